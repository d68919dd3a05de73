"""What observability costs: the pipeline and cache hits with metrics, and metrics plus tracing, against neither.

Default run (100,000 rows, 5 repeats of each configuration, 3 forced pipelines and 500 cache hits
per stage in each; about 5 minutes on 2 cores):

    .venv/bin/python bench/bench_observability.py --json bench-observability.json

Quick check (a few rows, one repeat; about 20 s on 2 cores, what tests/test_bench.py runs):

    .venv/bin/python bench/bench_observability.py --rows 5000 --repeats 1 --pipelines 1 --hits 50

Configurations, each a mesh of its own with its own environment:

  off              MLMESH_METRICS=off and no OTEL_* variable: no /metrics endpoint, no tracing.
  metrics          MLMESH_METRICS=on (the default): each stage serves /metrics, and this script
                   scrapes all five every --scrape-every seconds while the mesh works, as
                   Prometheus would (more often than its usual 15-60 s, so it errs on the costly side).
  metrics+tracing  the same, plus OTEL_EXPORTER_OTLP_ENDPOINT pointing at an OTLP/gRPC receiver
                   in this script's process (tests/otlp_receiver.py), so the stages and the
                   client making the calls both export every span (default sampler: all of them;
                   default batching, OTEL_BSP_*).
  metrics+tracing@10%  the same, sampling a tenth of the traces (OTEL_TRACES_SAMPLER=
                   parentbased_traceidratio, OTEL_TRACES_SAMPLER_ARG=0.1), as docs/observability.md suggests
                   for a busy mesh: here each cache hit is a trace of its own, so a tenth of them.

Note that MLMESH_METRICS=off only turns off the HTTP endpoint: the stages count every call
in their in-memory metrics either way (services/runtime/interceptor.py), so `metrics` against
`off` is the price of serving and scraping, not of counting.

Each measurement is a subprocess (--child) with the configuration's environment. It starts
five stage processes (services.cli.launcher.LocalMesh) on free gRPC and metrics ports,
with a fresh artifact store, and then:

  pipeline  runs the pipeline once untimed on `synthetic:classification?rows=N&features=32`
            (first-use imports, the page cache), then --pipelines times with
            force_recompute, so every stage computes again; each through a client of its
            own inside a run span, as `mlmesh run` does. Wall time as the caller sees it,
            and the CPU time of the five stages and the client (from /proc).
  hits      repeats the same LoadRequest to the loader, then the same PreprocessRequest to
            preprocess, --hits times each, one call at a time, every reply checked to be a
            cache hit; latency per call (median, p99) and CPU per call (the stage's, from
            /proc, and the client's).

A subprocess per measurement, not one per configuration, because tracing is set up once per
process (OpenTelemetry's global provider), and a fresh mesh each time keeps one
configuration's leftovers (a store, a warm cache) away from the next.

Configurations are interleaved, one measurement of each per repeat, the order rotated from
one repeat to the next (off, metrics, tracing; metrics, tracing, off; ...) so that drift
favours none of them. Ratios and differences are taken within a repeat against that
repeat's `off`, then the median over repeats is reported. Goals (issue 13): the pipeline
at most 2% slower, a cache hit at most 0.2 ms slower (median latency).

`--only pipeline,hits` picks sections; `--json PATH` writes every raw number. No process
outlives the script (see bench_scale.Processes): children run in process groups killed as
a whole, and a child stops its mesh in `finally`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(Path(__file__).resolve().parent), str(ROOT)]  # bench_scale, and tests.otlp_receiver

import bench_scale  # noqa: E402 - standard library only at module level; the helpers below come from it
from bench_scale import (  # noqa: E402
    MAX_DATASET_BYTES,
    PYTHON,
    STAGES,
    Processes,
    clean_env,
    cpu_seconds,
    median,
    percentiles,
    print_table,
    run_measured,
    synthetic_source,
)

CONFIGS = ("off", "metrics", "metrics+tracing", "metrics+tracing@10%")
# The sampling docs/observability.md suggests for a busy mesh: a tenth of the traces (runs, or lone calls).
SAMPLED = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
SECTIONS = ("pipeline", "hits")
HIT_STAGES = ("loader", "preprocess")
PIPELINE_GOAL = 1.02  # ratio to off
HIT_GOAL_MS = 0.2  # added median latency per call


# ---- environments -----------------------------------------------------------------------------
def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: all held at once while asking, so none is handed out twice."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def config_env(config: str, base: Path, otlp_endpoint: str) -> dict[str, str]:
    """The environment of one measurement: its mesh's and its client's (they must agree)."""
    # No inherited OTEL_* either: a collector set in the caller's shell would turn tracing on in `off`.
    env = {k: v for k, v in clean_env().items() if not k.startswith("OTEL_")}
    env.update(
        {
            "MLMESH_ARTIFACT_ROOT": str(base / "artifacts"),
            "MLMESH_MAX_DATASET_BYTES": str(MAX_DATASET_BYTES),
            "MLMESH_RPC_TIMEOUT_SECONDS": "3600",
            "MLMESH_METRICS": "off" if config == "off" else "on",
            "MLMESH_METRICS_HOST": "127.0.0.1",
        }
    )
    # Never the default ports (50051.., 9451..): another mesh may be up on this machine.
    ports = free_ports(2 * len(STAGES))
    for i, stage in enumerate(STAGES):
        env[f"MLMESH_{stage.upper()}_PORT"] = str(ports[i])
        env[f"MLMESH_{stage.upper()}_METRICS_PORT"] = str(ports[len(STAGES) + i])
    if config.startswith("metrics+tracing"):
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp_endpoint
    if config.endswith("@10%"):
        env.update(SAMPLED)
    return env


def metrics_ports(env: dict[str, str]) -> dict[str, int]:
    if env.get("MLMESH_METRICS") == "off":
        return {}
    return {stage: int(env[f"MLMESH_{stage.upper()}_METRICS_PORT"]) for stage in STAGES}


def scrape(port: int, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:
        return response.read().decode()


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in Prometheus' text format (labels matched as a subset)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        series, _, value = line.rpartition(" ")
        found = dict(re.findall(r'(\w+)="([^"]*)"', series))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return None


class Scraper:
    """Scrapes every stage's /metrics every `interval` seconds on a thread of this (the parent)
    process, like a Prometheus server: its cost lands in the stages, not in the client."""

    def __init__(self, ports: dict[str, int], interval: float):
        self.ports, self.interval = ports, interval
        self.scrapes = self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for port in self.ports.values():
                try:
                    scrape(port)
                    self.scrapes += 1
                except OSError:  # the mesh is not up yet, or already gone
                    self.failures += 1

    def __enter__(self) -> Scraper:
        if self.ports and self.interval > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


# ---- child: one measurement in one configuration ------------------------------------------------
async def child_measure(args: argparse.Namespace, settings: Any, pids: dict[str, int]) -> dict:
    from services.client.mesh import MeshClient, PipelineConfig, load_request, preprocess_request
    from services.runtime import tracing

    source = synthetic_source(args.rows, args.features, args.seed)
    result: dict[str, Any] = {"tracing": tracing.enabled()}

    async def pipeline(force: bool) -> tuple[float, Any]:
        config = PipelineConfig(source=source, seed=args.seed, force_recompute=force)
        async with MeshClient(settings) as client:
            started = time.perf_counter()
            # The run's root span, as `mlmesh run` opens it: every stage call is its child.
            with tracing.run_span(client.run_id, "bench pipeline", **{"mlmesh.source": source}):
                run = await client.run_pipeline(config)
            return time.perf_counter() - started, run

    # Untimed: the stages import some libraries on first use, and the table comes into the page cache.
    result["warmup_seconds"], run = await pipeline(force=False)
    if "pipeline" in args.only:
        runs = []
        for _ in range(args.pipelines):
            stages_cpu, client_cpu = sum(cpu_seconds(pid) for pid in pids.values()), time.process_time()
            seconds, run = await pipeline(force=True)
            hits = [s.stage for s in run.stages if s.cache_hit]
            if hits:
                raise RuntimeError(f"forced recompute answered from cache: {hits}")
            runs.append(
                {
                    "seconds": seconds,
                    "stages": {s.stage: s.seconds for s in run.stages},
                    # CPU, beside wall time: on a shared 2-core machine it moves less with other load.
                    "stages_cpu_seconds": sum(cpu_seconds(pid) for pid in pids.values()) - stages_cpu,
                    "client_cpu_seconds": time.process_time() - client_cpu,
                }
            )
        result["pipeline"] = runs

    if "hits" in args.only:
        config = PipelineConfig(source=source, seed=args.seed)
        requests = {"loader": load_request(config), "preprocess": preprocess_request(config, run.load.dataset)}
        result["hits"] = {}
        async with MeshClient(settings) as client:
            for stage in HIT_STAGES:
                call = client.load if stage == "loader" else client.preprocess
                for _ in range(20):  # the channel, and the stage's memo entry and page cache, warm
                    await call(requests[stage])
                latencies, misses = [], 0
                stage_cpu, client_cpu = cpu_seconds(pids[stage]), time.process_time()
                started = time.perf_counter()
                for _ in range(args.hits):
                    began = time.perf_counter()
                    reply = await call(requests[stage])
                    latencies.append(time.perf_counter() - began)
                    misses += not reply.stage.cache_hit
                elapsed = time.perf_counter() - started
                if misses:
                    raise RuntimeError(f"{misses} of {args.hits} repeated {stage} calls were not cache hits")
                result["hits"][stage] = {
                    **percentiles(latencies),
                    "mean": sum(latencies) / len(latencies),
                    "seconds": elapsed,
                    # CPU per call: where an overhead goes, when latency alone is noisy.
                    "stage_cpu_per_call": (cpu_seconds(pids[stage]) - stage_cpu) / args.hits,
                    "client_cpu_per_call": (time.process_time() - client_cpu) / args.hits,
                }
    return result


def child_main(args: argparse.Namespace) -> int:
    from services.cli.launcher import LocalMesh
    from services.runtime import tracing
    from services.runtime.settings import Settings

    # The client traces too when the environment says so, like `mlmesh run` (service "bench").
    tracing.configure("bench")
    env = dict(os.environ)
    settings = Settings.from_env(env)
    base = Path(env["MLMESH_ARTIFACT_ROOT"]).parent
    mesh = LocalMesh(settings, env=env, log_dir=base / "logs")
    try:
        asyncio.run(mesh.start())
        pids = {stage: mesh.processes[stage].pid for stage in STAGES}
        result = asyncio.run(child_measure(args, settings, pids))
        # After the clock: the endpoint answers, and counted what was asked of it.
        if settings.metrics:
            pages = {stage: scrape(port) for stage, port in metrics_ports(env).items()}
            result["scrape"] = {
                "bytes": {stage: len(text) for stage, text in pages.items()},
                "loader_cache_hits": metric_value(
                    pages["loader"], "mlmesh_cache_requests_total", stage="loader", result="hit"
                ),
            }
    finally:
        mesh.stop()  # the stages flush their spans as they stop (tracing.shutdown)
        tracing.shutdown()
    print(json.dumps(result))
    return 0


# ---- parent: interleaved measurements -----------------------------------------------------------
def measure(config: str, args: argparse.Namespace, receiver: Any) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-observability-") as tmp:
        base = Path(tmp)
        env = config_env(config, base, receiver.endpoint)
        before = len(receiver.spans())
        command = [
            PYTHON,
            __file__,
            "--child",
            "--rows",
            str(args.rows),
            "--features",
            str(args.features),
            "--seed",
            str(args.seed),
            "--pipelines",
            str(args.pipelines),
            "--hits",
            str(args.hits),
            "--only",
            ",".join(args.only),
        ]
        parent_cpu = time.process_time()
        with Scraper(metrics_ports(env), args.scrape_every) as scraper:
            process = run_measured(command, env, base / "child.out", args.timeout)
        # This process only waits, scrapes and receives spans: its CPU is the receiver's and the scraper's.
        parent_cpu = time.process_time() - parent_cpu
        result = json.loads((base / "child.out").read_text().strip().splitlines()[-1])
        # The stages flushed as they stopped, and the child before it exited; a last export may still be in flight.
        spans = receiver.spans()[before:]
    result["process_seconds"], result["receiver_scraper_cpu_seconds"] = process["seconds"], parent_cpu
    result["scrapes"], result["scrape_failures"] = scraper.scrapes, scraper.failures
    services: dict[str, int] = {}
    for span in spans:
        services[span["service"]] = services.get(span["service"], 0) + 1
    result["spans"] = services
    return result


def collect(args: argparse.Namespace, results: dict, errors: dict[str, str]) -> None:
    from tests.otlp_receiver import OtlpReceiver

    with OtlpReceiver() as receiver:
        for repeat in range(args.repeats):
            order = CONFIGS[repeat % len(CONFIGS) :] + CONFIGS[: repeat % len(CONFIGS)]
            for config in order:
                print(f"  repeat {repeat + 1}/{args.repeats} {config} ...", end="", flush=True)
                started = time.perf_counter()
                try:
                    results["runs"][config].append(measure(config, args, receiver))
                    print(f" {time.perf_counter() - started:.1f}s", flush=True)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception:  # noqa: BLE001 - reported at the end; the other measurements still run
                    errors[f"{config} repeat {repeat + 1}"] = traceback.format_exc()
                    results["runs"][config].append(None)
                    print(" FAILED", flush=True)


# ---- report -----------------------------------------------------------------------------------
def pipeline_seconds(run: dict | None) -> float | None:
    return None if not run or not run.get("pipeline") else median([p["seconds"] for p in run["pipeline"]])


def pipeline_cpu(run: dict | None) -> float | None:
    if not run or not run.get("pipeline"):
        return None
    return median([p["stages_cpu_seconds"] + p["client_cpu_seconds"] for p in run["pipeline"]])


def hit_value(run: dict | None, stage: str, key: str) -> float | None:
    return None if not run or stage not in run.get("hits", {}) else run["hits"][stage][key]


def paired(results: dict, config: str, value: Any, combine: Any) -> float | None:
    """Median over repeats of combine(config's value, off's value in the same repeat)."""
    pairs = [(value(r), value(o)) for r, o in zip(results["runs"][config], results["runs"]["off"], strict=False)]
    return median([combine(a, b) for a, b in pairs if a is not None and b is not None])


def summarize(args: argparse.Namespace, results: dict) -> dict:
    summary: dict[str, Any] = {}
    for config in CONFIGS:
        runs = results["runs"][config]
        entry: dict[str, Any] = {"measurements": sum(r is not None for r in runs)}
        if "pipeline" in args.only:
            entry["pipeline_seconds"] = median([pipeline_seconds(r) for r in runs])
            entry["pipeline_ratio"] = paired(results, config, pipeline_seconds, lambda a, b: a / b)
            entry["pipeline_cpu_seconds"] = median([pipeline_cpu(r) for r in runs])
            entry["pipeline_cpu_ratio"] = paired(results, config, pipeline_cpu, lambda a, b: a / b)
            entry["pipeline_stage_seconds"] = {
                stage: median([median([p["stages"][stage] for p in r["pipeline"]]) for r in runs if r])
                for stage in STAGES
            }
        if "hits" in args.only:
            entry["hits"] = {}
            for stage in HIT_STAGES:
                hit = {
                    key: median([hit_value(r, stage, key) for r in runs])
                    for key in ("p50", "p99", "mean", "stage_cpu_per_call", "client_cpu_per_call")
                }
                for key in ("p50", "p99", "mean", "stage_cpu_per_call", "client_cpu_per_call"):
                    hit[f"{key}_added"] = paired(
                        results, config, lambda r, k=key, s=stage: hit_value(r, s, k), lambda a, b: a - b
                    )
                entry["hits"][stage] = hit
        entry["spans"] = {}
        for r in runs:
            for service, count in (r or {}).get("spans", {}).items():
                entry["spans"][service] = entry["spans"].get(service, 0) + count
        summary[config] = entry
    # Met when every measured figure of the configuration is within its goal.
    met = {}
    for config in CONFIGS[1:]:
        figures = []
        if "pipeline" in args.only:
            figures.append(_met(summary[config]["pipeline_ratio"], PIPELINE_GOAL))
        if "hits" in args.only:
            figures += [_met(_ms(summary[config]["hits"][s]["p50_added"]), HIT_GOAL_MS) for s in HIT_STAGES]
        met[config] = all(figures)
    summary["goals"] = {"pipeline_ratio_max": PIPELINE_GOAL, "hit_added_ms_max": HIT_GOAL_MS, "met": met}
    return summary


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _met(value: float | None, goal: float) -> bool:
    return value is not None and value <= goal


def _text(value: float | None, fmt: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, fmt)


def report(args: argparse.Namespace, results: dict, summary: dict, errors: dict[str, str]) -> None:
    print(
        f"\n{args.rows:,} rows x {args.features} features, {args.repeats} repeat(s) of each configuration "
        f"(interleaved), {args.pipelines} forced pipeline(s) and {args.hits} hits per stage per measurement, "
        f"{os.cpu_count()} cores; medians, differences and ratios paired against `off` within a repeat"
    )
    if "pipeline" in args.only:
        print(
            "\nPipeline (force_recompute: every stage computes): wall time as the caller sees it, and the CPU "
            "of the five stages and the client together:"
        )
        rows = []
        for config in CONFIGS:
            s = summary[config]
            per_run = [pipeline_seconds(r) for r in results["runs"][config]]
            stages = s["pipeline_stage_seconds"]
            rows.append(
                [
                    config,
                    _text(s["pipeline_seconds"], ".3f"),
                    _text(s["pipeline_ratio"], ".3f") + "x" if config != "off" else "1",
                    _text(s["pipeline_cpu_seconds"], ".3f"),
                    _text(s["pipeline_cpu_ratio"], ".3f") + "x" if config != "off" else "1",
                    ", ".join(_text(v, ".2f") for v in per_run),
                    " ".join(f"{_text(stages[st], '.2f')}" for st in STAGES),
                ]
            )
        print_table(
            [
                "config",
                "seconds",
                "vs off",
                "CPU s",
                "vs off",
                "each repeat (s)",
                f"per stage (server s: {' '.join(STAGES)})",
            ],
            rows,
        )
        # A ratio nearer 1 than the baseline's own spread is not resolved by this run.
        baseline = [v for v in (pipeline_seconds(r) for r in results["runs"]["off"]) if v is not None]
        if len(baseline) > 1:
            print(
                f"  noise: `off` alone spreads {100 * (max(baseline) - min(baseline)) / median(baseline):.0f}% "
                f"(max - min over median) across its {len(baseline)} repeats"
            )
    if "hits" in args.only:
        print("\nCache hits, one call at a time (ms per call; added = median of the paired differences to `off`):")
        rows = []
        for stage in HIT_STAGES:
            for config in CONFIGS:
                h = summary[config]["hits"][stage]

                def added(key: str, h: dict = h, config: str = config) -> str:
                    return "" if config == "off" else _text(_ms(h[key]), "+.3f")

                rows.append(
                    [
                        stage,
                        config,
                        _text(_ms(h["p50"]), ".3f"),
                        added("p50_added"),
                        _text(_ms(h["p99"]), ".3f"),
                        added("p99_added"),
                        _text(_ms(h["stage_cpu_per_call"]), ".3f"),
                        added("stage_cpu_per_call_added"),
                        _text(_ms(h["client_cpu_per_call"]), ".3f"),
                        added("client_cpu_per_call_added"),
                    ]
                )
        print_table(
            ["stage", "config", "p50", "added", "p99", "added", "stage CPU", "added", "client CPU", "added"], rows
        )
    spans = {c: summary[c]["spans"] for c in CONFIGS}
    print(
        "\nSpans received by the OTLP receiver: "
        + "; ".join(
            f"{c}: " + (", ".join(f"{k} {v}" for k, v in sorted(s.items())) or "none") for c, s in spans.items()
        )
    )
    scrapes = {c: sum((r or {}).get("scrapes", 0) for r in results["runs"][c]) for c in CONFIGS}
    receiver = {c: median([(r or {}).get("receiver_scraper_cpu_seconds") for r in results["runs"][c]]) for c in CONFIGS}
    print(
        "CPU of this process (receiver, scraper) per measurement, median: "
        + ", ".join(f"{c} {_text(v, '.2f')} s" for c, v in receiver.items())
    )
    load = results.get("load_average", {})
    if load:
        print(
            f"Load average (1 min) before / after the run: {load.get('before', 0):.2f} / {load.get('after', 0):.2f} "
            f"on {os.cpu_count()} cores (other work on the machine shows here)"
        )
    print(
        f"/metrics scrapes during the measurements (every {args.scrape_every:g} s, five stages): "
        + ", ".join(f"{c} {n}" for c, n in scrapes.items())
    )

    print("\nGoals:")
    rows = []
    for config in CONFIGS[1:]:
        if "pipeline" in args.only:
            ratio = summary[config]["pipeline_ratio"]
            rows.append(
                [
                    f"pipeline, {config} / off",
                    _text(ratio, ".3f") + "x",
                    f"<= {PIPELINE_GOAL:.2f}x",
                    "MET" if _met(ratio, PIPELINE_GOAL) else "MISSED",
                ]
            )
        if "hits" in args.only:
            for stage in HIT_STAGES:
                added = _ms(summary[config]["hits"][stage]["p50_added"])
                rows.append(
                    [
                        f"{stage} cache hit p50, {config} - off",
                        _text(added, "+.3f") + " ms",
                        f"<= {HIT_GOAL_MS} ms",
                        "MET" if _met(added, HIT_GOAL_MS) else "MISSED",
                    ]
                )
    print_table(["figure", "measured", "goal", "status"], rows)
    for name, text in errors.items():
        print(f"\nFAILED: {name}\n{text}", file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rows",
        type=lambda text: int(text.replace("_", "")),
        default=100_000,
        help="rows of the synthetic table the pipeline runs on",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="measurements of each configuration; medians are reported"
    )
    parser.add_argument("--hits", type=int, default=500, help="cache-hit calls per stage per measurement")
    parser.add_argument(
        "--pipelines", type=int, default=3, help="forced pipelines per measurement (their median is the measurement's)"
    )
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of sections: {', '.join(SECTIONS)}")
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--scrape-every",
        type=float,
        default=5.0,
        help="seconds between scrapes of each stage's /metrics in the metrics configurations; 0: none",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one measurement may take")
    parser.add_argument("--json", type=Path, help="write every raw number here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one measurement, in its env
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SECTIONS)
    if unknown or not args.only:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.repeats < 1 or args.hits < 1 or args.pipelines < 1:
        parser.error("--repeats, --hits and --pipelines must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, bench_scale._exit_on_signal)  # unwind through `finally`: meshes and children stop
    if args.child:
        return child_main(args)
    results: dict[str, Any] = {
        "config": {
            "rows": args.rows,
            "features": args.features,
            "seed": args.seed,
            "repeats": args.repeats,
            "hits": args.hits,
            "pipelines": args.pipelines,
            "sections": args.only,
            "scrape_every": args.scrape_every,
            "cpus": os.cpu_count(),
            "configs": list(CONFIGS),
        },
        "runs": {config: [] for config in CONFIGS},  # one entry per repeat, None where it failed
    }
    errors: dict[str, str] = {}
    results["load_average"] = {"before": os.getloadavg()[0]}
    try:
        collect(args, results, errors)
    finally:
        results["load_average"]["after"] = os.getloadavg()[0]
        Processes.cleanup()
        summary = summarize(args, results)
        report(args, results, summary, errors)
        if args.json:
            results.update(summary=summary, errors=errors)
            args.json.write_text(json.dumps(results, indent=2, default=str))
            print(f"\nraw numbers: {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
