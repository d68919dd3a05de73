"""The Flyte workflow against a live mesh: pyflyte run, caches, decks, errors, sweep, package."""

from __future__ import annotations

import hashlib
import html
import json
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.runtime.catalog import PIPELINE_STAGES
from tests.helpers import free_ports, run_script, start_local_mesh
from tests.test_mesh_processes import write_house_prices

# `pyflyte run` of the whole workflow against `mlmesh up` meshes: ten seconds and more a test.
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def flyte_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    base = tmp_path_factory.mktemp("flyte")
    mesh, env = start_local_mesh(base)
    env["_LOG_DIR"] = str(base / "logs")
    yield env
    mesh.stop()


def pyflyte(
    env: dict[str, str], *args: str, timeout: float = 300, summary: bool = False
) -> subprocess.CompletedProcess:
    """`pyflyte ...`; its result as JSON on stdout (MLMESH_OUTPUT=json), or as people see it with `summary`."""
    return subprocess.run(
        [str(BIN / "pyflyte"), *args],
        cwd=ROOT,
        env={**env, "MLMESH_OUTPUT": "" if summary else "json"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def result_of(stdout: str) -> dict:
    """The workflow's result from `MLMESH_OUTPUT=json pyflyte run` (after pyflyte's own first line)."""
    assert "{" in stdout, stdout[-2000:]
    return json.loads(stdout[stdout.index("\n{") + 1 :] if not stdout.startswith("{") else stdout)


def rpc_lines(env: dict[str, str], stage: str) -> list[str]:
    return [line for line in (Path(env["_LOG_DIR"]) / f"{stage}.log").read_text().splitlines() if "rpc method=" in line]


def test_pyflyte_run_end_to_end_then_served_from_caches(flyte_env: dict[str, str]) -> None:
    first = pyflyte(flyte_env, "run", "workflow/pipeline.py", "training_pipeline", summary=True)
    assert first.returncode == 0, first.stdout + first.stderr
    # The summary people read: decision, metrics, the registry, where the report and deck are.
    summary = first.stdout
    assert (
        "PipelineResult(" not in summary
        and "decision  PROMOTE  (sklearn:breast_cancer · logistic_regression" in summary
    )
    accuracy = float(re.search(r"accuracy ([0-9.]+)", summary).group(1))
    assert accuracy >= 0.95
    assert "registered as breast_cancer-logistic_regression v1" in summary
    # The workflow's last step rolled the version out: serving answered a smoke request with it.
    assert re.search(
        r"^served    breast_cancer-logistic_regression v1 at \S+ \(smoke request answered '\w+'\)$", summary, re.M
    )
    assert "serving: breast_cancer-logistic_regression v1" in first.stderr
    report = re.search(r"^report +(\S+)$", summary, re.M).group(1)
    assert Path(report).is_file() and b"mlmesh evaluation" in Path(report).read_bytes()
    assert Path(re.search(r"^deck +(\S+)$", summary, re.M).group(1)).is_file()
    assert (
        re.search(r"^stages +loader +\S+ +computed$", summary, re.M)
        and "0 of 5 answered from the stages' memos" in summary
    )
    # Progress went to stderr, one line per stage (not a terminal here, so plain lines).
    for stage in PIPELINE_STAGES:
        assert re.search(rf"^{stage}: computed in ", first.stderr, re.M), first.stderr

    decks = list(Path(flyte_env["TMPDIR"]).rglob("deck.html"))
    assert len(decks) >= 2, "the load and evaluate tasks wrote no decks"
    # The evaluator's page sits in an iframe's srcdoc, so its styles stay out of Flyte's page.
    deck = html.unescape("\n".join(d.read_text() for d in decks))
    assert 'class="roc"' in deck and "confusion-matrix" in deck and "<td>accuracy</td>" in deck
    # The load task's deck is the data profile, with a histogram per numeric column.
    assert "<h2>Data profile</h2>" in deck and 'class="histogram"' in deck and "mean radius" in deck
    # Class names survive from source to report.
    assert "<th>malignant</th>" in deck and "<th>benign</th>" in deck

    # Every stage recorded its execution under the run's id (one per local pyflyte run).
    run_id = re.search(r"^run +(local-[0-9T]+-[0-9a-f]+) ", summary, re.M).group(1)
    graph = subprocess.run(
        [str(BIN / "mlmesh"), "lineage", "--run", run_id, "--json"], env=flyte_env, capture_output=True, text=True
    )
    assert [s["stage"] for s in json.loads(graph.stdout)] == [
        "loader",
        "preprocess",
        "features",
        "trainer",
        "evaluator",
    ]

    before = {stage: len(rpc_lines(flyte_env, stage)) for stage in PIPELINE_STAGES}
    second = pyflyte(flyte_env, "run", "workflow/pipeline.py", "training_pipeline")
    assert second.returncode == 0, second.stderr
    result = result_of(second.stdout)
    model = re.search(r"^model +([0-9a-f]{12}) ", summary, re.M).group(1)
    assert result["model"]["sha256"].startswith(model) and result["task_kind"] == "classification"
    assert result["rows_dropped"] == {"missing_target": 0, "invalid_target": 0, "incomplete": 0, "duplicate": 0}
    assert [s["cache_hit"] for s in result["stages"]] == [True] * 5
    after = {stage: rpc_lines(flyte_env, stage) for stage in PIPELINE_STAGES}
    # Every stage is asked again and answers from its memo, which checks its outputs still exist.
    for stage in ("loader", "preprocess", "features", "trainer"):
        assert len(after[stage]) == before[stage] + 1 and "cache_hit=true" in after[stage][-1], stage
    evaluator_calls = after["evaluator"][before["evaluator"] :]
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
    assert len(_verified_refs(result_of(third.stdout))) >= 15

    # --recompute reaches every stage, and each one computes instead of answering from its memo.
    before = {stage: len(rpc_lines(flyte_env, stage)) for stage in PIPELINE_STAGES}
    fourth = pyflyte(flyte_env, "run", "workflow/pipeline.py", "training_pipeline", "--recompute")
    assert fourth.returncode == 0, fourth.stderr
    for stage in PIPELINE_STAGES:
        new_calls = rpc_lines(flyte_env, stage)[before[stage] :]
        computed = [line for line in new_calls if "cache_hit=false" in line]
        assert computed, f"--recompute did not make {stage} compute: {new_calls}"


def _refs(value: object) -> list[tuple[str, str]]:
    """Every artifact ref (uri, sha256) anywhere in a JSON result."""
    if isinstance(value, dict):
        if isinstance(value.get("uri"), str) and isinstance(value.get("sha256"), str):
            return [(value["uri"].removeprefix("file://"), value["sha256"])]
        return [ref for item in value.values() for ref in _refs(item)]
    if isinstance(value, list):
        return [ref for item in value for ref in _refs(item)]
    return []


def _verified_refs(result: dict) -> list[tuple[str, str]]:
    refs = _refs(result)
    for path, digest in refs:
        assert Path(path).is_file(), f"a returned ref names a missing object: {path}"
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest, path
    return refs


@pytest.mark.parametrize("deleted", ["x_train", "model", "report"])
def test_a_deleted_object_is_recomputed_by_the_next_identical_run(flyte_env: dict[str, str], deleted: str) -> None:
    args = ("run", "workflow/pipeline.py", "training_pipeline", "--source", "sklearn:wine", "--seed", "11")
    first = pyflyte(flyte_env, *args)
    assert first.returncode == 0, first.stdout + first.stderr
    # A field of the result (model, report) or an entry of its lineage (x_train).
    result = result_of(first.stdout)
    victim = result[deleted] if deleted in result else result["lineage"][deleted]
    Path(victim["uri"].removeprefix("file://")).unlink()
    second = pyflyte(flyte_env, *args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert victim["sha256"] in {digest for _, digest in _refs(result_of(second.stdout))}  # the same bytes, made again
    assert len(_verified_refs(result_of(second.stdout))) >= 15


def test_stopped_service_is_named_with_its_address(flyte_env: dict[str, str]) -> None:
    dead = f"localhost:{free_ports(1)[0]}"
    # MLMESH_RECONNECT_SECONDS: the wait for a restarting stage (120 s by default) is not what this checks.
    env = {
        **flyte_env,
        "MLMESH_TRAINER_ADDRESS": dead,
        "MLMESH_RPC_TIMEOUT_SECONDS": "10",
        "MLMESH_RECONNECT_SECONDS": "2",
    }
    result = pyflyte(env, "run", "workflow/pipeline.py", "training_pipeline", "--seed", "7")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"trainer at {dead} failed with UNAVAILABLE" in re.sub(r"\s+", " ", output)
    assert "grpc/_channel.py" not in output and "_cython" not in output


def _sweep_result(stdout: str) -> tuple[str, int, list[dict[str, float]]]:
    result = result_of(stdout)
    return result["metric"], result["best_index"], result["candidate_metrics"]


def test_readme_sweep_command_picks_the_best_default_candidate(flyte_env: dict[str, str]) -> None:
    result = pyflyte(flyte_env, "run", "workflow/pipeline.py", "sweep_pipeline", "--metric", "f1_macro")
    assert result.returncode == 0, result.stdout + result.stderr
    metric, best, scores = _sweep_result(result.stdout)
    assert metric == "f1_macro" and len(scores) == 4  # the four default classification candidates
    assert scores[best]["f1_macro"] == max(s["f1_macro"] for s in scores)
    # One comparison report, every candidate side by side, the winner marked.
    report = result_of(result.stdout)["comparison_report"]
    page = Path(report["uri"].removeprefix("file://")).read_bytes()
    assert hashlib.sha256(page).hexdigest() == report["sha256"]
    assert page.count(b"<tr") == 5 and page.count(b'class="winner"') == 1 and b"Only the winner is registered" in page
    # Only the winner is registered.
    registered = [result_of(result.stdout)["best"]["registered_as"]]
    assert registered[0]
    models = subprocess.run([str(BIN / "mlmesh"), "models", "--json"], env=flyte_env, capture_output=True, text=True)
    names = {entry["name"] for entry in json.loads(models.stdout)}
    losers = {f"breast_cancer-{m}" for m in ("logistic_regression", "random_forest", "hist_gradient_boosting", "sgd")}
    losers -= {registered[0].split(" v")[0]}
    assert not (names & (losers - {"breast_cancer-logistic_regression"})), names  # that one came from training_pipeline


def test_sweep_picks_the_candidate_that_is_really_best(flyte_env: dict[str, str]) -> None:
    features_calls = len(rpc_lines(flyte_env, "features"))
    candidates = json.dumps(
        [
            {"model": "random_forest", "hyperparameters": {"n_estimators": "1", "max_depth": "1"}},  # a stump: weak
            {"model": "logistic_regression", "hyperparameters": {"C": "1.0"}},
            {"model": "sgd", "hyperparameters": {"max_iter": "5", "tol": "null"}},
        ]
    )
    args = [
        "run",
        "workflow/pipeline.py",
        "sweep_pipeline",
        "--source",
        "sklearn:wine",
        "--candidates",
        candidates,
        "--seed",
        "3",
    ]
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
    metric, _best, scores = _sweep_result(result.stdout)
    assert metric == "r2" and len(scores) == 3  # ridge, random_forest, hist_gradient_boosting
    assert all("accuracy" not in s for s in scores)
    assert any("the regression default applies" in r for r in result_of(result.stdout)["best"]["reasons"])


def test_roles_task_kind_and_deduplication_from_pyflyte(flyte_env: dict[str, str], tmp_path: Path) -> None:
    rows = ["zip,row_id,size,label"]
    for i in range(240):
        rows.append(f"{[1001, 2002, 3003][i % 3]},{i},{(i * 7) % 241},{(i % 3) + (i % 2)}")  # all distinct
    rows += rows[1:41]  # forty exact repeats of earlier rows
    table = tmp_path / "zips.csv"
    table.write_text("\n".join(rows) + "\n")
    base = ["run", "workflow/pipeline.py", "training_pipeline", "--source", str(table), "--target_column", "label"]
    kept = pyflyte(
        flyte_env, *base, "--column_roles", '{"zip": "categorical", "row_id": "ignore"}', "--task_kind", "regression"
    )
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert (
        result_of(kept.stdout)["task_kind"] == "regression" and result_of(kept.stdout)["rows_dropped"]["duplicate"] == 0
    )
    deduplicated = pyflyte(
        flyte_env,
        *base,
        "--column_roles",
        '{"zip": "categorical", "row_id": "ignore"}',
        "--task_kind",
        "regression",
        "--drop_duplicates",
    )
    assert deduplicated.returncode == 0, deduplicated.stdout + deduplicated.stderr
    assert result_of(deduplicated.stdout)["rows_dropped"]["duplicate"] == 40
    schema_ref = result_of(deduplicated.stdout)["lineage"]["schema"]["uri"].removeprefix("file://")
    roles = {c["name"]: (c["role"], c["overridden"]) for c in json.loads(Path(schema_ref).read_text())["columns"]}
    assert roles["zip"] == ("categorical", True) and roles["row_id"] == ("ignore", True)
    assert roles["size"] == ("numeric", False)

    wrong = pyflyte(flyte_env, *base, "--column_roles", '{"zip": "postcode"}')
    assert wrong.returncode != 0
    assert "unknown role 'postcode'" in re.sub(r"\s+", " ", wrong.stdout + wrong.stderr)


def test_docs_workflow_commands_run_as_written(flyte_env: dict[str, str], tmp_path: Path) -> None:
    """docs/workflow.md's pyflyte block, line for line, from a folder holding its data.csv."""
    text = (ROOT / "docs" / "workflow.md").read_text()
    section = text.split("\n## Running the workflow\n", 1)[1].split("\n## ", 1)[0]
    script = re.findall(r"```sh\n(.*?)```", section, re.S)[0]
    assert script.count("pyflyte run") == 6 and "--source data.csv" in script
    write_house_prices(tmp_path)
    (tmp_path / "workflow").symlink_to(ROOT / "workflow")
    script = script.replace(".venv/bin/", f"{BIN}/")
    result = run_script(script, tmp_path, flyte_env, timeout=900)
    # Six summaries (a sweep ends with its winner's), two of them after a sweep's table.
    decisions = re.findall(r"^decision  (PROMOTE|RETRAIN)  \((.*)\)$", result.stdout, re.M)
    assert len(decisions) == 6 and result.stdout.count("\nsweep     ") == 2, result.stdout[-3000:]
    house = next(what for _, what in decisions if what.startswith("data.csv"))
    assert house == "data.csv · ridge · regression"
    assert "registered as data.csv-ridge v1" in result.stdout
    assert "data.csv-ridge" in result.stdout.rsplit("\nsweep     ", 1)[1]  # `mlmesh models` lists it


def test_pyflyte_package_needs_no_backend(tmp_path: Path, flyte_env: dict[str, str]) -> None:
    output = tmp_path / "flyte-package.tgz"
    result = pyflyte(flyte_env, "--pkgs", "workflow", "package", "-o", str(output), "--force")
    assert result.returncode == 0, result.stdout + result.stderr
    with tarfile.open(output) as archive:
        names = archive.getnames()
        train_spec = archive.extractfile(next(n for n in names if n.endswith("workflow.tasks.train_1.pb"))).read()
    assert b"mlmesh-pipeline:latest" in train_spec  # tasks name the pipeline image
    for expected in ("training_pipeline", "sweep_pipeline", "training_pipeline_nightly", "training_pipeline_demo"):
        assert any(expected in n for n in names), f"{expected} missing from {names}"
