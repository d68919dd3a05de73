"""The transformer serving compiles (services/serving/compiled.py) gives the fitted one's numbers, bit for bit.

Every configuration the features stage can fit is compiled and compared with the fitted
transformer on frames it never saw: known, missing and unseen levels, numbers far from the
training range, missing dates. Where compiling is refused (missing indicators), serving
falls back to the fitted transformer, and says so.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
import pytest

from services.features import logic
from services.serving.compiled import compile_transformer

ROWS = 300


def table(seed: int, rows: int = ROWS) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "amount": rng.normal(100, 30, rows),
            "count": rng.integers(0, 9, rows).astype("float64"),
            "flag": rng.choice([0.0, 1.0], rows),
            "colour": pd.Series(
                rng.choice(["red", "green", "blue", "teal", "rare"], rows, p=[0.4, 0.3, 0.2, 0.09, 0.01]), dtype="str"
            ),
            "city": pd.Series([f"city{i}" for i in rng.integers(0, 60, rows)], dtype="str"),
            "seen": (pd.Timestamp("2022-01-01") + pd.to_timedelta(rng.integers(0, 700, rows), unit="D")).astype(
                "datetime64[us]"
            ),
        }
    )
    frame.loc[rng.choice(rows, 20), "amount"] = np.nan
    frame.loc[rng.choice(rows, 15), "colour"] = np.nan
    frame.loc[rng.choice(rows, 5), "seen"] = pd.NaT
    frame["y"] = (frame["count"] + (frame["colour"] == "red") * 3 + rng.normal(0, 1, rows) > 5).astype("int64")
    return frame


ROLES = {
    "amount": "numeric",
    "count": "numeric",
    "flag": "boolean",
    "colour": "categorical",
    "city": "categorical",
    "seen": "datetime",
}
KINDS = {"amount": "number", "count": "number", "flag": "number", "colour": "text", "city": "text", "seen": "time"}


def fit(task: str = "classification", **options: object) -> logic.Engineered:
    train, test = table(0), table(1, 80)
    if task == "regression":
        train, test = train.assign(y=train["amount"].fillna(0) * 2.0), test.assign(y=test["amount"].fillna(0) * 2.0)
    names = ["0", "1"] if task == "classification" else []
    return logic.engineer(train, test, "y", task, ROLES, names, logic.FeatureOptions(**options), 2**34)


def unseen_frame() -> pd.DataFrame:
    """New rows: levels never seen, missing everywhere, numbers far outside training."""
    frame = table(7, 120).drop(columns=["y"])
    frame.loc[::5, "colour"] = "purple"
    frame.loc[::7, "city"] = "atlantis"
    frame.loc[::3, "amount"] = 1e9
    frame.loc[::11, ["amount", "count", "flag"]] = np.nan
    frame.loc[::13, "city"] = np.nan
    return frame


def columns_of(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    return {
        name: frame[name].to_numpy(dtype=object, na_value=np.nan) if KINDS[name] == "text" else frame[name].to_numpy()
        for name in KINDS
    }


CONFIGURATIONS = [
    pytest.param({}, id="defaults"),
    pytest.param({"scaling": "minmax"}, id="minmax"),
    pytest.param({"scaling": "robust"}, id="robust"),
    pytest.param({"scaling": "none"}, id="no-scaling"),
    pytest.param({"categorical_encoding": "one_hot", "min_level_count": 1}, id="one-hot-every-level"),
    pytest.param({"categorical_encoding": "target"}, id="target"),
    pytest.param({"categorical_encoding": "ordinal"}, id="ordinal"),
    pytest.param({"max_one_hot_levels": 3}, id="few-one-hot-levels"),
    pytest.param({"imputation": "mean", "polynomial_degree": 2, "categorical_encoding": "one_hot"}, id="polynomial"),
    pytest.param({"select_k_best": 5}, id="select"),
]


@pytest.mark.parametrize("options", CONFIGURATIONS)
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_the_compiled_transformer_gives_the_fitted_numbers(options: dict, task: str) -> None:
    fitted = fit(task, **options).transformer
    levels = {
        name: sorted(str(level) for level in known)
        for name, known in zip(["colour", "city"], _encoder_categories(fitted), strict=False)
    }
    compiled = compile_transformer(fitted, KINDS, levels)
    assert compiled is not None, "this configuration should compile"
    frame = unseen_frame()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        expected = fitted.transform(frame)
    got = compiled.transform(columns_of(frame), len(frame))
    assert got.shape == expected.shape and np.array_equal(got, expected)


def _encoder_categories(fitted) -> list:
    columns = fitted.named_steps["columns"]
    found = {}
    for _, branch, names in columns.transformers_:
        encoder = getattr(branch, "named_steps", {}).get("encode") if hasattr(branch, "named_steps") else None
        for name, known in zip(names, getattr(encoder, "categories_", []) or [], strict=False):
            found[name] = known
    return [found.get("colour", []), found.get("city", [])]


def test_missing_indicators_are_not_compiled_and_serving_says_it_uses_the_fitted_transformer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fitted = fit(missing_indicators=True).transformer
    with caplog.at_level(logging.INFO, logger="services.serving.compiled"):
        assert compile_transformer(fitted, KINDS, {}) is None
    assert "serving uses the fitted transformer as it is: numeric branch with missing indicators" in caplog.text
