"""A data profile: for every column, counts, range or top levels, and a small histogram.

It is computed once, at load time, over the whole table, and stored as a JSON
artifact. The evaluator's report and the Flyte deck of the load task render it
(services/runtime/pages.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from services.loader.schema import ColumnDecision

HISTOGRAM_BINS = 10
TOP_LEVELS = 10
MAX_LEVEL_TEXT = 60


def _level(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_LEVEL_TEXT else text[:MAX_LEVEL_TEXT] + "..."


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _numeric(values: pd.Series) -> dict[str, Any]:
    array = values.to_numpy(dtype="float64", na_value=np.nan)
    finite = array[np.isfinite(array)]
    if finite.size == 0:
        return {}
    low, high = float(finite.min()), float(finite.max())
    with np.errstate(over="ignore", invalid="ignore"):
        entry: dict[str, Any] = {"min": low, "max": high, "mean": _finite(finite.mean()), "std": _finite(finite.std())}
    if np.isfinite(high - low):  # a range wider than float64 has no finite bins
        counts, edges = np.histogram(finite, bins=HISTOGRAM_BINS)
        entry["histogram"] = {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}
    return entry


def _datetime(values: pd.Series) -> dict[str, Any]:
    present = values.dropna()
    if present.empty:
        return {}
    seconds = present.astype("int64").to_numpy() / 1e6  # datetime64[us]
    counts, edges = np.histogram(seconds, bins=HISTOGRAM_BINS)
    as_text = [pd.Timestamp(e * 1e6, unit="us").isoformat() for e in edges]
    return {
        "min": present.min().isoformat(),
        "max": present.max().isoformat(),
        "histogram": {"edges": as_text, "counts": [int(c) for c in counts]},
    }


def _levels(values: pd.Series) -> dict[str, Any]:
    try:
        top = values.dropna().astype("str").value_counts().head(TOP_LEVELS)
    except TypeError:
        return {}
    return {"top": [[_level(level), int(count)] for level, count in top.items()]}


def column_profile(name: str, role: str, values: pd.Series, distinct: int) -> dict[str, Any]:
    missing = int(values.isna().sum())
    entry: dict[str, Any] = {
        "name": name,
        "role": role,
        "count": int(len(values) - missing),
        "missing": missing,
        "distinct": distinct,
    }
    if pd.api.types.is_datetime64_any_dtype(values):
        entry.update(_datetime(values))
    elif pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        entry.update(_numeric(values))
        if role == "numeric" and distinct <= TOP_LEVELS:
            entry.update(_levels(values))
    else:
        entry.update(_levels(values))
    return entry


def profile(
    raw: pd.DataFrame,
    features: pd.DataFrame,
    target: pd.Series,
    target_column: str,
    decisions: list[ColumnDecision],
) -> dict[str, Any]:
    """Profile every column: canonical values for features, the source values for the rest."""
    columns = []
    for decision in decisions:
        values = features[decision.name] if decision.name in features.columns else raw[decision.name]
        entry = column_profile(decision.name, decision.role, values, decision.distinct_values)
        if decision.infinite_values:
            entry["infinite"] = decision.infinite_values
        columns.append(entry)
    target_entry = column_profile(target_column, "target", target, int(target.nunique(dropna=True)))
    return {"rows": len(raw), "target": target_entry, "columns": columns}
