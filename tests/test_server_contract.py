"""What every stage server promises, whatever its stage: health, reflection, shutdown,
error hygiene, message limits, responsiveness under load and SIGTERM handling."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
from google.longrunning import operations_grpc_pb2, operations_proto_pb2
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mlmesh.evaluator.v1 import evaluator_pb2
from mlmesh.features.v1 import features_pb2
from mlmesh.loader.v1 import loader_pb2, loader_pb2_grpc
from mlmesh.preprocess.v1 import preprocess_pb2
from mlmesh.serving.v2 import open_inference_pb2
from mlmesh.trainer.v1 import trainer_pb2
from services.client.mesh import MeshClient, PipelineConfig
from services.runtime.catalog import STAGES
from services.runtime.formats import NPY, array_to_npy, npy_to_array
from services.runtime.server import RunningStage, stage_spec, start_stage
from services.runtime.settings import Settings
from services.runtime.store import ArtifactStore
from tests.helpers import (
    NOT_SERVING,
    SERVING,
    Upstream,
    assert_serving,
    each_method,
    each_stage,
    expect_error,
    features_for,
    health_status,
    raw_call,
    start_loader_process,
    upstream,
)

REPO = Path(__file__).resolve().parents[1]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


# ---- health ---------------------------------------------------------------------------------
@pytest.mark.asyncio
@pytest.mark.parametrize("name", each_stage())
async def test_health_is_serving_for_server_and_service(mesh: dict[str, RunningStage], name: str) -> None:
    stage = mesh[name]
    # The serving stage speaks a standard protocol, whose service name its clients already call.
    expected = "inference.GRPCInferenceService" if name == "serving" else f"mlmesh.{name}.v1.{name.capitalize()}Service"
    assert stage.spec.service_name == expected
    await assert_serving(stage)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health_status(stage.address, "mlmesh.nope.v1.NopeService")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.asyncio
@pytest.mark.parametrize("name", STAGES)
async def test_health_is_not_serving_until_the_store_accepts_a_write(
    settings: Settings, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.runtime import server as server_module

    gate = threading.Event()

    def blocked_write(runtime) -> None:  # runs on a worker thread; the loop stays free
        assert gate.wait(timeout=10), "test never released the store check"

    monkeypatch.setattr(server_module, "_check_store_writable", blocked_write)
    # Bind a port we know, so health can be asked while start_stage is still waiting.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    starting = asyncio.ensure_future(start_stage(stage_spec(name), settings, port=port))
    try:
        address, service = f"127.0.0.1:{port}", stage_spec(name).service_name
        deadline = time.monotonic() + 10
        while True:
            try:
                statuses = {await health_status(address, s, timeout=1) for s in ("", service)}
                break
            except grpc.aio.AioRpcError:
                assert time.monotonic() < deadline, "server never came up"
                await asyncio.sleep(0.02)
        assert statuses == {NOT_SERVING}
        assert not starting.done()
    finally:
        gate.set()
        stage = await starting
    await assert_serving(stage)
    await stage.stop(0)


# ---- reflection -----------------------------------------------------------------------------
async def _reflect(
    address: str, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(iter([request]), timeout=5)
        responses = [response async for response in call]
    assert len(responses) == 1
    return responses[0]


@pytest.mark.asyncio
@pytest.mark.parametrize("name", each_stage())
async def test_reflection_lists_and_describes_the_stage(mesh: dict[str, RunningStage], name: str) -> None:
    stage = mesh[name]
    listed = await _reflect(stage.address, reflection_pb2.ServerReflectionRequest(list_services=""))
    services = {s.name for s in listed.list_services_response.service}
    # The trainer's fits are long-running operations, followed through google.longrunning.
    operations = {"google.longrunning.Operations"} if name == "trainer" else set()
    assert services == {
        stage.spec.service_name,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        *operations,
        # Every stage lets a caller follow its unary calls (services/runtime/watch.py).
        "mlmesh.common.v1.ProgressService",
    }

    described = await _reflect(
        stage.address, reflection_pb2.ServerReflectionRequest(file_containing_symbol=stage.spec.service_name)
    )
    protos = described.file_descriptor_response.file_descriptor_proto
    assert protos, described
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw) for raw in protos]
    declared = {f"{f.package}.{s.name}" for f in files for s in f.service}
    assert stage.spec.service_name in declared


# ---- graceful shutdown ---------------------------------------------------------------------
@pytest.mark.asyncio
@pytest.mark.parametrize("name", STAGES)
async def test_stop_reports_not_serving_then_the_server_is_gone(settings: Settings, name: str) -> None:
    stage = await start_stage(stage_spec(name), settings, port=0)
    seen: list[int] = []
    async with grpc.aio.insecure_channel(stage.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=stage.spec.service_name), timeout=10
        )
        seen.append((await watch.read()).status)
        stopping = asyncio.ensure_future(stage.stop(0.5))
        try:
            seen.append((await watch.read()).status)
        except grpc.aio.AioRpcError as error:
            seen.append(error.code())
        await stopping
    assert seen == [SERVING, NOT_SERVING], seen

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health_status(stage.address, timeout=1)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.asyncio
async def test_a_taken_port_is_a_clear_start_error(settings: Settings) -> None:
    first = await start_stage(stage_spec("loader"), settings, port=0)
    try:
        with pytest.raises(OSError, match=rf"cannot bind 127\.0\.0\.1:{first.port}.*MLMESH_LOADER_PORT"):
            await start_stage(stage_spec("loader"), settings, port=first.port)
        await assert_serving(first)
    finally:
        await first.stop(0)


# ---- error hygiene -------------------------------------------------------------------------
def _stage_call(client: MeshClient, stage: str, refs: Upstream):
    loaded, prepared, features, trained = refs.loaded, refs.prepared, refs.features, refs.trained
    if stage == "loader":
        return client.load(loader_pb2.LoadRequest(source="sklearn:iris", force_recompute=True))
    if stage == "preprocess":
        return client.preprocess(preprocess_pb2.PreprocessRequest(dataset=loaded.dataset, force_recompute=True))
    if stage == "features":
        return client.build_features(
            features_pb2.BuildFeaturesRequest(train=prepared.train, test=prepared.test, force_recompute=True)
        )
    if stage == "trainer":
        return client.train(
            trainer_pb2.TrainRequest(
                x_train=features.x_train, y_train=features.y_train, model="logistic_regression", force_recompute=True
            )
        )
    return client.evaluate(
        evaluator_pb2.EvaluateRequest(
            model=trained.model, x_test=features.x_test, y_test=features.y_test, force_recompute=True
        )
    )


# (stage, logic function to break): on the worker thread, and in the handler itself.
BROKEN = [
    ("loader", "load_dataset"),
    ("loader", "parse_source"),
    ("preprocess", "preprocess"),
    ("features", "engineer"),
    ("trainer", "fit"),
    ("trainer", "build_estimator"),
    ("evaluator", "evaluate"),
    ("evaluator", "check_threshold_names"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("name", "function"),
    # the upstream run needs the stages up to the trainer; the evaluator only for its own case
    [pytest.param(name, function, marks=pytest.mark.stages(*STAGES[:4], name)) for name, function in BROKEN],
)
async def test_unexpected_exception_is_internal_with_incident_and_no_detail(
    client: MeshClient,
    mesh: dict[str, RunningStage],
    name: str,
    function: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    refs = await upstream(client)
    logic = sys.modules[f"services.{name}.logic"]

    def broken(*args, **kwargs):
        raise RuntimeError("secret-internal-detail")

    monkeypatch.setattr(logic, function, broken)
    with caplog.at_level(logging.ERROR, logger="mlmesh.rpc"):
        details = await expect_error(_stage_call(client, name, refs), grpc.StatusCode.INTERNAL, "incident")
    assert "secret-internal-detail" not in details
    assert "RuntimeError" not in details and "Traceback" not in details and ".py" not in details
    incident = re.search(r"incident ([0-9a-f]{8})", details)
    assert incident, details
    assert mesh[name].spec.service_name in details

    # The traceback, with the secret, is in the service log under the same incident id.
    logged = [r for r in caplog.records if r.name == "mlmesh.rpc" and f"incident={incident.group(1)}" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert "secret-internal-detail" in str(logged[0].exc_info[1])

    # The server is fine afterwards: healthy, and the real code path works again.
    await assert_serving(mesh[name])
    monkeypatch.undo()
    response = await _stage_call(client, name, refs)
    assert response.stage.stage == name and not response.stage.cache_hit


def _bad_request(client: MeshClient, stage: str):
    if stage == "loader":
        return client.load(loader_pb2.LoadRequest(source="sklearn:nope")), "unknown sklearn dataset"
    if stage == "preprocess":
        return client.preprocess(preprocess_pb2.PreprocessRequest()), "dataset is required"
    if stage == "features":
        return client.build_features(features_pb2.BuildFeaturesRequest()), "train is required"
    if stage == "trainer":
        return client.train(trainer_pb2.TrainRequest(model="random_forest")), "x_train is required"
    if stage == "serving":
        request = open_inference_pb2.ModelInferRequest(model_name="no such/model")
        return client.infer(request), "model name"
    return client.evaluate(evaluator_pb2.EvaluateRequest()), "model is required"


@pytest.mark.asyncio
@pytest.mark.parametrize("name", each_stage())
async def test_bad_requests_are_invalid_argument_and_health_stays_serving(
    client: MeshClient, mesh: dict[str, RunningStage], name: str
) -> None:
    for _ in range(3):
        call, fragment = _bad_request(client, name)
        await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, fragment)
    await assert_serving(mesh[name])


# ---- message size ---------------------------------------------------------------------------
@pytest.mark.asyncio
@pytest.mark.parametrize(("name", "method", "server_streaming"), each_method())
async def test_request_over_the_message_limit_is_resource_exhausted(
    mesh: dict[str, RunningStage],
    settings: Settings,
    client: MeshClient,
    name: str,
    method: str,
    server_streaming: bool,
) -> None:
    stage = mesh[name]
    # The server refuses a message by its length before it decodes a byte, so the body's content
    # does not matter: field 1 as a string of just over the limit.
    size = settings.max_message_bytes + 1024
    body = b"\x0a" + _varint(size) + b"x" * size
    # A raw channel without the client's own send limit, so the server is what refuses.
    async with grpc.aio.insecure_channel(stage.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw_call(channel, f"/{stage.spec.service_name}/{method}", server_streaming, body)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value
    assert "larger than max" in (caught.value.details() or "")

    await assert_serving(stage)
    call, fragment = _bad_request(client, name)  # the stage still handles ordinary requests
    await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, fragment)


# ---- responsiveness under load -------------------------------------------------------------
@pytest.mark.asyncio
@pytest.mark.stages("loader", "preprocess", "features", "trainer")
async def test_health_answers_within_deadline_while_trainer_is_busy(
    client: MeshClient, mesh: dict[str, RunningStage]
) -> None:
    features = await features_for(client, "synthetic:classification?rows=20000&features=30")
    trainer = mesh["trainer"]
    training = asyncio.ensure_future(
        client.train(
            trainer_pb2.TrainRequest(
                x_train=features.x_train,
                y_train=features.y_train,
                model="random_forest",
                hyperparameters={"n_estimators": "300"},
            )
        )
    )
    try:
        # Wait until the fit is really running on a worker thread.
        deadline = time.monotonic() + 10
        while not trainer.runtime._flights:
            assert time.monotonic() < deadline and not training.done(), "training never started"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # past reading the inputs, into the forest

        latencies: list[float] = []
        async with grpc.aio.insecure_channel(trainer.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for i in range(20):
                service = "" if i % 2 else trainer.spec.service_name
                started = time.perf_counter()
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                latencies.append(time.perf_counter() - started)
                assert reply.status == SERVING
                await asyncio.sleep(0.02)
        report = (
            f"health latency under load over {len(latencies)} checks: "
            f"max={max(latencies) * 1000:.1f}ms mean={sum(latencies) / len(latencies) * 1000:.1f}ms"
        )
        print(report)
        assert not training.done(), f"training finished before the checks did, so there was no load; {report}"
        assert all(latency < 1.0 for latency in latencies), report
    finally:
        training.cancel()
        with pytest.raises(asyncio.CancelledError):
            await training
        # The caller leaving does not stop a fit (it is a long-running operation);
        # CancelOperation does, at the forest's next step.
        async with grpc.aio.insecure_channel(trainer.address) as channel:
            for operation in trainer.runtime.operations.in_flight():
                await operations_grpc_pb2.OperationsStub(channel).CancelOperation(
                    operations_proto_pb2.CancelOperationRequest(name=operation.name), timeout=5
                )
    deadline = time.monotonic() + 20
    while trainer.runtime._flights:
        assert time.monotonic() < deadline, "the cancelled fit kept running"
        await asyncio.sleep(0.05)


# ---- infinity: never an internal error -----------------------------------------------------
def _write_table(path: Path, frame: pd.DataFrame) -> str:
    frame.to_csv(path, index=False) if path.suffix == ".csv" else frame.to_parquet(path)
    return str(path)


@pytest.mark.asyncio
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
async def test_infinite_feature_and_target_values_run_through_the_pipeline(
    client: MeshClient, tmp_path: Path, suffix: str
) -> None:
    rng = np.random.RandomState(8)
    frame = pd.DataFrame({"a": rng.normal(size=80), "b": rng.normal(size=80)})
    frame["y"] = 3 * frame["a"] - frame["b"] + rng.normal(0, 0.1, 80)
    frame.loc[[2, 9, 30], "a"] = [np.inf, -np.inf, np.inf]
    frame.loc[[5, 44], "y"] = [np.inf, -np.inf]
    source = _write_table(tmp_path / f"inf{suffix}", frame)
    run = await client.run_pipeline(PipelineConfig(source=source, target_column="y", model="ridge"))
    assert list(run.load.warnings) == ["column 'a': 3 infinite value(s) treated as missing"]
    assert run.preprocess.invalid_target_rows_removed == 2 and run.preprocess.rows_out == 78
    assert run.features.missing_values_imputed == 3
    assert run.evaluate.metrics["r2"] > 0.5


@pytest.mark.asyncio
async def test_infinite_values_are_refused_with_their_own_codes(
    client: MeshClient, mesh, settings: Settings, tmp_path: Path
) -> None:
    failed, invalid = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT
    x = np.linspace(0, 1, 40)
    no_target = _write_table(tmp_path / "no_target.parquet", pd.DataFrame({"x": x, "y": [np.inf, -np.inf] * 20}))
    await expect_error(
        client.load(loader_pb2.LoadRequest(source=no_target, target_column="y")),
        failed,
        "target column 'y' has no finite values",
    )
    # Finite numbers whose range is beyond float64: loaded and profiled, refused when scaling overflows.
    huge = _write_table(tmp_path / "huge.parquet", pd.DataFrame({"x": [-1.5e308, 1.5e308] * 20, "y": x}))
    loaded = await client.load(loader_pb2.LoadRequest(source=huge, target_column="y"))
    prepared = await client.preprocess(preprocess_pb2.PreprocessRequest(dataset=loaded.dataset))
    await expect_error(
        client.build_features(features_pb2.BuildFeaturesRequest(train=prepared.train, test=prepared.test)),
        failed,
        "encoding the features overflowed: some numbers are too large (near 1e308) to scale or multiply",
    )
    await expect_error(
        client.preprocess(preprocess_pb2.PreprocessRequest(dataset=loaded.dataset, test_fraction=float("inf"))),
        invalid,
        "test_fraction must be between 0 and 1",
    )

    refs = await upstream(client)
    features = refs.features
    store = ArtifactStore(settings.artifact_root)
    x_train = npy_to_array(store.get(features.x_train), "x_train").copy()  # decoded arrays are read-only views
    x_train[0, 0] = np.inf
    await expect_error(
        client.train(
            trainer_pb2.TrainRequest(
                x_train=store.put(array_to_npy(x_train), NPY), y_train=features.y_train, model="logistic_regression"
            )
        ),
        failed,
        "x_train holds infinite values; pass the x_train the features stage returned",
    )
    # JSON's Infinity as a hyperparameter: scikit-learn's constraints decide.
    unregularized = await client.train(
        trainer_pb2.TrainRequest(
            x_train=features.x_train,
            y_train=features.y_train,
            model="logistic_regression",
            hyperparameters={"C": "Infinity"},
        )
    )
    assert unregularized.effective_hyperparameters["C"] == "Infinity"
    await expect_error(
        client.train(
            trainer_pb2.TrainRequest(
                x_train=features.x_train, y_train=features.y_train, model="sgd", hyperparameters={"alpha": "Infinity"}
            )
        ),
        invalid,
        "invalid hyperparameter for sgd: The 'alpha' parameter of SGDClassifier",
    )
    await expect_error(
        client.evaluate(
            evaluator_pb2.EvaluateRequest(
                model=refs.trained.model,
                x_test=features.x_test,
                y_test=features.y_test,
                maximums={"log_loss": float("inf")},
            )
        ),
        invalid,
        "maximums['log_loss'] must be a finite number",
    )
    for stage in mesh.values():
        await assert_serving(stage)


# ---- the process: SIGTERM ------------------------------------------------------------------
def stop_with_sigterm(process: subprocess.Popen) -> tuple[str, float]:
    process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    try:
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return output, time.monotonic() - started


def test_sigterm_drains_and_exits_zero(tmp_path: Path) -> None:
    process, port = start_loader_process(tmp_path / "artifacts")
    output, elapsed = stop_with_sigterm(process)
    assert process.returncode == 0, output
    assert elapsed < 5, f"took {elapsed:.1f}s to stop"
    assert f"serving mlmesh.loader.v1.LoaderService on 127.0.0.1:{port}" in output
    assert "loader stopping" in output and "loader stopped" in output, output
    assert "Traceback" not in output


@pytest.mark.slow  # a stage process, stopped mid-fit after its grace period
def test_sigterm_ends_a_stage_whose_worker_is_busy_within_its_grace_period(tmp_path: Path) -> None:
    process, port = start_loader_process(tmp_path / "artifacts")
    source = "synthetic:classification?rows=1000000&features=40&seed=5"  # about 10 s of loading

    def load() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, contextlib.suppress(grpc.RpcError):
            loader_pb2_grpc.LoaderServiceStub(channel).Load(loader_pb2.LoadRequest(source=source), timeout=60)

    caller = threading.Thread(target=load, daemon=True)
    caller.start()
    time.sleep(1.5)  # the load is on a worker thread now
    output, elapsed = stop_with_sigterm(process)
    # Grace (1 s) to drain, then the process leaves without joining the busy worker.
    assert elapsed < 5, f"took {elapsed:.1f}s to stop with a busy worker:\n{output}"
    assert process.returncode == 0, output
    assert "loader stopped" in output
    assert not list((tmp_path / "artifacts").glob("memo/loader/*.json")), "the load finished; it was not busy"
    caller.join(timeout=10)


@pytest.mark.asyncio
async def test_garbage_in_the_table_fields_gets_an_honest_code(client: MeshClient, mesh, tmp_path: Path) -> None:
    """Random values in every field issue 8 added: never INTERNAL, UNAVAILABLE or UNKNOWN, and bounded messages."""
    from services.client.mesh import StageCallError, features_request, load_request, preprocess_request

    rng = np.random.RandomState(12)
    table = tmp_path / "table.csv"
    pd.DataFrame(
        {
            "city": rng.choice(["a", "b", "c"], 80),
            "size": rng.normal(size=80),
            "when": pd.date_range("2024-01-01", periods=80).astype(str),
            "y": rng.randint(0, 2, 80),
        }
    ).to_csv(table, index=False)
    config = PipelineConfig(source=str(table), target_column="y")
    loaded = await client.load(load_request(config))
    prepared = await client.preprocess(preprocess_request(config, loaded.dataset))
    features = await client.build_features(features_request(config, prepared.train, prepared.test))
    refs = [
        loaded.dataset,
        loaded.schema,
        loaded.profile,
        prepared.train,
        prepared.test,
        prepared.split_report,
        features.x_train,
        features.y_train,
        features.transformer,
        features.feature_schema,
    ]
    words = ["", "city", "size", "when", "y", "nope", "\x00", "é" * 50, "x" * 2000]

    def garbage_int() -> int:
        return int(rng.choice([-(2**31), -1, 0, 1, 2, 3, 4, 8, 9, 255, 1000, 2**31 - 1]))

    calls = []
    for _ in range(20):
        roles = {str(rng.choice(words)): garbage_int() for _ in range(rng.randint(0, 4))}
        calls.append(
            client.load(
                loader_pb2.LoadRequest(
                    source=str(table),
                    target_column=str(rng.choice(words)),
                    task_kind=garbage_int() % 5,
                    column_roles=roles,
                )
            )
        )
        request = features_pb2.BuildFeaturesRequest(
            train=refs[rng.randint(len(refs))],
            test=refs[rng.randint(len(refs))],
            scaling=garbage_int(),
            numeric_imputation=garbage_int(),
            categorical_encoding=garbage_int(),
            max_one_hot_levels=garbage_int(),
            min_level_count=garbage_int(),
            polynomial_degree=garbage_int() % 6,
            select_k_best=garbage_int(),
            missing_indicators=bool(rng.randint(2)),
            seed=garbage_int(),
        )
        calls.append(client.build_features(request))
        calls.append(
            client.preprocess(
                preprocess_pb2.PreprocessRequest(
                    dataset=refs[rng.randint(len(refs))],
                    drop_duplicate_rows=bool(rng.randint(2)),
                    drop_incomplete_rows=bool(rng.randint(2)),
                    seed=garbage_int(),
                )
            )
        )
        calls.append(
            client.train(
                trainer_pb2.TrainRequest(
                    x_train=features.x_train,
                    y_train=features.y_train,
                    feature_schema=refs[rng.randint(len(refs))],
                    model=str(rng.choice(["", "ridge", "hist_gradient_boosting", "nope"])),
                )
            )
        )
    honest = {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, StageCallError)]
    assert all(not isinstance(o, Exception) or isinstance(o, StageCallError) for o in outcomes), outcomes
    assert refused, "random garbage was never refused"
    for error in refused:
        assert error.code in honest, f"{error.code.name}: {error.details}"
        assert len(error.details) < 1500 and "x" * 1100 not in error.details
    for stage in mesh.values():
        await assert_serving(stage)


@pytest.mark.asyncio
async def test_a_stage_at_its_call_limit_refuses_calls_but_always_answers_health(settings: Settings) -> None:
    import dataclasses

    limited = dataclasses.replace(settings, max_concurrent_rpcs=1)
    stage = await start_stage(stage_spec("loader"), limited, port=0)
    try:
        async with grpc.aio.insecure_channel(stage.address) as channel:
            loader = loader_pb2_grpc.LoaderServiceStub(channel)
            busy = asyncio.ensure_future(
                loader.Load(
                    loader_pb2.LoadRequest(source="synthetic:classification?rows=300000&features=20&seed=9"), timeout=60
                )
            )
            await asyncio.sleep(0.5)  # the first call holds the only slot
            assert not busy.done()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await loader.Load(loader_pb2.LoadRequest(source="sklearn:iris"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "MLMESH_MAX_CONCURRENT_RPCS" in refused.value.details()
            for _ in range(5):  # health is never counted against the limit
                started = time.perf_counter()
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="mlmesh.loader.v1.LoaderService"), timeout=2
                )
                assert reply.status == SERVING and time.perf_counter() - started < 1
            assert (await busy).rows == 300000
            # The slot is free again.
            assert (await loader.Load(loader_pb2.LoadRequest(source="sklearn:iris"), timeout=30)).rows == 150
    finally:
        await stage.stop(0.5)
