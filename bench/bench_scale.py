"""The mesh at scale: time, memory, throughput and start-up against their goals, in one run.

Quick check (50,000 rows, 3 repeats, every section; a few minutes on 2 cores):

    .venv/bin/python bench/bench_scale.py

The 1M-row table:

    .venv/bin/python bench/bench_scale.py --rows 1000000 --repeats 3 --json bench-scale-1m.json

The 10M-row table, with each stage's growth from 1M to 10M rows (the 10M dataset
is 2.6 GB of float64 before any copy: have tens of GB of RAM free, and expect
well over an hour, most of it in the plain-Flyte runs):

    .venv/bin/python bench/bench_scale.py --rows 1000000,10000000 --repeats 3 --json bench-scale-10m.json

`--only pipeline,rss,flyte,hits,health,start,make` picks sections (default: all).
`--prewarm` runs a tiny sklearn:iris pipeline on each mesh (and in the baseline) before
the timed run, so that nothing done once per process (a lazy import, a first
allocation) is timed; the launcher's fork server already imports scikit-learn and
skops once for all stages (services/cli/preload.py). `--health-model hist_gradient_boosting` loads the trainer
with OpenMP threads instead of a forest's.

Workload: `synthetic:classification?rows=N&features=32&classes=2&seed=1`, the default
model (logistic_regression), split and model seed 1. Every mesh is five real stage
processes (services.cli.launcher.LocalMesh) on ephemeral ports with a fresh
artifact store in a temporary folder, MLMESH_MAX_DATASET_BYTES = 64 GiB so large
tables are accepted, and MLMESH_RPC_TIMEOUT_SECONDS = 7200 so a slow stage is not
cut off. "Warm-started" means the processes answer SERVING before the clock starts.
Only the pipeline is timed, never the start of the mesh.

What it measures, and the goal printed beside it (MET / MISSED):

  pipeline  mesh pipeline wall time (MeshClient.run_pipeline, cold store) over the
            same stage logic called in one process with no gRPC and no store (a
            subprocess: see baseline_main), paired per repeat; goal <= 1.10.
            Per stage: the stage's own seconds (StageInfo.seconds), the caller's
            seconds and the work seconds from the manifest, beside the baseline's step.
            With two or more sizes: each stage's growth in seconds from one size to the
            next; goal <= 1.1 x the size ratio.
  rss       each stage's peak RSS (VmHWM, reset before the run through clear_refs)
            over the largest artifact it reads or writes; goal <= 1.5. Also its RSS
            before and right after the run, and the five stages' peak together
            (sampled sum every 20 ms, and the sum of the peaks), at each size.
  flyte     `pyflyte run workflow/pipeline.py training_pipeline` against a warm mesh
            with a fresh store, over `pyflyte run bench/flyte_plain.py plain_pipeline`
            (a plain flytekit workflow passing DataFrames and arrays), both as
            subprocesses with a fresh HOME (Flyte's local cache) and TMPDIR; goal <= 0.80.
  hits      loader cache hits per second: K concurrent callers (default 16) on one
            channel for a few seconds, every reply checked to be a hit; goal >= 2000/s.
  health    grpc.health.v1 Check latency on the trainer every 20 ms while it fits a
            random forest (n_jobs=-1) on --health-rows rows; goal p99 <= 10 ms and
            max <= 50 ms. The trainer's CPU use during the fit is printed beside it.
  start     `mlmesh up` until all five stages answer SERVING; goal <= 2 s. Also each
            stage's import time (`python -c "import services.<stage>.service"`).
  make      the `run` recipe of the Makefile (read from it, run directly so make does
            not reinstall the venv), cold (fresh store, fresh Flyte cache) and warm
            (the same store again); goal <= 5 s cold.

`--json PATH` writes every raw number. No process outlives the script: meshes are
stopped in `finally` (SIGTERM and SIGHUP unwind to it too), subprocesses run in their
own process groups and are killed as groups, and stages started here die with this
process (PR_SET_PDEATHSIG). Only a SIGKILL of this script leaves a running pyflyte,
`mlmesh up` or `with-mesh` subprocess (and its temporary folder) behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

# Only the standard library at module level: `--baseline` mode must hold nothing but the
# stage logic, so its peak RSS and import set are those of "the same logic in one process".
# gRPC, the client and the launcher are imported inside the functions that use them.

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin" if (ROOT / ".venv" / "bin" / "python").exists() else Path(sys.executable).parent
PYTHON = sys.executable
STAGES = ("loader", "preprocess", "features", "trainer", "evaluator")  # services.runtime.settings.STAGES
SECTIONS = ("pipeline", "rss", "flyte", "hits", "health", "start", "make")
GIB = 1024**3
MAX_DATASET_BYTES = 64 * GIB
HIT_SOURCE = "sklearn:breast_cancer"  # small, so a hit is a memo lookup and nothing else
WARMUP_SOURCE = "sklearn:iris"  # --prewarm: a different table, so the measured run still misses every cache


def synthetic_source(rows: int, features: int, seed: int) -> str:
    return f"synthetic:classification?rows={rows}&features={features}&classes=2&seed={seed}"


# ---- process hygiene ------------------------------------------------------------------------
class Processes:
    """Everything this script started, so `finally` (and a SIGTERM) can stop all of it."""

    meshes: ClassVar[list[Any]] = []  # LocalMesh instances
    groups: ClassVar[list[subprocess.Popen]] = []  # subprocesses started as leaders of their own process group

    @classmethod
    def cleanup(cls) -> None:
        for mesh in list(cls.meshes):
            with contextlib.suppress(Exception):
                mesh.stop()
        cls.meshes.clear()
        for process in list(cls.groups):
            kill_group(process)
        cls.groups.clear()


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL a subprocess and everything in its process group (a launcher's stages too)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        process.wait(timeout=5)
    with contextlib.suppress(ValueError):
        Processes.groups.remove(process)


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through every `finally`, unlike the default action


def spawn(command: list[str], env: dict[str, str], output: Path, cwd: Path = ROOT) -> subprocess.Popen:
    """A subprocess in its own process group (killable as a whole), output to a file (no pipe to fill)."""
    with open(output, "wb") as sink:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    Processes.groups.append(process)
    return process


def run_measured(command: list[str], env: dict[str, str], output: Path, timeout: float, cwd: Path = ROOT) -> dict:
    """Wall time, exit status and peak RSS (wait4's ru_maxrss: its largest process) of one command."""
    started = time.perf_counter()
    process = spawn(command, env, output, cwd)
    # On timeout only signal the group: the wait4 below reaps it (a second waiter would race it).
    timer = threading.Timer(timeout, lambda: os.killpg(process.pid, signal.SIGKILL))
    timer.start()
    try:
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        timer.cancel()
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    kill_group(process)  # anything it left behind in its group
    result = {"seconds": seconds, "returncode": process.returncode, "peak_rss_bytes": usage.ru_maxrss * 1024}
    if process.returncode != 0:
        tail = output.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{shlex.join(command)} exited with {process.returncode} after {seconds:.1f}s:\n{tail}")
    return result


# ---- environments -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    """This environment without MLMESH_* settings: an inherited address or store would mislead the run."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MLMESH_")}


def mesh_env(base: Path) -> dict[str, str]:
    """A mesh of its own: fresh ports, a store in `base`, limits raised for large tables."""
    env = clean_env()
    env.update(
        {
            "MLMESH_ARTIFACT_ROOT": str(base / "artifacts"),
            "MLMESH_MAX_DATASET_BYTES": str(MAX_DATASET_BYTES),
            "MLMESH_RPC_TIMEOUT_SECONDS": "7200",
        }
    )
    env.update({f"MLMESH_{stage.upper()}_PORT": str(free_port()) for stage in STAGES})
    return env


def flyte_env(env: dict[str, str], base: Path) -> dict[str, str]:
    """A fresh HOME (Flyte's local cache lives in ~/.flyte) and TMPDIR (its raw data and sandboxes)."""
    (base / "home").mkdir(exist_ok=True)
    (base / "tmp").mkdir(exist_ok=True)
    return {**env, "HOME": str(base / "home"), "TMPDIR": str(base / "tmp")}


@contextlib.contextmanager
def mesh_running(base: Path) -> Iterator[tuple[Any, Any, dict[str, str]]]:
    """Five stage processes, SERVING, with a fresh store in `base`; stopped on the way out."""
    from services.cli.launcher import LocalMesh
    from services.runtime.settings import Settings

    env = mesh_env(base)
    settings = Settings.from_env(env)
    mesh = LocalMesh(settings, env=env, log_dir=base / "logs")
    Processes.meshes.append(mesh)
    try:
        asyncio.run(mesh.start())
        yield mesh, settings, env
    finally:
        mesh.stop()
        Processes.meshes.remove(mesh)


# ---- /proc ------------------------------------------------------------------------------------
def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS) and friends of one process, in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if name.startswith("Vm") and len(parts) == 2 and parts[1] == "kB":
            values[name] = int(parts[0]) * 1024
    return values


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0; allowed for our own processes)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_of(pids: set[int]) -> list[int]:
    """Processes whose parent is one of `pids` (a stage that forked workers would show here)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) in pids:
                    found.append(int(entry.name))
    return found


class RssSampler:
    """The five stages' RSS summed every `interval` seconds, on a thread: the true peak of the sum."""

    def __init__(self, pids: list[int], interval: float = 0.02):
        self.pids, self.interval = pids, interval
        self.peak_total = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                total = sum(proc_status(pid).get("VmRSS", 0) for pid in self.pids)
                self.peak_total = max(self.peak_total, total)
                self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---- 1. the mesh pipeline, with memory --------------------------------------------------------
CLIENT_METHODS = {
    "loader": "load",
    "preprocess": "preprocess",
    "features": "build_features",
    "trainer": "train",
    "evaluator": "evaluate",
}


def time_client_calls(client: Any, seconds: dict[str, float]) -> None:
    """Record each stage call's wall time as the caller sees it (gRPC and all), around run_pipeline."""
    for stage, name in CLIENT_METHODS.items():
        original = getattr(client, name)

        async def timed(*args: Any, _original: Callable = original, _stage: str = stage, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await _original(*args, **kwargs)
            finally:
                seconds[_stage] = time.perf_counter() - started

        setattr(client, name, timed)  # run_pipeline looks the methods up on the instance


def artifact_refs(message: Any) -> dict[str, Any]:
    """Every ArtifactRef field set in a reply: a stage's outputs."""
    return {
        field.name: value
        for field, value in message.ListFields()
        if field.message_type is not None and field.message_type.full_name == "mlmesh.common.v1.ArtifactRef"
    }


def stage_artifacts(run: Any, root: str) -> dict[str, dict]:
    """Per stage: the sizes of what it wrote (its reply) and read (its outputs' manifest), and its work seconds."""
    from services.runtime.store import ArtifactStore

    store = ArtifactStore(root)
    replies = dict(zip(STAGES, (run.load, run.preprocess, run.features, run.train, run.evaluate), strict=True))
    out = {}
    for stage, reply in replies.items():
        outputs = artifact_refs(reply)
        manifest = store.manifest(next(iter(outputs.values())).sha256) or {}
        inputs = {name: int(ref["size_bytes"]) for name, ref in (manifest.get("inputs") or {}).items()}
        out[stage] = {
            "outputs": {name: ref.size_bytes for name, ref in outputs.items()},
            "inputs": inputs,
            "work_seconds": manifest.get("duration_seconds"),
        }
    return out


async def run_once(settings: Any, config: Any) -> Any:
    """One pipeline through a client of its own (the --prewarm run)."""
    from services.client.mesh import MeshClient

    async with MeshClient(settings) as client:
        return await client.run_pipeline(config)


def measure_mesh_pipeline(rows: int, args: argparse.Namespace) -> dict:
    """One cold-store pipeline on a warm-started mesh: times per stage and memory per stage."""
    from services.client.mesh import MeshClient, PipelineConfig

    config = PipelineConfig(source=synthetic_source(rows, args.features, args.seed), seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp, mesh_running(Path(tmp)) as (mesh, settings, _):
        pids = {stage: mesh.processes[stage].pid for stage in STAGES}
        if args.prewarm:
            # Stages import some libraries on first use (scikit-learn in the loader, skops),
            # after SERVING: a tiny pipeline pays that first, so only per-table work is timed.
            asyncio.run(run_once(settings, PipelineConfig(source=WARMUP_SOURCE, seed=args.seed)))
        idle = {stage: proc_status(pid)["VmRSS"] for stage, pid in pids.items()}
        reset = {stage: reset_peak(pid) for stage, pid in pids.items()}
        client_seconds: dict[str, float] = {}

        async def drive() -> Any:
            async with MeshClient(settings) as client:
                time_client_calls(client, client_seconds)
                return await client.run_pipeline(config)

        with RssSampler(list(pids.values())) as sampler:
            started = time.perf_counter()
            run = asyncio.run(drive())
            seconds = time.perf_counter() - started
        after = {stage: proc_status(pid) for stage, pid in pids.items()}
        children = children_of(set(pids.values()))
        artifacts = stage_artifacts(run, settings.artifact_root)
    hits = [s.stage for s in run.stages if s.cache_hit]
    if hits:
        raise RuntimeError(f"a cold store answered from cache: {hits}")
    stages = {}
    for stage, info in zip(STAGES, run.stages, strict=True):
        sizes = {**artifacts[stage]["inputs"], **artifacts[stage]["outputs"]}
        largest = max(sizes.items(), key=lambda item: item[1])
        stages[stage] = {
            "server_seconds": info.seconds,
            "client_seconds": client_seconds[stage],
            "work_seconds": artifacts[stage]["work_seconds"],
            "rss_idle_bytes": idle[stage],
            "peak_rss_bytes": after[stage]["VmHWM"],
            "rss_after_bytes": after[stage]["VmRSS"],
            "peak_reset": reset[stage],
            "inputs_bytes": artifacts[stage]["inputs"],
            "outputs_bytes": artifacts[stage]["outputs"],
            "largest_artifact": largest[0],
            "largest_artifact_bytes": largest[1],
        }
    return {
        "seconds": seconds,
        "stages": stages,
        "run_id": run.run_id,
        "peak_rss_total_sampled_bytes": sampler.peak_total,
        "rss_samples": sampler.samples,
        "peak_rss_sum_of_stage_peaks_bytes": sum(s["peak_rss_bytes"] for s in stages.values()),
        "stage_children": len(children),
    }


# ---- 2. the same logic in one process -----------------------------------------------------------
def baseline_main(rows: int, features: int, seed: int, max_bytes: int, prewarm: bool) -> dict:
    """Child mode: the stage logic called directly, each step timed (bench_mesh.in_process, step by step).

    Not bench_mesh.in_process itself: that one caps the dataset at 2 GiB (10M rows need
    2.6 GB) and times the whole, while the per-stage ratios need each step.
    """
    started = time.perf_counter()
    from services.evaluator import logic as evaluator_logic
    from services.features import logic as features_logic
    from services.loader import logic as loader_logic
    from services.preprocess import logic as preprocess_logic
    from services.runtime.stage import Run
    from services.trainer import logic as trainer_logic

    imports = time.perf_counter() - started

    def run_steps(source_text: str) -> tuple[dict[str, float], Any]:
        steps: dict[str, float] = {}

        @contextlib.contextmanager
        def step(name: str) -> Iterator[None]:
            began = time.perf_counter()
            yield
            steps[name] = time.perf_counter() - began

        with step("loader"):
            source = loader_logic.parse_source(source_text)
            loaded = loader_logic.load_dataset(source, "", None, max_bytes)
        target, task = loaded.target_column, loaded.task.kind
        roles = {c.name: c.role for c in loaded.columns}
        with step("preprocess"):
            prepared = preprocess_logic.preprocess(loaded.frame, target, task, 0.2, seed)
        with step("features"):
            engineered = features_logic.engineer(
                prepared.train,
                prepared.test,
                target,
                task,
                roles,
                prepared.class_names,
                features_logic.FeatureOptions(seed=seed),
                max_bytes,
            )
        with step("trainer"):
            model = trainer_logic.build_estimator(task, trainer_logic.DEFAULT_MODELS[task], {}, seed)
            model, _ = trainer_logic.fit(model, engineered.x_train, engineered.y_train, Run.detached())
        with step("evaluator"):
            evaluation = evaluator_logic.evaluate(model, engineered.x_test, engineered.y_test)
        return steps, evaluation

    if prewarm:
        run_steps(WARMUP_SOURCE)  # the same first-use imports the mesh's --prewarm pays
    steps, evaluation = run_steps(synthetic_source(rows, features, seed))
    return {
        "seconds": sum(steps.values()),
        "steps": steps,
        "import_seconds": imports,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "accuracy": evaluation.metrics.get("accuracy"),
    }


def measure_baseline(rows: int, args: argparse.Namespace) -> dict:
    """The baseline in a subprocess, so its memory and imports stay out of this process."""
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        output = Path(tmp) / "baseline.out"
        command = [
            PYTHON,
            __file__,
            "--baseline",
            str(rows),
            "--features",
            str(args.features),
            "--seed",
            str(args.seed),
            *(["--prewarm"] if args.prewarm else []),
        ]
        process = run_measured(command, clean_env(), output, args.timeout)
        result = json.loads(output.read_text().strip().splitlines()[-1])
    result["process_seconds"] = process["seconds"]  # with interpreter start and imports
    return result


# ---- 4. pyflyte on the mesh vs plain flytekit -------------------------------------------------------
def measure_flyte_mesh(rows: int, args: argparse.Namespace) -> dict:
    """`pyflyte run` of the mesh's workflow against a warm mesh with a fresh store."""
    from services.client.mesh import PipelineConfig

    command = [
        str(BIN / "pyflyte"),
        "run",
        "workflow/pipeline.py",
        "training_pipeline",
        "--source",
        synthetic_source(rows, args.features, args.seed),
        "--seed",
        str(args.seed),
    ]
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp, mesh_running(Path(tmp)) as (_, settings, env):
        if args.prewarm:
            asyncio.run(run_once(settings, PipelineConfig(source=WARMUP_SOURCE, seed=args.seed)))
        return run_measured(command, flyte_env(env, Path(tmp)), Path(tmp) / "pyflyte.out", args.timeout)


def measure_flyte_plain(rows: int, args: argparse.Namespace) -> dict:
    """`pyflyte run` of bench/flyte_plain.py: DataFrames and arrays passed through Flyte."""
    command = [
        str(BIN / "pyflyte"),
        "run",
        "bench/flyte_plain.py",
        "plain_pipeline",
        "--rows",
        str(rows),
        "--features",
        str(args.features),
        "--seed",
        str(args.seed),
    ]
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        env = flyte_env({**clean_env(), "MLMESH_MAX_DATASET_BYTES": str(MAX_DATASET_BYTES)}, Path(tmp))
        return run_measured(command, env, Path(tmp) / "plain.out", args.timeout)


# ---- 5. cache-hit throughput ------------------------------------------------------------------------
def measure_hits(args: argparse.Namespace) -> dict:
    from mlmesh.loader.v1 import loader_pb2
    from services.client.mesh import MeshClient

    request = loader_pb2.LoadRequest(source=HIT_SOURCE)

    async def hammer(settings: Any) -> dict:
        async with MeshClient(settings) as client:  # one channel per stage: every caller shares the loader's
            await client.load(request)  # computes, and fills the memo
            for _ in range(20):
                await client.load(request)  # warm the channel and the loader's page cache
            latencies: list[float] = []
            misses = 0
            deadline = time.perf_counter() + args.hit_seconds

            async def caller() -> None:
                nonlocal misses
                while time.perf_counter() < deadline:
                    began = time.perf_counter()
                    reply = await client.load(request)
                    latencies.append(time.perf_counter() - began)
                    misses += not reply.stage.cache_hit

            started = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(args.hit_callers)))
            elapsed = time.perf_counter() - started
        if misses:
            raise RuntimeError(f"{misses} of {len(latencies)} repeated loads were not cache hits")
        return {
            "calls": len(latencies),
            "seconds": elapsed,
            "calls_per_second": len(latencies) / elapsed,
            "callers": args.hit_callers,
            **percentiles(latencies),
        }

    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp, mesh_running(Path(tmp)) as (mesh, settings, _):
        loader = mesh.processes["loader"].pid
        cpu_before = cpu_seconds(loader)
        result = asyncio.run(hammer(settings))
        result["loader_cpu_cores"] = (cpu_seconds(loader) - cpu_before) / result["seconds"]
    return result


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"n": len(ordered), "p50": at(0.50), "p99": at(0.99), "max": ordered[-1]}


# ---- 6. health under a CPU-saturating fit ---------------------------------------------------------
# The fits that keep the trainer busy on every core: a forest (threads, n_jobs=-1, grown in
# ~100 warm-start steps) or gradient boosting (OpenMP, one call, no early stop).
HEALTH_FITS: dict[str, Callable[[int], dict[str, str]]] = {
    "random_forest": lambda size: {"n_estimators": str(size), "n_jobs": "-1"},
    "hist_gradient_boosting": lambda size: {"max_iter": str(size), "early_stopping": "false"},
}


def measure_health(args: argparse.Namespace) -> dict:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from mlmesh.trainer.v1 import trainer_pb2
    from services.client.mesh import (
        MeshClient,
        PipelineConfig,
        features_request,
        load_request,
        preprocess_request,
    )

    config = PipelineConfig(source=synthetic_source(args.health_rows, args.features, args.seed), seed=args.seed)

    async def check(stub: Any) -> float:
        began = time.perf_counter()
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"trainer health says {reply.status}")
        return time.perf_counter() - began

    async def probe(settings: Any, trainer_pid: int) -> dict:
        async with MeshClient(settings) as client, grpc.aio.insecure_channel(settings.addresses["trainer"]) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            idle = []
            for _ in range(100):
                idle.append(await check(stub))
                await asyncio.sleep(0.02)
            # The trainer's inputs first, so only the fit overlaps the checks.
            loaded = await client.load(load_request(config))
            prepared = await client.preprocess(preprocess_request(config, loaded.dataset))
            features = await client.build_features(features_request(config, prepared.train, prepared.test))
            request = trainer_pb2.TrainRequest(
                x_train=features.x_train,
                y_train=features.y_train,
                feature_schema=features.feature_schema,
                model=args.health_model,
                hyperparameters=HEALTH_FITS[args.health_model](args.health_size),
                seed=args.seed,
            )
            cpu_before = cpu_seconds(trainer_pid)
            started = time.perf_counter()
            training = asyncio.ensure_future(client.train(request))
            busy = []
            while not training.done():
                busy.append(await check(stub))
                await asyncio.sleep(0.02)
            await training
            fit_seconds = time.perf_counter() - started
            cores = (cpu_seconds(trainer_pid) - cpu_before) / fit_seconds
        return {
            "idle": percentiles(idle),
            "busy": percentiles(busy),
            "fit_seconds": fit_seconds,
            "trainer_cpu_cores": cores,
            "cpus": os.cpu_count(),
            "rows": args.health_rows,
            "model": args.health_model,
            "hyperparameters": dict(request.hyperparameters),
            "raw_busy": busy,
        }

    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp, mesh_running(Path(tmp)) as (mesh, settings, _):
        return asyncio.run(probe(settings, mesh.processes["trainer"].pid))


# ---- 7. mlmesh up until SERVING, and import times --------------------------------------------------
def measure_start(args: argparse.Namespace) -> dict:
    from services.client.mesh import check_health
    from services.runtime.settings import Settings

    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        env = mesh_env(Path(tmp))
        settings = Settings.from_env(env)

        async def all_serving(up: subprocess.Popen) -> None:
            deadline = time.monotonic() + 60
            while True:
                statuses = await asyncio.gather(
                    *(check_health(settings.addresses[s], timeout=0.5, settings=settings) for s in STAGES)
                )
                if all(status == "SERVING" for status in statuses):
                    return
                if up.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"mlmesh up exited ({up.returncode}) or timed out; statuses {statuses}:\n"
                        + (Path(tmp) / "up.out").read_text(errors="replace")[-2000:]
                    )
                await asyncio.sleep(0.02)

        started = time.perf_counter()
        up = spawn([str(BIN / "mlmesh"), "up", "--log-dir", str(Path(tmp) / "logs")], env, Path(tmp) / "up.out")
        try:
            asyncio.run(all_serving(up))
            serving = time.perf_counter() - started
            stopping = time.perf_counter()
            up.send_signal(signal.SIGINT)  # what Ctrl-C sends: mlmesh up stops its stages and exits
            code = up.wait(timeout=60)
            stopped = time.perf_counter() - stopping
        finally:
            kill_group(up)
    return {"serving_seconds": serving, "stop_seconds": stopped, "returncode": code}


def measure_imports() -> dict:
    """Each stage's start-up imports (what `python -m services.<stage>` imports before serving)."""

    def wall(code: str) -> float:
        started = time.perf_counter()
        subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=clean_env(), check=True, capture_output=True)
        return time.perf_counter() - started

    result = {"interpreter": wall("pass")}
    for stage in STAGES:
        result[stage] = wall(f"import uvloop, services.runtime.server, services.{stage}.service")
    return result


# ---- 8. make run, cold and warm ---------------------------------------------------------------------
def make_run_command(log_dir: Path) -> list[str]:
    """The Makefile's `run` recipe, with its log folder moved out of the repository."""
    makefile = (ROOT / "Makefile").read_text()
    match = re.search(r"^run:.*\n\t(.+)$", makefile, re.MULTILINE)
    if match is None:
        raise RuntimeError("no `run:` recipe found in the Makefile")
    recipe = match.group(1).replace("$(BIN)", str(BIN)).replace("artifacts/logs", str(log_dir))
    if "artifacts" in recipe or "$(" in recipe:
        raise RuntimeError(f"the run recipe changed and would write into the repository: {recipe}")
    return shlex.split(recipe)


def measure_make(args: argparse.Namespace) -> dict:
    # Not `make run` itself: pyproject.toml is newer than .venv/.installed in a working
    # checkout, which makes make reinstall the venv first. The recipe is what `make run`
    # costs "with the venv present".
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        base = Path(tmp)
        command = make_run_command(base / "logs")
        env = flyte_env(mesh_env(base), base)
        cold = run_measured(command, env, base / "make-cold.out", args.timeout)
        env.update({f"MLMESH_{stage.upper()}_PORT": str(free_port()) for stage in STAGES})  # same store, new ports
        warm = run_measured(command, env, base / "make-warm.out", args.timeout)
    return {"command": shlex.join(command), "cold": cold, "warm": warm}


# ---- the run --------------------------------------------------------------------------------------
def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def collect(args: argparse.Namespace, results: dict, errors: dict[str, str]) -> None:
    """Run the chosen sections, recording each failure and going on with the rest."""

    def attempt(name: str, fn: Callable[[], Any]) -> Any:
        print(f"  {name} ...", end="", flush=True)
        started = time.perf_counter()
        try:
            value = fn()
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception:  # noqa: BLE001 - reported at the end; the other sections still run
            errors[name] = traceback.format_exc()
            print(" FAILED", flush=True)
            return None
        print(f" {time.perf_counter() - started:.1f}s", flush=True)
        return value

    chosen = set(args.only)
    for rows in args.rows:
        size = results["sizes"][str(rows)]
        for repeat in range(args.repeats):
            print(f"{rows:,} rows, repeat {repeat + 1}/{args.repeats}", flush=True)
            # Alternate which side goes first, so drift (page cache, thermal) does not favour one.
            order = [0, 1] if repeat % 2 == 0 else [1, 0]
            if chosen & {"pipeline", "rss"}:
                runs = [("mesh", lambda rows=rows: measure_mesh_pipeline(rows, args))]
                if "pipeline" in chosen:
                    runs.append(("baseline", lambda rows=rows: measure_baseline(rows, args)))
                for index in order if len(runs) == 2 else [0]:
                    key, fn = runs[index]
                    size[key].append(attempt(f"{key} {rows}", fn))
            if "flyte" in chosen:
                runs = [
                    ("flyte_mesh", lambda rows=rows: measure_flyte_mesh(rows, args)),
                    ("flyte_plain", lambda rows=rows: measure_flyte_plain(rows, args)),
                ]
                for index in order:
                    key, fn = runs[index]
                    size[key].append(attempt(f"{key} {rows}", fn))
    if "hits" in chosen:
        results["hits"] = attempt("hits", lambda: measure_hits(args))
    if "health" in chosen:
        results["health"] = attempt("health", lambda: measure_health(args))
    if "start" in chosen:
        results["start"] = [attempt(f"start {i + 1}", lambda: measure_start(args)) for i in range(args.repeats)]
        results["imports"] = [attempt(f"imports {i + 1}", measure_imports) for i in range(args.repeats)]
    if "make" in chosen:
        results["make"] = [attempt(f"make {i + 1}", lambda: measure_make(args)) for i in range(args.repeats)]


# ---- the report -----------------------------------------------------------------------------------
@dataclass
class Figure:
    name: str
    value: float | None
    shown: str
    goal: str
    met: bool | None  # None: no goal, or not measured


def seconds_text(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f} MiB"


def listed(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def ok(results: list) -> list:
    return [r for r in results if r is not None]


def pipeline_figures(rows: int, size: dict) -> list[Figure]:
    mesh, base = size["mesh"], size["baseline"]
    pairs = [(m, b) for m, b in zip(mesh, base, strict=False) if m and b]
    ratio = median([m["seconds"] / b["seconds"] for m, b in pairs])
    return [
        Figure(
            f"mesh pipeline / one process, {rows:,} rows",
            ratio,
            "-" if ratio is None else f"{ratio:.2f}x",
            "<= 1.10",
            None if ratio is None else ratio <= 1.10,
        )
    ]


def flyte_figures(rows: int, size: dict) -> list[Figure]:
    pairs = [(m, p) for m, p in zip(size["flyte_mesh"], size["flyte_plain"], strict=False) if m and p]
    ratio = median([m["seconds"] / p["seconds"] for m, p in pairs])
    return [
        Figure(
            f"pyflyte on the mesh / plain flytekit, {rows:,} rows",
            ratio,
            "-" if ratio is None else f"{ratio:.2f}x",
            "<= 0.80",
            None if ratio is None else ratio <= 0.80,
        )
    ]


def rss_figures(rows: int, size: dict) -> list[Figure]:
    mesh = ok(size["mesh"])
    if not mesh:
        return []
    figures = []
    for stage in STAGES:
        ratio = median(
            [m["stages"][stage]["peak_rss_bytes"] / m["stages"][stage]["largest_artifact_bytes"] for m in mesh]
        )
        peak = median([m["stages"][stage]["peak_rss_bytes"] for m in mesh])
        largest = median([m["stages"][stage]["largest_artifact_bytes"] for m in mesh])
        figures.append(
            Figure(
                f"peak RSS / largest artifact, {stage}, {rows:,} rows",
                ratio,
                f"{ratio:.2f}x ({mib(peak)} / {mib(largest)})",
                "<= 1.5",
                ratio <= 1.5,
            )
        )
    sampled = median([m["peak_rss_total_sampled_bytes"] for m in mesh])
    summed = median([m["peak_rss_sum_of_stage_peaks_bytes"] for m in mesh])
    figures.append(
        Figure(
            f"peak RSS of all five stages, {rows:,} rows",
            sampled,
            f"{mib(sampled)} (sum of peaks {mib(summed)})",
            "-",
            None,
        )
    )
    return figures


def growth_figures(args: argparse.Namespace, results: dict) -> list[Figure]:
    figures = []
    for small, large in zip(args.rows, args.rows[1:], strict=False):
        a, b = ok(results["sizes"][str(small)]["mesh"]), ok(results["sizes"][str(large)]["mesh"])
        if not a or not b:
            continue
        size_ratio = large / small
        for stage in STAGES:
            before = median([m["stages"][stage]["server_seconds"] for m in a])
            after = median([m["stages"][stage]["server_seconds"] for m in b])
            growth = after / before
            figures.append(
                Figure(
                    f"seconds growth {small:,} -> {large:,} rows, {stage}",
                    growth,
                    f"{growth:.1f}x (rows {size_ratio:.0f}x)",
                    f"<= {1.1 * size_ratio:.1f}x",
                    growth <= 1.1 * size_ratio,
                )
            )
    return figures


def service_figures(results: dict) -> list[Figure]:
    figures = []
    hits = results.get("hits")
    if "hits" in results:
        rate = hits["calls_per_second"] if hits else None
        figures.append(
            Figure(
                f"loader cache hits/s, {hits['callers'] if hits else '?'} callers, one channel",
                rate,
                "-" if rate is None else f"{rate:,.0f}/s",
                ">= 2000/s",
                None if rate is None else rate >= 2000,
            )
        )
    health = results.get("health")
    if "health" in results:
        busy = health["busy"] if health else {}
        p99, worst = busy.get("p99"), busy.get("max")
        figures.append(
            Figure(
                "trainer health Check p99 during a fit",
                p99,
                seconds_text(p99),
                "<= 10 ms",
                None if p99 is None else p99 <= 0.010,
            )
        )
        figures.append(
            Figure(
                "trainer health Check max during a fit",
                worst,
                seconds_text(worst),
                "<= 50 ms",
                None if worst is None else worst <= 0.050,
            )
        )
    if "start" in results:
        up = median([s["serving_seconds"] for s in ok(results["start"])])
        figures.append(
            Figure(
                "mlmesh up until all five SERVING", up, seconds_text(up), "<= 2 s", None if up is None else up <= 2.0
            )
        )
    if "make" in results:
        made = ok(results["make"])
        cold = median([m["cold"]["seconds"] for m in made])
        warm = median([m["warm"]["seconds"] for m in made])
        figures.append(
            Figure(
                "make run (its recipe), cold store",
                cold,
                seconds_text(cold),
                "<= 5 s",
                None if cold is None else cold <= 5.0,
            )
        )
        figures.append(Figure("make run (its recipe), warm store", warm, seconds_text(warm), "-", None))
    return figures


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print(
            "  ".join(
                str(cell).ljust(w) if i == 0 else str(cell).rjust(w)
                for i, (cell, w) in enumerate(zip(line, widths, strict=True))
            ).rstrip()
        )


def print_details(args: argparse.Namespace, results: dict) -> None:
    for rows in args.rows:
        size = results["sizes"][str(rows)]
        mesh, base = ok(size["mesh"]), ok(size["baseline"])
        if mesh:
            when = "after a sklearn:iris warm-up pipeline" if args.prewarm else "the first request after SERVING"
            print(
                f"\nPer stage, {rows:,} rows, {when} (medians of {len(mesh)}; server = StageInfo.seconds, "
                "caller = the RPC as the client saw it, work = the computation in the manifest):"
            )
            table = []
            for stage in STAGES:
                server = median([m["stages"][stage]["server_seconds"] for m in mesh])
                step = median([b["steps"][stage] for b in base]) if base else None
                table.append(
                    [
                        stage,
                        seconds_text(server),
                        seconds_text(median([m["stages"][stage]["client_seconds"] for m in mesh])),
                        seconds_text(median([m["stages"][stage]["work_seconds"] for m in mesh])),
                        seconds_text(step),
                        f"{server / step:.2f}x" if step else "-",
                    ]
                )
            total_mesh = median([m["seconds"] for m in mesh])
            total_base = median([b["seconds"] for b in base]) if base else None
            table.append(
                [
                    "pipeline",
                    "",
                    seconds_text(total_mesh),
                    "",
                    seconds_text(total_base),
                    f"{total_mesh / total_base:.2f}x" if total_base else "-",
                ]
            )
            print_table(["stage", "server", "caller", "work", "one process", "server/one"], table)
            if base:
                print(
                    f"  one process: peak RSS {mib(median([b['peak_rss_bytes'] for b in base]))}, imports "
                    f"{seconds_text(median([b['import_seconds'] for b in base]))} (not timed), accuracy "
                    f"{base[0]['accuracy']:.4f}"
                )
            print(
                f"\nMemory per stage, {rows:,} rows (medians; peak = VmHWM, reset before the run: "
                f"{all(m['stages'][s]['peak_reset'] for m in mesh for s in STAGES)}):"
            )
            table = []
            for stage in STAGES:
                get = lambda key, stage=stage, mesh=mesh: median([m["stages"][stage][key] for m in mesh])  # noqa: E731
                peak, idle, largest = get("peak_rss_bytes"), get("rss_idle_bytes"), get("largest_artifact_bytes")
                table.append(
                    [
                        stage,
                        mib(idle),
                        mib(peak),
                        mib(peak - idle),
                        mib(get("rss_after_bytes")),
                        f"{mesh[0]['stages'][stage]['largest_artifact']} {mib(largest)}",
                        f"{peak / largest:.2f}x",
                        f"{(peak - idle) / largest:.2f}x",
                    ]
                )
            print_table(
                ["stage", "idle", "peak", "peak-idle", "after run", "largest artifact", "peak/art", "(peak-idle)/art"],
                table,
            )
            children = max(m["stage_children"] for m in mesh)
            if children:
                print(f"  note: the stages had {children} child processes, not counted above")
        flyte_mesh, flyte_plain = ok(size["flyte_mesh"]), ok(size["flyte_plain"])
        if flyte_mesh or flyte_plain:
            print(f"\npyflyte run, {rows:,} rows (whole commands: interpreter, imports, Flyte, the pipeline):")
            print_table(
                ["workflow", "median", "runs", "peak RSS of the pyflyte process"],
                [
                    [
                        name,
                        seconds_text(median([r["seconds"] for r in runs])),
                        listed([r["seconds"] for r in runs]),
                        mib(median([r["peak_rss_bytes"] for r in runs])),
                    ]
                    for name, runs in (
                        ("mesh (workflow/pipeline.py)", flyte_mesh),
                        ("plain (bench/flyte_plain.py)", flyte_plain),
                    )
                ],
            )
    if results.get("hits"):
        h = results["hits"]
        print(
            f"\nLoader cache hits: {h['calls']:,} calls in {h['seconds']:.2f}s by {h['callers']} callers; latency p50 "
            f"{seconds_text(h['p50'])}, p99 {seconds_text(h['p99'])}, max {seconds_text(h['max'])}; "
            f"loader used {h['loader_cpu_cores']:.2f} cores"
        )
    if results.get("health"):
        h = results["health"]
        print(
            f"\nTrainer health Check, idle: p50 {seconds_text(h['idle']['p50'])}, p99 {seconds_text(h['idle']['p99'])}, "
            f"max {seconds_text(h['idle']['max'])} (n={h['idle']['n']})"
        )
        params = ", ".join(f"{k}={v}" for k, v in h["hyperparameters"].items())
        print(
            f"  during {h['model']}({params}) on {h['rows']:,} rows, {h['fit_seconds']:.1f}s, "
            f"trainer at {h['trainer_cpu_cores']:.2f} of {h['cpus']} cores: p50 {seconds_text(h['busy']['p50'])}, "
            f"p99 {seconds_text(h['busy']['p99'])}, max {seconds_text(h['busy']['max'])} (n={h['busy']['n']})"
        )
    if ok(results.get("start", [])):
        starts = ok(results["start"])
        print(
            f"\nmlmesh up: SERVING after {listed([s['serving_seconds'] for s in starts])} s; "
            f"stopped by SIGINT in {seconds_text(median([s['stop_seconds'] for s in starts]))}"
        )
    if ok(results.get("imports", [])):
        imports = ok(results["imports"])
        interpreter = median([i["interpreter"] for i in imports])
        per_stage = {stage: median([i[stage] for i in imports]) for stage in STAGES}
        print(
            f"  start-up imports per stage (python -c, median; bare interpreter {seconds_text(interpreter)}): "
            + ", ".join(f"{stage} {seconds_text(v)}" for stage, v in per_stage.items())
            + f"; sum {sum(per_stage.values()):.2f} s on {os.cpu_count()} cores"
        )
    if ok(results.get("make", [])):
        made = ok(results["make"])
        print(f"\nmake run recipe: {made[0]['command']}")
        print(
            f"  cold {listed([m['cold']['seconds'] for m in made])} s; "
            f"warm {listed([m['warm']['seconds'] for m in made])} s"
        )


def report(args: argparse.Namespace, results: dict, errors: dict[str, str]) -> list[Figure]:
    figures: list[Figure] = []
    for rows in args.rows:
        size = results["sizes"][str(rows)]
        if "pipeline" in args.only:
            figures += pipeline_figures(rows, size)
        if "flyte" in args.only:
            figures += flyte_figures(rows, size)
        if "rss" in args.only:
            figures += rss_figures(rows, size)
    if {"pipeline", "rss"} & set(args.only):
        figures += growth_figures(args, results)
    figures += service_figures(results)

    print_details(args, results)
    print(
        f"\nSummary: {', '.join(f'{r:,}' for r in args.rows)} rows x {args.features} features, "
        f"{args.repeats} repeat(s), medians (ratios: median of paired runs), {os.cpu_count()} cores"
    )
    print_table(
        ["figure", "measured", "goal", "status"],
        [
            [
                f.name,
                f.shown,
                f.goal,
                "-" if f.goal == "-" else ("NOT MEASURED" if f.met is None else ("MET" if f.met else "MISSED")),
            ]
            for f in figures
        ],
    )
    for name, text in errors.items():
        print(f"\nFAILED: {name}\n{text}", file=sys.stderr)
    return figures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rows",
        default="50000",
        help="rows of the synthetic table; a comma list (1000000,10000000) also gives the growth figure",
    )
    parser.add_argument("--repeats", type=int, default=3, help="paired runs per figure; medians are reported")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of sections: {', '.join(SECTIONS)}")
    parser.add_argument(
        "--prewarm",
        action="store_true",
        help="run a tiny sklearn:iris pipeline on each mesh before the timed one, so the stages' "
        "first-use imports are not timed (default: the first request after SERVING is timed)",
    )
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hit-callers", type=int, default=16)
    parser.add_argument("--hit-seconds", type=float, default=3.0)
    parser.add_argument(
        "--health-rows", type=int, default=20000, help="rows of the table the health section's forest fits"
    )
    parser.add_argument(
        "--health-model",
        choices=sorted(HEALTH_FITS),
        default="random_forest",
        help="the fit that loads the trainer during the health checks",
    )
    parser.add_argument(
        "--health-size",
        type=int,
        default=200,
        help="its trees (random_forest) or iterations (hist_gradient_boosting): a longer fit, more samples",
    )
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds any one subprocess may take")
    parser.add_argument("--json", type=Path, help="write every raw number here")
    parser.add_argument("--baseline", type=int, metavar="ROWS", help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args(argv)
    args.rows = [int(r.replace("_", "")) for r in args.rows.split(",") if r.strip()]
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.baseline is not None:
        print(json.dumps(baseline_main(args.baseline, args.features, args.seed, MAX_DATASET_BYTES, args.prewarm)))
        return 0
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    results: dict[str, Any] = {
        "config": {
            "rows": args.rows,
            "repeats": args.repeats,
            "features": args.features,
            "seed": args.seed,
            "sections": args.only,
            "prewarm": args.prewarm,
            "cpus": os.cpu_count(),
            "max_dataset_bytes": MAX_DATASET_BYTES,
            "hit_callers": args.hit_callers,
            "hit_seconds": args.hit_seconds,
            "health_rows": args.health_rows,
            "health_model": args.health_model,
            "health_size": args.health_size,
        },
        # Per size, one entry per repeat (None where it failed).
        "sizes": {str(rows): {"mesh": [], "baseline": [], "flyte_mesh": [], "flyte_plain": []} for rows in args.rows},
    }
    errors: dict[str, str] = {}
    try:
        collect(args, results, errors)
    finally:
        Processes.cleanup()
        figures = report(args, results, errors)
        if args.json:
            results["errors"] = errors
            results["figures"] = [vars(f) for f in figures]
            args.json.write_text(json.dumps(results, indent=2, default=str))
            print(f"\nraw numbers: {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
