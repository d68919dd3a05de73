"""The Flyte workflow against a live mesh: pyflyte run, caches, decks, errors, sweep, package."""

from __future__ import annotations

import ast
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.runtime.settings import STAGES
from tests.conftest import free_ports, start_local_mesh
from tests.test_mesh_processes import write_house_prices

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def flyte_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    base = tmp_path_factory.mktemp("flyte")
    mesh, env = start_local_mesh(base)
    env["_LOG_DIR"] = str(base / "logs")
    yield env
    mesh.stop()


def pyflyte(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "pyflyte"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def rpc_lines(env: dict[str, str], stage: str) -> list[str]:
    return [l for l in (Path(env["_LOG_DIR"]) / f"{stage}.log").read_text().splitlines() if "rpc method=" in l]


def test_pyflyte_run_end_to_end_then_served_from_caches(flyte_env: dict[str, str]) -> None:
    first = pyflyte(flyte_env, "run", "workflow/pipeline.py", "training_pipeline")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "PipelineResult(" in first.stdout and "decision='PROMOTE'" in first.stdout
    accuracy = float(re.search(r"'accuracy': ([0-9.]+)", first.stdout).group(1))
    assert accuracy >= 0.95
    assert "registered_as='breast_cancer-logistic_regression v1'" in first.stdout

    decks = list(Path(flyte_env["TMPDIR"]).rglob("deck.html"))
    assert len(decks) >= 2, "the load and evaluate tasks wrote no decks"
    deck = "\n".join(d.read_text() for d in decks)
    assert 'class="roc"' in deck and "confusion-matrix" in deck and "<td>accuracy</td>" in deck
    # The load task's deck is the data profile, with a histogram per numeric column.
    assert "<h2>Data profile</h2>" in deck and 'class="histogram"' in deck and "mean radius" in deck
    # Class names survive from source to report.
    assert "<th>malignant</th>" in deck and "<th>benign</th>" in deck
    assert "task_kind='classification'" in first.stdout
    assert "rows_dropped={'missing_target': 0, 'invalid_target': 0, 'incomplete': 0, 'duplicate': 0}" in first.stdout

    # Every stage recorded its execution under the run's id (one per local pyflyte run).
    run_id = re.search(r"run_id='(local-[0-9T]+-[0-9a-f]+)'", first.stdout).group(1)
    graph = subprocess.run([str(BIN / "mlmesh"), "lineage", "--run", run_id, "--json"], env=flyte_env,
                           capture_output=True, text=True)
    assert [s["stage"] for s in json.loads(graph.stdout)] == ["loader", "preprocess", "features", "trainer", "evaluator"]

    before = {stage: len(rpc_lines(flyte_env, stage)) for stage in STAGES}
    second = pyflyte(flyte_env, "run", "workflow/pipeline.py", "training_pipeline")
    assert second.returncode == 0, second.stderr
    model = re.search(r"model=ArtifactRef\(uri='[^']+', sha256='([0-9a-f]{64})'", first.stdout).group(1)
    assert f"sha256='{model}'" in second.stdout
    after = {stage: rpc_lines(flyte_env, stage) for stage in STAGES}
    # Every stage is asked again and answers from its memo, which checks its outputs still exist.
    for stage in ("loader", "preprocess", "features", "trainer"):
        assert len(after[stage]) == before[stage] + 1 and "cache_hit=true" in after[stage][-1], stage
    evaluator_calls = after["evaluator"][before["evaluator"]:]
    assert "Evaluate" in evaluator_calls[0] and "cache_hit=true" in evaluator_calls[0]
    # The registry found the model already registered.
    assert "RegisterModel" in evaluator_calls[-1]
    models = subprocess.run([str(BIN / "mlmesh"), "models", "--json"], env=flyte_env, capture_output=True, text=True)
    [entry] = json.loads(models.stdout)
    assert entry["name"] == "breast_cancer-logistic_regression" and len(entry["versions"]) == 1

    # A wiped store: the next run recomputes what is missing and returns only refs that exist.
    store = Path(flyte_env["MLMESH_ARTIFACT_ROOT"])
    for folder in ("objects", "memo", "manifests"):
        shutil.rmtree(store / folder)
    third = pyflyte(flyte_env, "run", "workflow/pipeline.py", "training_pipeline")
    assert third.returncode == 0, third.stdout + third.stderr
    assert len(_verified_refs(third.stdout)) >= 15

    # --recompute reaches every stage, and each one computes instead of answering from its memo.
    before = {stage: len(rpc_lines(flyte_env, stage)) for stage in STAGES}
    fourth = pyflyte(flyte_env, "run", "workflow/pipeline.py", "training_pipeline", "--recompute")
    assert fourth.returncode == 0, fourth.stderr
    for stage in STAGES:
        new_calls = rpc_lines(flyte_env, stage)[before[stage]:]
        computed = [line for line in new_calls if "cache_hit=false" in line]
        assert computed, f"--recompute did not make {stage} compute: {new_calls}"


def _verified_refs(output: str) -> list[tuple[str, str]]:
    refs = re.findall(r"uri='file://([^']+)', sha256='([0-9a-f]{64})'", output)
    for path, digest in refs:
        assert Path(path).is_file(), f"a returned ref names a missing object: {path}"
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest, path
    return refs


@pytest.mark.parametrize("deleted", ["x_train", "model", "report"])
def test_a_deleted_object_is_recomputed_by_the_next_identical_run(flyte_env: dict[str, str], deleted: str) -> None:
    args = ("run", "workflow/pipeline.py", "training_pipeline", "--source", "sklearn:wine", "--seed", "11")
    first = pyflyte(flyte_env, *args)
    assert first.returncode == 0, first.stdout + first.stderr
    # A field of the result (model=, report=) or an entry of its lineage ('x_train': ...).
    victim = re.search(rf"(?:\b{deleted}=|'{deleted}': )ArtifactRef\(uri='file://([^']+)', sha256='([0-9a-f]{{64}})'",
                       first.stdout)
    Path(victim.group(1)).unlink()
    second = pyflyte(flyte_env, *args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"sha256='{victim.group(2)}'" in second.stdout  # the same bytes, made again
    assert len(_verified_refs(second.stdout)) >= 15


def test_stopped_service_is_named_with_its_address(flyte_env: dict[str, str]) -> None:
    dead = f"localhost:{free_ports(1)[0]}"
    env = {**flyte_env, "MLMESH_TRAINER_ADDRESS": dead, "MLMESH_RPC_TIMEOUT_SECONDS": "10"}
    result = pyflyte(env, "run", "workflow/pipeline.py", "training_pipeline", "--seed", "7")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"trainer at {dead} failed with UNAVAILABLE" in re.sub(r"\s+", " ", output)
    assert "grpc/_channel.py" not in output and "_cython" not in output


def _sweep_result(stdout: str) -> tuple[str, int, list[dict[str, float]]]:
    match = re.search(r"SweepResult\(metric='(\w+)', best_index=(\d+), .*candidate_metrics=(\[.*?\]), comparison_report=", stdout, re.S)
    assert match, stdout[-2000:]
    return match.group(1), int(match.group(2)), ast.literal_eval(match.group(3))


def test_readme_sweep_command_picks_the_best_default_candidate(flyte_env: dict[str, str]) -> None:
    result = pyflyte(flyte_env, "run", "workflow/pipeline.py", "sweep_pipeline", "--metric", "f1_macro")
    assert result.returncode == 0, result.stdout + result.stderr
    metric, best, scores = _sweep_result(result.stdout)
    assert metric == "f1_macro" and len(scores) == 4  # the four default classification candidates
    assert scores[best]["f1_macro"] == max(s["f1_macro"] for s in scores)
    # One comparison report, every candidate side by side, the winner marked.
    report = re.search(r"comparison_report=ArtifactRef\(uri='file://([^']+)', sha256='([0-9a-f]{64})'", result.stdout)
    page = Path(report.group(1)).read_bytes()
    assert hashlib.sha256(page).hexdigest() == report.group(2)
    assert page.count(b"<tr") == 5 and page.count(b'class="winner"') == 1 and b"Only the winner is registered" in page
    # Only the winner is registered.
    registered = re.findall(r"registered_as='([^']*)'", result.stdout)
    assert len(registered) == 1
    models = subprocess.run([str(BIN / "mlmesh"), "models", "--json"], env=flyte_env, capture_output=True, text=True)
    names = {entry["name"] for entry in json.loads(models.stdout)}
    losers = {f"breast_cancer-{m}" for m in ("logistic_regression", "random_forest", "hist_gradient_boosting", "sgd")}
    losers -= {registered[0].split(" v")[0]}
    assert not (names & (losers - {"breast_cancer-logistic_regression"})), names  # that one came from training_pipeline


def test_sweep_picks_the_candidate_that_is_really_best(flyte_env: dict[str, str]) -> None:
    features_calls = len(rpc_lines(flyte_env, "features"))
    candidates = json.dumps([
        {"model": "random_forest", "hyperparameters": {"n_estimators": "1", "max_depth": "1"}},  # a stump: weak
        {"model": "logistic_regression", "hyperparameters": {"C": "1.0"}},
        {"model": "sgd", "hyperparameters": {"max_iter": "5", "tol": "null"}},
    ])
    args = ["run", "workflow/pipeline.py", "sweep_pipeline", "--source", "sklearn:wine", "--candidates", candidates,
            "--seed", "3"]
    result = pyflyte(flyte_env, *args, "--metric", "f1_macro")
    assert result.returncode == 0, result.stdout + result.stderr
    metric, best, scores = _sweep_result(result.stdout)
    f1 = [m["f1_macro"] for m in scores]
    assert metric == "f1_macro" and len(f1) == 3
    assert best == f1.index(max(f1)) and f1[0] < max(f1)  # the stump really is worse
    assert len(rpc_lines(flyte_env, "features")) - features_calls == 1, "features ran more than once"

    # log_loss is minimised without being told.
    lowest = pyflyte(flyte_env, *args, "--metric", "log_loss")
    assert lowest.returncode == 0, lowest.stdout + lowest.stderr
    metric, best, scores = _sweep_result(lowest.stdout)
    losses = [m["log_loss"] for m in scores]
    assert metric == "log_loss" and best == losses.index(min(losses))


def test_regression_sweep_defaults_follow_the_task_kind(flyte_env: dict[str, str]) -> None:
    result = pyflyte(flyte_env, "run", "workflow/pipeline.py", "sweep_pipeline", "--source", "sklearn:diabetes")
    assert result.returncode == 0, result.stdout + result.stderr
    metric, best, scores = _sweep_result(result.stdout)
    assert metric == "r2" and len(scores) == 3  # ridge, random_forest, hist_gradient_boosting
    assert all("accuracy" not in s for s in scores)
    assert "r2 " in result.stdout and "the regression default applies" in result.stdout


def test_roles_task_kind_and_deduplication_from_pyflyte(flyte_env: dict[str, str], tmp_path: Path) -> None:
    rows = ["zip,row_id,size,label"]
    for i in range(240):
        rows.append(f"{[1001, 2002, 3003][i % 3]},{i},{(i * 7) % 241},{(i % 3) + (i % 2)}")  # all distinct
    rows += rows[1:41]  # forty exact repeats of earlier rows
    table = tmp_path / "zips.csv"
    table.write_text("\n".join(rows) + "\n")
    base = ["run", "workflow/pipeline.py", "training_pipeline", "--source", str(table), "--target_column", "label"]
    kept = pyflyte(flyte_env, *base, "--column_roles", '{"zip": "categorical", "row_id": "ignore"}',
                   "--task_kind", "regression")
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "task_kind='regression'" in kept.stdout and "'duplicate': 0" in kept.stdout
    deduplicated = pyflyte(flyte_env, *base, "--column_roles", '{"zip": "categorical", "row_id": "ignore"}',
                           "--task_kind", "regression", "--drop_duplicates")
    assert deduplicated.returncode == 0, deduplicated.stdout + deduplicated.stderr
    assert "'duplicate': 40" in deduplicated.stdout
    schema_ref = re.search(r"'schema': ArtifactRef\(uri='file://([^']+)'", deduplicated.stdout).group(1)
    roles = {c["name"]: (c["role"], c["overridden"]) for c in json.loads(Path(schema_ref).read_text())["columns"]}
    assert roles["zip"] == ("categorical", True) and roles["row_id"] == ("ignore", True)
    assert roles["size"] == ("numeric", False)

    wrong = pyflyte(flyte_env, *base, "--column_roles", '{"zip": "postcode"}')
    assert wrong.returncode != 0
    assert "unknown role 'postcode'" in re.sub(r"\s+", " ", wrong.stdout + wrong.stderr)


def test_readme_workflow_commands_run_as_written(flyte_env: dict[str, str], tmp_path: Path) -> None:
    """The README's pyflyte block, line for line, from a folder holding its data.csv."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## The Flyte workflow\n", 1)[1].split("\n## ", 1)[0]
    script = re.findall(r"```sh\n(.*?)```", section, re.S)[0]
    assert script.count("pyflyte run") == 6 and "--source data.csv" in script
    write_house_prices(tmp_path)
    (tmp_path / "workflow").symlink_to(ROOT / "workflow")
    script = script.replace(".venv/bin/", f"{BIN}/")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=flyte_env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = re.findall(r"^PipelineResult\(.*$", result.stdout, re.M)
    sweeps = re.findall(r"^SweepResult\(.*$", result.stdout, re.M)
    assert len(results) == 4 and len(sweeps) == 2
    house = results[2]
    assert "task_kind='regression'" in house and "'r2':" in house and "'accuracy'" not in house
    assert "registered_as='data.csv-ridge v1'" in house
    assert "data.csv-ridge" in result.stdout.split(sweeps[-1], 1)[1]  # `mlmesh models` lists it

def test_pyflyte_package_needs_no_backend(tmp_path: Path, flyte_env: dict[str, str]) -> None:
    output = tmp_path / "flyte-package.tgz"
    result = pyflyte(flyte_env, "--pkgs", "workflow", "package", "-o", str(output), "--force")
    assert result.returncode == 0, result.stdout + result.stderr
    archive = tarfile.open(output)
    names = archive.getnames()
    train_spec = archive.extractfile(next(n for n in names if n.endswith("workflow.pipeline.train_1.pb"))).read()
    assert b"mlmesh-pipeline:latest" in train_spec  # tasks name the pipeline image
    for expected in ("training_pipeline", "sweep_pipeline", "training_pipeline_nightly", "training_pipeline_demo"):
        assert any(expected in n for n in names), f"{expected} missing from {names}"
