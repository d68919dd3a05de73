"""What the test files share that is not a fixture: status-code names, health checks, ports,
expected errors, a client for the stages a test started, and the pipeline run up to a stage.

conftest.py keeps the fixtures; test files import these from here (`from tests.helpers import ...`).
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlmesh.evaluator.v1 import evaluator_pb2
from mlmesh.features.v1 import features_pb2
from mlmesh.loader.v1 import loader_pb2
from mlmesh.preprocess.v1 import preprocess_pb2
from mlmesh.trainer.v1 import trainer_pb2
from services.cli.launcher import LocalMesh
from services.client.mesh import MeshClient, PipelineRun, StageCallError
from services.runtime.catalog import CATALOG, STAGES
from services.runtime.server import RunningStage
from services.runtime.settings import Settings

REPO = Path(__file__).resolve().parents[1]

# ---- status codes, by the names the tests use ------------------------------------------------
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
FAILED = grpc.StatusCode.FAILED_PRECONDITION
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
DATA_LOSS = grpc.StatusCode.DATA_LOSS
DENIED = grpc.StatusCode.PERMISSION_DENIED
LATE = grpc.StatusCode.DEADLINE_EXCEEDED

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# ---- health ------------------------------------------------------------------------------------
async def health_status(address: str, service: str = "", timeout: float = 2.0) -> int:
    """grpc.health.v1 Check over a plain channel (not the mesh client): the status number."""
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    return reply.status


async def assert_serving(stage: RunningStage) -> None:
    """The stage's server and its service both answer SERVING."""
    for service in ("", stage.spec.service_name):
        status = await health_status(stage.address, service)
        assert status == SERVING, (
            f"{stage.spec.name} {service!r}: {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
        )


# ---- errors ------------------------------------------------------------------------------------
async def expect_error(awaitable, code: grpc.StatusCode, *fragments: str) -> str:
    """Await a call that must fail with `code`; its message must contain every fragment."""
    with pytest.raises(StageCallError) as caught:
        await awaitable
    error = caught.value
    assert error.code == code, f"expected {code.name}, got {error.code.name}: {error.details}"
    for fragment in fragments:
        assert fragment in error.details, f"{fragment!r} not in {error.details!r}"
    return error.details


async def logged_rpc_line(caplog: pytest.LogCaptureFixture, path: str, seconds: float = 5.0) -> str:
    """The access-log line the server wrote for `path`, waiting for it. A stage that aborts sends the
    status first and logs after, so a client in the same event loop can see the error before the line.
    The caller keeps mlmesh.rpc at INFO (caplog.set_level) until this returns."""
    deadline = time.monotonic() + seconds
    while True:
        for record in caplog.records:
            message = record.getMessage()
            if record.name == "mlmesh.rpc" and f"method={path} " in message:
                return message
        if time.monotonic() > deadline:
            raise AssertionError(f"no access-log line for {path} within {seconds:.0f} s")
        await asyncio.sleep(0.02)


# ---- starting fewer stages ---------------------------------------------------------------------
def each_stage(*names: str) -> list:
    """Stage names (all five unless given) as parametrize values, each marked to start only that
    stage: for a test, parametrized by stage, that calls nothing but the stage it is given."""
    return [pytest.param(name, marks=pytest.mark.stages(name)) for name in names or STAGES]


def each_method() -> list:
    """(stage, method, server_streaming) for every RPC of every stage's service, read from the
    generated descriptors of the catalog (services/runtime/catalog.py), each marked to start only
    its stage: a new stage or RPC is covered by the tests that use this without a table to edit."""
    return [
        pytest.param(entry.name, method.name, method.server_streaming, marks=pytest.mark.stages(entry.name))
        for entry in CATALOG
        for method in entry.pb2().DESCRIPTOR.services_by_name[entry.service].methods
    ]


def raw_call(channel: grpc.aio.Channel, path: str, server_streaming: bool, body: bytes, timeout: float = 10):
    """An awaitable that sends `body` as the request of the RPC at `path`, bytes as they are (no
    serializer, no client-side size check), and reads every reply."""

    async def call() -> list[bytes]:
        if not server_streaming:
            return [
                await channel.unary_unary(path, request_serializer=None, response_deserializer=None)(
                    body, timeout=timeout
                )
            ]
        stream = channel.unary_stream(path, request_serializer=None, response_deserializer=None)(body, timeout=timeout)
        return [reply async for reply in stream]

    return call()


# ---- a client for the stages a test started ----------------------------------------------------
class StageNotStarted(LookupError):
    """A test called a stage its mesh did not start."""


class StartedStagesClient(MeshClient):
    """A MeshClient that reaches only the stages a test started. A call to any other stage fails
    at once with StageNotStarted, instead of trying the stage's default address (where nothing,
    or a developer's own mesh, listens) until the reconnect deadline."""

    def __init__(self, settings: Settings, stages: Mapping[str, RunningStage], **kwargs: Any):
        super().__init__(settings, addresses={name: stage.address for name, stage in stages.items()}, **kwargs)
        self.started = tuple(stages)

    def channel(self, stage: str) -> grpc.aio.Channel:
        if stage not in self.started:
            raise StageNotStarted(
                f"this test called the {stage} stage, but its mesh started only {', '.join(self.started) or 'none'}; "
                f"add {stage!r} to the test's @pytest.mark.stages(...)"
            )
        return super().channel(stage)


def start_loader_process(
    artifact_root: Path, grace_seconds: float = 1.0, stdout: int = subprocess.PIPE
) -> tuple[subprocess.Popen, int]:
    """`python -m services.loader`, as the images run it, on free gRPC and metrics ports, once its
    service answers SERVING. Its output goes to `stdout` (a pipe, as text, unless told otherwise).
    Returns the process and its gRPC port; the caller stops it."""
    port, metrics_port = free_ports(2)
    env = {
        **os.environ,
        "MLMESH_LOADER_PORT": str(port),
        "MLMESH_LOADER_METRICS_PORT": str(metrics_port),  # never the default 9451 a local mesh may hold
        "MLMESH_ARTIFACT_ROOT": str(artifact_root),
        "MLMESH_GRACE_SECONDS": str(grace_seconds),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "services.loader"],
        cwd=REPO,
        env=env,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    status = None
    while status != SERVING:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            raise AssertionError(f"the loader exited with {process.returncode} before serving:\n{output}")
        assert time.monotonic() < deadline, "the loader never reported SERVING"
        try:
            status = asyncio.run(health_status(f"127.0.0.1:{port}", "mlmesh.loader.v1.LoaderService", timeout=1))
        except grpc.aio.AioRpcError:
            time.sleep(0.05)
    return process, port


# ---- shell blocks from the docs -----------------------------------------------------------------
def run_script(
    script: str, cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`script` (a shell block from the docs) run as written by `bash -euo pipefail` in `cwd`; it must
    exit 0. Returns the finished process, its output as text."""
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"{script}\n--- exit {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


# ---- ports -------------------------------------------------------------------------------------
def free_ports(count: int) -> list[int]:
    """`count` distinct ports the kernel just handed out as free (closed again before returning)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def worker_port_range(start: int = 20000, stop: int = 32000) -> range:
    """This test worker's share of [start, stop): pytest-xdist runs one session per worker
    (PYTEST_XDIST_WORKER=gw0, gw1, ...), and two workers must never choose the same port."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker) if worker.isdigit() else 0
    share = (stop - start) // max(count, 1)
    return range(start + index * share, start + (index + 1) * share)


def quiet_ports(count: int) -> list[int]:
    """Free ports below the kernel's ephemeral range (32768 and up), so no client connection of
    the session takes one while a stage is not listening on it; from this test worker's share."""
    chosen: list[int] = []
    candidates = worker_port_range()
    for port in random.sample(candidates, min(200, len(candidates))):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        chosen.append(port)
        if len(chosen) == count:
            return chosen
    raise RuntimeError("no free ports between 20000 and 32000")


def use_free_ports(env: dict[str, str]) -> dict[str, int]:
    """Point `env` at a mesh of its own: free gRPC and metrics ports for every stage (so it never
    collides with another mesh a test holds open), and clients at those ports. Returns the gRPC ports."""
    ports = dict(zip(STAGES, free_ports(len(STAGES)), strict=True))
    for (stage, port), metrics_port in zip(ports.items(), quiet_ports(len(STAGES)), strict=True):
        env[f"MLMESH_{stage.upper()}_PORT"] = str(port)
        env[f"MLMESH_{stage.upper()}_METRICS_PORT"] = str(metrics_port)
        env.pop(f"MLMESH_{stage.upper()}_ADDRESS", None)
    return ports


def start_local_mesh(base: Path, extra_env: Mapping[str, str] | None = None) -> tuple[LocalMesh, dict[str, str]]:
    """`mlmesh up`'s LocalMesh on free ports, with a private artifact store, HOME and TMPDIR, and the
    environment that points the CLI and pyflyte at it (with `extra_env` on top, for the stages and
    clients alike). Stage logs go to base/logs."""
    env = {
        **os.environ,
        **(extra_env or {}),
        "MLMESH_ARTIFACT_ROOT": str(base / "artifacts"),
        "MLMESH_GRACE_SECONDS": "1",
        "HOME": str(base / "home"),  # Flyte's local cache lives under ~/.flyte
        "TMPDIR": str(base / "tmp"),  # Flyte writes decks under the temp folder
    }
    for folder in ("home", "tmp"):
        (base / folder).mkdir()
    use_free_ports(env)
    mesh = LocalMesh(Settings.from_env(env), env=env, log_dir=base / "logs")
    asyncio.run(mesh.start())
    return mesh, env


# ---- the pipeline, run up to a stage -----------------------------------------------------------
# Each helper calls the stages before it through the client, as the workflow does, so a test of one
# stage gets real upstream artifacts. Which stages run: load (loader), prepare (+ preprocess),
# features_for (+ features), upstream (+ trainer).
async def load(client: MeshClient, source: str = "sklearn:iris", target: str = "", **fields: Any):
    return await client.load(loader_pb2.LoadRequest(source=source, target_column=target, **fields))


async def prepare(
    client: MeshClient, source: str = "sklearn:iris", *, target: str = "", **fields: Any
) -> preprocess_pb2.PreprocessResponse:
    """load, then preprocess with `fields` (seed, test_fraction, ...)."""
    loaded = await load(client, source, target)
    return await client.preprocess(preprocess_pb2.PreprocessRequest(dataset=loaded.dataset, **fields))


async def features_for(
    client: MeshClient,
    source: str = "sklearn:iris",
    *,
    target: str = "",
    seed: int = 0,
    test_fraction: float = 0.0,
    **fields: Any,
) -> features_pb2.BuildFeaturesResponse:
    """load, preprocess (`seed`, `test_fraction`; 0 means the default 0.2), then build features with `fields`."""
    prepared = await prepare(client, source, target=target, seed=seed, test_fraction=test_fraction)
    return await client.build_features(
        features_pb2.BuildFeaturesRequest(train=prepared.train, test=prepared.test, **fields)
    )


@dataclass
class Upstream:
    """Every stage's reply up to the trainer: what the evaluator, or a repeat of any stage, needs."""

    loaded: loader_pb2.LoadResponse
    prepared: preprocess_pb2.PreprocessResponse
    features: features_pb2.BuildFeaturesResponse
    trained: trainer_pb2.TrainResponse


async def upstream(
    client: MeshClient, source: str = "sklearn:iris", model: str = "logistic_regression", target: str = ""
) -> Upstream:
    """load, preprocess, build features and train `model`, keeping each reply."""
    loaded = await load(client, source, target)
    prepared = await client.preprocess(preprocess_pb2.PreprocessRequest(dataset=loaded.dataset))
    features = await client.build_features(features_pb2.BuildFeaturesRequest(train=prepared.train, test=prepared.test))
    trained = await client.train(
        trainer_pb2.TrainRequest(x_train=features.x_train, y_train=features.y_train, model=model)
    )
    return Upstream(loaded, prepared, features, trained)


def evaluate_request(run: PipelineRun, **fields: Any) -> evaluator_pb2.EvaluateRequest:
    """An EvaluateRequest for a pipeline run's model and test split; `fields` add to or replace them."""
    return evaluator_pb2.EvaluateRequest(
        **{
            "model": run.train.model,
            "x_test": run.features.x_test,
            "y_test": run.features.y_test,
            "class_names": run.preprocess.class_names,
            **fields,
        }
    )
