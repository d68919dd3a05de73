"""What Flyte adds over the plain client, on the same inputs and the same mesh.

    .venv/bin/python bench/bench_flyte.py [--repeats 3]

For each repeat, with a fresh artifact store and a fresh Flyte local cache:
  cold: `pyflyte run workflow/pipeline.py training_pipeline` vs `mlmesh run` (plain client)
  warm: the same command again (served from the caches)
Both are whole commands in a subprocess, so both pay interpreter start-up and
imports; medians and ratios are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from services.cli.launcher import LocalMesh
from services.runtime.catalog import STAGES
from services.runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMMANDS = {
    "pyflyte": [str(BIN / "pyflyte"), "run", "workflow/pipeline.py", "training_pipeline"],
    "client": [str(BIN / "mlmesh"), "run", "--min", "accuracy=0.95"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[float]] = {f"{c} {w}": [] for c in COMMANDS for w in ("cold", "warm")}
    for _ in range(args.repeats):
        for name, command in COMMANDS.items():
            with tempfile.TemporaryDirectory() as base:
                env = {**os.environ, "MLMESH_ARTIFACT_ROOT": f"{base}/artifacts", "HOME": base}
                env.update({f"MLMESH_{s.upper()}_PORT": str(free_port()) for s in STAGES})
                mesh = LocalMesh(Settings.from_env(env), env=env, log_dir=Path(base) / "logs")
                asyncio.run(mesh.start())
                try:
                    results[f"{name} cold"].append(timed(command, env))
                    results[f"{name} warm"].append(timed(command, env))
                finally:
                    mesh.stop()
    medians = {k: statistics.median(v) for k, v in results.items()}
    for key, value in medians.items():
        print(f"{key:<14} median {value:6.2f} s  ({', '.join(f'{x:.2f}' for x in results[key])})")
    print(
        f"pyflyte/client cold = {medians['pyflyte cold'] / medians['client cold']:.2f}x, "
        f"warm = {medians['pyflyte warm'] / medians['client warm']:.2f}x"
    )


if __name__ == "__main__":
    main()
