"""Model catalogue, hyperparameter validation and a fit that reports progress."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge, SGDClassifier
from sklearn.utils._param_validation import InvalidParameterError

from services.runtime.errors import FailedPrecondition, InvalidArgument, bounded
from services.runtime.stage import Run
from services.runtime.vocabulary import TaskKind
from services.trainer.checkpoints import Checkpoints, Preempted

# name -> (estimator class, defaults we choose over scikit-learn's)
MODELS: dict[TaskKind, dict[str, tuple[type[BaseEstimator], dict[str, Any]]]] = {
    TaskKind.CLASSIFICATION: {
        "logistic_regression": (LogisticRegression, {"max_iter": 1000}),
        "random_forest": (RandomForestClassifier, {}),
        "hist_gradient_boosting": (HistGradientBoostingClassifier, {}),
        # log_loss gives probabilities, which ROC AUC and log loss need.
        "sgd": (SGDClassifier, {"loss": "log_loss"}),
    },
    TaskKind.REGRESSION: {
        "ridge": (Ridge, {}),
        "random_forest": (RandomForestRegressor, {}),
        "hist_gradient_boosting": (HistGradientBoostingRegressor, {}),
    },
}

# The model trained when a request names none.
DEFAULT_MODELS = {TaskKind.CLASSIFICATION: "logistic_regression", TaskKind.REGRESSION: "ridge"}

# Estimators grown in steps with warm_start, and the parameter that counts the
# steps. Only those whose stepped fit is exactly scikit-learn's single fit:
# tree i of a forest comes from the same seed whatever the chunking. Gradient
# boosting is not here: its warm start re-bins the data and restarts early
# stopping on every call, which changes the model (62 instead of 100
# iterations on a 20,000-row table) and costs 3x the time at 10 steps.
_INCREMENTAL = {
    RandomForestClassifier: "n_estimators",
    RandomForestRegressor: "n_estimators",
}
# A stepped fit advances about 1% at a time: progress and checkpoints are that fine.
FIT_STEPS = 100


def all_model_names() -> list[str]:
    return sorted({name for catalogue in MODELS.values() for name in catalogue})


def parse_value(raw: str) -> Any:
    """A JSON literal keeps its type (200 -> int, 0.5 -> float); anything else is a string."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def literal(value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except TypeError:
        return json.dumps(repr(value))


def build_estimator(task: TaskKind, model: str, hyperparameters: dict[str, str], seed: int) -> BaseEstimator:
    catalogue = MODELS[task]
    if model not in catalogue:
        other = TaskKind.REGRESSION if task == TaskKind.CLASSIFICATION else TaskKind.CLASSIFICATION
        hint = f" ({model} is a {other} model)" if model in MODELS[other] else ""
        raise InvalidArgument(
            f"model {bounded(repr(model), 80)} is not available for {task}{hint}; choose one of {', '.join(sorted(catalogue))}"
        )
    cls, defaults = catalogue[model]
    estimator = cls(**defaults)
    valid = estimator.get_params(deep=False)
    params = {}
    for name, raw in sorted(hyperparameters.items()):
        if name == "random_state":
            raise InvalidArgument("hyperparameter 'random_state' is set through the request's seed field")
        if name not in valid:
            raise InvalidArgument(
                f"unknown hyperparameter {bounded(repr(name), 80)} for {model}; valid names: {', '.join(sorted(valid))}"
            )
        params[name] = parse_value(raw)
    if "random_state" in valid:
        params["random_state"] = seed
    estimator.set_params(**params)
    try:
        estimator._validate_params()  # scikit-learn's own constraint table
    except InvalidParameterError as exc:
        raise InvalidArgument(f"invalid hyperparameter for {model}: {bounded(exc, 300)}") from None
    return estimator


@dataclass
class FeatureColumns:
    """What the features stage says about the matrix: column names, and which are category codes."""

    names: list[str] = field(default_factory=list)
    categorical: list[int] = field(default_factory=list)

    @classmethod
    def from_schema(cls, schema: Any, x: np.ndarray) -> FeatureColumns:
        if not isinstance(schema, dict) or not isinstance(schema.get("feature_names"), list):
            raise FailedPrecondition(
                "feature_schema is not a features stage schema; pass the feature_schema ref it returned"
            )
        names = [str(n) for n in schema["feature_names"]]
        width = x.shape[1] if x.ndim == 2 else -1
        if len(names) != width or len(set(names)) != len(names):
            raise FailedPrecondition(
                f"feature_schema names {len(names)} features but x_train has {width} columns; "
                "pass both from one features run"
            )
        categorical = schema.get("categorical_feature_indices") or []
        if not all(isinstance(i, int) and 0 <= i < width for i in categorical):
            raise FailedPrecondition("feature_schema lists categorical columns outside x_train")
        return cls(names, sorted(set(categorical)))

    def frame(self, x: np.ndarray) -> Any:
        """x with its column names, so the fitted model records them (feature_names_in_)."""
        if not self.names:
            return x
        return pd.DataFrame(x, columns=self.names, copy=False)

    def apply_categorical(self, estimator: BaseEstimator) -> None:
        """Category codes become native categorical features where the estimator has them."""
        if self.categorical and "categorical_features" in estimator.get_params(deep=False):
            mask = np.zeros(len(self.names), dtype=bool)
            mask[self.categorical] = True
            estimator.set_params(categorical_features=mask)


def check_fit_inputs(x: Any, y: np.ndarray) -> None:
    if y.ndim != 1:
        raise FailedPrecondition(f"y_train must be a vector of targets, got shape {y.shape}")
    if x.ndim != 2 or x.shape[1] == 0:
        raise FailedPrecondition(f"x_train must be a 2-D matrix with features, got shape {x.shape}")
    if x.shape[0] != y.shape[0]:
        raise FailedPrecondition(
            f"x_train has {x.shape[0]} rows but y_train has {y.shape[0]}; pass both from one features run"
        )
    # Not the hyperparameters' fault, so not left to the fit's ValueError below.
    values = np.asarray(x)
    if np.issubdtype(values.dtype, np.floating) and np.isinf(values).any():
        raise FailedPrecondition("x_train holds infinite values; pass the x_train the features stage returned")
    if np.issubdtype(y.dtype, np.floating) and not np.isfinite(y).all():
        raise FailedPrecondition(
            "y_train holds missing or infinite targets; pass the y_train the features stage returned"
        )


def fit(
    estimator: BaseEstimator,
    x: Any,
    y: np.ndarray,
    run: Run,
    checkpoints: Checkpoints | None = None,
) -> tuple[BaseEstimator, list[str]]:
    """Fit, in steps where that gives scikit-learn's own model, resuming from a checkpoint.

    Returns the fitted estimator (the checkpoint's, when the fit resumed) and the
    warnings worth reporting.
    """
    check_fit_inputs(x, y)
    counter = _INCREMENTAL.get(type(estimator))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        try:
            if counter is None:
                what = f"fitting {type(estimator).__name__} on {x.shape[0]} rows"
                run.progress(0.0, what, 0, 1)
                run.check_cancelled()
                with _heartbeat(run, what):
                    estimator.fit(x, y)
                total = 1
            else:
                estimator, total = _fit_in_steps(estimator, counter, x, y, run, checkpoints)
        except (ValueError, OverflowError) as exc:
            # Each value passed _validate_params, so this is a combination scikit-learn
            # refuses at fit time (penalty="l1" with the lbfgs solver, max_samples
            # without bootstrap), or a value its range allows but its arithmetic does not
            # (max_samples=10**400 overflows): the caller's to change, not an internal error.
            raise InvalidArgument(
                f"{type(estimator).__name__} cannot be fitted with these hyperparameters: {bounded(exc, 300)}"
            ) from None
    run.progress(1.0, "fit complete", total, total)
    return estimator, sorted({str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)})


# A fit in one call says how long it has been going, this often: it has no steps to count.
HEARTBEAT_SECONDS = 5.0


@contextlib.contextmanager
def _heartbeat(run: Run, what: str) -> Iterator[None]:
    """Report the elapsed time of a one-call fit every HEARTBEAT_SECONDS, from a side thread."""
    done = threading.Event()
    started = time.monotonic()

    def beat() -> None:
        while not done.wait(HEARTBEAT_SECONDS):
            run.progress(0.0, f"{what}, {time.monotonic() - started:.0f}s so far", 0, 1)

    thread = threading.Thread(target=beat, name="fit-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _fit_in_steps(
    estimator: BaseEstimator, counter: str, x: Any, y: np.ndarray, run: Run, checkpoints: Checkpoints | None
) -> tuple[BaseEstimator, int]:
    total = estimator.get_params()[counter]
    warm_start = estimator.get_params()["warm_start"]
    done = resumed_from = 0
    resumed = checkpoints.load(estimator, counter) if checkpoints is not None else None
    if resumed is not None:
        estimator, done = resumed
        resumed_from = done
    estimator.set_params(warm_start=True)
    step = max(1, -(-total // FIT_STEPS))
    note = f" (resumed at {resumed_from})" if resumed_from else ""
    run.progress(done / total, f"{counter} {done}/{total}{note}", done, total, resumed_from)
    while done < total:
        if run.cancelled.is_set() or run.stopping.is_set():
            # Keep what was done: the same request resumes from here (after a restart,
            # or when a cancelled or idle fit is asked for again).
            if checkpoints is not None and done > resumed_from:
                checkpoints.save(estimator, done, total)
            if run.stopping.is_set():
                raise Preempted(
                    f"the trainer is shutting down; the fit stopped at {counter} {done} of {total} "
                    f"{'with a checkpoint' if checkpoints is not None and done else 'before any step'}. "
                    "Send the same request again and it resumes from there"
                )
            run.check_cancelled()
        done = min(total, done + step)
        estimator.set_params(**{counter: done})
        estimator.fit(x, y)
        run.progress(done / total, f"{counter} {done}/{total}{note}", done, total, resumed_from)
        if checkpoints is not None:
            checkpoints.save_if_due(estimator, done, total)
    estimator.set_params(warm_start=warm_start)
    return estimator, total
