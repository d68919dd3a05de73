"""The fitted feature transformer, compiled for serving: the same numbers, without pandas on the way.

`ColumnTransformer.transform` on a DataFrame of a few rows spends about two
milliseconds in pandas and in input validation, for microseconds of arithmetic;
at serving's request rates that is most of the work. For the branches the
features stage builds (services/features/logic.py), this module computes each
branch's output directly from the request's column arrays:

- numeric: the imputer's fill values, then the scaler's arithmetic, in the
  order scikit-learn applies them (subtract, then divide; multiply, then add);
- categorical (one-hot, target and ordinal encoding, after the "(missing)"
  fill): a table with the branch's output for every level the encoder knows,
  the missing value and an unseen level, made by calling the fitted branch
  itself at load time, so every entry is the branch's own output;
- anything else (datetime parts, missing indicators, polynomial expansion,
  selection): the fitted step itself.

A compiled transformer is used only after it reproduces the fitted one bit for
bit on a validation frame (every level, missing and unseen values, numbers
around each column's statistics, zero, extremes); otherwise serving uses the
fitted transformer as it is, and says so in its log.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from sklearn.preprocessing import MinMaxScaler, RobustScaler, StandardScaler

log = logging.getLogger(__name__)

Columns = dict[str, np.ndarray]
# A value no table holds: what an unseen level looks like to the encoders.
_UNSEEN = "\x00mlmesh: a level never seen"
VALIDATION_ROWS = 512


class NotCompilable(Exception):
    """The transformer has a part this module does not reproduce; serving uses it as it is."""


def _frame(columns: Columns, names: list[str], kinds: dict[str, str]) -> pd.DataFrame:
    """The columns as the frame the fitted transformer takes (text columns as pandas' string dtype)."""
    return pd.DataFrame(
        {name: pd.Series(columns[name], dtype="str") if kinds[name] == "text" else columns[name] for name in names}
    )


def _centre_then_divide(centre: np.ndarray | None, spread: np.ndarray | None) -> Callable[[np.ndarray], np.ndarray]:
    """StandardScaler's and RobustScaler's transform: subtract, then divide, in place, as they do."""

    def scale(x: np.ndarray) -> np.ndarray:
        if centre is not None:
            x -= centre
        if spread is not None:
            x /= spread
        return x

    return scale


def _scale(scaler: Any) -> Callable[[np.ndarray], np.ndarray]:
    if scaler == "passthrough" or scaler is None:
        return lambda x: x
    if type(scaler) is StandardScaler:
        return _centre_then_divide(
            scaler.mean_ if scaler.with_mean else None, scaler.scale_ if scaler.with_std else None
        )
    if type(scaler) is RobustScaler:
        return _centre_then_divide(
            scaler.center_ if scaler.with_centering else None, scaler.scale_ if scaler.with_scaling else None
        )
    if type(scaler) is MinMaxScaler:
        low, high = scaler.feature_range

        def min_max(x: np.ndarray) -> np.ndarray:
            x *= scaler.scale_
            x += scaler.min_
            if scaler.clip:
                np.clip(x, low, high, out=x)
            return x

        return min_max
    raise NotCompilable(f"scaler {type(scaler).__name__}")


def _numeric(branch: Any, names: list[str]) -> Callable[[Columns, int], np.ndarray]:
    steps = dict(getattr(branch, "steps", []))
    imputer = steps.get("impute")
    if imputer is None or getattr(imputer, "add_indicator", True) or set(steps) - {"impute", "scale"}:
        raise NotCompilable("numeric branch with missing indicators or other steps")
    fill = np.asarray(imputer.statistics_, dtype="float64")
    scale = _scale(steps.get("scale", "passthrough"))

    def numeric(columns: Columns, rows: int) -> np.ndarray:
        x = np.empty((rows, len(names)), dtype="float64")
        for position, name in enumerate(names):
            x[:, position] = columns[name]
        missing = np.isnan(x)
        if missing.any():
            x[missing] = np.broadcast_to(fill, x.shape)[missing]
        return scale(x)

    return numeric


def _categorical(branch: Any, names: list[str], width: int) -> Callable[[Columns, int], np.ndarray]:
    """One lookup table per column, made by the fitted branch: row i is its output for level i."""
    encoder = dict(getattr(branch, "steps", [])).get("encode")
    categories = getattr(encoder, "categories_", None)
    if categories is None or len(categories) != len(names):
        raise NotCompilable("categorical branch without the encoder's levels")
    base = {name: str(levels[0]) for name, levels in zip(names, categories, strict=True)}
    owner = np.full(width, -1)
    tables: list[tuple[pd.Index, np.ndarray, np.ndarray]] = []
    for position, (name, levels) in enumerate(zip(names, categories, strict=True)):
        known = [str(level) for level in levels]
        values = np.asarray([*known, np.nan, _UNSEEN], dtype=object)
        frame = pd.DataFrame(
            {
                other: pd.Series(
                    values if other == name else np.full(len(values), base[other], dtype=object), dtype="str"
                )
                for other in names
            }
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)  # the unseen row
            output = np.asarray(branch.transform(frame), dtype="float64")
        varies = np.flatnonzero((output != output[0]).any(axis=0))
        if (owner[varies] >= 0).any():
            raise NotCompilable("an output column depends on two input columns")
        owner[varies] = position
        tables.append((pd.Index(known), varies, output))
    constant_row = tables[0][2][0] if tables else np.zeros(width)
    missing_at, unseen_at = -2, -1  # the table rows after the known levels

    def categorical(columns: Columns, rows: int) -> np.ndarray:
        out = np.empty((rows, width), dtype="float64")
        out[:] = constant_row  # the columns no level moves
        for name, (index, varies, table) in zip(names, tables, strict=True):
            values = columns[name]
            codes = index.get_indexer(pd.Index(values, dtype=object))
            codes[codes < 0] = len(table) + unseen_at
            codes[pd.isna(values)] = len(table) + missing_at
            out[:, varies] = table[codes][:, varies]
        return out

    return categorical


def _fitted(branch: Any, names: list[str], kinds: dict[str, str]) -> Callable[[Columns, int], np.ndarray]:
    def fitted(columns: Columns, rows: int) -> np.ndarray:
        return np.asarray(branch.transform(_frame(columns, names, kinds)), dtype="float64")

    return fitted


class CompiledTransformer:
    """transform(columns, rows) -> the matrix the fitted transformer gives for the same rows."""

    def __init__(self, transformer: Any, kinds: dict[str, str]):
        steps = getattr(transformer, "steps", None)
        if not steps or steps[0][0] != "columns":
            raise NotCompilable("not the features stage's pipeline")
        columns = steps[0][1]
        self.after = [step for _, step in steps[1:]]  # polynomial expansion, rescaling, selection: as fitted
        slices = columns.output_indices_
        self.width = sum(s.stop - s.start for s in slices.values())
        self.branches: list[tuple[slice, Callable[[Columns, int], np.ndarray]]] = []
        for name, branch, names in columns.transformers_:
            if branch == "drop" or name == "remainder" or slices[name].stop == slices[name].start:
                continue
            names = [str(n) for n in names]
            width = slices[name].stop - slices[name].start
            if name == "numeric":
                compute = _numeric(branch, names)
            elif name in ("one_hot", "target", "ordinal"):
                compute = _categorical(branch, names, width)
            else:
                compute = _fitted(branch, names, kinds)
            self.branches.append((slices[name], compute))

    def transform(self, columns: Columns, rows: int) -> np.ndarray:
        out = np.empty((rows, self.width), dtype="float64")
        for where, compute in self.branches:
            out[:, where] = compute(columns, rows)
        for step in self.after:
            out = step.transform(out)
        return np.ascontiguousarray(out, dtype="float64")


def _validation_columns(transformer: Any, kinds: dict[str, str], levels: dict[str, list[str]]) -> tuple[Columns, int]:
    """Rows that visit every level, missing and unseen values, and numbers around each column's statistics."""
    rng = np.random.default_rng(0)
    longest = max((len(known) for known in levels.values()), default=0)
    rows = min(VALIDATION_ROWS, max(64, longest + 8))
    columns: Columns = {}
    for name, kind in kinds.items():
        if kind == "number":
            special = np.asarray([np.nan, 0.0, 1.0, -1.0, 0.5, 1e6, -1e6, 3.0e-5, 2.0, 7.25])
            spread = rng.normal(0, 1e3, rows) * rng.choice([1e-3, 1.0, 10.0], rows)
            columns[name] = np.concatenate([special, spread])[:rows]
        elif kind == "time":
            seconds = rng.integers(0, 2_000_000_000, rows).astype("datetime64[s]").astype("datetime64[us]")
            seconds[::9] = np.datetime64("NaT")
            columns[name] = seconds
        else:
            known = levels.get(name, [])
            cycle = np.asarray([*known, np.nan, _UNSEEN], dtype=object)
            columns[name] = cycle[np.arange(rows) % len(cycle)]
    return columns, rows


def compile_transformer(
    transformer: Any, kinds: dict[str, str], levels: dict[str, list[str]]
) -> CompiledTransformer | None:
    """The compiled transformer if it matches the fitted one bit for bit on a validation frame, else None.

    kinds: each input column's kind ("number", "text" or "time"); levels: each text column's known levels."""
    try:
        compiled = CompiledTransformer(transformer, kinds)
        columns, rows = _validation_columns(transformer, kinds, levels)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            expected = np.ascontiguousarray(transformer.transform(_frame(columns, list(kinds), kinds)), dtype="float64")
            got = compiled.transform(columns, rows)
    except NotCompilable as reason:
        log.info("serving uses the fitted transformer as it is: %s", reason)
        return None
    except Exception as exc:  # noqa: BLE001 - any surprise means: use the fitted transformer
        log.warning("the transformer could not be compiled (%s); serving uses it as it is", type(exc).__name__)
        return None
    if expected.shape != got.shape or not np.array_equal(expected, got, equal_nan=True):
        log.warning("the compiled transformer differs from the fitted one; serving uses the fitted one")
        return None
    return compiled
