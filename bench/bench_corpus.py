"""The corpus (tests/corpus.py) through the real `mlmesh run`, against hand-written scikit-learn baselines.

    .venv/bin/python bench/bench_corpus.py                      # every table, CSV and Parquet
    .venv/bin/python bench/bench_corpus.py --tables penguins,fair --out /tmp/corpus
    MLMESH_DATA_ROOTS=/tmp/corpus .venv/bin/mlmesh with-mesh -- .venv/bin/python bench/bench_corpus.py --reuse-mesh --out /tmp/corpus

By default it starts its own mesh (five child processes on free ports, with a
private artifact store in a temporary folder) and stops it at the end; with
--reuse-mesh it talks to the mesh the MLMESH_* variables name, whose loader
must be allowed to read the tables' folder (MLMESH_DATA_ROOTS). Every run
passes --force, so each stage computes (no memo hits from the other format or
an earlier run) and the wall time is the CLI's whole run: process start, five
RPCs, reading and writing the store.

Prints one Markdown row per table and format: rows x columns, the roles the
loader found (counts), the task kind, the model, mlmesh's score (accuracy or
R² on the held-out split), the hand-written baseline's score on the same
split, the difference, and the CLI's wall seconds. Needs the dev extra
(palmerpenguins, statsmodels).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.cli.launcher import LocalMesh  # noqa: E402
from services.runtime.catalog import STAGES  # noqa: E402
from services.runtime.settings import Settings  # noqa: E402
from tests import corpus  # noqa: E402
from tests.helpers import free_ports  # noqa: E402

MLMESH = Path(sys.executable).parent / "mlmesh"
SHORT = {
    "numeric": "num",
    "boolean": "bool",
    "categorical": "cat",
    "datetime": "date",
    "identifier": "id",
    "text": "text",
    "constant": "const",
    "ignore": "ignore",
}


def roles_found(summary: dict) -> str:
    counts = Counter(column["role"] for column in summary["columns"])
    return ", ".join(f"{SHORT[role]} {counts[role]}" for role in SHORT if counts[role])


def run_table(table: corpus.Table, folder: Path, fmt: str, env: dict[str, str]) -> tuple[dict, float]:
    started = time.perf_counter()
    result = subprocess.run(
        [str(MLMESH), "run", "--source", f"{table.name}.{fmt}", *table.cli_args(), "--force", "--json"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{table.name} ({fmt}): mlmesh run exited {result.returncode}: {result.stderr.strip()}")
    return json.loads(result.stdout), wall


def bench(tables: list[corpus.Table], folder: Path, env: dict[str, str]) -> list[str]:
    lines = [
        "| dataset | format | rows x columns | roles found | task | model | metric | mlmesh | baseline | diff | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for table in tables:
        frame = table.build()
        corpus.write(frame, folder, table.name)
        baseline = table.baseline(frame)
        for fmt in corpus.FORMATS:
            summary, wall = run_table(table, folder, fmt, env)
            score = summary["metrics"][table.metric]
            flag = "" if score >= baseline - table.allowance else " **worse**"
            lines.append(
                f"| {table.name} | {fmt} | {len(frame):,} x {frame.shape[1]} | {roles_found(summary)} "
                f"| {summary['task_kind']} | {table.model} | {table.metric} | {score:.4f} | {baseline:.4f} "
                f"| {score - baseline:+.4f}{flag} | {wall:.1f} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)  # progress while the rest runs
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", default="", help="comma-separated table names (default: all)")
    parser.add_argument("--out", type=Path, help="write the tables here (default: a temporary folder)")
    parser.add_argument("--reuse-mesh", action="store_true", help="use the mesh the MLMESH_* variables name")
    args = parser.parse_args()
    names = [n for n in args.tables.split(",") if n] or list(corpus.BY_NAME)
    unknown = sorted(set(names) - set(corpus.BY_NAME))
    if unknown:
        parser.error(f"unknown tables {unknown}; choose from {', '.join(corpus.BY_NAME)}")
    tables = [corpus.BY_NAME[n] for n in names]

    with tempfile.TemporaryDirectory(prefix="bench-corpus-") as scratch:
        folder = (args.out or Path(scratch) / "tables").resolve()
        env = dict(os.environ)
        mesh = None
        if not args.reuse_mesh:
            env["MLMESH_ARTIFACT_ROOT"] = str(Path(scratch) / "artifacts")
            env["MLMESH_DATA_ROOTS"] = str(folder)  # the loader reads only there
            env["MLMESH_GRACE_SECONDS"] = "1"
            for stage, port in zip(STAGES, free_ports(len(STAGES)), strict=True):
                env[f"MLMESH_{stage.upper()}_PORT"] = str(port)
                env.pop(f"MLMESH_{stage.upper()}_ADDRESS", None)
            mesh = LocalMesh(Settings.from_env(env), env=env, log_dir=Path(scratch) / "logs")
            asyncio.run(mesh.start())
        try:
            started = time.perf_counter()
            lines = bench(tables, folder, env)
        finally:
            if mesh is not None:
                mesh.stop()
    print("\n".join(lines))
    allowances = [t for t in tables if t.allowance_reason]
    print(
        f"\n{len(tables)} tables x {len(corpus.FORMATS)} formats in {time.perf_counter() - started:.0f}s. "
        "diff = mlmesh - baseline; the bar is diff >= -0.01"
        + "".join(f"; {t.name} may be {t.allowance} worse: {t.allowance_reason}" for t in allowances)
        + "."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
