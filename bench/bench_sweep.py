"""The sweep's wall time with its candidates trained concurrently against one at a time.

    .venv/bin/python bench/bench_sweep.py [--repeats 3] [--rows 20000]

Each repeat starts a fresh local mesh (`mlmesh up`'s LocalMesh, fresh store,
free ports) and runs `pyflyte run workflow/pipeline.py sweep_pipeline` with
four random-forest candidates, once with the sweep's concurrency at one
(MLMESH_WORKER_THREADS=1 for the pyflyte process) and once at its default
(the trainer's worker count), alternating, each on its own fresh store so
nothing is a cache hit. Prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.cli.launcher import LocalMesh  # noqa: E402
from services.runtime.catalog import STAGES  # noqa: E402
from services.runtime.settings import Settings  # noqa: E402
from tests.helpers import free_ports  # noqa: E402

BIN = Path(sys.executable).parent
CANDIDATES = json.dumps(
    [
        {"model": "random_forest", "hyperparameters": {"n_estimators": "60", "max_depth": str(depth)}}
        for depth in (6, 8, 10, 12)
    ]
)


def one_sweep(rows: int, workers: int | None) -> float:
    with tempfile.TemporaryDirectory() as base:
        env = {**os.environ, "MLMESH_ARTIFACT_ROOT": f"{base}/artifacts", "HOME": base, "TMPDIR": base}
        for stage, port in zip(STAGES, free_ports(len(STAGES)), strict=True):
            env[f"MLMESH_{stage.upper()}_PORT"] = str(port)
        mesh = LocalMesh(Settings.from_env(env), env=env, log_dir=Path(base) / "logs")
        asyncio.run(mesh.start())
        try:
            run_env = dict(env) if workers is None else {**env, "MLMESH_WORKER_THREADS": str(workers)}
            started = time.perf_counter()
            done = subprocess.run(
                [
                    str(BIN / "pyflyte"),
                    "run",
                    "workflow/pipeline.py",
                    "sweep_pipeline",
                    "--source",
                    f"synthetic:classification?rows={rows}&features=20",
                    "--candidates",
                    CANDIDATES,
                ],
                cwd=ROOT,
                env=run_env,
                capture_output=True,
                text=True,
            )
            seconds = time.perf_counter() - started
            if done.returncode != 0:
                raise SystemExit(done.stdout[-2000:] + done.stderr[-2000:])
            return seconds
        finally:
            mesh.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=20000)
    args = parser.parse_args()
    sequential, concurrent = [], []
    for _ in range(args.repeats):
        sequential.append(one_sweep(args.rows, workers=1))
        concurrent.append(one_sweep(args.rows, workers=None))
    s, c = statistics.median(sequential), statistics.median(concurrent)
    print(f"sweep of 4 forests on {args.rows} rows, medians of {args.repeats}:")
    print(f"  one candidate at a time   {s:7.2f} s   {[round(x, 2) for x in sequential]}")
    print(f"  concurrent (default)      {c:7.2f} s   {[round(x, 2) for x in concurrent]}")
    print(f"  concurrent / sequential   {c / s:7.2f}")


if __name__ == "__main__":
    main()
