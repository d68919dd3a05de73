"""Every benchmark starts: `bench/<script>.py --help` exits 0 and prints its usage.

The benchmarks themselves take minutes (tests/test_bench.py runs the ones the docs
show, in the slow tier); this fast check catches what breaks them silently in
between, such as an import of a helper that moved. A bench file with a
Flyte workflow is a Flyte module (bench/flyte_plain.py), started the way its
docstring says: `pyflyte run <file> <workflow> --help`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BENCH_FILES = sorted((REPO / "bench").glob("*.py"))


def help_command(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    workflows = [
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and any(getattr(d, "id", getattr(d, "attr", "")) == "workflow" for d in node.decorator_list)
    ]
    if workflows:
        return [str(BIN / "pyflyte"), "run", str(path.relative_to(REPO)), workflows[0], "--help"]
    return [sys.executable, str(path.relative_to(REPO)), "--help"]


def test_there_are_benchmarks() -> None:
    assert len(BENCH_FILES) >= 10, [p.name for p in BENCH_FILES]


def test_every_benchmark_starts_and_prints_its_usage() -> None:
    # All at once: each start is a second or two of imports, and they are independent.
    started = {
        path.name: subprocess.Popen(
            help_command(path), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for path in BENCH_FILES
    }
    failures = []
    for name, process in started.items():
        out, err = process.communicate(timeout=120)
        if process.returncode != 0 or "usage" not in out.lower():
            failures.append(f"{name}: exit {process.returncode}\n{out[-1500:]}\n{err[-1500:]}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("path", BENCH_FILES, ids=lambda p: p.name)
def test_every_benchmark_says_how_to_reproduce_it(path: Path) -> None:
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert ".venv/bin/" in docstring, f"{path.name}: its docstring should show the command that runs it"
