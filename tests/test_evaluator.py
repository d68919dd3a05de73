"""Evaluator stage: metrics checked against scikit-learn, the promotion decision; then the real service."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics
from sklearn.datasets import load_breast_cancer, load_iris
from sklearn.linear_model import LogisticRegression, Ridge, SGDClassifier
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mlmesh.common.v1.common_pb2 import TaskKind
from mlmesh.evaluator.v1 import evaluator_pb2
from mlmesh.features.v1 import features_pb2
from services.client.mesh import MeshClient, PipelineConfig, PipelineRun
from services.client.mesh import evaluate_request as client_evaluate_request
from services.evaluator import logic
from services.runtime.errors import FailedPrecondition, InvalidArgument
from services.runtime.formats import (
    JSON,
    NPY,
    array_to_npy,
    json_bytes_to_doc,
    npy_to_array,
    skops_to_model,
    to_json_bytes,
)
from services.runtime.settings import Settings
from services.runtime.store import ArtifactStore
from tests.helpers import FAILED, INVALID, assert_serving, evaluate_request, expect_error

PROMOTE, RETRAIN = evaluator_pb2.DECISION_PROMOTE, evaluator_pb2.DECISION_RETRAIN
BINARY_SOURCE = "synthetic:classification?rows=400&features=8&classes=2&seed=3"


def binary_split():
    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x_train, y_train), x_test, y_test


def iris_split():
    x, y = load_iris(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    return LogisticRegression(max_iter=1000).fit(x_train, y_train), x_test, y_test


def classification_metrics(model, x, y) -> dict[str, float]:
    predicted = model.predict(x)
    proba = model.predict_proba(x)
    found = {
        "accuracy": metrics.accuracy_score(y, predicted),
        "precision_macro": metrics.precision_score(y, predicted, average="macro", zero_division=0),
        "recall_macro": metrics.recall_score(y, predicted, average="macro", zero_division=0),
        "f1_macro": metrics.f1_score(y, predicted, average="macro", zero_division=0),
        "log_loss": metrics.log_loss(y, proba, labels=model.classes_),
    }
    if len(model.classes_) == 2:
        found["roc_auc"] = metrics.roc_auc_score(y, proba[:, 1])
    else:
        found["roc_auc"] = metrics.roc_auc_score(y, proba, multi_class="ovr", average="macro")
    return found


# ---- metrics ------------------------------------------------------------------------------
def test_binary_metrics_match_sklearn() -> None:
    model, x, y = binary_split()
    evaluation = logic.evaluate(model, x, y)
    assert evaluation.task == "classification"
    assert set(evaluation.metrics) == set(logic.CLASSIFICATION_METRICS)
    for name, value in classification_metrics(model, x, y).items():
        assert evaluation.metrics[name] == pytest.approx(value), name
    assert 0.9 < evaluation.metrics["roc_auc"] <= 1.0
    assert evaluation.confusion_matrix == metrics.confusion_matrix(y, model.predict(x)).tolist()
    assert sum(map(sum, evaluation.confusion_matrix)) == len(y)
    [curve] = evaluation.roc_curves
    fpr, tpr, _ = metrics.roc_curve(y, model.predict_proba(x)[:, 1])
    assert curve["class"] == 1 and curve["fpr"] == fpr.tolist() and curve["tpr"] == tpr.tolist()
    assert evaluation.notes == []


def test_multiclass_roc_auc_is_one_vs_rest_macro() -> None:
    model, x, y = iris_split()
    evaluation = logic.evaluate(model, x, y)
    proba = model.predict_proba(x)
    assert evaluation.metrics["roc_auc"] == pytest.approx(
        metrics.roc_auc_score(y, proba, multi_class="ovr", average="macro")
    )
    per_class = [metrics.roc_auc_score(y == k, proba[:, k]) for k in range(3)]
    assert evaluation.metrics["roc_auc"] == pytest.approx(np.mean(per_class))
    for name, value in classification_metrics(model, x, y).items():
        assert evaluation.metrics[name] == pytest.approx(value), name
    assert [c["class"] for c in evaluation.roc_curves] == [0, 1, 2]
    assert np.array(evaluation.confusion_matrix).shape == (3, 3)


def test_absent_and_single_classes_are_noted() -> None:
    model, x, y = iris_split()
    two = y != 2
    evaluation = logic.evaluate(model, x[two], y[two])
    assert "roc_auc" not in evaluation.metrics and "log_loss" in evaluation.metrics
    assert any("absent from the test split" in note for note in evaluation.notes)
    assert [c["class"] for c in evaluation.roc_curves] == [0, 1]  # class 2 has no positives
    assert np.array(evaluation.confusion_matrix).shape == (3, 3)

    one = y == 1
    evaluation = logic.evaluate(model, x[one], y[one])
    assert "roc_auc" not in evaluation.metrics
    assert any("single class" in note for note in evaluation.notes)


def test_models_without_probabilities_get_no_roc_auc() -> None:
    _, x, y = binary_split()
    model = SGDClassifier(loss="hinge", random_state=0).fit(x, y)
    evaluation = logic.evaluate(model, x, y)
    assert "roc_auc" not in evaluation.metrics and "log_loss" not in evaluation.metrics
    assert evaluation.metrics["accuracy"] == pytest.approx(metrics.accuracy_score(y, model.predict(x)))
    assert any("no class probabilities" in note for note in evaluation.notes)


def test_regression_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = x @ np.array([2.0, -1.0, 0.5]) + rng.normal(0, 0.3, 200)
    model = Ridge().fit(x[:150], y[:150])
    evaluation = logic.evaluate(model, x[150:], y[150:])
    predicted = model.predict(x[150:])
    assert evaluation.task == "regression"
    assert evaluation.metrics == pytest.approx(
        {
            "r2": metrics.r2_score(y[150:], predicted),
            "mae": metrics.mean_absolute_error(y[150:], predicted),
            "rmse": math.sqrt(metrics.mean_squared_error(y[150:], predicted)),
        }
    )
    assert evaluation.confusion_matrix == [] and evaluation.predictions["true"] == y[150:].tolist()


def test_evaluate_checks_shapes() -> None:
    model, x, y = iris_split()
    with pytest.raises(FailedPrecondition, match=r"expects 4 features but x_test has shape \(45, 3\)"):
        logic.evaluate(model, x[:, :3], y)
    with pytest.raises(FailedPrecondition, match=r"expects 4 features but x_test has shape \(45,\)"):
        logic.evaluate(model, y.astype(float), y)
    with pytest.raises(FailedPrecondition, match="x_test has 45 rows but y_test has 40"):
        logic.evaluate(model, x, y[:40])
    with pytest.raises(FailedPrecondition, match=r"y_test must be a vector of targets, got shape \(45, 4\)"):
        logic.evaluate(model, x, x)
    with pytest.raises(FailedPrecondition, match="classifier but y_test holds float64 values"):
        logic.evaluate(model, x, y + 0.5)
    with pytest.raises(FailedPrecondition, match=r"y_test holds classes \[3, 4\] the model was not trained on"):
        logic.evaluate(model, x, np.where(y == 2, 3, y) + (y == 0) * 4)
    with pytest.raises(FailedPrecondition, match="empty"):
        logic.evaluate(model, x[:0], y[:0])


# ---- the decision -------------------------------------------------------------------------
def classified(**values: float) -> logic.Evaluation:
    return logic.Evaluation(task="classification", metrics=values)


def test_decide_promotes_when_every_threshold_is_met() -> None:
    passed, reasons = logic.decide(classified(accuracy=0.9, log_loss=0.3), {"accuracy": 0.9}, {"log_loss": 0.5})
    assert passed
    assert reasons == ["accuracy 0.9000 meets minimum 0.9", "log_loss 0.3000 meets maximum 0.5"]


def test_decide_retrains_and_says_why() -> None:
    passed, reasons = logic.decide(
        classified(accuracy=0.8, f1_macro=0.7, log_loss=0.9),
        {"accuracy": 0.75, "f1_macro": 0.8},
        {"log_loss": 0.5},
    )
    assert not passed
    assert reasons == [
        "accuracy 0.8000 meets minimum 0.75",
        "f1_macro 0.7000 is below minimum 0.8",
        "log_loss 0.9000 is above maximum 0.5",
    ]
    passed, reasons = logic.decide(classified(accuracy=1.0), {"roc_auc": 0.5}, {"log_loss": 1.0})
    assert not passed
    assert reasons == [
        "roc_auc could not be computed, so minimum 0.5 is not met",
        "log_loss could not be computed, so maximum 1 is not met",
    ]


def test_decide_on_regression_maximums() -> None:
    evaluation = logic.Evaluation(task="regression", metrics={"r2": 0.5, "mae": 40.0, "rmse": 50.0})
    assert logic.decide(evaluation, {}, {"rmse": 60, "mae": 40}) == (
        True,
        ["mae 40.0000 meets maximum 40", "rmse 50.0000 meets maximum 60"],
    )
    assert logic.decide(evaluation, {"r2": 0.4}, {"rmse": 49.5}) == (
        False,
        ["r2 0.5000 meets minimum 0.4", "rmse 50.0000 is above maximum 49.5"],
    )
    # With no thresholds at all, a regression is judged by the regression default, r2 >= 0.3.
    assert logic.decide(evaluation, {}, {}) == (
        True,
        [
            "r2 0.5000 meets minimum 0.3",
            "no thresholds were given, so the regression default applies; set minimums/maximums to choose",
        ],
    )


def test_default_thresholds_follow_the_task_kind() -> None:
    assert logic.effective_thresholds("classification", {}, {}) == ({"accuracy": 0.9}, {}, True)
    assert logic.effective_thresholds("regression", {}, {}) == ({"r2": 0.3}, {}, True)
    # Any threshold given replaces the defaults entirely.
    assert logic.effective_thresholds("regression", {}, {"rmse": 5.0}) == ({}, {"rmse": 5.0}, False)

    weak_regression = logic.Evaluation(task="regression", metrics={"r2": 0.1, "mae": 1.0, "rmse": 2.0})
    passed, reasons = logic.decide(weak_regression, {}, {})
    assert not passed
    assert reasons == [
        "r2 0.1000 is below minimum 0.3",
        "no thresholds were given, so the regression default applies; set minimums/maximums to choose",
    ]
    assert not any("accuracy" in reason for reason in reasons)  # a regression is never judged on accuracy

    passed, reasons = logic.decide(classified(accuracy=0.85, f1_macro=0.99), {}, {})
    assert not passed
    assert reasons == [
        "accuracy 0.8500 is below minimum 0.9",
        "no thresholds were given, so the classification default applies; set minimums/maximums to choose",
    ]


def test_thresholds_must_suit_the_task() -> None:
    with pytest.raises(InvalidArgument, match="threshold on 'r2' does not apply to a classification model"):
        logic.decide(classified(accuracy=1.0), {"r2": 0.1}, {})
    regression = logic.Evaluation(task="regression", metrics={"r2": 1.0})
    with pytest.raises(InvalidArgument, match="threshold on 'log_loss' does not apply to a regression model"):
        logic.decide(regression, {}, {"log_loss": 0.1})


def test_threshold_names_and_values_are_checked() -> None:
    logic.check_threshold_names({"accuracy": 0.9, "r2": 0.1}, {"rmse": 3.0})
    with pytest.raises(InvalidArgument, match="minimums names unknown metric 'acc'"):
        logic.check_threshold_names({"acc": 0.9}, {})
    with pytest.raises(InvalidArgument, match="maximums names unknown metric 'mse'"):
        logic.check_threshold_names({}, {"mse": 1.0})
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(InvalidArgument, match="must be a finite number"):
            logic.check_threshold_names({"accuracy": bad}, {})


# ---- the real service ---------------------------------------------------------------------
def stored(settings: Settings, run: PipelineRun):
    store = ArtifactStore(settings.artifact_root)
    model = skops_to_model(store.get(run.train.model), "model")
    x = npy_to_array(store.get(run.features.x_test), "x_test")
    y = npy_to_array(store.get(run.features.y_test), "y_test")
    report = json_bytes_to_doc(store.get(run.evaluate.metrics_report), "metrics_report")
    # The trainer fits on named columns (the feature schema's names); predict with the same names.
    assert list(model.feature_names_in_) == list(run.features.feature_names)
    return model, pd.DataFrame(x, columns=model.feature_names_in_), y, report


@pytest.mark.asyncio
async def test_binary_metrics_over_the_service_match_sklearn(client: MeshClient, settings: Settings) -> None:
    run = await client.run_pipeline(PipelineConfig(source=BINARY_SOURCE, minimums={"accuracy": 0.5}))
    reply = run.evaluate
    assert reply.task_kind == TaskKind.TASK_KIND_CLASSIFICATION
    model, x, y, report = stored(settings, run)
    assert len(y) == 80 and x.shape == (80, 8)
    expected = classification_metrics(model, x, y)
    assert set(reply.metrics) == set(expected)
    for name, value in expected.items():
        assert reply.metrics[name] == pytest.approx(value), name
    matrix = metrics.confusion_matrix(y, model.predict(x)).tolist()
    assert [list(row.counts) for row in reply.confusion_matrix] == matrix

    assert reply.decision == PROMOTE
    assert list(reply.reasons) == [f"accuracy {expected['accuracy']:.4f} meets minimum 0.5"]
    assert report["decision"] == "PROMOTE" and report["task_kind"] == "classification"
    assert report["test_rows"] == 80 and report["class_names"] == ["0", "1"]
    assert report["confusion_matrix"] == matrix and len(report["roc_curves"]) == 1
    assert report["metrics"] == pytest.approx(dict(reply.metrics))
    assert report["thresholds"] == {"minimums": {"accuracy": 0.5}, "maximums": {}}


@pytest.mark.asyncio
async def test_iris_roc_auc_is_one_vs_rest(client: MeshClient, settings: Settings) -> None:
    run = await client.run_pipeline(PipelineConfig(source="sklearn:iris"))
    model, x, y, report = stored(settings, run)
    proba = model.predict_proba(x)
    assert run.evaluate.metrics["roc_auc"] == pytest.approx(
        metrics.roc_auc_score(y, proba, multi_class="ovr", average="macro")
    )
    assert run.evaluate.metrics["accuracy"] == pytest.approx(metrics.accuracy_score(y, model.predict(x)))
    assert len(run.evaluate.confusion_matrix) == 3
    assert sum(sum(row.counts) for row in run.evaluate.confusion_matrix) == 30
    assert report["class_names"] == ["setosa", "versicolor", "virginica"]
    assert [curve["class"] for curve in report["roc_curves"]] == [0, 1, 2]
    accuracy = run.evaluate.metrics["accuracy"]
    assert accuracy >= 0.9 and run.evaluate.decision == PROMOTE
    assert list(run.evaluate.reasons) == [
        f"accuracy {accuracy:.4f} meets minimum 0.9",
        "no thresholds were given, so the classification default applies; set minimums/maximums to choose",
    ]
    assert report["thresholds"] == {"minimums": {"accuracy": 0.9}, "maximums": {}}


@pytest.mark.asyncio
async def test_diabetes_ridge_regression_metrics(client: MeshClient, settings: Settings) -> None:
    run = await client.run_pipeline(
        PipelineConfig(source="sklearn:diabetes", model="ridge", minimums={"r2": 0.2}, maximums={"rmse": 80})
    )
    reply = run.evaluate
    assert reply.task_kind == TaskKind.TASK_KIND_REGRESSION and list(reply.confusion_matrix) == []
    model, x, y, report = stored(settings, run)
    predicted = model.predict(x)
    assert dict(reply.metrics) == pytest.approx(
        {
            "r2": metrics.r2_score(y, predicted),
            "mae": metrics.mean_absolute_error(y, predicted),
            "rmse": math.sqrt(metrics.mean_squared_error(y, predicted)),
        }
    )
    assert 0.2 < reply.metrics["r2"] < 1 and reply.metrics["mae"] < reply.metrics["rmse"] < 80
    assert reply.decision == PROMOTE
    assert report["thresholds"] == {"minimums": {"r2": 0.2}, "maximums": {"rmse": 80}}
    assert report["predictions"]["predicted"] == pytest.approx(predicted.tolist())
    assert report["test_rows"] == len(y) == 89


@pytest.mark.asyncio
async def test_decisions_follow_thresholds(client: MeshClient) -> None:
    run = await client.run_pipeline(PipelineConfig(source="sklearn:diabetes", model="ridge"))
    rmse, mae, r2 = run.evaluate.metrics["rmse"], run.evaluate.metrics["mae"], run.evaluate.metrics["r2"]
    # No thresholds: the regression default (r2 >= 0.3) decides, never accuracy.
    assert r2 >= 0.3 and run.evaluate.decision == PROMOTE
    assert list(run.evaluate.reasons) == [
        f"r2 {r2:.4f} meets minimum 0.3",
        "no thresholds were given, so the regression default applies; set minimums/maximums to choose",
    ]

    lenient = await client.evaluate(evaluate_request(run, maximums={"rmse": rmse + 1, "mae": mae}))
    assert lenient.decision == PROMOTE
    assert list(lenient.reasons) == [
        f"mae {mae:.4f} meets maximum {mae:g}",
        f"rmse {rmse:.4f} meets maximum {rmse + 1:g}",
    ]

    strict = await client.evaluate(evaluate_request(run, minimums={"r2": 0.1}, maximums={"rmse": 10}))
    assert strict.decision == RETRAIN
    assert f"rmse {rmse:.4f} is above maximum 10" in strict.reasons
    assert any(r.startswith("r2 ") and "meets minimum 0.1" in r for r in strict.reasons)

    too_high = await client.evaluate(evaluate_request(run, minimums={"r2": 0.99}))
    assert too_high.decision == RETRAIN and "is below minimum 0.99" in too_high.reasons[0]


@pytest.mark.asyncio
async def test_classifier_maximums_and_missing_metrics(client: MeshClient) -> None:
    run = await client.run_pipeline(PipelineConfig(source=BINARY_SOURCE))
    log_loss = run.evaluate.metrics["log_loss"]
    below = await client.evaluate(evaluate_request(run, maximums={"log_loss": log_loss * 2}))
    assert below.decision == PROMOTE
    above = await client.evaluate(evaluate_request(run, maximums={"log_loss": log_loss / 2}))
    assert above.decision == RETRAIN and "is above maximum" in above.reasons[0]

    hinge = await client.run_pipeline(
        PipelineConfig(source=BINARY_SOURCE, model="sgd", hyperparameters={"loss": "hinge"}, minimums={"roc_auc": 0.5})
    )
    assert hinge.evaluate.decision == RETRAIN
    assert "roc_auc" not in hinge.evaluate.metrics and "accuracy" in hinge.evaluate.metrics
    assert hinge.evaluate.reasons[0] == "roc_auc could not be computed, so minimum 0.5 is not met"
    assert any("no class probabilities" in reason for reason in hinge.evaluate.reasons)


@pytest.mark.asyncio
async def test_report_is_deterministic(client: MeshClient) -> None:
    config = PipelineConfig(source=BINARY_SOURCE, minimums={"f1_macro": 0.6})
    run = await client.run_pipeline(config)
    config.force_recompute = True
    # The same request the pipeline sent, with the profile, split report and feature schema refs.
    same = client_evaluate_request(config, run.train.model, run.features, run.preprocess, run.load.profile)
    again = await client.evaluate(same)
    assert not again.stage.cache_hit
    assert again.metrics_report.sha256 == run.evaluate.metrics_report.sha256
    assert again.html_report.sha256 == run.evaluate.html_report.sha256
    assert dict(again.metrics) == dict(run.evaluate.metrics)
    # Without those refs the report has fewer sections, so it is another report.
    bare = await client.evaluate(evaluate_request(run, minimums={"f1_macro": 0.6}))
    assert bare.metrics_report.sha256 != run.evaluate.metrics_report.sha256
    assert dict(bare.metrics) == dict(run.evaluate.metrics)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("thresholds", "fragments"),
    [
        ({"minimums": {"acc": 0.9}}, ["minimums names unknown metric 'acc'", "accuracy"]),
        ({"maximums": {"mse": 3.0}}, ["maximums names unknown metric 'mse'"]),
        ({"minimums": {"accuracy": math.nan}}, ["minimums['accuracy'] must be a finite number"]),
        ({"minimums": {"r2": 0.5}}, ["threshold on 'r2' does not apply to a classification model"]),
        ({"maximums": {"rmse": 1.0}}, ["threshold on 'rmse' does not apply to a classification model"]),
    ],
)
async def test_bad_thresholds(client: MeshClient, mesh, thresholds: dict, fragments: list[str]) -> None:
    run = await client.run_pipeline(PipelineConfig(source=BINARY_SOURCE))
    await expect_error(client.evaluate(evaluate_request(run, **thresholds)), INVALID, *fragments)
    await assert_serving(mesh["evaluator"])


@pytest.mark.asyncio
async def test_classification_threshold_on_a_regressor(client: MeshClient, mesh) -> None:
    run = await client.run_pipeline(PipelineConfig(source="sklearn:diabetes", model="ridge"))
    await expect_error(
        client.evaluate(evaluate_request(run, minimums={"accuracy": 0.5})),
        INVALID,
        "threshold on 'accuracy' does not apply to a regression model",
    )
    await assert_serving(mesh["evaluator"])


@pytest.mark.asyncio
async def test_test_data_must_come_from_the_same_features_run(client: MeshClient, mesh) -> None:
    run = await client.run_pipeline(PipelineConfig(source=BINARY_SOURCE))
    wider = await client.build_features(
        features_pb2.BuildFeaturesRequest(train=run.preprocess.train, test=run.preprocess.test, polynomial_degree=2)
    )
    await expect_error(
        client.evaluate(evaluate_request(run, x_test=wider.x_test)),
        FAILED,
        "the model expects 8 features but x_test has shape (80, 44)",
        "same features run",
    )
    await assert_serving(mesh["evaluator"])

    other = await client.run_pipeline(PipelineConfig(source=BINARY_SOURCE, test_fraction=0.5))
    await expect_error(
        client.evaluate(evaluate_request(run, y_test=other.features.y_test)), FAILED, "80 rows but y_test has 200"
    )
    await assert_serving(mesh["evaluator"])

    # Swapped refs are the caller's mistake, not an internal error.
    await expect_error(
        client.evaluate(evaluate_request(run, x_test=run.features.y_test)), FAILED, "x_test has shape (80,)"
    )
    await assert_serving(mesh["evaluator"])
    await expect_error(
        client.evaluate(evaluate_request(run, y_test=run.features.x_test)), FAILED, "y_test must be a vector"
    )
    await assert_serving(mesh["evaluator"])

    three = await client.run_pipeline(PipelineConfig(source=BINARY_SOURCE.replace("classes=2", "classes=3")))
    await expect_error(
        client.evaluate(evaluate_request(run, y_test=three.features.y_test)),
        FAILED,
        "y_test holds classes [2] the model was not trained on",
    )
    await assert_serving(mesh["evaluator"])

    regression = await client.run_pipeline(
        PipelineConfig(source="synthetic:regression?rows=400&features=8&seed=3", model="ridge")
    )
    await expect_error(
        client.evaluate(evaluate_request(run, y_test=regression.features.y_test)),
        FAILED,
        "classifier but y_test holds float64 values",
    )
    await assert_serving(mesh["evaluator"])


@pytest.mark.asyncio
async def test_missing_or_wrong_refs(client: MeshClient, mesh) -> None:
    run = await client.run_pipeline(PipelineConfig(source=BINARY_SOURCE))
    for name in ("model", "x_test", "y_test"):
        request = evaluate_request(run)
        request.ClearField(name)
        await expect_error(client.evaluate(request), INVALID, f"{name} is required")
        await assert_serving(mesh["evaluator"])
    await expect_error(
        client.evaluate(evaluate_request(run, model=run.features.x_test)), FAILED, "model", "not a readable .skops"
    )
    await assert_serving(mesh["evaluator"])
    # A JSON artifact is not a model either.
    await expect_error(client.evaluate(evaluate_request(run, model=run.evaluate.metrics_report)), FAILED, "model")
    await assert_serving(mesh["evaluator"])


# ---- the HTML report ----------------------------------------------------------------------
def html_of(settings: Settings, reply: evaluator_pb2.EvaluateResponse) -> str:
    return ArtifactStore(settings.artifact_root).get(reply.html_report).decode()


@pytest.mark.asyncio
async def test_html_report_names_the_classes_and_shows_profile_rows_and_encodings(
    client: MeshClient, settings: Settings
) -> None:
    run = await client.run_pipeline(PipelineConfig(source="sklearn:iris"))
    html = html_of(settings, run.evaluate)
    assert "<h1>Evaluation: PROMOTE</h1>" in html
    assert "classes: setosa, versicolor, virginica." in html
    assert "<tr><th></th><th>setosa</th><th>versicolor</th><th>virginica</th></tr>" in html  # confusion matrix
    assert "<title>setosa</title>" in html  # the ROC curve of each class
    assert "no thresholds were given, so the classification default applies" in html
    assert "<h2>Data profile</h2><p>150 rows in the source.</p>" in html
    assert "<tr><th>sepal length (cm)</th><td>numeric</td><td>150</td><td>0</td>" in html
    assert (
        "<h2>Rows</h2><p>150 rows in; dropped by reason: duplicate: 0, incomplete: 0, invalid target: 0, "
        "missing target: 0; 120 train, 30 test (test fraction 0.2, seed 42). Exact repeats found: 1.</p>"
    ) in html
    assert "<h2>Features</h2><p>4 source columns became 4 model inputs, fitted on the train split.</p>" in html
    assert "<h2>Most important inputs</h2><p>mean |coefficient| (on scaled inputs)</p>" in html
    _, _, _, report = stored(settings, run)
    assert report["profile"]["rows"] == 150 and report["split_report"]["test_rows"] == 30
    assert report["feature_schema"]["feature_names"] == list(run.features.feature_names)
    assert {name for name, _ in report["importances"]["values"]} == set(run.features.feature_names)

    # Without the context refs the report keeps the class names and leaves those sections out.
    bare = await client.evaluate(evaluate_request(run))
    bare_html = html_of(settings, bare)
    assert "<th>setosa</th>" in bare_html
    assert not any(title in bare_html for title in ("Data profile", "<h2>Rows</h2>", "<h2>Features</h2>"))


@pytest.mark.asyncio
async def test_a_profile_ref_of_the_wrong_shape_never_breaks_the_report(
    client: MeshClient, mesh, settings: Settings
) -> None:
    run = await client.run_pipeline(PipelineConfig(source=BINARY_SOURCE, minimums={"accuracy": 0.5}))
    store = ArtifactStore(settings.artifact_root)
    # Other JSON artifacts of the pipeline, and JSON that is not an object: no profile section.
    for wrong in (
        run.preprocess.split_report,
        run.evaluate.metrics_report,
        store.put(to_json_bytes([1, 2, 3]), JSON),
        store.put(to_json_bytes("profile"), JSON),
    ):
        reply = await client.evaluate(evaluate_request(run, profile=wrong, minimums={"accuracy": 0.5}))
        assert reply.decision == PROMOTE and dict(reply.metrics) == dict(run.evaluate.metrics)
        assert "Data profile" not in html_of(settings, reply)
    # A profile-like object with malformed entries renders what it can, escaped.
    malformed = store.put(
        to_json_bytes(
            {
                "rows": "many",
                "columns": [
                    {"name": "top-not-pairs", "top": [1, ["a", 2, 3], ["ok", 4]]},
                    {"name": "<b>bold</b>", "histogram": {"counts": 7}, "min": "low"},
                    {"name": "negative", "histogram": {"counts": [1, -2, "x"]}, "missing": "<i>"},
                    "not a column",
                ],
            }
        ),
        JSON,
    )
    reply = await client.evaluate(evaluate_request(run, profile=malformed, minimums={"accuracy": 0.5}))
    assert reply.decision == PROMOTE
    html = html_of(settings, reply)
    assert "<h2>Data profile</h2><p>many rows in the source.</p>" in html
    assert "top: ok (4)" in html and "&lt;b&gt;bold&lt;/b&gt;" in html and "&lt;i&gt;" in html
    assert "<b>bold</b>" not in html and "<i>" not in html
    # Bytes that are not JSON at all are a broken artifact, not an internal error.
    await expect_error(
        client.evaluate(evaluate_request(run, profile=run.load.dataset)),
        FAILED,
        "profile is not a readable JSON document",
    )
    await assert_serving(mesh["evaluator"])


# ---- infinite values never make an internal error -------------------------------------------
@pytest.mark.asyncio
async def test_infinite_test_data_is_a_failed_precondition(client: MeshClient, mesh, settings: Settings) -> None:
    store = ArtifactStore(settings.artifact_root)
    run = await client.run_pipeline(PipelineConfig(source="sklearn:diabetes", model="ridge"))
    x = npy_to_array(store.get(run.features.x_test), "x_test").copy()  # decoded arrays are read-only views
    y = npy_to_array(store.get(run.features.y_test), "y_test")
    x[3, 1] = np.inf
    y_inf = y.copy()
    y_inf[0] = -np.inf
    await expect_error(
        client.evaluate(evaluate_request(run, x_test=store.put(array_to_npy(x), NPY))),
        FAILED,
        "x_test holds infinite values; evaluate with the x_test the features stage returned",
    )
    await expect_error(
        client.evaluate(evaluate_request(run, y_test=store.put(array_to_npy(y_inf), NPY))),
        FAILED,
        "y_test holds missing or infinite targets; evaluate with the y_test the features stage returned",
    )
    # Finite but huge inputs make a linear model predict infinity.
    huge = np.full_like(x, 1e308)
    await expect_error(
        client.evaluate(evaluate_request(run, x_test=store.put(array_to_npy(huge), NPY))),
        FAILED,
        f"the model predicts non-finite values for {len(y)} of {len(y)} test rows",
    )
    await assert_serving(mesh["evaluator"])
