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
