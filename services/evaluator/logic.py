"""Metrics and the promotion decision."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn import metrics

from services.runtime.catalog import UPSTREAM_OF_EVALUATOR
from services.runtime.errors import FailedPrecondition, InvalidArgument, bounded
from services.runtime.vocabulary import Decision, TaskKind

log = logging.getLogger(__name__)

CLASSIFICATION_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "roc_auc", "log_loss")
REGRESSION_METRICS = ("r2", "mae", "rmse")
ALL_METRICS = CLASSIFICATION_METRICS + REGRESSION_METRICS
# Applied when a request gives no thresholds at all, by the model's task kind, so the
# CLI, the workflow, the sweep and grpcurl callers all get the same gate.
DEFAULT_THRESHOLDS: dict[TaskKind, tuple[dict[str, float], dict[str, float]]] = {
    TaskKind.CLASSIFICATION: ({"accuracy": 0.9}, {}),
    TaskKind.REGRESSION: ({"r2": 0.3}, {}),
}
# Points drawn in the predicted-vs-true plot; more add bytes, not insight.
MAX_PLOTTED_POINTS = 2000
TOP_IMPORTANCES = 20
# Curves (ROC, precision-recall) keep at most this many points: at a million rows with
# distinct scores a curve has a point per row, and the report must stay small.
MAX_CURVE_POINTS = 200
# ROC and precision-recall curves are drawn for at most this many classes (the most frequent).
MAX_CURVE_CLASSES = 10
# Per-class rows kept in the metrics report.
MAX_PER_CLASS = 1000
CALIBRATION_BINS = 10
RESIDUAL_BINS = 30
# Permutation importance, for models with neither feature_importances_ nor coef_: a fixed
# subsample, few repeats, a fixed seed, and a cap on the predictions it costs.
PERMUTATION_ROWS = 2000
PERMUTATION_REPEATS = 3
PERMUTATION_PREDICTIONS = 300  # column permutations (columns x repeats) at most
PERMUTATION_MAX_COLUMNS = 2000
PERMUTATION_SEED = 0


@dataclass
class Evaluation:
    task: TaskKind
    metrics: dict[str, float]
    confusion_matrix: list[list[int]] = field(default_factory=list)
    roc_curves: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    predictions: dict[str, list[float]] = field(default_factory=dict)
    importances: list[tuple[str, float]] = field(default_factory=list)
    importance_kind: str = ""
    pr_curves: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    per_class: list[dict[str, Any]] = field(default_factory=list)
    residuals: dict[str, Any] = field(default_factory=dict)
    test_rows: int = 0


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
            f"model is a {kind}, not a model: it has no predict method; pass the model ref the trainer returned"
        )


def _scores(model: Any, x: np.ndarray) -> np.ndarray | None:
    if hasattr(model, "predict_proba"):
        try:
            return model.predict_proba(x)
        except AttributeError:  # e.g. SGDClassifier with a loss that has no probabilities
            return None
    return None


def evaluate(model: Any, test_matrix: np.ndarray, y: np.ndarray) -> Evaluation:
    """Metrics, curves and importances of a fitted model on the test split."""
    task = TaskKind.of_model(model)
    _check_inputs(model, task, test_matrix, y)
    names = getattr(model, "feature_names_in_", None)
    # The model was fitted with its feature names; predicting with them keeps scikit-learn quiet.
    x: Any = test_matrix if names is None else pd.DataFrame(test_matrix, columns=[str(n) for n in names], copy=False)
    with np.errstate(over="ignore", invalid="ignore"):  # overflowing predictions are refused below
        predicted = model.predict(x)
    importance_kind, importances = _importances(model, names, x.shape[1])
    importance_notes: list[str] = []
    if not importances:
        importance_kind, importances, importance_notes = _permutation_importances(model, task, names, x, y)
    if task == TaskKind.REGRESSION:
        return _regression(y, predicted, importance_kind, importances, importance_notes)
    return _classification(model, x, y, predicted, importance_kind, importances, importance_notes)


def report_document(
    evaluation: Evaluation,
    decision: Decision,
    reasons: list[str],
    thresholds: dict[str, dict[str, float]],
    class_names: list[str],
    context: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The metrics report (JSON) the HTML page is rendered from. `context` adds the documents
    the caller passed along (schema, profile, split report), each under its own key."""
    return {
        "task_kind": evaluation.task,
        "metrics": evaluation.metrics,
        "thresholds": thresholds,
        "importances": {"kind": evaluation.importance_kind, "values": evaluation.importances},
        **(context or {}),
        "decision": decision,
        "reasons": reasons,
        "notes": evaluation.notes,
        "test_rows": evaluation.test_rows,
        "class_names": class_names,
        "confusion_matrix": evaluation.confusion_matrix,
        "roc_curves": evaluation.roc_curves,
        "predictions": evaluation.predictions,
        "pr_curves": evaluation.pr_curves,
        "calibration": evaluation.calibration,
        "per_class": evaluation.per_class,
        "residuals": evaluation.residuals,
        **({"model": model} if model is not None else {}),
        **({"provenance": provenance} if provenance is not None else {}),
    }


def _check_inputs(model: Any, task: TaskKind, x: np.ndarray, y: np.ndarray) -> None:
    """Refuse a test split that does not belong to this model, before predicting anything."""
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
    if task == TaskKind.CLASSIFICATION:
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
        raise FailedPrecondition(
            "y_test holds missing or infinite targets; evaluate with the y_test the features stage returned"
        )


def _regression(
    y: np.ndarray, predicted: Any, importance_kind: str, importances: list[tuple[str, float]], notes: list[str]
) -> Evaluation:
    with np.errstate(over="ignore", invalid="ignore"):
        predicted = np.asarray(predicted, dtype="float64")
    overflowed = int((~np.isfinite(predicted)).sum())
    if overflowed:
        raise FailedPrecondition(
            f"the model predicts non-finite values for {overflowed} of {len(y)} test rows; "
            "its inputs or coefficients are too large, so rescale the data"
        )
    shown = np.unique(np.linspace(0, len(y) - 1, min(len(y), MAX_PLOTTED_POINTS)).astype(int))
    result = Evaluation(
        task=TaskKind.REGRESSION,
        test_rows=len(y),
        metrics={
            **({"r2": float(metrics.r2_score(y, predicted))} if len(y) > 1 else {}),
            "mae": float(metrics.mean_absolute_error(y, predicted)),
            "rmse": float(np.sqrt(metrics.mean_squared_error(y, predicted))),
        },
        predictions={"true": y[shown].tolist(), "predicted": predicted[shown].tolist()},
        importances=importances,
        importance_kind=importance_kind,
        notes=notes,
    )
    if "r2" not in result.metrics:
        result.notes.append("r2 is undefined for a test split with fewer than two rows, so it is not reported")
    result.residuals = _residuals(np.asarray(y, dtype="float64"), predicted)
    if len(shown) < len(y):
        result.notes.append(f"the predicted-vs-true plot shows {len(shown)} of {len(y)} test rows, evenly spaced")
    return result


def _classification(
    model: Any,
    x: Any,
    y: np.ndarray,
    predicted: Any,
    importance_kind: str,
    importances: list[tuple[str, float]],
    notes: list[str],
) -> Evaluation:
    labels = model.classes_
    result = Evaluation(
        task=TaskKind.CLASSIFICATION,
        test_rows=len(y),
        metrics={
            "accuracy": float(metrics.accuracy_score(y, predicted)),
            "precision_macro": float(
                metrics.precision_score(y, predicted, average="macro", labels=labels, zero_division=0)
            ),
            "recall_macro": float(metrics.recall_score(y, predicted, average="macro", labels=labels, zero_division=0)),
            "f1_macro": float(metrics.f1_score(y, predicted, average="macro", labels=labels, zero_division=0)),
        },
        confusion_matrix=metrics.confusion_matrix(y, predicted, labels=labels).tolist(),
        importances=importances,
        importance_kind=importance_kind,
        notes=notes,
    )
    result.per_class = _per_class(y, predicted, labels)
    if len(labels) > MAX_PER_CLASS:
        result.notes.append(f"the per-class table keeps the first {MAX_PER_CLASS} of {len(labels)} classes")
    _add_probability_metrics(result, model, x, y, labels)
    return result


def _add_probability_metrics(result: Evaluation, model: Any, x: Any, y: np.ndarray, labels: np.ndarray) -> None:
    """log_loss, calibration, roc_auc and the ROC and precision-recall curves, when the model gives probabilities."""
    proba = _scores(model, x)
    if proba is None:
        result.notes.append("the model gives no class probabilities, so roc_auc and log_loss are not reported")
        return
    proba = np.asarray(proba, dtype="float64")
    result.metrics["log_loss"] = float(metrics.log_loss(y, proba, labels=labels))
    result.calibration = _calibration(y, proba, labels)
    present = np.unique(y)
    if len(present) < 2:
        result.notes.append("the test split holds a single class, so roc_auc is undefined")
        return
    if len(labels) == 2:
        result.metrics["roc_auc"] = float(metrics.roc_auc_score(y, proba[:, 1]))
        positives = y == labels[1]
        result.roc_curves.append(_roc(positives, proba[:, 1], int(labels[1])))
        result.pr_curves.append(_pr(positives, proba[:, 1], int(labels[1])))
    else:
        if len(present) < len(labels):
            result.notes.append("some classes are absent from the test split; roc_auc is not reported")
        else:
            result.metrics["roc_auc"] = float(
                metrics.roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=labels)
            )
        drawn = _drawn_classes(y, labels)
        if len(drawn) < len(labels):
            result.notes.append(
                f"ROC and precision-recall curves are drawn for the {len(drawn)} most frequent of {len(labels)} classes"
            )
        for index in drawn:
            positives = y == labels[index]
            if positives.any() and not positives.all():
                result.roc_curves.append(_roc(positives, proba[:, index], int(labels[index])))
                result.pr_curves.append(_pr(positives, proba[:, index], int(labels[index])))


def _thin(*columns: np.ndarray) -> list[list[float]]:
    """At most MAX_CURVE_POINTS evenly spaced points of a curve, its two ends kept."""
    count = len(columns[0])
    if count <= MAX_CURVE_POINTS:
        return [c.tolist() for c in columns]
    keep = np.unique(np.linspace(0, count - 1, MAX_CURVE_POINTS).round().astype(int))
    return [c[keep].tolist() for c in columns]


def _roc(positives: np.ndarray, scores: np.ndarray, label: int) -> dict[str, Any]:
    fpr, tpr, _ = metrics.roc_curve(positives, scores)
    area = float(metrics.auc(fpr, tpr))
    fpr_shown, tpr_shown = _thin(fpr, tpr)
    return {"class": label, "auc": area, "fpr": fpr_shown, "tpr": tpr_shown}


def _pr(positives: np.ndarray, scores: np.ndarray, label: int) -> dict[str, Any]:
    precision, recall, _ = metrics.precision_recall_curve(positives, scores)
    average = float(metrics.average_precision_score(positives, scores))
    # scikit-learn returns recall falling; drawn left to right it reads better rising.
    recall_shown, precision_shown = _thin(recall[::-1], precision[::-1])
    return {
        "class": label,
        "average_precision": average,
        "prevalence": float(np.mean(positives)),
        "recall": recall_shown,
        "precision": precision_shown,
    }


def _drawn_classes(y: np.ndarray, labels: np.ndarray) -> list[int]:
    """Indices of the classes whose curves are drawn: the most frequent, ties by label order."""
    support = (
        np.array([np.count_nonzero(y == label) for label in labels])
        if len(labels) <= 64
        else np.bincount(np.searchsorted(labels, y), minlength=len(labels))
    )
    order = np.argsort(-support, kind="stable")[:MAX_CURVE_CLASSES]
    return sorted(int(i) for i in order)


def _per_class(y: np.ndarray, predicted: np.ndarray, labels: np.ndarray) -> list[dict[str, Any]]:
    shown = labels[:MAX_PER_CLASS]
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        y, predicted, labels=shown, zero_division=0
    )
    return [
        {"class": int(label), "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for label, p, r, f, s in zip(shown, precision, recall, f1, support, strict=True)
    ]


def _calibration(y: np.ndarray, proba: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """A reliability curve: the positive class for a binary model; the top class (the
    predicted class's probability against how often it is right) for more classes."""
    if len(labels) == 2:
        confidence, correct = proba[:, 1], (y == labels[1])
        kind, label = "positive class", int(labels[1])
    else:
        top = np.argmax(proba, axis=1)
        confidence, correct = proba[np.arange(len(y)), top], (labels[top] == y)
        kind, label = "top class", -1
    confidence = np.clip(np.nan_to_num(confidence, nan=0.0), 0.0, 1.0)
    which = np.minimum((confidence * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)
    counts = np.bincount(which, minlength=CALIBRATION_BINS)
    predicted_sum = np.bincount(which, weights=confidence, minlength=CALIBRATION_BINS)
    observed_sum = np.bincount(which, weights=correct.astype("float64"), minlength=CALIBRATION_BINS)
    bins = [
        {
            "predicted": float(predicted_sum[b] / counts[b]),
            "observed": float(observed_sum[b] / counts[b]),
            "count": int(counts[b]),
        }
        for b in range(CALIBRATION_BINS)
        if counts[b]
    ]
    error = float(sum(b["count"] * abs(b["observed"] - b["predicted"]) for b in bins) / max(len(y), 1))
    return {"kind": kind, "class": label, "bins": bins, "expected_calibration_error": error}


def _residuals(y: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    """The error distribution: residual = true - predicted, as a histogram and a few numbers."""
    with np.errstate(over="ignore", invalid="ignore"):
        residual = y - predicted
    finite = residual[np.isfinite(residual)]
    if not len(finite):
        return {}
    summary = {
        "mean": float(np.mean(finite)),
        "std": float(np.std(finite)),
        "min": float(finite.min()),
        "max": float(finite.max()),
        "p05": float(np.percentile(finite, 5)),
        "p50": float(np.percentile(finite, 50)),
        "p95": float(np.percentile(finite, 95)),
    }
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            counts, edges = np.histogram(finite, bins=RESIDUAL_BINS)
    except ValueError:  # a range wider than a float holds
        return summary
    if not np.isfinite(edges).all():
        return summary
    return {**summary, "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}


def _permutation_importances(
    model: Any, task: TaskKind, names: Any, x: Any, y: np.ndarray
) -> tuple[str, list[tuple[str, float]], list[str]]:
    """How much the score drops when one input is shuffled, on a bounded, seeded subsample."""
    values = np.asarray(x)
    width = values.shape[1]
    if width == 0 or width > PERMUTATION_MAX_COLUMNS or len(y) < 2:
        return "", [], []
    labels = [str(n) for n in names] if names is not None else [f"x{i}" for i in range(width)]
    rng = np.random.default_rng(PERMUTATION_SEED)
    rows = np.sort(rng.choice(len(y), size=min(len(y), PERMUTATION_ROWS), replace=False))
    sample, truth = np.array(values[rows]), np.asarray(y)[rows]
    repeats = max(1, min(PERMUTATION_REPEATS, PERMUTATION_PREDICTIONS // width))
    if width * repeats > PERMUTATION_PREDICTIONS:  # wide inputs: fewer rows, same prediction budget
        keep = max(100, PERMUTATION_ROWS * PERMUTATION_PREDICTIONS // width)
        sample, truth = sample[:keep], truth[:keep]

    def frame(matrix: np.ndarray) -> Any:
        return pd.DataFrame(matrix, columns=labels, copy=False) if names is not None else matrix

    def score(matrix: np.ndarray) -> float:
        with np.errstate(all="ignore"):
            guess = model.predict(frame(matrix))
        if task == TaskKind.CLASSIFICATION:
            return float(np.mean(guess == truth))
        guess = np.asarray(guess, dtype="float64")
        if not np.isfinite(guess).all():
            return float("nan")
        return float(metrics.r2_score(truth, guess)) if len(truth) > 1 else float("nan")

    base = score(sample)
    drops = np.zeros(width)
    for column in range(width):
        original = sample[:, column].copy()
        total = 0.0
        for _ in range(repeats):
            sample[:, column] = rng.permutation(original)
            total += base - score(sample)
        sample[:, column] = original
        drops[column] = total / repeats
    if not np.isfinite(drops).all():
        return "", [], ["permutation importance could not be computed: the model's score is undefined on the subsample"]
    order = np.argsort(-drops, kind="stable")[:TOP_IMPORTANCES]
    metric = "accuracy" if task == TaskKind.CLASSIFICATION else "r2"
    kind = f"permutation importance: mean drop in {metric} over {repeats} shuffles of {len(truth)} test rows"
    return kind, [(labels[i], float(drops[i])) for i in order], []


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
    task: TaskKind, minimums: dict[str, float], maximums: dict[str, float]
) -> tuple[dict[str, float], dict[str, float], bool]:
    """The caller's thresholds, or the task kind's defaults when there are none (third value True)."""
    if minimums or maximums:
        return minimums, maximums, False
    default_minimums, default_maximums = DEFAULT_THRESHOLDS[task]
    return dict(default_minimums), dict(default_maximums), True


def decide(evaluation: Evaluation, minimums: dict[str, float], maximums: dict[str, float]) -> tuple[bool, list[str]]:
    """PROMOTE (True) only if every threshold that applies is met; reasons say why."""
    minimums, maximums, defaulted = effective_thresholds(evaluation.task, minimums, maximums)
    own = CLASSIFICATION_METRICS if evaluation.task == TaskKind.CLASSIFICATION else REGRESSION_METRICS
    for name in [*minimums, *maximums]:
        if name not in own:
            raise InvalidArgument(
                f"threshold on {name!r} does not apply to a {evaluation.task} model; use one of {', '.join(own)}"
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
        reasons.append(
            f"no thresholds were given, so the {evaluation.task} default applies; set minimums/maximums to choose"
        )
    return passed, reasons


# ---- what ran: the producing computations, from the store's manifests ---------------------------
MAX_MANIFESTS_WALKED = 64
MAX_SHOWN_PARAMS = 40
MAX_SHOWN_TEXT = 200


def shown_value(value: Any, limit: int = MAX_SHOWN_TEXT) -> Any:
    """A parameter as the report keeps it: JSON scalars as they are, anything else as bounded text."""
    if value is None or isinstance(value, (bool, int)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    if isinstance(value, str):
        return bounded(value, limit)
    try:
        text = json.dumps(value, sort_keys=True, default=repr)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return bounded(text, limit)


def shown_params(params: Any) -> dict[str, Any]:
    if not isinstance(params, dict):
        return {}
    return {
        bounded(str(k), 80): shown_value(v)
        for k, v in sorted(params.items(), key=lambda kv: str(kv[0]))[:MAX_SHOWN_PARAMS]
    }


def redact_source(source: Any) -> str:
    """A source for the page: a URL without its query or user info (either may hold a secret)."""
    text = str(source)
    if "://" in text:
        scheme, _, rest = text.partition("://")
        host_and_path = rest.split("?", 1)[0].split("#", 1)[0]
        host, slash, path = host_and_path.partition("/")
        if "@" in host:
            host = "***@" + host.rpartition("@")[2]
        text = f"{scheme}://{host}{slash}{path}" + ("?..." if "?" in rest else "")
    return bounded(text, MAX_SHOWN_TEXT)


def model_description(model: Any) -> dict[str, Any]:
    """The fitted model's class and its effective hyperparameters (scikit-learn's get_params)."""
    try:
        params = model.get_params(deep=False)
    except Exception:  # noqa: BLE001 - an odd model still gets a report
        params = {}
    return {"class": bounded(type(model).__name__, 80), "hyperparameters": shown_params(params)}


def provenance(store: Any, model_digest: str, x_test_digest: str) -> dict[str, Any]:
    """The computations behind the model and x_test, back to the loader, from their manifests.

    One row per stage (the first manifest met walking back from the model, then x_test):
    version, parameters, when it was computed and how long it took. A missing or
    malformed manifest (an artifact put by hand) leaves its stage out; this never raises.
    """
    stages: dict[str, dict[str, Any]] = {}
    features_keys: dict[str, str] = {}
    try:
        queue, seen = [("model", model_digest), ("x_test", x_test_digest)], set[str]()
        while queue and len(seen) < MAX_MANIFESTS_WALKED:
            origin, digest = queue.pop(0)
            if digest in seen:
                continue
            seen.add(digest)
            manifest = store.manifest(digest)
            if not isinstance(manifest, dict):
                continue
            stage = manifest.get("stage")
            if stage == "features" and origin in ("model", "x_test") and origin not in features_keys:
                features_keys[origin] = str(manifest.get("cache_key", ""))
            if stage in UPSTREAM_OF_EVALUATOR and stage not in stages:
                duration = manifest.get("duration_seconds")
                params = shown_params(manifest.get("params"))
                if stage == "loader" and "source" in params:
                    params["source"] = redact_source(manifest["params"]["source"])
                stages[stage] = {
                    "stage_version": bounded(str(manifest.get("stage_version", "")), 40),
                    "created_at": bounded(str(manifest.get("created_at", "")), 40),
                    "duration_seconds": float(duration)
                    if isinstance(duration, (int, float)) and not isinstance(duration, bool) and math.isfinite(duration)
                    else None,
                    "cache_key": bounded(str(manifest.get("cache_key", "")), 64),
                    "params": params,
                    # Recorded by runtimes that write the producing run into manifests; absent otherwise.
                    **({"run_id": bounded(str(manifest["run_id"]), 128)} if manifest.get("run_id") else {}),
                }
            inputs = manifest.get("inputs")
            if not isinstance(inputs, dict):
                inputs = {}
            for ref in inputs.values():
                digest_in = ref.get("sha256") if isinstance(ref, dict) else None
                if isinstance(digest_in, str):
                    queue.append((origin, digest_in))
    except Exception as exc:  # noqa: BLE001 - the report stands without its provenance
        log.warning("could not read the manifests behind the model: %s", bounded(exc, 200))
    notes = []
    if len(set(features_keys.values())) > 1:
        notes.append("x_test comes from another features computation than the model's training data")
    ordered = {name: stages[name] for name in UPSTREAM_OF_EVALUATOR if name in stages}
    return {"stages": ordered, "notes": notes}
