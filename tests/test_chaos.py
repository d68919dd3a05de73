"""Chaos: pipelines whose stages are SIGKILLed at random moments still finish, with the fault-free results.

`mlmesh up` restarts a killed stage; the client retries a stage that is
unreachable (MLMESH_RECONNECT_SECONDS) and re-attaches to, or resumes, a fit.
Every stage call is safe to repeat, so a kill costs time, never a result.
bench/bench_chaos.py runs the same experiment at any size and reports timings.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from services.runtime.catalog import STAGES
from tests.test_mesh_processes import BIN, UpProcess, on_new_ports, stage_pid

# Twenty pipelines against `mlmesh up` while stages are SIGKILLed: minutes.
pytestmark = pytest.mark.slow
PIPELINES = 20
SEED = 20261124


def configs() -> list[list[str]]:
    """Twenty small pipelines: several sources, a forest (long enough to be hit mid-fit) or a linear model."""
    sources = [
        "sklearn:wine",
        "sklearn:breast_cancer",
        "synthetic:classification?rows=3000&features=12",
        "synthetic:regression?rows=3000&features=10",
    ]
    runs = []
    for i in range(PIPELINES):
        source = sources[i % len(sources)]
        model = ["--model", "random_forest", "--hp", "n_estimators=60"] if i % 2 == 0 else []
        runs.append(["--source", source, "--seed", str(i), *model])
    return runs


def run_pipeline(env: dict[str, str], args: list[str]) -> dict:
    done = subprocess.run(
        [str(BIN / "mlmesh"), "run", "--json", "--force", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


def outcome(summary: dict) -> tuple:
    return summary["metrics"], summary["decision"], summary["model"]["sha256"]


@pytest.fixture
def chaos_mesh(tmp_path: Path):
    env = on_new_ports(
        {
            **os.environ,
            "MLMESH_ARTIFACT_ROOT": str(tmp_path / "artifacts"),
            "MLMESH_GRACE_SECONDS": "1",
            "MLMESH_CHECKPOINT_SECONDS": "0.2",
            "MLMESH_RESTART_LIMIT": "1000",
        }
    )
    up = UpProcess(env, {s: int(env[f"MLMESH_{s.upper()}_PORT"]) for s in STAGES})
    up.wait_for("mesh is up")
    # `mlmesh up` prints every restart; drain its output so it never blocks on a full pipe.
    drain = threading.Thread(target=lambda: [up.output.append(line) for line in up.process.stdout], daemon=True)
    drain.start()
    yield up
    up.stop()


def test_pipelines_survive_random_sigkills_with_identical_results(chaos_mesh: UpProcess) -> None:
    env = chaos_mesh.env
    plans = configs()
    baseline = [outcome(run_pipeline(env, args)) for args in plans]

    rng = random.Random(SEED)
    kills: Counter[str] = Counter()
    survived = []
    for args, expected in zip(plans, baseline, strict=True):
        stage, delay = rng.choice(STAGES), rng.uniform(0.2, 2.5)

        def strike(stage: str = stage, delay: float = delay) -> None:
            time.sleep(delay)
            try:
                os.kill(stage_pid(chaos_mesh, stage), signal.SIGKILL)
                kills[stage] += 1
            except (AssertionError, ProcessLookupError):
                pass  # that stage was between a death and its restart: nothing to kill this time

        killer = threading.Thread(target=strike)
        killer.start()
        summary = run_pipeline(env, args)
        killer.join()
        survived.append(outcome(summary) == expected)
        assert outcome(summary) == expected, f"{args}: results differ after killing {stage} at {delay:.2f}s"
    print(f"\nchaos: {sum(survived)}/{PIPELINES} pipelines identical to fault-free runs; kills per stage {dict(kills)}")
    assert sum(kills.values()) >= PIPELINES // 2, f"too few kills landed to call this chaos: {dict(kills)}"

    # The store is consistent: every object matches its name, and no memo entry points at nothing.
    root = Path(env["MLMESH_ARTIFACT_ROOT"])
    objects = [p for p in (root / "objects").rglob("*") if p.is_file() and not p.name.startswith(".tmp-")]
    for path in objects:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name.split(".")[0], path
    for entry in (root / "memo").rglob("*.json"):
        for ref in json.loads(entry.read_text())["outputs"].values():
            path = Path(ref["uri"].removeprefix("file://"))
            assert path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == ref["sha256"], (entry, path)
