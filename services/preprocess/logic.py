"""Cleaning and splitting. Imputation statistics come from the train split only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.impute import SimpleImputer
from sklearn.model_selection import train_test_split

from services.runtime.errors import FailedPrecondition

IMPUTE_STRATEGIES = ("mean", "median", "most_frequent", "drop_rows")


@dataclass
class Prepared:
    train: pd.DataFrame
    test: pd.DataFrame
    rows_in: int
    duplicate_rows_removed: int
    incomplete_rows_removed: int
    missing_values_imputed: int
    class_names: list[str]


def preprocess(
    frame: pd.DataFrame,
    target_column: str,
    task: str,
    impute_strategy: str,
    test_fraction: float,
    seed: int,
) -> Prepared:
    if target_column not in frame.columns:
        raise FailedPrecondition(
            f"dataset has no target column {target_column!r}; pass a dataset written by the loader"
        )
    rows_in = len(frame)
    features = [c for c in frame.columns if c != target_column]

    frame = frame[frame[target_column].notna()]
    incomplete = rows_in - len(frame)
    if impute_strategy == "drop_rows":
        before = len(frame)
        frame = frame.dropna(subset=features)
        incomplete += before - len(frame)
    before = len(frame)
    frame = frame.drop_duplicates().reset_index(drop=True)
    duplicates = before - len(frame)
    if len(frame) < 2:
        raise FailedPrecondition(
            f"only {len(frame)} usable rows remain after removing rows without a target"
            + (" or with missing features" if impute_strategy == "drop_rows" else "")
            + " and duplicates; at least 2 are needed for a split"
        )

    target = frame[target_column]
    class_names: list[str] = []
    if task == "classification":
        classes = np.array(sorted(target.unique(), key=lambda v: (str(type(v)), v)), dtype=object)
        class_names = [str(c) for c in classes]
        codes = {value: index for index, value in enumerate(classes)}
        y = target.map(codes).astype("int64").to_numpy()
        counts = np.bincount(y, minlength=len(classes))
        if len(classes) < 2:
            raise FailedPrecondition("classification needs at least two classes after cleaning")
        rare = [class_names[i] for i, n in enumerate(counts) if n < 2]
        if rare:
            raise FailedPrecondition(
                f"classes {rare} have fewer than 2 rows; a stratified split needs at least 2 per class. "
                "Add data or remove those rows"
            )
        test_rows = int(np.ceil(test_fraction * len(frame)))
        if test_rows < len(classes) or len(frame) - test_rows < len(classes):
            raise FailedPrecondition(
                f"test_fraction={test_fraction} on {len(frame)} rows cannot hold all {len(classes)} "
                "classes in both splits; use a fraction closer to 0.5 or more data"
            )
        stratify = y
    else:
        y = target.to_numpy(dtype="float64")
        stratify = None

    x = frame[features].to_numpy(dtype="float64")
    try:
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=test_fraction, random_state=seed, stratify=stratify
        )
    except ValueError as exc:
        raise FailedPrecondition(f"cannot split the dataset: {exc}") from None

    missing = int(np.isnan(x_train).sum() + np.isnan(x_test).sum())
    if impute_strategy != "drop_rows" and missing:
        # Fit on train only: the test split must not leak into the statistics.
        imputer = SimpleImputer(strategy=impute_strategy, keep_empty_features=True)
        x_train = imputer.fit_transform(x_train)
        x_test = imputer.transform(x_test)

    def as_frame(x_part: np.ndarray, y_part: np.ndarray) -> pd.DataFrame:
        part = pd.DataFrame(x_part, columns=features)
        part[target_column] = y_part
        return part

    return Prepared(
        train=as_frame(x_train, y_train),
        test=as_frame(x_test, y_test),
        rows_in=rows_in,
        duplicate_rows_removed=duplicates,
        incomplete_rows_removed=incomplete,
        missing_values_imputed=missing if impute_strategy != "drop_rows" else 0,
        class_names=class_names,
    )
