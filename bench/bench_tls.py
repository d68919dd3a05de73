"""What transport security costs (issue 11): TLS and mTLS+token against plaintext, as ratios.

    .venv/bin/python bench/bench_tls.py [--repeats 5] [--rows 100000] [--hits 300] [--connects 50]
    .venv/bin/python bench/bench_tls.py --quick      # smoke: 2 repeats, 20k rows, 50 hits, 20 connects

Three configurations, each a full five-stage mesh in this process on ephemeral
ports (127.0.0.1:0) with its own artifact store in a temporary folder:

  plaintext    no TLS, no identity (the local default);
  tls          the stages serve TLS; the client trusts their CA (MLMESH_TLS_CA);
  mtls+token   TLS, client certificates required (MLMESH_TLS_CLIENT_CA) and a
               bearer token checked on every call (MLMESH_AUTH_TOKENS_FILE).

Certificates (ECDSA P-256) and tokens are made at run time by tests/certs.py.

Workloads, with the configurations interleaved side by side (plaintext, tls,
mtls+token; tls, mtls+token, plaintext; ...: the order rotates each turn, so no
configuration is always first) so that machine noise hits all of them alike,
each after an untimed warm-up:

  1. the whole pipeline on synthetic:classification?rows=N&features=32&classes=2
     with the default model (logistic regression), cold: every repeat of every
     configuration starts a fresh mesh on a fresh, empty store and a fresh
     client, so every stage computes and writes its artifacts, and the client
     opens its five connections (handshakes included), as `mlmesh run` does.
     Median wall time, its ratio to plaintext's median, and the median of the
     per-repeat paired ratios. "in stages" is the sum of the stages' own
     reported seconds; "outside" = wall - in stages (transport, client, queues);
     "CPU" is this process's CPU time over the run (client, servers and gRPC's
     own threads, so TLS's cryptography too), less sensitive than wall time to
     other programs on the machine.
  2. cache-hit latency of the loader: after one Load of sklearn:breast_cancer,
     M identical Loads on an open connection (memo hits), interleaved in blocks;
     p50, p90, p99 and the p50 ratio to plaintext;
  3. new-connection cost: open a fresh channel, one health Check (handshake
     included), close it; median of K per configuration, interleaved. (Health
     is open by default, so here mtls+token pays the client certificate, not
     the token check; section 2 pays the token check on every call.)

Everything runs in one process: client and servers share one event loop and
the GIL, so the figures are for this machine and this arrangement, not for a
network. Temporary folders are removed and all servers stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from mlmesh.loader.v1 import loader_pb2  # noqa: E402
from services.client.mesh import MeshClient, PipelineConfig  # noqa: E402
from services.runtime.catalog import STAGES  # noqa: E402
from services.runtime.security import call_metadata, open_channel  # noqa: E402
from services.runtime.server import RunningStage, stage_spec, start_stage  # noqa: E402
from services.runtime.settings import Settings  # noqa: E402
from tests.certs import Pki  # noqa: E402

CONFIGS = ("plaintext", "tls", "mtls+token")
HIT_SOURCE = "sklearn:breast_cancer"
STAGE_COUNT = len(STAGES)
HIT_BLOCK = 25  # cache hits per configuration before moving to the next


@dataclass
class Material:
    """A CA, the stages' certificate, a client certificate and a token file, in `folder`."""

    folder: Path

    def __post_init__(self) -> None:
        pki = Pki(self.folder / "pki")
        self.ca = pki.cert
        self.server = pki.issue("mlmesh stages", hosts=["localhost", "127.0.0.1"])
        self.client = pki.issue("bench-runner", client=True)
        self.token = secrets.token_hex(32)
        self.tokens = self.folder / "tokens"
        self.tokens.write_text(f"runner pipeline {self.token}\n")

    def server_env(self, config: str, artifacts: str) -> dict[str, str]:
        env = {"MLMESH_ARTIFACT_ROOT": artifacts, "MLMESH_GRACE_SECONDS": "0.5"}
        if config != "plaintext":
            env |= {"MLMESH_TLS_CERT": str(self.server.cert), "MLMESH_TLS_KEY": str(self.server.key)}
        if config == "mtls+token":
            env |= {"MLMESH_TLS_CLIENT_CA": str(self.ca), "MLMESH_AUTH_TOKENS_FILE": str(self.tokens)}
        return env

    def client_env(self, config: str, artifacts: str) -> dict[str, str]:
        env = {"MLMESH_ARTIFACT_ROOT": artifacts, "MLMESH_RECONNECT_SECONDS": "20"}
        if config != "plaintext":
            env["MLMESH_TLS_CA"] = str(self.ca)
        if config == "mtls+token":
            env |= {
                "MLMESH_TLS_CLIENT_CERT": str(self.client.cert),
                "MLMESH_TLS_CLIENT_KEY": str(self.client.key),
                "MLMESH_AUTH_TOKEN": self.token,
            }
        return env


class Mesh:
    """Five stages of one configuration on ephemeral ports, over one store, and a client for them."""

    def __init__(self, material: Material, config: str, artifacts: str):
        self.material, self.config, self.artifacts = material, config, artifacts
        self.stages: dict[str, RunningStage] = {}
        self.client_settings = Settings.from_env(material.client_env(config, artifacts))

    async def __aenter__(self) -> Mesh:
        settings = Settings.from_env(self.material.server_env(self.config, self.artifacts))
        try:
            for name in STAGES:
                self.stages[name] = await start_stage(stage_spec(name), settings, port=0)
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        for stage in self.stages.values():
            await stage.stop(0.2)
        self.stages.clear()

    @property
    def addresses(self) -> dict[str, str]:
        return {name: f"127.0.0.1:{stage.port}" for name, stage in self.stages.items()}

    def client(self) -> MeshClient:
        return MeshClient(self.client_settings, addresses=self.addresses)


def rotated(turn: int) -> tuple[str, ...]:
    """The configurations, side by side, starting one further on each turn: plaintext, tls, mtls+token;
    then tls, mtls+token, plaintext; ... so that no configuration always runs first (or right after
    the same neighbour's teardown)."""
    start = turn % len(CONFIGS)
    return CONFIGS[start:] + CONFIGS[:start]


# ---- workload 1: the cold pipeline ----------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    wall: float  # the client's wall time for run_pipeline
    stages: float  # the sum of the stages' own reported seconds
    cpu: float  # this process's CPU time meanwhile: client, servers and gRPC's threads (TLS included)
    reply_bytes: int  # the five stages' replies, serialized: what crossed the (TLS) connection back


async def cold_pipeline(material: Material, config: str, pipeline: PipelineConfig, base: Path) -> Timing:
    """One cold pipeline on a fresh mesh and store."""
    with tempfile.TemporaryDirectory(dir=base) as artifacts:
        async with Mesh(material, config, artifacts) as mesh, mesh.client() as client:
            started, cpu = time.perf_counter(), time.process_time()
            run = await client.run_pipeline(pipeline)
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    if any(stage.cache_hit for stage in run.stages):
        raise SystemExit(f"{config}: a cold run had a cache hit; the benchmark is wrong")
    if not 0.5 < run.evaluate.metrics["accuracy"] <= 1.0:
        raise SystemExit(f"{config}: implausible accuracy {run.evaluate.metrics['accuracy']}")
    replies = (run.load, run.preprocess, run.features, run.train, run.evaluate)
    return Timing(wall, sum(stage.seconds for stage in run.stages), cpu, sum(r.ByteSize() for r in replies))


async def pipelines(material: Material, rows: int, repeats: int, base: Path) -> dict[str, list[Timing]]:
    pipeline = PipelineConfig(source=f"synthetic:classification?rows={rows}&features=32&classes=2&seed=0")
    # Warm-up, not timed: one full-size run per configuration. A smaller one is not enough: the
    # first few runs at full size are 20-40% slower (first-use costs in numpy, sklearn, the allocator).
    for config in CONFIGS:
        await cold_pipeline(material, config, pipeline, base)
    out: dict[str, list[Timing]] = {config: [] for config in CONFIGS}
    for repeat in range(repeats):
        for config in rotated(repeat):
            out[config].append(await cold_pipeline(material, config, pipeline, base))
        line = "  ".join(f"{c} {out[c][-1].wall:.2f}s" for c in CONFIGS)
        print(f"  pipeline repeat {repeat + 1}/{repeats}: {line}", file=sys.stderr, flush=True)
    return out


# ---- workloads 2 and 3: cache hits and new connections -----------------------------------------
async def cache_hits(meshes: dict[str, Mesh], hits: int) -> dict[str, list[float]]:
    request = loader_pb2.LoadRequest(source=HIT_SOURCE)
    clients = {config: mesh.client() for config, mesh in meshes.items()}
    out: dict[str, list[float]] = {config: [] for config in CONFIGS}
    try:
        for config, client in clients.items():
            first = await client.load(request)  # computes and fills the memo; opens the connection
            if first.stage.cache_hit:
                raise SystemExit(f"{config}: the first Load on a fresh store was a cache hit")
            for _ in range(HIT_BLOCK):  # warm the connection and the memo path, not timed
                await client.load(request)
        turn = 0
        while any(len(out[c]) < hits for c in CONFIGS):
            turn += 1
            for config in rotated(turn):
                client = clients[config]
                for _ in range(min(HIT_BLOCK, hits - len(out[config]))):
                    started = time.perf_counter()
                    reply = await client.load(request)
                    out[config].append(time.perf_counter() - started)
                    if not reply.stage.cache_hit:
                        raise SystemExit(f"{config}: a repeated Load was not a cache hit")
    finally:
        for client in clients.values():
            await client.close()
    return out


async def one_connection(mesh: Mesh) -> float:
    settings = mesh.client_settings
    started = time.perf_counter()
    async with open_channel(mesh.addresses["loader"], settings) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10, metadata=call_metadata(settings)
        )
    seconds = time.perf_counter() - started
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise SystemExit(f"{mesh.config}: loader is not SERVING")
    return seconds


async def connections(meshes: dict[str, Mesh], count: int) -> dict[str, list[float]]:
    for _ in range(5):  # warm-up, not timed
        for mesh in meshes.values():
            await one_connection(mesh)
    out: dict[str, list[float]] = {config: [] for config in CONFIGS}
    for turn in range(count):
        for config in rotated(turn):
            out[config].append(await one_connection(meshes[config]))
    return out


# ---- report --------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, q in (0, 100]."""
    ordered = sorted(values)
    rank = math.ceil(len(ordered) * q / 100)
    return ordered[max(0, min(len(ordered), rank) - 1)]


def command(args: argparse.Namespace) -> str:
    if args.quick:
        return ".venv/bin/python bench/bench_tls.py --quick"
    return (
        f".venv/bin/python bench/bench_tls.py --repeats {args.repeats} --rows {args.rows} "
        f"--hits {args.hits} --connects {args.connects}"
    )


def report(
    args: argparse.Namespace,
    runs: dict[str, list[Timing]],
    hits: dict[str, list[float]],
    connects: dict[str, list[float]],
    seconds: float,
    load: tuple[float, float],
) -> str:
    plain_wall = statistics.median(t.wall for t in runs["plaintext"])
    lines = [
        f"## Cost of TLS: {datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, "
        f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
        f"grpcio {__import__('grpc').__version__}",
        "",
        f"Reproduce: `{command(args)}`",
        "",
        f"### 1. Cold pipeline, synthetic:classification rows={args.rows} features=32, logistic regression "
        f"(fresh mesh + store per run, {args.repeats} interleaved repeats after 1 warm-up each)",
        "",
        "| configuration | median wall s | ratio to plaintext | median paired ratio | median in stages s "
        "| median outside stages s | median CPU s | CPU ratio | all runs, wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    base = plain_wall
    cpu_base = statistics.median(t.cpu for t in runs["plaintext"])
    for config in CONFIGS:
        walls = [t.wall for t in runs[config]]
        cpu = statistics.median(t.cpu for t in runs[config])
        paired = statistics.median(t.wall / p.wall for t, p in zip(runs[config], runs["plaintext"], strict=True))
        lines.append(
            f"| {config} | {statistics.median(walls):.3f} | {statistics.median(walls) / base:.3f} | {paired:.3f} "
            f"| {statistics.median(t.stages for t in runs[config]):.3f} "
            f"| {statistics.median(t.wall - t.stages for t in runs[config]):.3f} "
            f"| {cpu:.3f} | {cpu / cpu_base:.3f} | {', '.join(f'{w:.2f}' for w in walls)} |"
        )
    # What sections 2 and 3 say the pipeline should pay: five new connections and five calls.
    expected = {
        config: STAGE_COUNT
        * (
            statistics.median(connects[config])
            - statistics.median(connects["plaintext"])
            + statistics.median(hits[config])
            - statistics.median(hits["plaintext"])
        )
        for config in CONFIGS[1:]
    }
    lines += [
        "",
        f"Each pipeline's five replies carry {runs['plaintext'][0].reply_bytes:,} bytes in all (data goes through "
        "the store, not gRPC). Expected transport cost from sections 2 and 3 (5 handshakes + 5 calls): "
        + "; ".join(
            f"{config} {ms * 1000:+.1f} ms = {ms / plain_wall:+.2%} of plaintext's median"
            for config, ms in expected.items()
        )
        + ".",
    ]
    lines += [
        "",
        f"### 2. Loader cache hit ({HIT_SOURCE}, open connection, {args.hits} calls per configuration, "
        f"interleaved in blocks of {HIT_BLOCK})",
        "",
        "| configuration | p50 ms | p90 ms | p99 ms | p50 ratio to plaintext |",
        "|---|---:|---:|---:|---:|",
    ]
    hit_base = statistics.median(hits["plaintext"])
    for config in CONFIGS:
        values = hits[config]
        lines.append(
            f"| {config} | {statistics.median(values) * 1000:.2f} | {percentile(values, 90) * 1000:.2f} "
            f"| {percentile(values, 99) * 1000:.2f} | {statistics.median(values) / hit_base:.3f} |"
        )
    lines += [
        "",
        f"### 3. New connection: open a channel + one health Check + close (handshake included), "
        f"{args.connects} per configuration, interleaved",
        "",
        "| configuration | median ms | p90 ms | ratio to plaintext | extra over plaintext ms |",
        "|---|---:|---:|---:|---:|",
    ]
    conn_base = statistics.median(connects["plaintext"])
    for config in CONFIGS:
        median = statistics.median(connects[config])
        lines.append(
            f"| {config} | {median * 1000:.2f} | {percentile(connects[config], 90) * 1000:.2f} "
            f"| {median / conn_base:.3f} | {(median - conn_base) * 1000:+.2f} |"
        )
    lines += [
        "",
        f"Total bench time {seconds:.0f}s; load average {load[0]:.2f} at the start, {load[1]:.2f} at the end "
        "(one process: the client and the servers share one event loop).",
    ]
    return "\n".join(lines)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="cold pipelines per configuration (default 5)")
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the synthetic dataset (default 100000)")
    parser.add_argument("--hits", type=int, default=300, help="timed cache hits per configuration (default 300)")
    parser.add_argument("--connects", type=int, default=50, help="timed new connections per configuration (default 50)")
    parser.add_argument(
        "--quick", action="store_true", help="a fast smoke: 2 repeats, 20000 rows, 50 hits, 20 connects"
    )
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.rows, args.hits, args.connects = 2, 20_000, 50, 20
    if min(args.repeats, args.rows, args.hits, args.connects) < 1:
        parser.error("--repeats, --rows, --hits and --connects must be at least 1")

    started, load_before = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as folder:
        base = Path(folder)
        material = Material(base)
        runs = await pipelines(material, args.rows, args.repeats, base)
        stores = {config: tempfile.mkdtemp(dir=base, prefix=f"hits-{config.replace('+', '-')}-") for config in CONFIGS}
        meshes = {config: Mesh(material, config, stores[config]) for config in CONFIGS}
        try:
            for mesh in meshes.values():
                await mesh.__aenter__()
            hits = await cache_hits(meshes, args.hits)
            connects = await connections(meshes, args.connects)
        finally:
            for mesh in meshes.values():
                await mesh.stop()
    print(report(args, runs, hits, connects, time.perf_counter() - started, (load_before, os.getloadavg()[0])))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
