"""Trainer stage: catalogue, hyperparameters, stepped fit with progress; then the real service."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import LogisticRegression, Ridge, SGDClassifier

from mlmesh.common.v1.common_pb2 import ArtifactRef, TaskKind
from mlmesh.features.v1 import features_pb2
from mlmesh.trainer.v1 import trainer_pb2
from services.client.mesh import MeshClient
from services.runtime import vocabulary
from services.runtime.errors import Cancelled, FailedPrecondition, InvalidArgument
from services.runtime.formats import npy_to_array, skops_to_model
from services.runtime.settings import Settings
from services.runtime.stage import Run
from services.runtime.store import ArtifactStore
from services.trainer import logic
from tests.helpers import FAILED, INVALID, assert_serving, expect_error, features_for, prepare

# The service tests here run the pipeline up to the trainer: the evaluator is never called.
pytestmark = pytest.mark.stages("loader", "preprocess", "features", "trainer")
CLASSIFICATION_SOURCE = "synthetic:classification?rows=300&features=6&classes=3&seed=1"
REGRESSION_SOURCE = "synthetic:regression?rows=300&features=6&noise=5&seed=1"

ESTIMATORS = {
    ("classification", "logistic_regression"): LogisticRegression,
    ("classification", "random_forest"): RandomForestClassifier,
    ("classification", "hist_gradient_boosting"): HistGradientBoostingClassifier,
    ("classification", "sgd"): SGDClassifier,
    ("regression", "ridge"): Ridge,
    ("regression", "random_forest"): RandomForestRegressor,
    ("regression", "hist_gradient_boosting"): HistGradientBoostingRegressor,
}


# Fewer trees and boosting rounds keep the every-model tests quick; the defaults are
# exercised by the progress tests.
QUICK = {"random_forest": {"n_estimators": "20"}, "hist_gradient_boosting": {"max_iter": "20"}}


def toy(task: str, rows: int = 120) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 4))
    if task == "classification":
        return x, (x[:, 0] + x[:, 1] > 0).astype("int64")
    return x, x @ np.array([1.0, -2.0, 0.5, 0.0]) + rng.normal(0, 0.1, rows)


# ---- hyperparameter literals --------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("200", 200),
        ("0.5", 0.5),
        ("1e-3", 0.001),
        ("-1", -1),
        ("true", True),
        ("false", False),
        ("null", None),
        ('"sqrt"', "sqrt"),
        ("sqrt", "sqrt"),
        ("[1, 2]", [1, 2]),
        ('{"a": 1}', {"a": 1}),
        ("", ""),
    ],
)
def test_parse_value_keeps_json_types(raw: str, value) -> None:
    parsed = logic.parse_value(raw)
    assert parsed == value and type(parsed) is type(value)


def test_literal_round_trips() -> None:
    for value in (200, 0.5, True, None, "sqrt", [1, 2], {"b": 1, "a": 2}):
        assert logic.parse_value(logic.literal(value)) == value
    assert logic.literal({"b": 1, "a": 2}) == '{"a": 2, "b": 1}'
    assert logic.literal(np.float64) == logic.literal(repr(np.float64))  # not JSON: its repr as a string


# ---- the catalogue ------------------------------------------------------------------------
def test_all_model_names() -> None:
    assert logic.all_model_names() == ["hist_gradient_boosting", "logistic_regression", "random_forest", "ridge", "sgd"]


@pytest.mark.parametrize(("task", "model"), list(ESTIMATORS))
def test_build_estimator_uses_seed_and_our_defaults(task: str, model: str) -> None:
    estimator = logic.build_estimator(task, model, {}, seed=17)
    assert type(estimator) is ESTIMATORS[(task, model)]
    assert estimator.get_params()["random_state"] == 17
    if model == "logistic_regression":
        assert estimator.max_iter == 1000
    if model == "sgd":
        assert estimator.loss == "log_loss"


def test_build_estimator_types_hyperparameters() -> None:
    forest = logic.build_estimator(
        "classification",
        "random_forest",
        {
            "n_estimators": "7",
            "max_features": "sqrt",
            "bootstrap": "false",
            "max_depth": "null",
            "min_samples_leaf": "0.1",
            "class_weight": '"balanced"',
        },
        seed=3,
    )
    assert forest.n_estimators == 7 and isinstance(forest.n_estimators, int)
    assert forest.max_features == "sqrt" and forest.bootstrap is False and forest.max_depth is None
    assert forest.min_samples_leaf == 0.1 and forest.class_weight == "balanced"
    ridge = logic.build_estimator("regression", "ridge", {"alpha": "2"}, seed=0)
    assert ridge.alpha == 2


@pytest.mark.parametrize(
    ("task", "model", "hyperparameters", "fragments"),
    [
        ("classification", "logistic_regression", {"C": "-1"}, ["'C' parameter", "Got -1"]),
        ("classification", "random_forest", {"n_estimators": "many"}, ["'n_estimators'", "many"]),
        ("classification", "random_forest", {"n_trees": "5"}, ["unknown hyperparameter 'n_trees'", "n_estimators"]),
        ("classification", "sgd", {"random_state": "1"}, ["'random_state' is set through the request's seed"]),
        ("regression", "logistic_regression", {}, ["not available for regression", "is a classification model"]),
        ("classification", "ridge", {}, ["not available for classification", "is a regression model"]),
        ("regression", "random_forest", {"criterion": "entropy"}, ["'criterion'", "RandomForestRegressor"]),
    ],
)
def test_build_estimator_rejects(task, model, hyperparameters, fragments) -> None:
    with pytest.raises(InvalidArgument) as caught:
        logic.build_estimator(task, model, hyperparameters, seed=0)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_task_of_target() -> None:
    assert vocabulary.TaskKind.of_target(np.array([0, 1, 2])) == vocabulary.TaskKind.CLASSIFICATION
    assert vocabulary.TaskKind.of_target(np.array([0.0, 1.0])) == vocabulary.TaskKind.REGRESSION


# ---- fitting ------------------------------------------------------------------------------
def _run(events: list | None = None) -> Run:
    """A Run for calling logic.fit directly that records (fraction, message) of each progress event."""
    sink = events if events is not None else []
    return Run.detached(lambda p: sink.append((p.fraction, p.message)))


def test_stepped_fit_reports_progress_and_restores_warm_start() -> None:
    x, y = toy("classification")
    estimator = logic.build_estimator("classification", "random_forest", {"n_estimators": "25"}, seed=0)
    events: list[tuple[float, str]] = []
    fitted, _ = logic.fit(estimator, x, y, _run(events))
    steps = [f"n_estimators {n}/25" for n in range(0, 26)]
    assert [m for _, m in events] == [*steps, "fit complete"]
    fractions = [f for f, _ in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and fractions[0] == 0.0
    assert len(fitted.estimators_) == 25 and fitted.warm_start is False

    # Growing in steps gives the same forest as one fit with the same seed.
    whole = RandomForestClassifier(n_estimators=25, random_state=0).fit(x, y)
    np.testing.assert_array_equal(whole.predict_proba(x), fitted.predict_proba(x))


def test_single_shot_fit_reports_start_and_end() -> None:
    x, y = toy("regression")
    estimator = logic.build_estimator("regression", "ridge", {}, seed=0)
    events: list[tuple[float, str]] = []
    assert logic.fit(estimator, x, y, _run(events))[1] == []
    assert events == [(0.0, "fitting Ridge on 120 rows"), (1.0, "fit complete")]
    assert estimator.score(x, y) > 0.99


def test_a_one_call_fit_reports_its_elapsed_time(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = toy("regression")
    estimator = logic.build_estimator("regression", "ridge", {}, seed=0)
    real_fit = estimator.fit
    monkeypatch.setattr(logic, "HEARTBEAT_SECONDS", 0.05)
    monkeypatch.setattr(estimator, "fit", lambda *a: (time.sleep(0.3), real_fit(*a))[1])
    events: list[tuple[float, str]] = []
    logic.fit(estimator, x, y, _run(events))
    beats = [m for _, m in events if m.startswith("fitting Ridge on 120 rows, ") and m.endswith("s so far")]
    assert len(beats) >= 3 and events[-1] == (1.0, "fit complete")


@pytest.mark.slow  # two 12,000-row gradient boosting fits
def test_gradient_boosting_is_fitted_as_scikit_learn_fits_it() -> None:
    # Warm-started steps would re-bin and restart early stopping: a different model.
    from sklearn.datasets import make_classification

    x, y = make_classification(12_000, 8, random_state=0)
    estimator = logic.build_estimator("classification", "hist_gradient_boosting", {}, seed=3)
    fitted, _ = logic.fit(estimator, x, y, _run())
    whole = HistGradientBoostingClassifier(random_state=3).fit(x, y)
    assert fitted.n_iter_ == whole.n_iter_
    np.testing.assert_array_equal(whole.predict_proba(x), fitted.predict_proba(x))


def test_fit_returns_convergence_warnings() -> None:
    x, y = toy("classification")
    estimator = logic.build_estimator("classification", "logistic_regression", {"max_iter": "1"}, seed=0)
    found = logic.fit(estimator, x, y, _run())[1]
    assert found and all(isinstance(w, str) and "converge" in w.lower() for w in found)


def test_fit_stops_when_cancelled() -> None:
    x, y = toy("classification")
    estimator = logic.build_estimator("classification", "random_forest", {"n_estimators": "50"}, seed=0)
    run = _run()
    fitted_counts: list[int] = []

    def progress(p) -> None:
        fitted_counts.append(p.step)
        if p.step == 10:
            run.cancelled.set()

    run.report = progress
    with pytest.raises(Cancelled):
        logic.fit(estimator, x, y, run)
    assert max(fitted_counts) == 10  # ten trees grown, then the cancellation is seen before the next


@pytest.mark.parametrize(
    ("model", "hyperparameters", "fragment"),
    [
        ("logistic_regression", {"penalty": "l1"}, "penalty"),
        ("random_forest", {"bootstrap": "false", "max_samples": "0.5"}, "bootstrap"),
        ("random_forest", {"bootstrap": "false", "oob_score": "true"}, "bootstrap"),
    ],
)
def test_hyperparameter_combinations_refused_at_fit_are_invalid_arguments(model, hyperparameters, fragment) -> None:
    x, y = toy("classification")
    estimator = logic.build_estimator("classification", model, hyperparameters, seed=0)  # each value alone is fine
    with pytest.raises(InvalidArgument, match="cannot be fitted with these hyperparameters") as caught:
        logic.fit(estimator, x, y, _run())
    assert fragment in str(caught.value)


def test_fit_checks_shapes() -> None:
    x, y = toy("classification")
    estimator = logic.build_estimator("classification", "sgd", {}, seed=0)
    with pytest.raises(FailedPrecondition, match="x_train has 120 rows but y_train has 100"):
        logic.fit(estimator, x, y[:100], _run())
    with pytest.raises(FailedPrecondition, match="2-D matrix"):
        logic.fit(estimator, y.astype(float), y, _run())


# ---- the real service ---------------------------------------------------------------------
def train_request(built, model: str, hyperparameters: dict[str, str] | None = None, seed: int = 5, force: bool = False):
    return trainer_pb2.TrainRequest(
        x_train=built.x_train,
        y_train=built.y_train,
        model=model,
        hyperparameters=hyperparameters or {},
        seed=seed,
        force_recompute=force,
    )


@pytest.mark.asyncio
@pytest.mark.parametrize(("task", "model"), list(ESTIMATORS))
async def test_every_model_trains_deterministically(
    client: MeshClient, settings: Settings, task: str, model: str
) -> None:
    source = CLASSIFICATION_SOURCE if task == "classification" else REGRESSION_SOURCE
    built = await features_for(client, source)
    quick = QUICK.get(model, {})
    first = await client.train(train_request(built, model, quick, force=True))
    second = await client.train(train_request(built, model, quick, force=True))
    assert not first.stage.cache_hit and not second.stage.cache_hit
    assert first.model.sha256 == second.model.sha256
    assert first.model.media_type == "application/vnd.skops"
    expected_kind = TaskKind.TASK_KIND_CLASSIFICATION if task == "classification" else TaskKind.TASK_KIND_REGRESSION
    assert first.task_kind == expected_kind
    assert first.effective_hyperparameters["random_state"] == "5"

    store = ArtifactStore(settings.artifact_root)
    estimator = skops_to_model(store.get(first.model), "model")
    assert type(estimator) is ESTIMATORS[(task, model)]
    x = npy_to_array(store.get(built.x_train), "x_train")
    y = npy_to_array(store.get(built.y_train), "y_train")
    assert estimator.score(x, y) == pytest.approx(first.train_score)
    assert first.train_score > (0.7 if task == "classification" else 0.8)

    reseeded = await client.train(train_request(built, model, quick, seed=6))
    assert reseeded.model.sha256 != first.model.sha256
    assert reseeded.effective_hyperparameters["random_state"] == "6"


@pytest.mark.asyncio
async def test_progress_is_streamed_step_by_step(client: MeshClient) -> None:
    built = await features_for(client, CLASSIFICATION_SOURCE)
    events: list[trainer_pb2.TrainProgress] = []
    result = await client.train(
        train_request(built, "random_forest", {"n_estimators": "40"}), on_progress=events.append
    )
    assert result.model.sha256 and not result.stage.cache_hit
    assert [e.message for e in events] == [*(f"n_estimators {n}/40" for n in range(41)), "fit complete"]
    assert [e.fraction_done for e in events] == pytest.approx([*(n / 40 for n in range(41)), 1.0])
    assert [(e.step, e.total_steps) for e in events[:3]] == [(0, 40), (1, 40), (2, 40)]
    assert all(e.operation_name.startswith("operations/train-") for e in events)
    assert all(e.eta_seconds >= 0 and e.elapsed_seconds >= 0 for e in events)
    assert events[-2].eta_seconds == 0.0  # nothing left at 40/40


@pytest.mark.asyncio
async def test_gradient_boosting_reports_start_and_end(client: MeshClient) -> None:
    built = await features_for(client, CLASSIFICATION_SOURCE)
    events: list[trainer_pb2.TrainProgress] = []
    await client.train(train_request(built, "hist_gradient_boosting", {"max_iter": "25"}), on_progress=events.append)
    assert [e.fraction_done for e in events] == [0.0, 1.0]
    assert events[0].message.startswith("fitting HistGradientBoostingClassifier on ")


@pytest.mark.asyncio
async def test_single_shot_models_report_start_and_end(client: MeshClient) -> None:
    built = await features_for(client, REGRESSION_SOURCE)
    events: list[trainer_pb2.TrainProgress] = []
    await client.train(train_request(built, "ridge"), on_progress=events.append)
    assert [(e.fraction_done, e.message) for e in events] == [(0.0, "fitting Ridge on 240 rows"), (1.0, "fit complete")]


@pytest.mark.asyncio
async def test_convergence_warnings_are_streamed(client: MeshClient) -> None:
    built = await features_for(client, CLASSIFICATION_SOURCE)
    events: list[trainer_pb2.TrainProgress] = []
    await client.train(train_request(built, "logistic_regression", {"max_iter": "1"}), on_progress=events.append)
    assert any(e.message.startswith("warning: ") and "converge" in e.message.lower() for e in events)


@pytest.mark.asyncio
async def test_hyperparameters_are_json_literals(client: MeshClient, settings: Settings) -> None:
    built = await features_for(client, CLASSIFICATION_SOURCE)
    hyperparameters = {"n_estimators": "7", "max_features": "sqrt", "bootstrap": "false", "max_depth": "null"}
    result = await client.train(train_request(built, "random_forest", hyperparameters))
    effective = result.effective_hyperparameters
    assert effective["n_estimators"] == "7" and effective["max_features"] == '"sqrt"'
    assert effective["bootstrap"] == "false" and effective["max_depth"] == "null"
    assert effective["criterion"] == '"gini"'  # untouched defaults are reported too
    forest = skops_to_model(ArtifactStore(settings.artifact_root).get(result.model), "model")
    assert len(forest.estimators_) == 7 and forest.bootstrap is False and forest.max_features == "sqrt"

    # A quoted string and a bare one are the same value, so the same request.
    quoted = await client.train(train_request(built, "random_forest", {**hyperparameters, "max_features": '"sqrt"'}))
    assert quoted.stage.cache_hit and quoted.model == result.model

    logistic = await client.train(train_request(built, "logistic_regression", {"C": "0.5", "fit_intercept": "true"}))
    assert logistic.effective_hyperparameters["C"] == "0.5"
    assert logistic.effective_hyperparameters["fit_intercept"] == "true"
    assert logistic.effective_hyperparameters["max_iter"] == "1000"


@pytest.mark.asyncio
async def test_task_specific_hyperparameters_are_accepted(client: MeshClient, settings: Settings) -> None:
    """Classifier-only values must not be refused because the regressor of that name lacks them."""
    built = await features_for(client, CLASSIFICATION_SOURCE)
    forest = await client.train(
        train_request(built, "random_forest", {"criterion": "entropy", "class_weight": "balanced", "n_estimators": "5"})
    )
    assert forest.effective_hyperparameters["criterion"] == '"entropy"'
    assert forest.effective_hyperparameters["class_weight"] == '"balanced"'
    boosted = await client.train(
        train_request(built, "hist_gradient_boosting", {"class_weight": "balanced", "max_iter": "5"})
    )
    assert boosted.effective_hyperparameters["class_weight"] == '"balanced"'

    regression = await features_for(client, REGRESSION_SOURCE)
    forest = await client.train(
        train_request(regression, "random_forest", {"criterion": "absolute_error", "n_estimators": "3"})
    )
    assert forest.task_kind == TaskKind.TASK_KIND_REGRESSION
    assert forest.effective_hyperparameters["criterion"] == '"absolute_error"'
    boosted = await client.train(
        train_request(regression, "hist_gradient_boosting", {"loss": "absolute_error", "max_iter": "5"})
    )
    assert boosted.effective_hyperparameters["loss"] == '"absolute_error"'


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("model", "hyperparameters", "seed", "fragments"),
    [
        ("xgboost", {}, 0, ["model 'xgboost' is unknown", "hist_gradient_boosting, logistic_regression"]),
        ("", {"C": "1"}, 0, ["hyperparameters need a model: name one (the default model depends on the task kind)"]),
        ("random_forest", {"n_trees": "5"}, 0, ["unknown hyperparameter 'n_trees' for random_forest"]),
        ("logistic_regression", {"C": "-1"}, 0, ["'C'", "LogisticRegression"]),
        ("logistic_regression", {"penalty": "l3"}, 0, ["'penalty'"]),
        ("random_forest", {"n_estimators": "many"}, 0, ["'n_estimators'"]),
        ("sgd", {"random_state": "3"}, 0, ["'random_state' is set through the request's seed field"]),
        ("ridge", {}, -1, ["seed must be in [0, 2^32), got -1"]),
        ("ridge", {}, 2**32, ["seed must be in [0, 2^32)"]),
    ],
)
async def test_bad_train_requests(client: MeshClient, mesh, model, hyperparameters, seed, fragments) -> None:
    built = await features_for(client, CLASSIFICATION_SOURCE)
    await expect_error(client.train(train_request(built, model, hyperparameters, seed=seed)), INVALID, *fragments)
    await assert_serving(mesh["trainer"])


@pytest.mark.asyncio
async def test_an_empty_model_trains_the_task_kinds_default(client: MeshClient, settings: Settings) -> None:
    store = ArtifactStore(settings.artifact_root)
    for source, name, cls in (
        (CLASSIFICATION_SOURCE, "logistic_regression", LogisticRegression),
        (REGRESSION_SOURCE, "ridge", Ridge),
    ):
        result = await client.train(train_request(await features_for(client, source), ""))
        assert result.model_name == name
        assert type(skops_to_model(store.get(result.model), "model")) is cls


@pytest.mark.asyncio
async def test_hyperparameter_combinations_refused_at_fit(client: MeshClient, mesh) -> None:
    built = await features_for(client, CLASSIFICATION_SOURCE)
    await expect_error(
        client.train(train_request(built, "logistic_regression", {"penalty": "l1"})),
        INVALID,
        "LogisticRegression cannot be fitted with these hyperparameters",
        "l1",
    )
    await assert_serving(mesh["trainer"])
    await expect_error(
        client.train(train_request(built, "random_forest", {"bootstrap": "false", "max_samples": "0.5"})),
        INVALID,
        "RandomForestClassifier cannot be fitted",
        "bootstrap",
    )
    await assert_serving(mesh["trainer"])
    # Fixing the combination makes the same request valid.
    fixed = await client.train(train_request(built, "logistic_regression", {"penalty": "l1", "solver": "saga"}))
    assert fixed.effective_hyperparameters["solver"] == '"saga"'


@pytest.mark.asyncio
async def test_models_must_suit_the_task(client: MeshClient, mesh) -> None:
    diabetes = await features_for(client, "sklearn:diabetes")
    await expect_error(
        client.train(train_request(diabetes, "logistic_regression")),
        INVALID,
        "model 'logistic_regression' is not available for regression",
        "classification model",
    )
    await assert_serving(mesh["trainer"])
    await expect_error(
        client.train(train_request(diabetes, "random_forest", {"criterion": "entropy"})),
        INVALID,
        "'criterion'",
        "RandomForestRegressor",
    )
    await assert_serving(mesh["trainer"])
    classes = await features_for(client, CLASSIFICATION_SOURCE)
    await expect_error(
        client.train(train_request(classes, "ridge")), INVALID, "not available for classification", "regression model"
    )
    await assert_serving(mesh["trainer"])


@pytest.mark.asyncio
async def test_a_stated_task_kind_is_checked_before_the_data_and_against_it(client: MeshClient, mesh) -> None:
    diabetes = await features_for(client, "sklearn:diabetes")  # a regression target
    # A number no release defines.
    unknown = train_request(diabetes, "ridge")
    unknown.task_kind = 99  # type: ignore[assignment]
    await expect_error(client.train(unknown), INVALID, "task_kind=99 is not a known TaskKind")
    # With the kind stated, a model or hyperparameter of the other kind is refused before any
    # data is read: these refs name nothing in the store, yet the answer is about the model.
    nowhere = ArtifactRef(uri="file:///nowhere/x.npy", sha256="0" * 64)
    for model, hyperparameters, fragment in (
        ("ridge", {}, "model 'ridge' is not available for classification"),
        ("random_forest", {"criterion": "squared_error"}, "'criterion'"),
    ):
        early = trainer_pb2.TrainRequest(
            x_train=nowhere,
            y_train=nowhere,
            model=model,
            hyperparameters=hyperparameters,
            task_kind=TaskKind.TASK_KIND_CLASSIFICATION,
        )
        await expect_error(client.train(early), INVALID, fragment)
    # A stated kind y_train disagrees with is refused, even where the same fit is in the memo.
    quick = {"n_estimators": "10"}
    unstated = await client.train(train_request(diabetes, "random_forest", quick))
    assert unstated.task_kind == TaskKind.TASK_KIND_REGRESSION
    wrong = train_request(diabetes, "random_forest", quick)
    wrong.task_kind = TaskKind.TASK_KIND_CLASSIFICATION
    await expect_error(client.train(wrong), FAILED, "task_kind is classification but y_train holds regression targets")
    right = train_request(diabetes, "random_forest", quick)
    right.task_kind = TaskKind.TASK_KIND_REGRESSION
    stated = await client.train(right)
    assert stated.task_kind == TaskKind.TASK_KIND_REGRESSION and stated.model == unstated.model
    await assert_serving(mesh["trainer"])


@pytest.mark.asyncio
async def test_bad_training_data(client: MeshClient, mesh) -> None:
    built = await features_for(client, CLASSIFICATION_SOURCE)
    await expect_error(
        client.train(trainer_pb2.TrainRequest(y_train=built.y_train, model="sgd")), INVALID, "x_train is required"
    )
    await assert_serving(mesh["trainer"])
    await expect_error(
        client.train(trainer_pb2.TrainRequest(x_train=built.x_train, model="sgd")), INVALID, "y_train is required"
    )
    await assert_serving(mesh["trainer"])

    other = await features_for(client, CLASSIFICATION_SOURCE, test_fraction=0.5)
    mixed = trainer_pb2.TrainRequest(x_train=built.x_train, y_train=other.y_train, model="sgd")
    await expect_error(client.train(mixed), FAILED, "x_train has 240 rows but y_train has 150")
    await assert_serving(mesh["trainer"])

    swapped = trainer_pb2.TrainRequest(x_train=built.y_train, y_train=built.y_train, model="sgd")
    await expect_error(client.train(swapped), FAILED, "2-D matrix")
    await assert_serving(mesh["trainer"])


@pytest.mark.asyncio
async def test_the_feature_schema_names_the_models_inputs(client: MeshClient, mesh, settings: Settings) -> None:
    built = await features_for(client, CLASSIFICATION_SOURCE)
    store = ArtifactStore(settings.artifact_root)
    named = await client.train(
        trainer_pb2.TrainRequest(
            x_train=built.x_train,
            y_train=built.y_train,
            feature_schema=built.feature_schema,
            model="random_forest",
            hyperparameters={"n_estimators": "5"},
        )
    )
    model = skops_to_model(store.get(named.model), "model")
    assert list(model.feature_names_in_) == list(built.feature_names) == [f"x{i}" for i in range(6)]
    unnamed = await client.train(train_request(built, "random_forest", {"n_estimators": "5"}))
    assert not hasattr(skops_to_model(store.get(unnamed.model), "model"), "feature_names_in_")
    assert unnamed.model.sha256 != named.model.sha256

    prepared = await prepare(client, CLASSIFICATION_SOURCE)
    wrong_shape = trainer_pb2.TrainRequest(
        x_train=built.x_train, y_train=built.y_train, feature_schema=prepared.split_report, model="sgd"
    )
    await expect_error(
        client.train(wrong_shape),
        FAILED,
        "feature_schema is not a features stage schema; pass the feature_schema ref it returned",
    )
    wider = await client.build_features(
        features_pb2.BuildFeaturesRequest(train=prepared.train, test=prepared.test, polynomial_degree=2)
    )
    mismatched = trainer_pb2.TrainRequest(
        x_train=built.x_train, y_train=built.y_train, feature_schema=wider.feature_schema, model="sgd"
    )
    await expect_error(
        client.train(mismatched),
        FAILED,
        "feature_schema names 27 features but x_train has 6 columns; pass both from one features run",
    )
    await assert_serving(mesh["trainer"])


# ---- the model is exactly scikit-learn's --------------------------------------------------
@pytest.mark.asyncio
# gradient boosting's early stopping switches on above 10,000 rows; those fits, and gradient boosting's
# hundred rounds at any size, take seconds each: slow
@pytest.mark.parametrize("rows", [2_000, pytest.param(12_000, marks=pytest.mark.slow)])
@pytest.mark.parametrize(
    ("task", "model"),
    [
        pytest.param(task, model, marks=[pytest.mark.slow] if model == "hist_gradient_boosting" else [])
        for task, catalogue in logic.MODELS.items()
        for model in sorted(catalogue)
    ],
)
async def test_the_stored_model_predicts_exactly_as_a_one_shot_fit(
    client: MeshClient, task: str, model: str, rows: int
) -> None:
    """However the trainer fits (in steps, with checkpoints, with progress), the model is scikit-learn's own."""
    source = f"synthetic:{task}?rows={rows}&features=8&seed=3"
    built = await features_for(client, source)
    quick = {"n_estimators": "12"} if model == "random_forest" else {}
    request = train_request(built, model, quick)
    request.feature_schema.CopyFrom(built.feature_schema)  # as the pipeline sends it: the model keeps feature names
    result = await client.train(request)
    store = ArtifactStore(client.settings.artifact_root)
    stored = skops_to_model(store.get(result.model), "model")

    cls, _ = logic.MODELS[task][model]
    params = {name: logic.parse_value(value) for name, value in result.effective_hyperparameters.items()}
    x_train = npy_to_array(store.get(built.x_train), "x_train")
    x_test = npy_to_array(store.get(built.x_test), "x_test")
    names = list(built.feature_names)
    # The frame as the trainer builds it (the same memory: BLAS sums in layout order, to the last bit).
    one_shot = cls(**params).fit(
        logic.FeatureColumns(names).frame(x_train), npy_to_array(store.get(built.y_train), "y_train")
    )
    test_frame = pd.DataFrame(x_test, columns=names)
    np.testing.assert_array_equal(stored.predict(test_frame), one_shot.predict(test_frame))
    if hasattr(one_shot, "predict_proba"):
        np.testing.assert_array_equal(stored.predict_proba(test_frame), one_shot.predict_proba(test_frame))
