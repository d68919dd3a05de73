"""What a person sees from `mlmesh run` and `pyflyte run`: progress, the summary, errors, Ctrl-C, pipes, --help.

Everything here goes through the real commands against a real local mesh.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cli import main as cli
from services.client.mesh import running_operations
from services.runtime.catalog import PIPELINE_STAGES
from services.runtime.settings import Settings
from tests.helpers import start_local_mesh

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# A fit long enough to interrupt: 4000 trees, about a percent a step.
SLOW_FIT = ("--model", "random_forest", "--hp", "n_estimators=4000")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    mesh, environment = start_local_mesh(tmp_path_factory.mktemp("cli"))
    yield environment
    mesh.stop()


def mlmesh(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "mlmesh"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow  # a whole `mlmesh run` against the module's mesh
def test_run_ends_with_the_summary_and_registers_a_promote(env: dict[str, str]) -> None:
    result = mlmesh(env, "run", "--source", "sklearn:wine", "--seed", "5")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    assert re.search(r"^decision  PROMOTE  \(sklearn:wine · logistic_regression · classification\)$", out, re.M), out
    assert re.search(r"^metrics   accuracy 0\.\d{4} +roc_auc 0\.\d{4} +f1_macro 0\.\d{4}$", out, re.M), out
    assert "registered as wine-logistic_regression v1" in out
    report = Path(re.search(r"^report +(\S+)$", out, re.M).group(1))
    assert report.is_file() and report.read_bytes().startswith(b"<!DOCTYPE html>")
    assert (
        re.search(r"^stages    loader +\S+  computed$", out, re.M) and "0 of 5 answered from the stages' memos" in out
    )
    # Progress is on stderr, a line per stage (plain: this is not a terminal), and never on stdout.
    for stage in PIPELINE_STAGES:
        assert re.search(rf"^{stage}: computed in \d", result.stderr, re.M), result.stderr
    assert re.search(r"^loader: computed in [\d.]+s, 178 rows \([\d.]+k? rows/s\)$", result.stderr, re.M), result.stderr
    assert "registry: wine-logistic_regression v1" in result.stderr and "computed in" not in out
    # The promotion ends served: serving loaded the version now and answered a smoke request.
    assert re.search(
        r"^served    wine-logistic_regression v1 at 127\.0\.0\.1:\d+ \(smoke request answered 'class_\d'\)$", out, re.M
    ), out
    assert "serving: wine-logistic_regression v1" in result.stderr

    again = mlmesh(env, "run", "--source", "sklearn:wine", "--seed", "5", "--json", "--registry-name", "wine-prod")
    summary = json.loads(again.stdout)
    assert summary["registered_as"] == "wine-prod v1" and summary["decision"] == "PROMOTE"
    assert [s["cache_hit"] for s in summary["stages"]] == [True] * 5
    assert summary["effective_hyperparameters"]["max_iter"] == "1000"
    models = json.loads(mlmesh(env, "models", "--json").stdout)
    assert {m["name"] for m in models} >= {"wine-logistic_regression", "wine-prod"}

    unregistered = mlmesh(env, "run", "--source", "sklearn:iris", "--no-register", "--quiet")
    assert unregistered.returncode == 0 and unregistered.stderr == ""
    assert "not registered (only PROMOTE is)" in unregistered.stdout
    assert "iris-logistic_regression" not in mlmesh(env, "models").stdout


@pytest.mark.slow  # a whole `mlmesh run` against the module's mesh
def test_a_retrain_is_not_registered_and_says_why(env: dict[str, str]) -> None:
    result = mlmesh(env, "run", "--source", "sklearn:diabetes", "--min", "r2=0.99")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^decision  RETRAIN .*\n +r2 0\.\d{4} is below minimum 0\.99$", result.stdout, re.M), (
        result.stdout
    )
    assert "not registered (only PROMOTE is)" in result.stdout and "registry:" not in result.stderr


@pytest.mark.slow  # a whole `mlmesh run` against the module's mesh
def test_a_stage_error_is_one_paragraph(env: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "absent.csv"
    result = mlmesh(env, "run", "--source", str(missing), "--target", "y")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "NOT_FOUND" in result.stderr and result.stdout == ""
    flyte = subprocess.run(
        [
            str(BIN / "pyflyte"),
            "run",
            "workflow/pipeline.py",
            "training_pipeline",
            "--source",
            str(missing),
            "--target_column",
            "y",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert flyte.returncode == 1
    assert "Traceback" not in flyte.stderr + flyte.stdout and "╭" not in flyte.stderr
    # It ends with the stage's own message.
    assert flyte.stderr.rstrip().splitlines()[-1].startswith("loader at "), flyte.stderr
    assert "NOT_FOUND" in flyte.stderr and "the load task failed" in flyte.stderr


@pytest.mark.slow  # pyflyte runs
def test_pyflyte_takes_numbers_as_people_type_them(env: dict[str, str]) -> None:
    result = subprocess.run(
        [
            str(BIN / "pyflyte"),
            "run",
            "workflow/pipeline.py",
            "training_pipeline",
            "--source",
            "sklearn:breast_cancer",
            "--model",
            "random_forest",
            "--hyperparameters",
            '{"n_estimators": 30, "max_depth": 4.0}',
            "--minimums",
            '{"accuracy": 1}',
        ],
        cwd=ROOT,
        env={**env, "MLMESH_OUTPUT": "json"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    outcome = json.loads(result.stdout[result.stdout.index("\n{") + 1 :])
    assert (
        outcome["decision"] == "RETRAIN"
        and "accuracy" in outcome["reasons"][0]
        and "minimum 1" in outcome["reasons"][0]
    )
    assert outcome["model_name"] == "random_forest"


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _running_fits(env: dict[str, str]) -> list:
    settings = Settings.from_env(env)
    return asyncio.run(running_operations(settings.addresses["trainer"], settings=settings))


def _interrupt(command: list[str], env: dict[str, str], log: Path) -> tuple[int, str]:
    """Start `command` in its own process group, Ctrl-C it (SIGINT to the group, as a terminal does)
    once it shows a fit running, as a person would, and return its exit code and stderr."""
    with log.open("w+") as err:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )
        try:
            _wait_for(
                lambda: bool(re.search(r"^trainer: +\d+% ", log.read_text(), re.M)) or process.poll() is not None,
                120,
                "the fit's progress on stderr",
            )
            assert _running_fits(env), log.read_text()[-2000:]
            assert process.poll() is None, log.read_text()[-2000:]
            os.killpg(process.pid, signal.SIGINT)
            code = process.wait(timeout=30)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    return code, log.read_text()


@pytest.mark.slow  # a whole `mlmesh run` against the module's mesh
def test_ctrl_c_stops_the_run_and_its_fit_with_one_line(env: dict[str, str], tmp_path: Path) -> None:
    code, stderr = _interrupt(
        [str(BIN / "mlmesh"), "run", "--source", "sklearn:digits", *SLOW_FIT], env, tmp_path / "run.err"
    )
    assert code == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "mlmesh: interrupted; the trainer was asked to stop its fit" in stderr, stderr[
        -3000:
    ]
    _wait_for(lambda: not _running_fits(env), 30, "the trainer to stop the fit")


@pytest.mark.slow  # pyflyte runs
def test_ctrl_c_under_pyflyte_and_with_mesh(tmp_path: Path) -> None:
    """`make run`'s shape: with-mesh starting its own mesh around pyflyte; Ctrl-C ends both quickly."""
    base = tmp_path / "own"
    base.mkdir()
    mesh, env = start_local_mesh(base)
    mesh.stop()  # only its ports and folders: with-mesh starts its own mesh on them
    command = [
        str(BIN / "mlmesh"),
        "with-mesh",
        "--",
        str(BIN / "pyflyte"),
        "run",
        "workflow/pipeline.py",
        "training_pipeline",
        "--source",
        "sklearn:digits",
        "--model",
        "random_forest",
        "--hyperparameters",
        '{"n_estimators": 4000}',
    ]
    started = time.monotonic()
    code, stderr = _interrupt(command, env, tmp_path / "flyte.err")
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "mlmesh: interrupted during the train task" in stderr, stderr[-3000:]
    assert time.monotonic() - started < 120
    # with-mesh stopped its mesh: nothing answers on the loader's port any more.
    settings = Settings.from_env(env)
    assert not _running_fits(env)
    probe = subprocess.run([str(BIN / "mlmesh"), "status", "--timeout", "1"], env=env, capture_output=True, text=True)
    assert probe.returncode == 1 and "SERVING" not in probe.stdout.replace("NOT_SERVING", ""), (
        settings.addresses,
        probe.stdout,
    )


@pytest.mark.slow  # a whole `mlmesh run` against the module's mesh
def test_a_closed_pipe_is_quiet(env: dict[str, str]) -> None:
    # `mlmesh runs | head -1` with more than one line: the reader leaves early.
    result = subprocess.run(
        ["bash", "-c", f"{BIN / 'mlmesh'} runs --json | head -c 1"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout == "[" and result.stderr == "", result.stderr


def test_help_lists_sources_models_and_choices() -> None:
    text = subprocess.run(
        [str(BIN / "mlmesh"), "run", "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}
    ).stdout
    for expected in (
        "breast_cancer, diabetes, digits, iris, wine",
        "synthetic:classification?rows=1000",
        "logistic_regression, random_forest, hist_gradient_boosting, sgd",
        "ridge, random_forest",
        "{standard,minmax,robust,none}",
        "default: standard",
        "--registry-name",
        "--no-register",
    ):
        assert expected in text, expected


def test_help_lists_match_the_catalogues() -> None:
    from services.loader.logic import SKLEARN_DATASETS
    from services.trainer.logic import MODELS

    assert tuple(sorted(SKLEARN_DATASETS)) == cli.HELP_SOURCES
    assert {kind: tuple(models) for kind, models in MODELS.items()} == cli.HELP_MODELS


def test_choices_are_the_enums_words_and_text_becomes_the_enum() -> None:
    """The CLI's choices and the workflow's enum inputs come from the same enums, so they cannot diverge."""
    from services.client.mesh import CHOICES, ConfigError, PipelineConfig
    from services.runtime.vocabulary import CategoricalEncoding, NumericImputation, Scaling, TaskKindChoice

    assert CHOICES == {
        "task_kind": ("", "classification", "regression"),
        "numeric_imputation": ("median", "mean", "most_frequent"),
        "categorical_encoding": ("auto", "one_hot", "target", "ordinal"),
        "scaling": ("standard", "minmax", "robust", "none"),
    }
    config = PipelineConfig(task_kind="regression", scaling="minmax", numeric_imputation="mean")
    assert config.task_kind is TaskKindChoice.REGRESSION and config.scaling is Scaling.MINMAX
    assert config.numeric_imputation is NumericImputation.MEAN
    assert PipelineConfig().categorical_encoding is CategoricalEncoding.AUTO
    assert PipelineConfig().task_kind is TaskKindChoice.INFERRED and PipelineConfig().task_kind == ""
    with pytest.raises(ConfigError, match=r"scaling 'bogus' is not one of: standard, minmax, robust, none"):
        PipelineConfig(scaling="bogus")
    with pytest.raises(ConfigError, match=r"task_kind 'both' is not one of: \(infer\), classification, regression"):
        PipelineConfig(task_kind="both")
    args = cli.build_parser().parse_args(["run", "--task", "regression", "--impute", "most_frequent"])
    assert cli.pipeline_config(args).task_kind is TaskKindChoice.REGRESSION
    assert cli.pipeline_config(args).numeric_imputation is NumericImputation.MOST_FREQUENT


def _write_customers(folder: Path, rows: int = 300) -> Path:
    """A table with every kind of column serving reads: numbers with gaps, levels with gaps, a
    boolean, dates, and an identifier and the target, which serving accepts and leaves out."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(3)
    frame = pd.DataFrame(
        {
            "customer_id": np.arange(5000, 5000 + rows),
            "age": rng.integers(18, 80, rows),
            "income": np.round(rng.normal(50_000, 15_000, rows), 2),
            "plan": rng.choice(["basic", "plus", "pro"], rows),
            "member": rng.choice([True, False], rows),
            "signup": (pd.Timestamp("2021-01-01") + pd.to_timedelta(rng.integers(0, 900, rows), unit="D")).strftime(
                "%Y-%m-%d"
            ),
        }
    )
    frame.loc[rng.choice(rows, 15), "income"] = np.nan
    frame.loc[rng.choice(rows, 10), "plan"] = np.nan
    score = frame.age / 80 + (frame.plan == "pro") * 0.8 + frame.member * 0.3 + rng.normal(0, 0.2, rows)
    frame["churn"] = np.where(score > 1.0, "stay", "leave")
    path = folder / "customers.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.mark.slow  # two `mlmesh run`s, predictions and the serving commands against the module's mesh
def test_predict_and_the_serving_commands(env: dict[str, str], tmp_path: Path) -> None:
    import pandas as pd

    table = _write_customers(tmp_path)
    for model in ("logistic_regression", "random_forest"):
        trained = mlmesh(
            env, "run", "--source", str(table), "--target", "churn", "--model", model,
            "--min", "accuracy=0.6", "--registry-name", "churn",
        )  # fmt: skip
        assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    assert "served    churn v2 at " in trained.stdout, trained.stdout

    status = mlmesh(env, "serving", "status")
    assert re.search(r"^  churn +v2 +READY +follows the newest version$", status.stdout, re.M), status.stdout

    scored = tmp_path / "scored.parquet"
    predicted = mlmesh(env, "predict", "--model", "churn", "--source", str(table), "--output", str(scored))
    assert predicted.returncode == 0, predicted.stderr
    assert predicted.stdout.strip() == f"300 predictions from churn v2 written to {scored}"
    result = pd.read_parquet(scored)
    assert list(result.columns[-4:]) == ["predicted", "probability_leave", "probability_stay", "model_version"]
    assert set(result["predicted"]) <= {"leave", "stay"} and (result["model_version"] == 2).all()
    assert (result["predicted"] == result["churn"]).mean() > 0.8  # the forest fits its own training rows
    assert ((result["probability_leave"] + result["probability_stay"] - 1).abs() < 1e-12).all()
    assert (result["predicted"] == result[["probability_leave", "probability_stay"]].idxmax(axis=1).str[12:]).all()

    # A rollback is one command, and the version it pins answers; follow undoes it.
    rolled = mlmesh(env, "serving", "rollback", "churn")
    assert rolled.stdout.strip() == "churn: rolled back from version 2 to 1, pinned", rolled.stderr
    old = tmp_path / "old.csv"
    assert mlmesh(env, "predict", "--model", "churn", "--source", str(table), "--output", str(old)).returncode == 0
    assert set(pd.read_csv(old)["model_version"]) == {1}
    assert "pinned to version 1" in mlmesh(env, "serving", "status").stdout
    assert mlmesh(env, "serving", "pin", "churn", "2").returncode == 0
    assert mlmesh(env, "serving", "follow", "churn").stdout.strip() == (
        "churn: serving the newest version (2) and each new one"
    )
    # Unloaded, the model refuses predictions with the reason and the way back.
    assert mlmesh(env, "serving", "unload", "churn").returncode == 0
    refused = mlmesh(env, "predict", "--model", "churn", "--source", str(table), "--output", str(old))
    assert refused.returncode == 2 and "FAILED_PRECONDITION" in refused.stderr and "is unloaded" in refused.stderr
    assert json.loads(mlmesh(env, "serving", "status", "--json").stdout)[0]["state"] in ("UNLOADED",)
    assert mlmesh(env, "serving", "follow", "churn").returncode == 0

    # What the caller gets wrong is said plainly.
    missing = mlmesh(
        env, "predict", "--model", "churn", "--source", str(scored.with_name("none.csv")), "--output", str(old)
    )
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    pd.read_csv(table).drop(columns=["plan"]).to_csv(tmp_path / "partial.csv", index=False)
    partial = mlmesh(
        env, "predict", "--model", "churn", "--source", str(tmp_path / "partial.csv"), "--output", str(old)
    )
    assert partial.returncode == 2 and "lacks the model's input column(s) 'plan'" in partial.stderr
    unknown = mlmesh(env, "predict", "--model", "nope", "--source", str(table), "--output", str(old))
    assert unknown.returncode == 2 and "NOT_FOUND" in unknown.stderr and "no model named 'nope'" in unknown.stderr
