"""Feature engineering, fitted on the train split only (no leakage from test).

The fitted transformer is one scikit-learn Pipeline:

    ColumnTransformer                       one branch per kind of column
      numeric   numeric and boolean columns: SimpleImputer (+ missing indicators) -> scaler
      one_hot   categorical, few levels: SimpleImputer("(missing)") -> OneHotEncoder (rare levels grouped)
      target    categorical, many levels: SimpleImputer("(missing)") -> TargetEncoder (cross-fitted) -> scaler
      ordinal   categorical, when asked: SimpleImputer("(missing)") -> OrdinalEncoder (codes, not scaled)
      datetime  DatetimeParts -> scaler
    -> PolynomialFeatures -> scaler      only with polynomial_degree > 1
    -> SelectKBest                       only with select_k_best > 0

It takes the loader's feature columns as a DataFrame, so the stored
transformer applies to new rows of the same table as they are.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from math import comb
from typing import Any

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.feature_selection import SelectKBest, f_classif, f_regression
from sklearn.impute import SimpleImputer
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import (
    MinMaxScaler,
    OneHotEncoder,
    OrdinalEncoder,
    PolynomialFeatures,
    RobustScaler,
    StandardScaler,
    TargetEncoder,
)

from services.features.encoders import DatetimeParts, median_or_zero
from services.runtime.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.runtime.formats import human_bytes
from services.runtime.vocabulary import TaskKind

SCALERS = {"standard": StandardScaler, "minmax": MinMaxScaler, "robust": RobustScaler, "none": None}
IMPUTATIONS = ("median", "mean", "most_frequent")
ENCODINGS = ("auto", "one_hot", "target", "ordinal")
MAX_POLYNOMIAL_DEGREE = 4
DEFAULT_MAX_ONE_HOT_LEVELS = 30
DEFAULT_MIN_LEVEL_COUNT = 5
# hist_gradient_boosting takes at most 255 categories per feature (its max_bins).
MAX_ORDINAL_LEVELS = 255
MISSING_LEVEL = "(missing)"
# Levels listed per column in the feature schema; the count is always complete.
LISTED_LEVELS = 100
DATETIME_PARTS = 7
TARGET_ENCODING_FOLDS = 5


@dataclass(frozen=True)
class FeatureOptions:
    scaling: str = "standard"
    polynomial_degree: int = 1
    select_k_best: int = 0
    imputation: str = "median"
    missing_indicators: bool = False
    categorical_encoding: str = "auto"
    max_one_hot_levels: int = DEFAULT_MAX_ONE_HOT_LEVELS
    min_level_count: int = DEFAULT_MIN_LEVEL_COUNT
    seed: int = 0


@dataclass
class Engineered:
    transformer: Pipeline
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    feature_names: list[str]
    schema: dict[str, Any]
    missing_values_imputed: int = 0
    categorical_indices: list[int] = field(default_factory=list)


def expanded_width(n_features: int, degree: int) -> int:
    """Columns PolynomialFeatures(degree, include_bias=False) produces."""
    return comb(n_features + degree, degree) - 1


def _scaler(options: FeatureOptions) -> Any:
    cls = SCALERS[options.scaling]
    return cls() if cls is not None else "passthrough"


def _levels(train: pd.DataFrame, column: str) -> pd.Series:
    return train[column].fillna(MISSING_LEVEL).value_counts()


def _encoder_for(levels: int, options: FeatureOptions, can_cross_fit: bool) -> str:
    if options.categorical_encoding != "auto":
        return options.categorical_encoding
    # Too few rows to cross-fit a target encoder: one-hot, with the rarer levels grouped.
    return "one_hot" if levels <= options.max_one_hot_levels or not can_cross_fit else "target"


def _branches(
    roles: dict[str, str],
    train: pd.DataFrame,
    task: TaskKind,
    options: FeatureOptions,
    n_classes: int,
    max_fold_rows: int,
) -> tuple[list[tuple[str, Any, list[str]]], list[dict[str, Any]], int]:
    """The ColumnTransformer branches, the per-column entries of the schema, and the expected width.

    max_fold_rows: train rows (regression) or rows of the largest class (classification), which
    bounds the number of cross-fitting folds the target encoder can use."""
    columns = [c for c in train.columns if c in roles]
    groups: dict[str, list[str]] = {"numeric": [], "one_hot": [], "target": [], "ordinal": [], "datetime": []}
    entries: list[dict[str, Any]] = []
    width = 0
    target_width = n_classes if task == TaskKind.CLASSIFICATION and n_classes > 2 else 1
    for column in columns:
        role = roles[column]
        entry: dict[str, Any] = {"name": column, "role": role, "missing_in_train": int(train[column].isna().sum())}
        if role in ("numeric", "boolean"):
            encoder = "numeric"
            width += 2 if options.missing_indicators else 1
        elif role == "datetime":
            encoder = "datetime_parts"
            width += DATETIME_PARTS
        else:
            levels = _levels(train, column)
            encoder = _encoder_for(len(levels), options, max_fold_rows >= TARGET_ENCODING_FOLDS)
            entry["levels_in_train"] = len(levels)
            entry["levels"] = [[str(level), int(count)] for level, count in levels.head(LISTED_LEVELS).items()]
            width += {"one_hot": min(len(levels), options.max_one_hot_levels) + 1, "target": target_width}.get(
                encoder, 1
            )
        entry["encoder"] = encoder
        groups["datetime" if encoder == "datetime_parts" else encoder].append(column)
        entries.append(entry)

    def categorical(encoder: Any) -> Pipeline:
        # keep_empty_features: a column with no value in train is one level, "(missing)", not dropped.
        fill = SimpleImputer(strategy="constant", fill_value=MISSING_LEVEL, keep_empty_features=True)
        return Pipeline([("fill", fill), ("encode", encoder)])

    min_count = options.min_level_count if options.min_level_count > 1 else None
    branches: list[tuple[str, Any, list[str]]] = []
    if groups["numeric"]:
        strategy = median_or_zero if options.imputation == "median" else options.imputation
        imputer = SimpleImputer(strategy=strategy, add_indicator=options.missing_indicators, keep_empty_features=True)
        branches.append(("numeric", Pipeline([("impute", imputer), ("scale", _scaler(options))]), groups["numeric"]))
    if groups["one_hot"]:
        one_hot = OneHotEncoder(
            handle_unknown="infrequent_if_exist",
            min_frequency=min_count,
            max_categories=options.max_one_hot_levels + 1,
            sparse_output=False,
            dtype=np.float64,
        )
        branches.append(("one_hot", categorical(one_hot), groups["one_hot"]))
    if groups["target"]:
        if max_fold_rows < TARGET_ENCODING_FOLDS:
            raise FailedPrecondition(
                f"target encoding of {', '.join(repr(c[:40]) for c in groups['target'][:5])} cross-fits over "
                f"{TARGET_ENCODING_FOLDS} folds and needs at least {TARGET_ENCODING_FOLDS} train rows"
                + (" in some class" if task == TaskKind.CLASSIFICATION else "")
                + "; use one_hot or ordinal encoding, or more data"
            )
        # Cross-fitting folds, seeded: train rows are encoded by the other folds' statistics.
        folds = (KFold if task == TaskKind.REGRESSION else StratifiedKFold)(
            TARGET_ENCODING_FOLDS, shuffle=True, random_state=options.seed
        )
        target = TargetEncoder(target_type="continuous" if task == TaskKind.REGRESSION else "auto", cv=folds)
        branches.append(
            ("target", Pipeline([*categorical(target).steps, ("scale", _scaler(options))]), groups["target"])
        )
    if groups["ordinal"]:
        # Unseen levels become -1, which hist_gradient_boosting treats as missing.
        ordinal = OrdinalEncoder(
            handle_unknown="use_encoded_value",
            unknown_value=-1,
            min_frequency=min_count,
            max_categories=MAX_ORDINAL_LEVELS,
            dtype=np.float64,
        )
        branches.append(("ordinal", categorical(ordinal), groups["ordinal"]))
    if groups["datetime"]:
        branches.append(
            ("datetime", Pipeline([("parts", DatetimeParts()), ("scale", _scaler(options))]), groups["datetime"])
        )
    return branches, entries, width


# Most output columns a features call may make, whatever the memory: the response lists
# every feature name, and must stay well inside the 4 MiB gRPC message limit.
MAX_FEATURE_COLUMNS = 100_000


def build_pipeline(
    branches: list[tuple[str, Any, list[str]]],
    task: TaskKind,
    options: FeatureOptions,
    width: int,
    rows: int,
    max_bytes: int,
) -> Pipeline:
    columns = ColumnTransformer(branches, remainder="drop", verbose_feature_names_out=False)
    steps: list[tuple[str, Any]] = [("columns", columns)]
    if width * rows * 8 > max_bytes or width > MAX_FEATURE_COLUMNS:
        raise ResourceExhausted(
            f"the encoded train split would have about {width} columns (at most {MAX_FEATURE_COLUMNS}) ({human_bytes(width * rows * 8)}), over "
            f"this service's limit of {human_bytes(max_bytes)} (MLMESH_MAX_DATASET_BYTES); lower max_one_hot_levels "
            "or leave out columns"
        )
    degree = options.polynomial_degree
    if degree > 1:
        if any(name == "ordinal" for name, _, _ in branches):
            raise InvalidArgument("polynomial_degree cannot be combined with ordinal categorical encoding")
        expanded = expanded_width(width, degree)
        if expanded * rows * 8 > max_bytes or expanded > MAX_FEATURE_COLUMNS:
            raise ResourceExhausted(
                f"polynomial_degree={degree} on {width} features makes {expanded} columns "
                f"({human_bytes(expanded * rows * 8)} for the train split; at most {MAX_FEATURE_COLUMNS} "
                "columns are allowed); lower the degree "
                "or select fewer input features"
            )
        steps.append(("polynomial", PolynomialFeatures(degree=degree, include_bias=False)))
        steps.append(("rescale", _scaler(options)))
    if options.select_k_best:
        score = f_classif if task == TaskKind.CLASSIFICATION else f_regression
        steps.append(("select", SelectKBest(score_func=score, k=options.select_k_best)))
    return Pipeline(steps)


_OVERFLOW = (
    "encoding the features overflowed: some numbers are too large (near 1e308) to scale or multiply; "
    "rescale those columns, or use scaling=minmax or robust"
)


def split_xy(frame: pd.DataFrame, target_column: str, task: TaskKind, what: str) -> tuple[pd.DataFrame, np.ndarray]:
    if target_column not in frame.columns:
        raise FailedPrecondition(f"{what} has no target column {target_column!r}")
    dtype = "int64" if task == TaskKind.CLASSIFICATION else "float64"
    return frame.drop(columns=[target_column]), frame[target_column].to_numpy(dtype=dtype)


def _names(pipeline: Pipeline) -> list[str]:
    try:
        return [str(n) for n in pipeline.get_feature_names_out()]
    except ValueError:  # two branches produced the same name: prefix each with its branch
        pipeline.named_steps["columns"].verbose_feature_names_out = True
        return [str(n) for n in pipeline.get_feature_names_out()]


def _categorical_indices(pipeline: Pipeline) -> list[int]:
    """Positions of ordinal category codes in the output, after any selection."""
    slices = pipeline.named_steps["columns"].output_indices_
    mask = np.zeros(sum(s.stop - s.start for s in slices.values()), dtype=bool)
    if "ordinal" in slices:
        mask[slices["ordinal"]] = True
    if "polynomial" in pipeline.named_steps:
        # Products of columns are no category codes (and ordinal codes are refused with a polynomial).
        mask = np.zeros(pipeline.named_steps["polynomial"].n_output_features_, dtype=bool)
    if "select" in pipeline.named_steps:
        mask = mask[pipeline.named_steps["select"].get_support()]
    return [int(i) for i in np.flatnonzero(mask)]


def engineer(
    train: pd.DataFrame,
    test: pd.DataFrame,
    target_column: str,
    task: TaskKind,
    roles: dict[str, str],
    class_names: list[str],
    options: FeatureOptions,
    max_bytes: int,
) -> Engineered:
    x_train, y_train = split_xy(train, target_column, task, "train")
    x_test, y_test = split_xy(test, target_column, task, "test")
    if list(x_train.columns) != list(x_test.columns):
        raise FailedPrecondition(
            "train and test have different feature columns; pass splits from the same preprocess run"
        )
    unknown = [c for c in x_train.columns if c not in roles]
    if unknown:
        raise FailedPrecondition("train has columns without a role; pass splits written by preprocess")
    max_fold_rows = (
        int(np.bincount(y_train).max()) if task == TaskKind.CLASSIFICATION and len(y_train) else len(y_train)
    )
    branches, entries, width = _branches(roles, x_train, task, options, len(class_names), max_fold_rows)
    after = " after polynomial expansion" if options.polynomial_degree > 1 else ""
    # `width` is an upper bound (rare levels may be grouped); the exact check follows the fit.
    available = expanded_width(width, options.polynomial_degree) if options.polynomial_degree > 1 else width
    if options.select_k_best > available:
        raise InvalidArgument(
            f"select_k_best={options.select_k_best} exceeds the {available} features available{after}"
        )
    pipeline = build_pipeline(branches, task, options, width, len(x_train), max_bytes)
    with warnings.catch_warnings():
        # Constant columns make f_classif warn; they simply score lowest. Rare levels make
        # OneHotEncoder warn about unknown categories at transform time; they are grouped.
        warnings.simplefilter("ignore", category=(UserWarning, RuntimeWarning))
        try:
            x_train_t = pipeline.fit_transform(x_train, y_train)
            x_test_t = pipeline.transform(x_test)
        except ValueError as exc:
            # Numbers near the float64 limit overflow to infinity when scaled or multiplied,
            # and the next step refuses them.
            if "infinity" in str(exc) or "NaN" in str(exc):
                raise FailedPrecondition(_OVERFLOW) from None
            raise
    for part in (x_train_t, x_test_t):
        if not np.all(np.isfinite(part)):
            raise FailedPrecondition(_OVERFLOW)
    if options.select_k_best:
        # SelectKBest only warns, and keeps every column, when k is larger than its input.
        produced = int(pipeline.named_steps["select"].n_features_in_)
        if options.select_k_best > produced:
            raise InvalidArgument(
                f"select_k_best={options.select_k_best} exceeds the {produced} features available{after}"
            )
    names = _names(pipeline)
    missing = int(x_train.isna().to_numpy().sum() + x_test.isna().to_numpy().sum())
    categorical = _categorical_indices(pipeline)
    schema = {
        "target_column": target_column,
        "task_kind": task,
        "class_names": class_names,
        "columns": entries,
        "feature_names": names,
        "categorical_feature_indices": categorical,
        "options": {
            "scaling": options.scaling,
            "polynomial_degree": options.polynomial_degree,
            "select_k_best": options.select_k_best,
            "numeric_imputation": options.imputation,
            "missing_indicators": options.missing_indicators,
            "categorical_encoding": options.categorical_encoding,
            "max_one_hot_levels": options.max_one_hot_levels,
            "min_level_count": options.min_level_count,
        },
    }
    return Engineered(
        transformer=pipeline,
        x_train=np.ascontiguousarray(x_train_t, dtype="float64"),
        y_train=y_train,
        x_test=np.ascontiguousarray(x_test_t, dtype="float64"),
        y_test=y_test,
        feature_names=names,
        schema=schema,
        missing_values_imputed=missing,
        categorical_indices=categorical,
    )
