"""Metrics, traces and logs, through the real entry points.

- a stage's /metrics over HTTP, read the way Prometheus reads it, after real gRPC calls
  that succeed, fail, are cancelled, time out, are refused and hit corrupt artifacts;
- `mlmesh up` with JSON logs and tracing to a local OTLP receiver: `pyflyte run` and
  `mlmesh run` each make one trace over the five stages, every log line parses;
- a real Prometheus (Debian's package) scraping that mesh, asked with PromQL;
- docs/observability.md's commands, as written.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from mlmesh.common.v1.common_pb2 import ArtifactRef
from mlmesh.loader.v1 import loader_pb2, loader_pb2_grpc
from mlmesh.preprocess.v1 import preprocess_pb2, preprocess_pb2_grpc
from services.runtime import tracing
from services.runtime.catalog import PIPELINE_STAGES, STAGES
from services.runtime.logs import json_formatter
from services.runtime.server import RunningStage, stage_spec, start_stage
from services.runtime.settings import DEFAULT_METRICS_PORTS, Settings
from tests.helpers import free_ports, run_script, use_free_ports
from tests.otlp_receiver import OtlpReceiver
from tests.test_mesh_processes import UpProcess

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
LOAD = "/mlmesh.loader.v1.LoaderService/Load"
SLOW_SOURCE = "synthetic:classification?rows=300000&features=20&seed=9"


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics page, keyed by name and labels."""
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


async def scrape_until(url: str, settled: Callable[[dict[tuple[str, frozenset], float]], bool], timeout: float = 10):
    """A scrape once `settled(samples)` holds (or the last one after `timeout`). A stage counts a
    failed call after its status has left, so a client can see the error before the counter moves;
    more so on a loaded machine."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if settled(samples) or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.05)


def handled(samples: dict, method: str, code: str) -> float:
    service, _, name = method.lstrip("/").rpartition("/")
    return value(samples, "grpc_server_handled_total", grpc_service=service, grpc_method=name, grpc_code=code)


# ---- one stage in this process, its /metrics over HTTP ------------------------------------
@pytest.fixture
def settings(settings: Settings) -> Settings:
    """conftest.py's settings with /metrics served over HTTP, which this module reads."""
    return dataclasses.replace(settings, metrics=True)


@pytest_asyncio.fixture
async def loader(settings: Settings) -> AsyncIterator[RunningStage]:
    limited = dataclasses.replace(settings, max_concurrent_rpcs=2, worker_threads=1)
    stage = await start_stage(stage_spec("loader"), limited, port=0)
    try:
        yield stage
    finally:
        await stage.stop(0.5)


@pytest.mark.asyncio
async def test_every_outcome_is_counted_with_its_real_code(
    loader: RunningStage, caplog: pytest.LogCaptureFixture
) -> None:
    assert loader.metrics_url
    before = scrape(loader.metrics_url)
    assert value(before, "mlmesh_build_info", stage="loader", stage_version=loader.spec.version) == 1
    assert value(before, "mlmesh_max_concurrent_rpcs") == 2
    assert handled(before, LOAD, "OK") == 0  # declared before the first call
    with caplog.at_level(logging.INFO, logger="mlmesh.rpc"):
        async with grpc.aio.insecure_channel(loader.address) as channel:
            stub = loader_pb2_grpc.LoaderServiceStub(channel)
            await stub.Load(loader_pb2.LoadRequest(source="sklearn:iris"), timeout=30)
            await stub.Load(loader_pb2.LoadRequest(source="sklearn:iris"), timeout=30)  # a hit
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await stub.Load(loader_pb2.LoadRequest(source="nope:iris"), timeout=30)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # Two slow calls hold both slots (MLMESH_MAX_CONCURRENT_RPCS=2), one computing on the only
            # worker thread and one waiting for it; a third call is refused.
            busy = [
                asyncio.ensure_future(
                    stub.Load(loader_pb2.LoadRequest(source=SLOW_SOURCE.replace("seed=9", f"seed={i}")), timeout=60)
                )
                for i in (1, 2)
            ]
            await asyncio.sleep(0.5)
            during = scrape(loader.metrics_url)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Load(loader_pb2.LoadRequest(source="sklearn:wine"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for call in busy:
                call.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await stub.Load(loader_pb2.LoadRequest(source=SLOW_SOURCE), timeout=0.3)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            for _ in range(3):  # health checks are neither counted nor in flight
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    assert value(during, "mlmesh_rpcs_in_flight") == 2
    assert value(during, "mlmesh_computations_running") == 1 and value(during, "mlmesh_worker_queue_depth") == 1
    deadline = time.monotonic() + 60
    while True:
        # Abandoned computations still run or wait for the worker until their next check for
        # cancellation (a synthetic table is made in one piece): the gauges say so until then.
        after = scrape(loader.metrics_url)
        settled = value(after, "mlmesh_worker_queue_depth") == 0 and value(after, "mlmesh_computations_running") == 0
        if (handled(after, LOAD, "CANCELLED") == 2 and settled) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert handled(after, LOAD, "OK") == 2
    assert handled(after, LOAD, "INVALID_ARGUMENT") == 1
    assert handled(after, LOAD, "DEADLINE_EXCEEDED") == 1
    assert handled(after, LOAD, "RESOURCE_EXHAUSTED") == 1
    assert handled(after, LOAD, "CANCELLED") == 2
    assert value(after, "grpc_server_started_total", grpc_method="Load", grpc_type="unary") == 7
    assert value(after, "grpc_server_handling_seconds_count", grpc_method="Load") == 7
    assert value(after, "grpc_server_started_total", grpc_service="grpc.health.v1.Health") == 0
    assert value(after, "mlmesh_rpcs_rejected_total") == 1
    assert value(after, "mlmesh_rpcs_in_flight") == 0
    assert value(after, "mlmesh_cache_requests_total", result="hit") == 1
    assert value(after, "mlmesh_cache_requests_total", result="miss") == 1
    assert value(after, "mlmesh_store_bytes_total", direction="write") > 1000
    assert value(after, "mlmesh_store_operation_seconds_count", operation="write") >= 3
    assert value(after, "mlmesh_computation_seconds_count", outcome="ok") >= 1
    assert value(after, "process_start_time_seconds") > 0
    assert value(after, "mlmesh_worker_queue_depth") == 0 and value(after, "mlmesh_computations_running") == 0
    # The log line of each call says the same, with the message the caller got for a failure.
    statuses = [
        re.search(r"status=(\w+)", r.getMessage()).group(1) for r in caplog.records if r.getMessage().startswith("rpc ")
    ]
    assert sorted(statuses) == sorted(
        ["OK", "OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "CANCELLED", "CANCELLED", "DEADLINE_EXCEEDED"]
    ), statuses
    refused_line = next(r.getMessage() for r in caplog.records if "status=INVALID_ARGUMENT" in r.getMessage())
    assert "error=" in refused_line and "nope" in refused_line


@pytest.mark.asyncio
async def test_an_internal_error_logs_incident_and_traceback_as_json(
    loader: RunningStage,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("secret-internal-detail")

    monkeypatch.setattr(sys.modules["services.loader.logic"], "load_dataset", broken)
    with caplog.at_level(logging.INFO, logger="mlmesh.rpc"):
        async with grpc.aio.insecure_channel(loader.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await loader_pb2_grpc.LoaderServiceStub(channel).Load(
                    loader_pb2.LoadRequest(source="sklearn:iris"), timeout=30
                )
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    incident = re.search(r"incident ([0-9a-f]{8})", caught.value.details()).group(1)
    formatter = json_formatter("loader")
    lines = [json.loads(formatter.format(record)) for record in caplog.records if record.name == "mlmesh.rpc"]
    [failure] = [line for line in lines if line["level"] == "ERROR"]
    assert failure["incident"] == incident and failure["code"] == "INTERNAL" and failure["stage"] == "loader"
    assert "secret-internal-detail" in failure["traceback"] and "Traceback" in failure["traceback"]
    [call] = [line for line in lines if line.get("method") == LOAD and line["level"] == "INFO"]
    assert call["code"] == "INTERNAL" and call["incident"] == incident and incident in call["error"]
    assert "secret" not in call["error"] and call["duration_ms"] >= 0 and call["cache_hit"] is None


@pytest.mark.parametrize("command", [["-m", "services.loader"], ["-m", "services.cli.main", "run"]])
def test_an_unknown_trace_exporter_stops_the_process_with_its_name(command: list[str], tmp_path: Path) -> None:
    env = {
        **os.environ,
        "MLMESH_ARTIFACT_ROOT": str(tmp_path),
        "OTEL_TRACES_EXPORTER": "zipkin",
        "MLMESH_LOADER_PORT": str(free_ports(1)[0]),
    }
    result = subprocess.run([str(BIN / "python"), *command], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "invalid tracing configuration" in result.stderr and "OTEL_TRACES_EXPORTER='zipkin'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.asyncio
async def test_a_corrupt_artifact_counts_as_a_verification_failure(settings: Settings) -> None:
    loader = await start_stage(stage_spec("loader"), settings, port=0)
    preprocess = await start_stage(stage_spec("preprocess"), settings, port=0)
    try:
        async with (
            grpc.aio.insecure_channel(loader.address) as one,
            grpc.aio.insecure_channel(preprocess.address) as two,
        ):
            loaded = await loader_pb2_grpc.LoaderServiceStub(one).Load(
                loader_pb2.LoadRequest(source="sklearn:iris"), timeout=30
            )
            path = Path(urllib.parse.urlparse(loaded.dataset.uri).path)
            path.chmod(0o644)
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
            with pytest.raises(grpc.aio.AioRpcError) as lost:
                await preprocess_pb2_grpc.PreprocessServiceStub(two).Preprocess(
                    preprocess_pb2.PreprocessRequest(
                        dataset=ArtifactRef(
                            uri=loaded.dataset.uri,
                            sha256=loaded.dataset.sha256,
                            size_bytes=loaded.dataset.size_bytes,
                            media_type=loaded.dataset.media_type,
                        )
                    ),
                    timeout=30,
                )
        assert lost.value.code() == grpc.StatusCode.DATA_LOSS
        method = "/mlmesh.preprocess.v1.PreprocessService/Preprocess"
        samples = await scrape_until(preprocess.metrics_url, lambda s: handled(s, method, "DATA_LOSS") > 0)
        assert value(samples, "mlmesh_store_verification_failures_total", stage="preprocess") == 1
        assert handled(samples, method, "DATA_LOSS") == 1
        assert value(scrape(loader.metrics_url), "mlmesh_store_verification_failures_total") == 0
    finally:
        await loader.stop(0.5)
        await preprocess.stop(0.5)


@pytest.mark.asyncio
async def test_metrics_off_serves_nothing(settings: Settings) -> None:
    stage = await start_stage(stage_spec("loader"), dataclasses.replace(settings, metrics=False), port=0)
    try:
        assert stage.metrics_port == 0 and stage.metrics_url == ""
    finally:
        await stage.stop(0.5)


@pytest.mark.asyncio
async def test_garbage_on_the_metrics_port_harms_nothing(loader: RunningStage) -> None:
    rng = random.Random(13)
    junk = [
        b"\x00" * 64,
        b"GET /" + b"A" * 70000 + b" HTTP/1.1\r\n\r\n",
        b"POST /metrics HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"GET /metrics?name[]=" + b"%ff" * 3000 + b" HTTP/1.0\r\n\r\n",
        b"\r\n" * 5000,
        *(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096))) for _ in range(20)),
    ]
    for payload in junk:
        reader, writer = await asyncio.open_connection("127.0.0.1", loader.metrics_port)
        writer.write(payload)
        with contextlib.suppress(OSError):  # the server may close on garbage before all of it is sent
            await writer.drain()
            writer.write_eof()
            await asyncio.wait_for(reader.read(), timeout=5)
        writer.close()
    assert value(scrape(loader.metrics_url), "mlmesh_build_info", stage="loader") == 1
    async with grpc.aio.insecure_channel(loader.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_stage_whose_metrics_port_is_taken_refuses_to_start(tmp_path: Path) -> None:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        env = {
            **os.environ,
            "MLMESH_ARTIFACT_ROOT": str(tmp_path),
            "MLMESH_LOADER_PORT": str(free_ports(1)[0]),
            "MLMESH_LOADER_METRICS_PORT": str(taken),
        }
        result = subprocess.run(
            [str(BIN / "python"), "-m", "services.loader"], env=env, capture_output=True, text=True, timeout=60
        )
    assert result.returncode != 0
    assert f"cannot serve metrics on 127.0.0.1:{taken}" in result.stderr
    assert "MLMESH_LOADER_METRICS_PORT" in result.stderr and "MLMESH_METRICS=off" in result.stderr


@pytest.mark.slow  # `mlmesh up` child processes
def test_up_refuses_a_taken_metrics_port_before_starting_anything(tmp_path: Path) -> None:
    import socket

    env = {**os.environ, "MLMESH_ARTIFACT_ROOT": str(tmp_path)}
    use_free_ports(env)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", int(env["MLMESH_TRAINER_METRICS_PORT"])))
        holder.listen()
        result = subprocess.run([str(BIN / "mlmesh"), "up"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "mesh is up" not in result.stdout
    assert f"metrics port {env['MLMESH_TRAINER_METRICS_PORT']} for trainer" in result.stderr
    assert "MLMESH_TRAINER_METRICS_PORT" in result.stderr and "Traceback" not in result.stderr


# ---- a real mesh: JSON logs, traces, Prometheus -------------------------------------------
class Mesh:
    def __init__(self, base: Path, receiver: OtlpReceiver) -> None:
        self.base = base
        self.receiver = receiver
        self.logs = base / "logs"
        self.env = {
            **os.environ,
            "MLMESH_ARTIFACT_ROOT": str(base / "artifacts"),
            "MLMESH_GRACE_SECONDS": "1",
            "MLMESH_LOG_FORMAT": "json",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s, so the test need not wait
            "HOME": str(base / "home"),
            "TMPDIR": str(base / "tmp"),
        }
        for folder in ("home", "tmp"):
            (base / folder).mkdir()
        self.ports = use_free_ports(self.env)
        self.metrics = {s: int(self.env[f"MLMESH_{s.upper()}_METRICS_PORT"]) for s in STAGES}
        self.up = UpProcess(self.env, self.ports, cwd=base, args=("--log-dir", str(self.logs)))
        try:
            self.up.wait_for("mesh is up")
        except AssertionError:
            self.up.stop()  # never leave a half-started mesh running
            raise
        self.banner = self.up.output

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def mesh_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with OtlpReceiver() as receiver:
        mesh = Mesh(tmp_path_factory.mktemp("observed"), receiver)
        try:
            yield mesh
        finally:
            mesh.up.stop()


def spans_of(receiver: OtlpReceiver, trace_id: str, until: int, timeout: float = 20) -> list[dict]:
    """The spans of one trace, once at least `until` have arrived and every parent named is among
    them. Each process exports in batches, so a child can arrive a batch before its parent."""
    deadline = time.monotonic() + timeout
    while True:
        spans = [s for s in receiver.spans() if s["trace_id"] == trace_id]
        ids = {s["span_id"] for s in spans}
        complete = all(not s["parent_id"] or s["parent_id"] in ids for s in spans)
        if (len(spans) >= until and complete) or time.monotonic() > deadline:
            return spans
        time.sleep(0.2)


def assert_one_tree(spans: list[dict], root_name: str) -> dict:
    """Every span of the trace hangs off one root named `root_name`; returns the spans by id."""
    by_id = {s["span_id"]: s for s in spans}
    assert len(by_id) == len(spans), "span ids are unique"
    roots = [s for s in spans if not s["parent_id"]]
    assert [r["name"] for r in roots] == [root_name], [(s["name"], s["parent_id"]) for s in spans]
    for span in spans:
        if span["parent_id"]:
            assert span["parent_id"] in by_id, f"{span['service']} {span['name']} has a parent not in the trace"
            parent = by_id[span["parent_id"]]
            assert parent["start"] <= span["start"] and span["end"] <= parent["end"] + 5_000_000, (
                f"{span['name']} lies outside its parent {parent['name']}"
            )
    return by_id


def stage_server_spans(spans: list[dict]) -> dict[str, dict]:
    server_kind = 2  # SPAN_KIND_SERVER
    return {
        s["service"]: s
        for s in spans
        if s["kind"] == server_kind and s["service"] in STAGES and not s["name"].endswith("/RegisterModel")
    }


@pytest.mark.slow  # `mlmesh up` child processes
def test_up_prints_where_each_stage_serves_metrics(mesh_up: Mesh) -> None:
    for stage in STAGES:
        line = next(line for line in mesh_up.banner if line.startswith(stage))
        assert f"metrics http://127.0.0.1:{mesh_up.metrics[stage]}/metrics" in line, line
        assert (
            value(scrape(f"http://127.0.0.1:{mesh_up.metrics[stage]}/metrics"), "mlmesh_build_info", stage=stage) == 1
        )


@pytest.mark.slow  # `mlmesh up` child processes
def test_pyflyte_run_is_one_trace_across_the_five_stages(mesh_up: Mesh) -> None:
    result = mesh_up.run(str(BIN / "pyflyte"), "run", "workflow/pipeline.py", "training_pipeline")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    run_id = re.search(r"^run +(\S+) ", result.stdout, re.M).group(1)
    spans = spans_of(mesh_up.receiver, tracing.trace_id_of(run_id), until=40)
    by_id = assert_one_tree(spans, "flyte run")
    tasks = {s["name"] for s in spans if s["name"].startswith("flyte.task ")}
    assert {
        "flyte.task load",
        "flyte.task preprocess",
        "flyte.task build_features",
        "flyte.task train",
        "flyte.task evaluate",
        "flyte.task serve",
    } <= tasks
    servers = stage_server_spans(spans)
    assert set(servers) == set(STAGES)
    for stage, server in servers.items():
        client = by_id[server["parent_id"]]  # stage span <- the task's client span <- the task <- the run
        assert client["service"] == "workflow" and client["name"] == server["name"]
        task = by_id[client["parent_id"]]
        assert task["name"].startswith("flyte.task ") and by_id[task["parent_id"]]["name"] == "flyte run"
        assert server["attributes"]["mlmesh.run_id"] == run_id
        assert server["attributes"]["rpc.grpc.status_code"] == 0
        if stage not in PIPELINE_STAGES:
            continue  # serving's smoke request is in the run's trace; it makes no artifact
        children = {s["name"] for s in spans if s["parent_id"] == server["span_id"]}
        assert f"{stage}.compute" in children, (stage, children)
        compute = next(s for s in spans if s["parent_id"] == server["span_id"] and s["name"] == f"{stage}.compute")
        writes = [s for s in spans if s["parent_id"] == compute["span_id"] and s["name"] == "store.write"]
        assert writes and all(s["attributes"]["mlmesh.artifact.bytes"] > 0 for s in writes)
    # The same run's lines in the stages' JSON logs carry the trace id.
    lines = [json.loads(line) for stage in STAGES for line in (mesh_up.logs / f"{stage}.log").read_text().splitlines()]
    calls = [line for line in lines if line.get("run_id") == run_id]
    assert {line["stage"] for line in calls} == set(STAGES)
    assert {line["trace_id"] for line in calls} == {tracing.trace_id_of(run_id)}
    assert all(line["span_id"] in by_id for line in calls)


@pytest.mark.slow  # `mlmesh up` child processes
def test_mlmesh_run_is_one_trace_too(mesh_up: Mesh) -> None:
    result = mesh_up.run(str(BIN / "mlmesh"), "run", "--source", "sklearn:wine", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    run_id = summary["run_id"]
    assert summary["trace_id"] == tracing.trace_id_of(run_id)
    spans = spans_of(mesh_up.receiver, tracing.trace_id_of(run_id), until=25)
    by_id = assert_one_tree(spans, "mlmesh run")
    servers = stage_server_spans(spans)
    assert set(servers) == set(STAGES)
    for server in servers.values():
        assert by_id[by_id[server["parent_id"]]["parent_id"]]["name"] == "mlmesh run"


@pytest.mark.slow  # `mlmesh up` child processes
def test_every_log_line_is_json_with_the_call_fields(mesh_up: Mesh) -> None:
    # The module's mesh has served other tests' calls too; this run's are the lines after these.
    seen = len((mesh_up.logs / "loader.log").read_text().splitlines())
    failed = mesh_up.run(str(BIN / "mlmesh"), "run", "--source", "no-such-file.csv")
    assert failed.returncode != 0
    for stage in STAGES:
        lines = (mesh_up.logs / f"{stage}.log").read_text().splitlines()
        assert lines
        for line in lines:
            record = json.loads(line)  # every line, not only the RPC lines
            assert record["stage"] == stage and record["level"] in {"DEBUG", "INFO", "WARNING", "ERROR"}
            assert record["time"].endswith("+00:00") and record["message"]
        calls = [json.loads(line) for line in lines if '"method"' in line]
        assert calls, stage
        for call in calls:
            assert call["code"] in grpc.StatusCode.__members__ and call["duration_ms"] >= 0
            assert isinstance(call["cache_hit"], (bool, type(None))) and call["run_id"]
            assert len(call["trace_id"]) == 32 and len(call["span_id"]) == 16
    loader_calls = [
        json.loads(line) for line in (mesh_up.logs / "loader.log").read_text().splitlines()[seen:] if '"method"' in line
    ]
    refused = [c for c in loader_calls if c["code"] != "OK"]
    assert refused and all(c["error"] and "no-such-file.csv" in c["error"] for c in refused), refused


@pytest.mark.slow  # `mlmesh up` child processes
def test_status_shows_uptime_work_in_flight_and_cache_hits(mesh_up: Mesh) -> None:
    mesh_up.run(str(BIN / "mlmesh"), "run", "--source", "sklearn:wine", "--json")  # all hits by now
    result = mesh_up.run(str(BIN / "mlmesh"), "status")
    assert result.returncode == 0, result.stdout + result.stderr
    for stage in STAGES:
        line = next(line for line in result.stdout.splitlines() if line.startswith(stage))
        assert "SERVING" in line and "restarts 0" in line and "calls in flight" in line, line
        assert re.search(r"up \d+m\d\ds", line), line
        # The pipeline's stages answered the run from their memos; serving has none, and says
        # how many models it serves (the run registered wine's, so at least that one).
        if stage in PIPELINE_STAGES:
            assert re.search(r"cache \d+/\d+ hits \(\d+%\)", line), line
        else:
            assert re.search(r"[1-9]\d* models? served \(mlmesh serving status\)", line), line
    trainer = next(line for line in result.stdout.splitlines() if line.startswith("trainer"))
    assert "0 operations" in trainer


@pytest.mark.network  # Debian's prometheus package, apt-get download when not cached
@pytest.mark.slow  # `mlmesh up` child processes
def test_a_real_prometheus_scrapes_the_mesh(mesh_up: Mesh, tmp_path: Path) -> None:
    from tests.prometheus_bin import prometheus_binaries

    binaries = prometheus_binaries()
    config = tmp_path / "prometheus.yml"
    targets = [f"127.0.0.1:{mesh_up.metrics[s]}" for s in STAGES]
    config.write_text(
        json.dumps(
            {  # JSON is YAML
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [{"job_name": "mlmesh", "static_configs": [{"targets": targets}]}],
            }
        )
    )
    [port] = free_ports(1)
    prometheus = subprocess.Popen(
        [
            str(binaries / "prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def query(promql: str) -> list[dict]:
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def eventually(promql: str, check, timeout: float = 30) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = query(promql)
                if check(result):
                    return result
            except OSError:
                pass  # still starting
            if time.monotonic() > deadline or prometheus.poll() is not None:
                raise AssertionError(f"{promql} never satisfied; last answer: {result if 'result' in dir() else None}")
            time.sleep(0.5)

    try:
        eventually("up", lambda r: len(r) == len(STAGES) and all(s["value"][1] == "1" for s in r))
        before = query('sum(grpc_server_handled_total{grpc_method="Load"})')
        done = float(before[0]["value"][1]) if before else 0.0
        # A run, the same run again (every stage a cache hit), and a call refused with its code.
        for _ in range(2):
            result = mesh_up.run(str(BIN / "mlmesh"), "run", "--source", "sklearn:diabetes", "--json")
            assert result.returncode == 0, result.stderr[-2000:]
        refused = mesh_up.run(str(BIN / "mlmesh"), "run", "--source", "sklearn:no_such_dataset")
        assert refused.returncode != 0
        per_method = eventually(
            'sum by (grpc_service, grpc_method) (grpc_server_handled_total{grpc_code="OK"})',
            lambda r: len({s["metric"]["grpc_method"] for s in r if float(s["value"][1]) > 0}) >= 5,
        )
        methods = {s["metric"]["grpc_method"] for s in per_method if float(s["value"][1]) > 0}
        assert {"Load", "Preprocess", "BuildFeatures", "Train", "Evaluate"} <= methods
        eventually(
            f'sum(grpc_server_handled_total{{grpc_method="Load"}}) - {done}',
            lambda r: r and float(r[0]["value"][1]) >= 3,
        )
        hits = eventually(
            'sum by (stage) (mlmesh_cache_requests_total{result="hit"})',
            lambda r: len([s for s in r if float(s["value"][1]) >= 1]) == 5,
        )
        assert {s["metric"]["stage"] for s in hits} == set(STAGES)
        errors = eventually('grpc_server_handled_total{grpc_method="Load", grpc_code!="OK"} > 0', lambda r: len(r) >= 1)
        assert {s["metric"]["grpc_code"] for s in errors} & {"INVALID_ARGUMENT", "NOT_FOUND"}, errors
        latency = query(
            'histogram_quantile(0.5, sum by (le) (rate(grpc_server_handling_seconds_bucket{grpc_method="Load"}[1m])))'
        )
        assert latency and float(latency[0]["value"][1]) >= 0
    finally:
        prometheus.terminate()
        try:
            prometheus.wait(timeout=20)
        except subprocess.TimeoutExpired:
            prometheus.kill()
            prometheus.wait()


@pytest.mark.slow  # `mlmesh up` child processes
def test_docs_observability_commands_run_as_written(mesh_up: Mesh) -> None:
    """Every block of docs/observability.md, run together."""
    text = (ROOT / "docs" / "observability.md").read_text()
    script = "\n".join(re.findall(r"```sh\n(.*?)```", text, re.S))
    assert "/metrics" in script and "mlmesh status" in script and "OTEL_EXPORTER_OTLP_ENDPOINT" in script
    # The mesh under test runs on free ports, and its collector is this test's receiver.
    for stage in STAGES:
        script = script.replace(f"127.0.0.1:{DEFAULT_METRICS_PORTS[stage]}", f"127.0.0.1:{mesh_up.metrics[stage]}")
    script = script.replace("http://127.0.0.1:4317", mesh_up.receiver.endpoint)
    roots_before = len([s for s in mesh_up.receiver.spans() if s["name"] == "flyte run"])
    result = run_script(script, ROOT, mesh_up.env)
    assert 'grpc_code="OK",grpc_method="Load"' in result.stdout and 'result="hit"' in result.stdout
    assert result.stdout.count("SERVING") == len(STAGES)
    deadline = time.monotonic() + 20  # the pyflyte run's trace reached the collector
    while len([s for s in mesh_up.receiver.spans() if s["name"] == "flyte run"]) == roots_before:
        assert time.monotonic() < deadline, "docs/observability.md's traced run sent no trace"
        time.sleep(0.2)
