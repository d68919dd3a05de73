"""Chaos at any size: pipelines with a random stage SIGKILLed at a random moment.

    .venv/bin/python bench/bench_chaos.py [--pipelines 20] [--seed 20261124]

The experiment of tests/test_chaos.py, as a report: `mlmesh up` on free ports,
each pipeline (`mlmesh run --json --force`) run once fault-free and once with
a kill, then the count of pipelines whose metrics, decision and model bytes
match, the kills per stage, and what a kill costs in wall time (median of
faulted minus fault-free run time).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.runtime.catalog import STAGES  # noqa: E402
from tests.test_chaos import configs, outcome, run_pipeline  # noqa: E402
from tests.test_mesh_processes import UpProcess, on_new_ports, stage_pid  # noqa: E402


def timed(env: dict[str, str], args: list[str]) -> tuple[tuple, float]:
    started = time.perf_counter()
    summary = run_pipeline(env, args)
    return outcome(summary), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipelines", type=int, default=20)
    parser.add_argument("--seed", type=int, default=20261124)
    args = parser.parse_args()
    plans = (configs() * (args.pipelines // len(configs()) + 1))[: args.pipelines]
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as root:
        env = on_new_ports(
            {
                **os.environ,
                "MLMESH_ARTIFACT_ROOT": root,
                "MLMESH_GRACE_SECONDS": "1",
                "MLMESH_CHECKPOINT_SECONDS": "0.2",
                "MLMESH_RESTART_LIMIT": "1000",
            }
        )
        up = UpProcess(env, {s: int(env[f"MLMESH_{s.upper()}_PORT"]) for s in STAGES})
        up.wait_for("mesh is up")
        threading.Thread(target=lambda: [up.output.append(line) for line in up.process.stdout], daemon=True).start()
        kills: Counter[str] = Counter()
        same, costs = 0, []
        try:
            for index, plan in enumerate(plans):
                expected, clean_seconds = timed(env, plan)
                stage, delay = rng.choice(STAGES), rng.uniform(0.2, 2.5)

                def strike(stage: str = stage, delay: float = delay) -> None:
                    time.sleep(delay)
                    try:
                        os.kill(stage_pid(up, stage), signal.SIGKILL)
                        kills[stage] += 1
                    except (AssertionError, ProcessLookupError):
                        pass

                killer = threading.Thread(target=strike)
                killer.start()
                try:
                    got, faulted_seconds = timed(env, plan)
                except AssertionError as exc:
                    print(f"  pipeline {index}: FAILED after killing {stage}: {str(exc)[:300]}")
                    killer.join()
                    continue
                killer.join()
                same += got == expected
                costs.append(faulted_seconds - clean_seconds)
                print(
                    f"  pipeline {index}: killed {stage} at {delay:.2f}s, identical={got == expected}, "
                    f"{clean_seconds:.1f}s clean, {faulted_seconds:.1f}s with the kill",
                    flush=True,
                )
        finally:
            up.process.terminate()
            try:
                up.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                up.process.kill()
    print(f"\n{same}/{len(plans)} pipelines completed with results identical to fault-free runs")
    print(f"kills per stage: {dict(kills)}")
    if costs:
        print(f"a kill costs {statistics.median(costs):.1f}s of wall time (median; max {max(costs):.1f}s)")


if __name__ == "__main__":
    main()
