"""Feature engineering, fitted on the train split only (no leakage from test)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from math import comb

import numpy as np
import pandas as pd
from sklearn.feature_selection import SelectKBest, f_classif, f_regression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MinMaxScaler, PolynomialFeatures, RobustScaler, StandardScaler

from services.runtime.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.runtime.formats import human_bytes

SCALERS = {"standard": StandardScaler, "minmax": MinMaxScaler, "robust": RobustScaler, "none": None}
MAX_POLYNOMIAL_DEGREE = 4


@dataclass
class Engineered:
    transformer: Pipeline
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    feature_names: list[str]


def expanded_width(n_features: int, degree: int) -> int:
    """Columns PolynomialFeatures(degree, include_bias=False) produces."""
    return comb(n_features + degree, degree) - 1


def build_pipeline(task: str, n_features: int, scaling: str, degree: int, k_best: int, max_cells: int, rows: int) -> Pipeline:
    steps: list[tuple[str, object]] = []
    width = n_features
    if degree > 1:
        width = expanded_width(n_features, degree)
        if width * rows * 8 > max_cells:
            raise ResourceExhausted(
                f"polynomial_degree={degree} on {n_features} features makes {width} columns "
                f"({human_bytes(width * rows * 8)} for the train split); lower the degree "
                "or select fewer input features"
            )
        steps.append(("polynomial", PolynomialFeatures(degree=degree, include_bias=False)))
    if SCALERS[scaling] is not None:
        steps.append(("scale", SCALERS[scaling]()))
    if k_best:
        if k_best > width:
            raise InvalidArgument(
                f"select_k_best={k_best} exceeds the {width} features available"
                + (" after polynomial expansion" if degree > 1 else "")
            )
        score = f_classif if task == "classification" else f_regression
        steps.append(("select", SelectKBest(score_func=score, k=k_best)))
    if not steps:
        steps.append(("identity", "passthrough"))
    return Pipeline(steps)


def split_xy(frame: pd.DataFrame, target_column: str, task: str, what: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if target_column not in frame.columns:
        raise FailedPrecondition(f"{what} has no target column {target_column!r}")
    features = [c for c in frame.columns if c != target_column]
    x = frame[features].to_numpy(dtype="float64")
    if np.isnan(x).any():
        raise FailedPrecondition(f"{what} still has missing values; run it through preprocess first")
    dtype = "int64" if task == "classification" else "float64"
    return x, frame[target_column].to_numpy(dtype=dtype), features


def engineer(
    train: pd.DataFrame, test: pd.DataFrame, target_column: str, task: str,
    scaling: str, degree: int, k_best: int, max_bytes: int,
) -> Engineered:
    x_train, y_train, names = split_xy(train, target_column, task, "train")
    x_test, y_test, test_names = split_xy(test, target_column, task, "test")
    if names != test_names:
        raise FailedPrecondition("train and test have different feature columns; pass splits from the same preprocess run")
    pipeline = build_pipeline(task, len(names), scaling, degree, k_best, max_bytes, len(x_train))
    with warnings.catch_warnings():
        # Constant columns make f_classif warn; they simply score lowest.
        warnings.simplefilter("ignore", category=(UserWarning, RuntimeWarning))
        x_train_t = pipeline.fit_transform(x_train, y_train)
    x_test_t = pipeline.transform(x_test)
    try:
        out_names = [str(n) for n in pipeline.get_feature_names_out(names)]
    except (AttributeError, ValueError):
        out_names = [f"f{i}" for i in range(x_train_t.shape[1])]
    return Engineered(
        transformer=pipeline,
        x_train=np.asarray(x_train_t, dtype="float64"),
        y_train=y_train,
        x_test=np.asarray(x_test_t, dtype="float64"),
        y_test=y_test,
        feature_names=out_names,
    )
