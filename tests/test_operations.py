"""Fits as long-running operations: follow, cancel, outlive deadlines, survive kills, resume from checkpoints.

The in-process tests drive the trainer over real gRPC on a free port; the
process tests run `mlmesh up`, kill the real trainer process, and use the
real CLI and grpcurl.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from google.longrunning import operations_grpc_pb2, operations_proto_pb2

from mlmesh.features.v1 import features_pb2
from mlmesh.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.client.mesh import MeshClient
from services.runtime.catalog import STAGES
from services.runtime.server import RunningStage, stage_spec, start_stage
from services.runtime.settings import Settings
from services.runtime.store import ArtifactStore
from services.trainer import logic as trainer_logic
from tests.helpers import INVALID, NOT_FOUND, StartedStagesClient, features_for
from tests.test_mesh_processes import GRPCURL, UpProcess, json_objects, mlmesh, on_new_ports, stage_pid

FOREST = {"n_estimators": "60"}


def forest_data(rows: int = 4000) -> str:
    """The table the fits here learn: large enough that a forest fit takes a moment."""
    return f"synthetic:classification?rows={rows}&features=12"


def forest_request(
    features: features_pb2.BuildFeaturesResponse, trees: int = 60, force: bool = False
) -> trainer_pb2.TrainRequest:
    return trainer_pb2.TrainRequest(
        x_train=features.x_train,
        y_train=features.y_train,
        model="random_forest",
        hyperparameters={"n_estimators": str(trees)},
        seed=7,
        force_recompute=force,
    )


def checkpoint_folders(artifact_root: Path) -> list[Path]:
    return (
        sorted((artifact_root / "checkpoints" / "trainer").glob("*"))
        if (artifact_root / "checkpoints").exists()
        else []
    )


# ---- in process: one mesh with short idle time and frequent checkpoints ----------------------
@pytest_asyncio.fixture
async def quick_mesh(settings: Settings) -> AsyncIterator[tuple[dict[str, RunningStage], Settings]]:
    tuned = dataclasses.replace(settings, operation_idle_seconds=1.0, checkpoint_seconds=0.0)
    # The fits here need the stages up to the trainer; the evaluator is never called.
    stages = {name: await start_stage(stage_spec(name), tuned, port=0) for name in STAGES[:4]}
    try:
        yield stages, dataclasses.replace(tuned, addresses={n: s.address for n, s in stages.items()})
    finally:
        for stage in stages.values():
            await stage.stop(None)


@pytest.fixture
def slow_steps(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Each forest step waits a little (until released), so a fit is long enough to act on."""
    release = threading.Event()
    real_fit = trainer_logic._fit_in_steps

    def slow(estimator, counter, x, y, run, checkpoints):
        real_progress = run.report

        def report(progress):
            real_progress(progress)
            if progress.step < progress.total_steps:
                release.wait(0.05)

        run.report = report
        return real_fit(estimator, counter, x, y, run, checkpoints)

    monkeypatch.setattr(trainer_logic, "_fit_in_steps", slow)
    return release


@pytest.mark.asyncio
@pytest.mark.stages("loader", "preprocess", "features", "trainer")
async def test_start_returns_at_once_and_wait_operation_returns_the_result(
    client: MeshClient, mesh: dict[str, RunningStage], artifact_root: Path
) -> None:
    features = await features_for(client, forest_data(), seed=1)
    async with grpc.aio.insecure_channel(mesh["trainer"].address) as channel:
        trainer = trainer_pb2_grpc.TrainerServiceStub(channel)
        operations = operations_grpc_pb2.OperationsStub(channel)
        operation = await trainer.StartTraining(forest_request(features), timeout=10)
        assert not operation.done  # it answered without waiting for the fit
        assert operation.name.startswith("operations/train-")
        # The same request joins the same operation.
        again = await trainer.StartTraining(forest_request(features), timeout=10)
        assert again.name == operation.name
        listed = await operations.ListOperations(
            operations_proto_pb2.ListOperationsRequest(filter="done=false"), timeout=5
        )
        assert [op.name for op in listed.operations] == [operation.name]
        while not operation.done:
            request = operations_proto_pb2.WaitOperationRequest(name=operation.name)
            request.timeout.FromSeconds(5)
            operation = await operations.WaitOperation(request, timeout=10)
        assert not operation.HasField("error")
        result = trainer_pb2.TrainResult()
        assert operation.response.Unpack(result)
        progress = trainer_pb2.TrainProgress()
        assert operation.metadata.Unpack(progress) and progress.fraction_done == 1.0
        assert ArtifactStore(str(artifact_root)).get(result.model)
        # The model is stored: its checkpoints are garbage and were collected.
        assert checkpoint_folders(artifact_root) == []
        # Asked again, a finished fit is a done operation at once (the memo answers).
        repeated = await trainer.StartTraining(forest_request(features), timeout=10)
        remembered = trainer_pb2.TrainResult()
        assert repeated.done and repeated.response.Unpack(remembered)
        assert remembered.model == result.model and remembered.stage.cache_hit and not result.stage.cache_hit


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("name", "code", "fragment"),
    [
        ("", INVALID, "malformed"),
        ("operations/train-xyz", INVALID, "malformed"),
        ("operations/train-" + "a" * 5000, INVALID, "malformed"),
        ("operations/train-" + "0" * 64, NOT_FOUND, "send the same request again"),
    ],
)
@pytest.mark.stages("trainer")
async def test_bad_and_unknown_operation_names(mesh: dict[str, RunningStage], name: str, code, fragment: str) -> None:
    async with grpc.aio.insecure_channel(mesh["trainer"].address) as channel:
        operations = operations_grpc_pb2.OperationsStub(channel)
        for call in (
            operations.GetOperation(operations_proto_pb2.GetOperationRequest(name=name), timeout=5),
            operations.CancelOperation(operations_proto_pb2.CancelOperationRequest(name=name), timeout=5),
            operations.WaitOperation(operations_proto_pb2.WaitOperationRequest(name=name), timeout=5),
            operations.DeleteOperation(operations_proto_pb2.DeleteOperationRequest(name=name), timeout=5),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == code and fragment in caught.value.details()
            assert len(caught.value.details().encode()) <= 1024
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await operations.ListOperations(operations_proto_pb2.ListOperationsRequest(filter="name=x"), timeout=5)
        assert caught.value.code() == INVALID and "filter" in caught.value.details()


@pytest.mark.asyncio
async def test_cancel_operation_stops_the_fit_and_the_same_request_resumes_from_its_checkpoint(
    quick_mesh, slow_steps: threading.Event, artifact_root: Path
) -> None:
    stages, settings = quick_mesh
    async with StartedStagesClient(settings, stages) as client:
        features = await features_for(client, forest_data(), seed=1)
        async with grpc.aio.insecure_channel(stages["trainer"].address) as channel:
            trainer = trainer_pb2_grpc.TrainerServiceStub(channel)
            operations = operations_grpc_pb2.OperationsStub(channel)
            operation = await trainer.StartTraining(forest_request(features), timeout=10)
            progress = trainer_pb2.TrainProgress()
            while progress.step < 10:
                operation = await operations.GetOperation(
                    operations_proto_pb2.GetOperationRequest(name=operation.name), timeout=5
                )
                operation.metadata.Unpack(progress)
                await asyncio.sleep(0.05)
            await operations.CancelOperation(
                operations_proto_pb2.CancelOperationRequest(name=operation.name), timeout=5
            )
            while not operation.done:
                operation = await operations.GetOperation(
                    operations_proto_pb2.GetOperationRequest(name=operation.name), timeout=5
                )
                await asyncio.sleep(0.05)
            assert operation.error.code == grpc.StatusCode.CANCELLED.value[0]
            assert len(checkpoint_folders(artifact_root)) == 1, "the cancelled fit kept no checkpoint"

        slow_steps.set()
        events: list[trainer_pb2.TrainProgress] = []
        resumed = await client.train(forest_request(features), on_progress=events.append)
        assert events[0].resumed_from_step >= 10 and events[0].step == events[0].resumed_from_step
        uninterrupted = await client.train(forest_request(features, force=True))
        assert resumed.model == uninterrupted.model, "a resumed fit must store the very bytes of an uninterrupted one"
        assert checkpoint_folders(artifact_root) == []


@pytest.mark.asyncio
async def test_a_fit_nobody_asks_about_is_stopped_after_the_idle_time(
    quick_mesh, slow_steps: threading.Event, artifact_root: Path
) -> None:
    stages, settings = quick_mesh
    runtime = stages["trainer"].runtime
    async with StartedStagesClient(settings, stages) as client:
        features = await features_for(client, forest_data(), seed=1)
        async with grpc.aio.insecure_channel(stages["trainer"].address) as channel:
            operation = await trainer_pb2_grpc.TrainerServiceStub(channel).StartTraining(
                forest_request(features, trees=400), timeout=10
            )
            # Nobody asks for 1 s (MLMESH_OPERATION_IDLE_SECONDS in this mesh): the fit stops.
            deadline = time.monotonic() + 20
            while runtime.operations.in_flight() or runtime._flights:
                assert time.monotonic() < deadline, "an unwatched fit kept running past its idle time"
                await asyncio.sleep(0.1)
            done = await operations_grpc_pb2.OperationsStub(channel).GetOperation(
                operations_proto_pb2.GetOperationRequest(name=operation.name), timeout=5
            )
        assert done.done and done.error.code == grpc.StatusCode.CANCELLED.value[0]
        assert "MLMESH_OPERATION_IDLE_SECONDS" in done.error.message


# ---- real processes: `mlmesh up`, SIGKILL and SIGTERM of the trainer, the CLI, grpcurl --------
@pytest.fixture
def up(tmp_path: Path) -> UpProcess:
    env = on_new_ports(
        {
            **os.environ,
            "MLMESH_ARTIFACT_ROOT": str(tmp_path / "artifacts"),
            "MLMESH_GRACE_SECONDS": "5",
            "MLMESH_CHECKPOINT_SECONDS": "0.5",
        }
    )
    process = UpProcess(env, {s: int(env[f"MLMESH_{s.upper()}_PORT"]) for s in STAGES})
    process.wait_for("mesh is up")
    yield process
    process.stop()


def _client_settings(up: UpProcess) -> Settings:
    return Settings.from_env(up.env)


async def _kill_mid_fit(
    up: UpProcess, how: signal.Signals
) -> tuple[trainer_pb2.TrainResult, list[trainer_pb2.TrainProgress], int, float]:
    """Train a forest, hit the trainer with `how` once a checkpoint past 40% exists, and follow the fit to the end."""
    artifact_root = Path(up.env["MLMESH_ARTIFACT_ROOT"])
    async with MeshClient(_client_settings(up)) as client:
        features = await features_for(client, forest_data(20000), seed=1)
        request = forest_request(features, trees=80)
        events: list[trainer_pb2.TrainProgress] = []
        hit = asyncio.Event()
        saved_step = 0

        def watch(progress: trainer_pb2.TrainProgress) -> None:
            nonlocal saved_step
            events.append(progress)
            if hit.is_set() or progress.fraction_done < 0.4:
                return
            for pointer in (artifact_root / "checkpoints" / "trainer").glob("*/state.json"):
                saved_step = json.loads(pointer.read_text())["step"]
                hit.set()

        training = asyncio.ensure_future(client.train(request, on_progress=watch))
        await asyncio.wait_for(hit.wait(), 120)
        victim = stage_pid(up, "trainer")
        os.kill(victim, how)
        killed_at = time.monotonic()
        result = await asyncio.wait_for(training, 180)
        return result, events, saved_step, killed_at


@pytest.mark.asyncio
@pytest.mark.slow  # `mlmesh up` child processes
async def test_a_sigkilled_trainer_resumes_from_its_checkpoint_to_the_identical_model(up: UpProcess) -> None:
    result, events, saved_step, _ = await _kill_mid_fit(up, signal.SIGKILL)
    up.wait_for("trainer exited with status -9")
    resumed = [e.resumed_from_step for e in events if e.resumed_from_step]
    assert resumed and resumed[0] >= saved_step > 0, (saved_step, resumed[:3])
    async with MeshClient(_client_settings(up)) as client:
        features = await features_for(client, forest_data(20000), seed=1)
        uninterrupted = await client.train(forest_request(features, trees=80, force=True))
    assert result.model == uninterrupted.model, "the resumed model differs from an uninterrupted fit"
    assert checkpoint_folders(Path(up.env["MLMESH_ARTIFACT_ROOT"])) == []


@pytest.mark.asyncio
@pytest.mark.slow  # `mlmesh up` child processes
async def test_sigterm_checkpoints_before_exit_and_the_next_trainer_resumes(up: UpProcess) -> None:
    result, events, saved_step, _ = await _kill_mid_fit(up, signal.SIGTERM)
    up.wait_for("trainer exited with status 0")  # within its grace period, checkpoint written
    resumed = [e.resumed_from_step for e in events if e.resumed_from_step]
    # On SIGTERM the trainer saves at its next step, later than the periodic checkpoint the test saw.
    assert resumed and resumed[0] > saved_step, (saved_step, resumed[:3])
    assert ArtifactStore(up.env["MLMESH_ARTIFACT_ROOT"]).get(result.model)


@pytest.mark.slow  # `mlmesh up` child processes
def test_a_fit_longer_than_the_client_deadline_completes_by_reattaching(up: UpProcess, tmp_path: Path) -> None:
    # Each call may take at most 5 s: enough for the other stages on a busy 2-core machine,
    # while the forest's fit takes several times that.
    env = {**up.env, "MLMESH_RPC_TIMEOUT_SECONDS": "5"}
    started = time.monotonic()
    run = mlmesh(
        env,
        "run",
        "--json",
        "--source",
        "synthetic:classification?rows=20000&features=12",
        "--model",
        "random_forest",
        "--hp",
        "n_estimators=400",
        timeout=300,
    )
    elapsed = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert elapsed > 10, f"the fit took {elapsed:.1f}s: too short to outlive a 5 s deadline"
    assert json.loads(run.stdout)["decision"]


@pytest.mark.slow  # `mlmesh up` child processes
def test_status_shows_a_running_fit(up: UpProcess) -> None:
    async def start() -> str:
        async with MeshClient(_client_settings(up)) as client:
            features = await features_for(client, forest_data(20000), seed=1)
            async with grpc.aio.insecure_channel(client.addresses["trainer"]) as channel:
                operation = await trainer_pb2_grpc.TrainerServiceStub(channel).StartTraining(
                    forest_request(features, trees=400), timeout=10
                )
                return operation.name

    name = asyncio.run(start())
    status = mlmesh(up.env, "status")
    assert status.returncode == 0, status.stdout
    assert f"running {name}" in status.stdout, status.stdout
    cancel = subprocess.run(
        [
            str(GRPCURL),
            "-plaintext",
            "-d",
            json.dumps({"name": name}),
            f"localhost:{up.ports['trainer']}",
            "google.longrunning.Operations/CancelOperation",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cancel.returncode == 0, cancel.stderr


@pytest.mark.slow  # `mlmesh up` child processes
def test_grpcurl_starts_follows_and_reads_a_fit(up: UpProcess) -> None:
    async def features() -> features_pb2.BuildFeaturesResponse:
        async with MeshClient(_client_settings(up)) as client:
            return await features_for(client, forest_data(), seed=1)

    built = asyncio.run(features())
    trainer = f"localhost:{up.ports['trainer']}"
    body = json.dumps(
        {
            "x_train": {"uri": built.x_train.uri, "sha256": built.x_train.sha256},
            "y_train": {"uri": built.y_train.uri, "sha256": built.y_train.sha256},
            "model": "random_forest",
            "hyperparameters": FOREST,
        }
    )

    def grpcurl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(GRPCURL), "-plaintext", *args], capture_output=True, text=True, timeout=120)

    started = grpcurl("-d", body, trainer, "mlmesh.trainer.v1.TrainerService/StartTraining")
    assert started.returncode == 0, started.stderr
    [operation] = json_objects(started.stdout)
    assert operation["name"].startswith("operations/train-")
    wait = json.dumps({"name": operation["name"], "timeout": "30s"})
    for _ in range(10):
        waited = grpcurl("-d", wait, trainer, "google.longrunning.Operations/WaitOperation")
        assert waited.returncode == 0, waited.stderr
        [operation] = json_objects(waited.stdout)
        if operation.get("done"):
            break
    assert operation["done"] and operation["response"]["@type"] == "type.googleapis.com/mlmesh.trainer.v1.TrainResult"
    assert len(operation["response"]["model"]["sha256"]) == 64
    assert operation["metadata"]["fraction_done"] == 1
