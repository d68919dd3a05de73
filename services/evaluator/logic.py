"""Metrics and the promotion decision."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn import metrics
from sklearn.base import is_classifier

from services.runtime.errors import FailedPrecondition, InvalidArgument, bounded

CLASSIFICATION_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "roc_auc", "log_loss")
REGRESSION_METRICS = ("r2", "mae", "rmse")
ALL_METRICS = CLASSIFICATION_METRICS + REGRESSION_METRICS
# Applied when a request gives no thresholds at all, by the model's task kind, so the
# CLI, the workflow, the sweep and grpcurl callers all get the same gate.
DEFAULT_THRESHOLDS: dict[str, tuple[dict[str, float], dict[str, float]]] = {
    "classification": ({"accuracy": 0.9}, {}),
    "regression": ({"r2": 0.3}, {}),
}
# Points drawn in the predicted-vs-true plot; more add bytes, not insight.
MAX_PLOTTED_POINTS = 2000
TOP_IMPORTANCES = 20


@dataclass
class Evaluation:
    task: str
    metrics: dict[str, float]
    confusion_matrix: list[list[int]] = field(default_factory=list)
    roc_curves: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    predictions: dict[str, list[float]] = field(default_factory=dict)
    importances: list[tuple[str, float]] = field(default_factory=list)
    importance_kind: str = ""


def check_threshold_names(minimums: dict[str, float], maximums: dict[str, float]) -> None:
    for kind, thresholds in (("minimums", minimums), ("maximums", maximums)):
        for name, value in thresholds.items():
            if name not in ALL_METRICS:
                raise InvalidArgument(
                    f"{kind} names unknown metric {bounded(repr(name), 80)}; known metrics: {', '.join(ALL_METRICS)}"
                )
            if not math.isfinite(value):
                raise InvalidArgument(f"{kind}[{name!r}] must be a finite number, got {value}")


def check_is_model(model: Any) -> None:
    """An allow-listed object that loads fine may still be no model: a fitted scaler, a dict."""
    if not callable(getattr(model, "predict", None)):
        kind = type(model).__name__
        raise FailedPrecondition(
            f"model is a {kind}, not a model: it has no predict method; "
            "pass the model ref the trainer returned"
        )


def _scores(model: Any, x: np.ndarray) -> np.ndarray | None:
    if hasattr(model, "predict_proba"):
        try:
            return model.predict_proba(x)
        except AttributeError:  # e.g. SGDClassifier with a loss that has no probabilities
            return None
    return None


def evaluate(model: Any, x: np.ndarray, y: np.ndarray) -> Evaluation:
    # Shape checks come first: a swapped or foreign ref must not surface as an internal error.
    expected = getattr(model, "n_features_in_", x.shape[1] if x.ndim == 2 else None)
    if x.ndim != 2 or x.shape[1] != expected:
        raise FailedPrecondition(
            f"the model expects {expected} features but x_test has shape {x.shape}; "
            "evaluate with the x_test from the same features run that trained the model"
        )
    if y.ndim != 1:
        raise FailedPrecondition(
            f"y_test must be a vector of targets, got shape {y.shape}; pass the y_test the features stage returned"
        )
    if len(x) != len(y):
        raise FailedPrecondition(f"x_test has {len(x)} rows but y_test has {len(y)}")
    if is_classifier(model):
        if not np.issubdtype(y.dtype, np.integer):
            raise FailedPrecondition(
                f"the model is a classifier but y_test holds {y.dtype} values, not class labels; "
                "evaluate with the y_test from the same features run that trained the model"
            )
        unknown = sorted(set(np.unique(y).tolist()) - set(np.asarray(model.classes_).tolist()))
        if unknown:
            raise FailedPrecondition(
                f"y_test holds classes {unknown} the model was not trained on; "
                "evaluate with the y_test from the same features run that trained the model"
            )
    if len(y) == 0:
        raise FailedPrecondition("the test split is empty")
    if np.issubdtype(x.dtype, np.floating) and np.isinf(x).any():
        raise FailedPrecondition("x_test holds infinite values; evaluate with the x_test the features stage returned")
    if np.issubdtype(y.dtype, np.floating) and not np.isfinite(y).all():
        raise FailedPrecondition("y_test holds missing or infinite targets; evaluate with the y_test the features stage returned")
    names = getattr(model, "feature_names_in_", None)
    if names is not None:
        # The model was fitted with its feature names; predicting with them keeps scikit-learn quiet.
        x = pd.DataFrame(x, columns=[str(n) for n in names], copy=False)
    with np.errstate(over="ignore", invalid="ignore"):  # overflowing predictions are refused below
        predicted = model.predict(x)
    importance_kind, importances = _importances(model, names, x.shape[1])
    if not is_classifier(model):
        overflowed = int((~np.isfinite(np.asarray(predicted, dtype="float64"))).sum())
        if overflowed:
            raise FailedPrecondition(
                f"the model predicts non-finite values for {overflowed} of {len(y)} test rows; "
                "its inputs or coefficients are too large, so rescale the data"
            )
        shown = np.unique(np.linspace(0, len(y) - 1, min(len(y), MAX_PLOTTED_POINTS)).astype(int))
        result = Evaluation(
            task="regression",
            metrics={
                "r2": float(metrics.r2_score(y, predicted)),
                "mae": float(metrics.mean_absolute_error(y, predicted)),
                "rmse": float(np.sqrt(metrics.mean_squared_error(y, predicted))),
            },
            predictions={"true": y[shown].tolist(), "predicted": predicted[shown].tolist()},
            importances=importances, importance_kind=importance_kind,
        )
        if len(shown) < len(y):
            result.notes.append(f"the predicted-vs-true plot shows {len(shown)} of {len(y)} test rows, evenly spaced")
        return result

    labels = model.classes_
    result = Evaluation(
        task="classification",
        metrics={
            "accuracy": float(metrics.accuracy_score(y, predicted)),
            "precision_macro": float(metrics.precision_score(y, predicted, average="macro", labels=labels, zero_division=0)),
            "recall_macro": float(metrics.recall_score(y, predicted, average="macro", labels=labels, zero_division=0)),
            "f1_macro": float(metrics.f1_score(y, predicted, average="macro", labels=labels, zero_division=0)),
        },
        confusion_matrix=metrics.confusion_matrix(y, predicted, labels=labels).tolist(),
        importances=importances, importance_kind=importance_kind,
    )
    proba = _scores(model, x)
    if proba is None:
        result.notes.append("the model gives no class probabilities, so roc_auc and log_loss are not reported")
        return result
    result.metrics["log_loss"] = float(metrics.log_loss(y, proba, labels=labels))
    present = np.unique(y)
    if len(present) < 2:
        result.notes.append("the test split holds a single class, so roc_auc is undefined")
        return result
    if len(labels) == 2:
        result.metrics["roc_auc"] = float(metrics.roc_auc_score(y, proba[:, 1]))
        fpr, tpr, _ = metrics.roc_curve(y, proba[:, 1], pos_label=labels[1])
        result.roc_curves.append({"class": int(labels[1]), "fpr": fpr.tolist(), "tpr": tpr.tolist()})
    else:
        if len(present) < len(labels):
            result.notes.append("some classes are absent from the test split; roc_auc is not reported")
        else:
            result.metrics["roc_auc"] = float(
                metrics.roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=labels)
            )
        for index, label in enumerate(labels):
            positives = y == label
            if positives.any() and not positives.all():
                fpr, tpr, _ = metrics.roc_curve(positives, proba[:, index])
                result.roc_curves.append({"class": int(label), "fpr": fpr.tolist(), "tpr": tpr.tolist()})
    return result


def _importances(model: Any, names: Any, width: int) -> tuple[str, list[tuple[str, float]]]:
    """The model's own view of which inputs matter most: impurity importances or |coefficients|."""
    labels = [str(n) for n in names] if names is not None else [f"x{i}" for i in range(width)]
    if hasattr(model, "feature_importances_"):
        kind, values = "impurity importance", np.asarray(model.feature_importances_, dtype=float)
    elif hasattr(model, "coef_"):
        coef = np.atleast_2d(np.asarray(model.coef_, dtype=float))
        kind, values = "mean |coefficient| (on scaled inputs)", np.abs(coef).mean(axis=0)
    else:
        return "", []
    if values.shape != (len(labels),):
        return "", []
    order = np.argsort(-values, kind="stable")[:TOP_IMPORTANCES]
    return kind, [(labels[i], float(values[i])) for i in order]


def effective_thresholds(
    task: str, minimums: dict[str, float], maximums: dict[str, float]
) -> tuple[dict[str, float], dict[str, float], bool]:
    """The caller's thresholds, or the task kind's defaults when there are none (third value True)."""
    if minimums or maximums:
        return minimums, maximums, False
    default_minimums, default_maximums = DEFAULT_THRESHOLDS[task]
    return dict(default_minimums), dict(default_maximums), True


def decide(evaluation: Evaluation, minimums: dict[str, float], maximums: dict[str, float]) -> tuple[bool, list[str]]:
    """PROMOTE (True) only if every threshold that applies is met; reasons say why."""
    minimums, maximums, defaulted = effective_thresholds(evaluation.task, minimums, maximums)
    own = CLASSIFICATION_METRICS if evaluation.task == "classification" else REGRESSION_METRICS
    for name in [*minimums, *maximums]:
        if name not in own:
            raise InvalidArgument(
                f"threshold on {name!r} does not apply to a {evaluation.task} model; "
                f"use one of {', '.join(own)}"
            )
    reasons, passed = [], True
    for name, bound in sorted(minimums.items()):
        value = evaluation.metrics.get(name)
        if value is None:
            passed = False
            reasons.append(f"{name} could not be computed, so minimum {bound:g} is not met")
        elif value >= bound:
            reasons.append(f"{name} {value:.4f} meets minimum {bound:g}")
        else:
            passed = False
            reasons.append(f"{name} {value:.4f} is below minimum {bound:g}")
    for name, bound in sorted(maximums.items()):
        value = evaluation.metrics.get(name)
        if value is None:
            passed = False
            reasons.append(f"{name} could not be computed, so maximum {bound:g} is not met")
        elif value <= bound:
            reasons.append(f"{name} {value:.4f} meets maximum {bound:g}")
        else:
            passed = False
            reasons.append(f"{name} {value:.4f} is above maximum {bound:g}")
    if defaulted:
        reasons.append(f"no thresholds were given, so the {evaluation.task} default applies; set minimums/maximums to choose")
    return passed, reasons
