"""The benchmarks the docs show run, as docs/performance.md and docs/data.md show them, and report real numbers.

Timings are not asserted (speed lives in the benchmarks, not in tests); what is
checked is that each command works end to end and measures something.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from services.runtime.catalog import PIPELINE_STAGES as STAGES

# The docs' benchmark commands, end to end: minutes.
pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python" if (REPO / ".venv" / "bin" / "python").exists() else Path(sys.executable)


def run_bench(*args: str, timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run([str(PYTHON), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_the_readme_quick_scale_benchmark_measures_every_figure_it_prints(tmp_path: Path) -> None:
    report = tmp_path / "scale.json"
    # docs/performance.md's quick command, plus --json to read the numbers back.
    done = run_bench(
        "bench/bench_scale.py",
        "--rows",
        "20000",
        "--repeats",
        "1",
        "--only",
        "pipeline,rss,hits",
        "--json",
        str(report),
        timeout=900,
    )
    results = json.loads(report.read_text())
    assert results["errors"] == {} or results["errors"] == [], results["errors"]
    figures = {figure["name"]: figure for figure in results["figures"]}
    ratio = figures["mesh pipeline / one process, 20,000 rows"]
    assert ratio["value"] > 0 and ratio["shown"] in done.stdout
    for stage in STAGES:
        peak = figures[f"peak RSS / largest artifact, {stage}, 20,000 rows"]
        assert peak["value"] > 0, peak
    assert results["hits"]["calls"] > 0 and results["hits"]["calls_per_second"] > 0
    assert "MET" in done.stdout or "MISSED" in done.stdout


def test_the_corpus_benchmark_prints_its_table(tmp_path: Path) -> None:
    # The docstring's two-table command: that every table trains as well as its baseline, in both
    # formats, is tests/test_corpus.py's to prove; this proves the benchmark runs and prints its rows.
    done = run_bench("bench/bench_corpus.py", "--tables", "penguins,fair", "--out", str(tmp_path), timeout=600)
    assert "2 tables x 2 formats" in done.stdout, done.stdout[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| penguins") or line.startswith("| fair")]
    assert len(rows) == 4, done.stdout[-2000:]


def test_the_observability_benchmark_compares_metrics_and_tracing_against_neither(tmp_path: Path) -> None:
    report = tmp_path / "observability.json"
    # The quick command from the benchmark's docstring, plus --json to read the numbers back.
    done = run_bench(
        "bench/bench_observability.py",
        "--rows",
        "5000",
        "--repeats",
        "1",
        "--pipelines",
        "1",
        "--hits",
        "50",
        "--json",
        str(report),
        timeout=600,
    )
    results = json.loads(report.read_text())
    assert results["errors"] == {}, results["errors"]
    configs = ("off", "metrics", "metrics+tracing", "metrics+tracing@10%")
    summary = results["summary"]
    for config in configs:
        assert config in done.stdout
        [run] = results["runs"][config]
        assert all(p["seconds"] > 0 for p in run["pipeline"]), run["pipeline"]
        for stage in ("loader", "preprocess"):
            hits = run["hits"][stage]
            assert hits["n"] == 50 and 0 < hits["p50"] <= hits["p99"], hits
        assert summary[config]["pipeline_seconds"] > 0
    for config in configs[1:]:
        assert math.isfinite(summary[config]["pipeline_ratio"]) and summary[config]["pipeline_ratio"] > 0
        for stage in ("loader", "preprocess"):
            assert math.isfinite(summary[config]["hits"][stage]["p50_added"])
        # Metrics on: the endpoint answered and counted the hits asked of it.
        assert results["runs"][config][0]["scrape"]["loader_cache_hits"] >= 50
    assert "scrape" not in results["runs"]["off"][0]  # MLMESH_METRICS=off: no endpoint
    # Tracing reached the receiver from the client and all five stages, and only when asked.
    spans = summary["metrics+tracing"]["spans"]
    assert {"bench", "loader", "preprocess", "features", "trainer", "evaluator"} <= set(spans), spans
    assert summary["off"]["spans"] == {} and summary["metrics"]["spans"] == {}
    # Sampling a tenth keeps fewer spans than tracing everything (the same calls, so a fair count).
    sampled = summary["metrics+tracing@10%"]["spans"]
    assert 0 < sum(sampled.values()) < sum(spans.values()), (sampled, spans)
    assert "MET" in done.stdout or "MISSED" in done.stdout


@pytest.mark.network  # MLServer's venv comes from PyPI the first time (then it stays in ~/.cache/mlmesh)
def test_the_serving_benchmark_compares_mlmesh_with_mlserver_on_the_same_predictions(tmp_path: Path) -> None:
    report = tmp_path / "serving.json"
    # docs/performance.md's quick command, plus --json to read the numbers back.
    done = run_bench(
        "bench/bench_serving.py",
        "--runs",
        "1",
        "--seconds",
        "1",
        "--warmup",
        "0.5",
        "--profile",
        "3",
        "--json",
        str(report),
        timeout=900,
    )
    results = json.loads(report.read_text())
    # The three servers answered every request, with the same class for every row.
    assert results["predictions_agree"], (results["reference_disagreements"], results["wrong_answers"])
    assert not any(results["failed_requests"].values()), results["failed_requests"]
    servers = {"mlmesh", "MLServer (defaults)", "MLServer (adaptive batching)"}
    assert set(results["summary"]) == servers
    cases = [case["name"] for case in results["cases"]]
    assert cases == [
        "batch 1, concurrency 1",
        "batch 1, concurrency 16",
        "batch 1, concurrency 64",
        "batch 1,024, concurrency 1",
    ]
    for server in servers:
        for case in cases:
            figures = results["summary"][server][case]
            assert figures["requests"] > 0 and figures["errors"] == 0, (server, case, figures)
            assert 0 < figures["p50_ms"] <= figures["p99_ms"], (server, case, figures)
            assert figures["server_cores"] > 0, (server, case, figures)
            assert f"| {case} | {server} |" in done.stdout
    assert results["summary"]["mlmesh"]["batch 1,024, concurrency 1"]["rows_per_second"] > 0
    assert results["goal"]["ratio"] > 0 and ("MET" in done.stdout or "MISSED" in done.stdout)
    # Where the serving stage's CPU went, by py-spy (unless the machine forbids ptrace, which it says).
    assert results["profile"] or "py-spy failed" in done.stdout, done.stdout[-2000:]
    if results["profile"]:
        assert math.isclose(sum(results["profile"].values()), 1.0, rel_tol=1e-6)
        assert any(label.startswith("predict: the transformer") for label in results["profile"])
