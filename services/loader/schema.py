"""What each column of a user's table is for, and what kind of task its target poses.

Every column gets one role (see services/runtime/roles.py). The rules look at
values, not at the file format, so the same table read from CSV (where
everything starts as text) and from Parquet (typed) gets the same roles:

- a column with at most one distinct value is `constant`;
- booleans, and text that is only true/false, are `boolean`;
- numbers, and text that is only numbers, are `numeric`, unless they are whole
  numbers that are all distinct and look like a key (an id-like name, or a
  consecutive run): then `identifier`;
- datetimes, and text that is only ISO 8601 dates or times, are `datetime`;
- text where every value is distinct is an `identifier`; text where most values
  are distinct is free `text`; other text, and pandas categories, are `categorical`;
- anything else (lists, bytes, ...) is ignored, with the reason.

Each feature column is converted to one canonical type: float64 for numeric and
boolean (0/1), str for categorical, datetime64[us] (UTC, naive) for datetime.
Infinite numbers become missing values and are counted.
"""

from __future__ import annotations

import datetime as dt
import decimal
import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from services.runtime.errors import FailedPrecondition, InvalidArgument
from services.runtime.roles import FALSE_SPELLINGS, FEATURE_ROLES, ISO_DATE, TRUE_SPELLINGS
from services.runtime.vocabulary import TaskKind

# A whole-number target is taken as class labels only with at most this many
# distinct values, each held by at least MIN_ROWS_PER_INFERRED_CLASS rows.
# Counts and totals have long thin tails, so they fail the second test.
MAX_INFERRED_CLASSES = 20
MIN_ROWS_PER_INFERRED_CLASS = 10

# Text columns: below this many values no column is called an identifier or free text.
MIN_ROWS_FOR_CARDINALITY_RULES = 20
# Text with more distinct values than this share of its rows is free text, not levels.
TEXT_DISTINCT_RATIO = 0.5

_ID_NAME = re.compile(r"(^|[^a-z])(id|ids|key|uuid|guid|index)$|^unnamed: ?0$|^row_?(id|number|num|no)$", re.IGNORECASE)
_ISO_DATE = ISO_DATE
# Whole numbers written with leading zeros are codes (zip codes, "007"), not quantities.
_ZERO_PADDED = re.compile(r"^\s*-?0\d")
_TRUE = set(TRUE_SPELLINGS)
_FALSE = set(FALSE_SPELLINGS)
# Text read as boolean without being asked: only the unambiguous spellings.
_INFERRED_BOOLEAN = {"true", "false"}
MAX_REASON_NAME = 60


def shown(name: str) -> str:
    """A column name as it appears in messages: quoted and bounded."""
    return repr(name if len(name) <= MAX_REASON_NAME else name[:MAX_REASON_NAME] + "...")


@dataclass
class ColumnDecision:
    name: str
    role: str
    reason: str
    overridden: bool
    source_dtype: str
    missing_ratio: float
    distinct_values: int
    infinite_values: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TaskDecision:
    kind: str
    reason: str
    overridden: bool


# ---- what a raw column holds -------------------------------------------------------------
def _is_text(series: pd.Series) -> bool:
    return pd.api.types.is_string_dtype(series) or pd.api.types.is_object_dtype(series)


def _object_kind(values: pd.Series) -> str:
    """For an object column: 'boolean', 'date', 'decimal', 'text' or 'other', by its non-missing values."""
    if values.empty:
        return "text"
    types = {type(v) for v in values}
    if types <= {bool, np.bool_}:
        return "boolean"
    if all(issubclass(t, (dt.date, pd.Timestamp, np.datetime64)) for t in types):
        return "date"
    if all(issubclass(t, (decimal.Decimal, int, float, np.number)) and not issubclass(t, bool) for t in types):
        return "decimal"
    if all(issubclass(t, (str, int, float, np.number)) for t in types):
        return "text"
    return "other"


def _text_as_numbers(text: pd.Series) -> pd.Series | None:
    numbers = pd.to_numeric(text, errors="coerce")
    return numbers.astype("float64") if numbers.notna().sum() == text.notna().sum() else None


def _text_as_datetimes(text: pd.Series) -> pd.Series | None:
    present = text.dropna()
    if present.empty:
        return None
    sample = present.iloc[:: max(1, len(present) // 1000)].astype(str)
    if not sample.str.match(_ISO_DATE).all():
        return None
    parsed = pd.to_datetime(text, format="ISO8601", errors="coerce", utc=True)
    if parsed.notna().sum() != len(present):
        return None
    return _naive_utc(parsed)


def _naive_utc(values: pd.Series) -> pd.Series:
    if getattr(values.dt, "tz", None) is not None:
        values = values.dt.tz_convert("UTC").dt.tz_localize(None)
    return values.astype("datetime64[us]")


def _text_as_booleans(text: pd.Series, spellings: set[str]) -> pd.Series | None:
    lowered = text.dropna().astype(str).str.strip().str.lower()
    if lowered.empty or not set(lowered.unique()) <= spellings:
        return None
    mapped = (
        text.astype("str").str.strip().str.lower().map(lambda v: 1.0 if v in _TRUE else 0.0 if v in _FALSE else np.nan)
    )
    return mapped.astype("float64")


def _as_text(series: pd.Series) -> pd.Series:
    """Canonical categorical values: str, whole numbers without '.0', missing stays missing."""
    if pd.api.types.is_float_dtype(series):
        finite = series.where(np.isfinite(series))
        integral = finite.dropna()
        if len(integral) and bool(np.all(np.mod(integral, 1) == 0)):
            return finite.astype("Int64").astype("str")
        return finite.astype("str")
    if pd.api.types.is_datetime64_any_dtype(series):
        return _naive_utc(series).dt.strftime("%Y-%m-%dT%H:%M:%S").astype("str")
    if isinstance(series.dtype, pd.CategoricalDtype):
        series = series.astype(object)
    return series.astype("str")


def _distinct_count(values: pd.Series) -> int:
    """How many distinct present values a column holds, exactly.

    Numbers are sorted and counted where neighbours differ: a hash table of ten
    million distinct floats spends its time in cache misses (2.9 s against 0.75 s
    for a sort at 10M rows, 34 times the time at 1M rather than 13). Equality is
    the same as nunique's: -0.0 equals 0.0, and NaN is not a value.
    """
    if values.dtype == np.float64:
        present = values.to_numpy()
        present = np.sort(present[~np.isnan(present)])
        return int(np.count_nonzero(present[1:] != present[:-1]) + 1) if present.size else 0
    try:
        return int(values.nunique(dropna=True))
    except TypeError:  # unhashable values (lists, dicts)
        return 0


def _looks_like_key(name: str, numbers: pd.Series) -> bool:
    """Whole numbers, all distinct, named like a key or forming a consecutive run."""
    present = numbers.dropna()
    if len(present) < MIN_ROWS_FOR_CARDINALITY_RULES or not bool(np.all(np.mod(present, 1) == 0)):
        return False
    if _distinct_count(present) != len(present):
        return False
    consecutive = float(present.max() - present.min()) == len(present) - 1
    return bool(_ID_NAME.search(name.strip())) or consecutive


# ---- one column -------------------------------------------------------------------------
def _canonical(name: str, raw: pd.Series) -> tuple[str, pd.Series | None, str]:
    """The natural kind of a raw column, its canonical values, and a reason if it cannot be used.

    Kinds: numeric, boolean, datetime, categorical (pandas category), text, unusable.
    """
    if pd.api.types.is_bool_dtype(raw):
        return "boolean", raw.astype("float64"), ""
    if isinstance(raw.dtype, pd.CategoricalDtype):
        return "categorical", _as_text(raw), ""
    if pd.api.types.is_numeric_dtype(raw):
        return "numeric", raw.astype("float64"), ""
    if pd.api.types.is_datetime64_any_dtype(raw):
        return "datetime", _naive_utc(raw), ""
    if pd.api.types.is_timedelta64_dtype(raw):
        return "numeric", raw.dt.total_seconds().astype("float64"), ""
    if _is_text(raw):
        kind = _object_kind(raw.dropna()) if pd.api.types.is_object_dtype(raw) else "text"
        if kind == "boolean":
            return "boolean", raw.map(lambda v: np.nan if pd.isna(v) else float(bool(v))).astype("float64"), ""
        if kind == "date":
            return "datetime", _naive_utc(pd.to_datetime(raw, errors="coerce", utc=True)), ""
        if kind == "decimal":
            return "numeric", pd.to_numeric(raw, errors="coerce").astype("float64"), ""
        if kind == "other":
            return "unusable", None, "its values are not numbers, text or dates"
        # Text is whatever it can be read as, in this order (a CSV holds only text).
        text = raw.astype("str")
        readings = (
            ("numeric", _text_as_numbers),
            ("boolean", lambda t: _text_as_booleans(t, _INFERRED_BOOLEAN)),
            ("datetime", _text_as_datetimes),
        )
        for kind, read in readings:
            converted = read(text)
            if converted is not None:
                return kind, converted, ""
        return "text", text, ""
    return "unusable", None, f"its type {raw.dtype} cannot be used as a feature"


def _infer_role(name: str, kind: str, values: pd.Series | None, distinct: int, present: int) -> tuple[str, str]:
    if kind == "unusable":
        return "ignore", ""
    if distinct <= 1:
        return "constant", "it has no values" if present == 0 else "it holds a single value"
    if kind == "boolean":
        return "boolean", "it holds two values (true/false)"
    if kind == "datetime":
        return "datetime", "it holds dates or times"
    if kind == "categorical":
        return "categorical", f"a categorical column with {distinct} levels"
    if kind == "numeric":
        assert values is not None, "only an unusable column has no canonical values"
        if _looks_like_key(name, values):
            return "identifier", "whole numbers, every one distinct, that look like a row key"
        return "numeric", "it holds numbers"
    # text
    if present >= MIN_ROWS_FOR_CARDINALITY_RULES:
        if distinct == present:
            return "identifier", f"every one of its {present} values is distinct"
        if _ID_NAME.search(name.strip()) and distinct > TEXT_DISTINCT_RATIO * present:
            return "identifier", f"named like a key, with {distinct} distinct values in {present} rows"
        if distinct > TEXT_DISTINCT_RATIO * present:
            return "text", (
                f"free text: {distinct} distinct values in {present} rows; declare it categorical to encode it anyway"
            )
    return "categorical", f"text with {distinct} levels"


def _convert_for_role(name: str, role: str, kind: str, raw: pd.Series, values: pd.Series) -> pd.Series:
    """Canonical values for a role the caller chose; refuses what cannot be converted."""
    if role == "categorical":
        finite_numbers = kind == "numeric" and values.notna().sum() == raw.notna().sum()
        if _is_text(raw) and finite_numbers and not raw.dropna().astype("str").str.match(_ZERO_PADDED).any():
            # Numbers that arrived as text ("1.0" from a CSV) are written like numbers from
            # Parquet ("1"), so both formats give the same levels.
            return _as_text(values)
        # Other text keeps its spelling (a zip code "02134"); numbers and datetimes are written out.
        return _as_text(raw if _is_text(raw) or kind == "boolean" else values)
    if role == "numeric":
        if kind in ("numeric", "boolean"):
            return values
        numbers = pd.to_numeric(raw, errors="coerce") if _is_text(raw) else None
        bad = raw.notna().sum() - (numbers.notna().sum() if numbers is not None else 0)
        if numbers is None or bad:
            raise FailedPrecondition(
                f"column {shown(name)} was declared numeric, but {bad} of its values are not numbers; "
                "declare it categorical or fix the values"
            )
        return numbers.astype("float64")
    if role == "boolean":
        if kind == "boolean":
            return values
        converted = None
        if kind == "numeric" and set(values.dropna().unique()) <= {0.0, 1.0}:
            converted = values
        elif _is_text(raw):
            converted = _text_as_booleans(raw.astype("str"), _TRUE | _FALSE)
        if converted is None:
            raise FailedPrecondition(
                f"column {shown(name)} was declared boolean, but its values are not all true/false, yes/no or 0/1; "
                "declare it categorical instead"
            )
        return converted
    if role == "datetime":
        if kind == "datetime":
            return values
        converted = _text_as_datetimes(raw.astype("str")) if _is_text(raw) else None
        if converted is None:
            raise FailedPrecondition(
                f"column {shown(name)} was declared datetime, but its values are not all ISO 8601 dates "
                "or times (2024-05-31, 2024-05-31T12:00:00Z)"
            )
        return converted
    raise AssertionError(f"not a feature role: {role}")


def decide_columns(
    frame: pd.DataFrame, target_column: str, overrides: dict[str, str]
) -> tuple[pd.DataFrame, list[ColumnDecision], list[str]]:
    """Roles for every column but the target; the feature columns in canonical types; warnings."""
    unknown = sorted(set(overrides) - set(frame.columns))
    if unknown:
        raise InvalidArgument(
            f"column_roles names {len(unknown)} column(s) the dataset does not have, e.g. {shown(unknown[0])}; "
            f"its columns are: {column_list(frame.columns)}"
        )
    if target_column in overrides:
        raise InvalidArgument(
            f"column_roles sets a role for the target column {shown(target_column)}; "
            "the target is chosen with target_column and its kind with task_kind"
        )
    rows = len(frame)
    features: dict[str, pd.Series] = {}
    decisions: list[ColumnDecision] = []
    warnings: list[str] = []
    for name in frame.columns:
        if name == target_column:
            continue
        raw = frame[name]
        kind, values, unusable = _canonical(name, raw)
        infinite = 0
        if values is not None and kind == "numeric":
            infinite = int(np.isinf(values.to_numpy()).sum())
            if infinite:
                values = values.where(np.isfinite(values))
        basis = values if values is not None else raw
        missing = int(basis.isna().sum())
        distinct = _distinct_count(basis)
        present = rows - missing
        if name in overrides:
            role, reason, overridden = overrides[name], "set by the caller", True
            if role in FEATURE_ROLES:
                if kind == "unusable":
                    raise FailedPrecondition(f"column {shown(name)} cannot be used as {role}: {unusable}")
                assert values is not None, "only an unusable column has no canonical values"
                values = _convert_for_role(name, role, kind, raw, values)
        else:
            role, reason = _infer_role(name, kind, values, distinct, present)
            reason, overridden = reason or unusable, False
        if role in FEATURE_ROLES:
            assert values is not None, "an unusable column, the one without canonical values, gets no feature role"
            features[name] = values
            # Also when declared categorical or boolean, unless the text "inf" was kept as a level.
            if infinite and int(values.isna().sum()) > int(raw.isna().sum()):
                warnings.append(f"column {shown(name)}: {infinite} infinite value(s) treated as missing")
        decisions.append(
            ColumnDecision(
                name=name,
                role=role,
                reason=reason,
                overridden=overridden,
                source_dtype=str(raw.dtype),
                missing_ratio=round(missing / rows, 6) if rows else 0.0,
                distinct_values=distinct,
                infinite_values=infinite,
            )
        )
    return pd.DataFrame(features, index=frame.index), decisions, warnings


def column_list(columns: Any, limit: int = 20) -> str:
    names = [shown(str(c)) for c in list(columns)[:limit]]
    more = len(columns) - limit
    return ", ".join(names) + (f" and {more} more" if more > 0 else "")


# ---- the target ---------------------------------------------------------------------------
def decide_task(target: pd.Series, name: str) -> TaskDecision:
    """Infer the task from the target's values; the reason says how to override it."""
    present = target.dropna()
    how = "pass task_kind (--task regression) to train a regression instead"
    if pd.api.types.is_bool_dtype(target) or isinstance(target.dtype, pd.CategoricalDtype):
        return TaskDecision(TaskKind.CLASSIFICATION, f"target {shown(name)} holds labels", False)
    numbers = present.astype("float64") if pd.api.types.is_numeric_dtype(target) else _text_as_numbers(present)
    if numbers is None:
        return TaskDecision(TaskKind.CLASSIFICATION, f"target {shown(name)} holds text labels; {how}", False)
    numbers = numbers[np.isfinite(numbers)]
    if numbers.empty:
        raise FailedPrecondition(f"target column {shown(name)} has no finite values")
    if not bool(np.all(np.mod(numbers, 1) == 0)):
        return TaskDecision(TaskKind.REGRESSION, f"target {shown(name)} holds fractional numbers", False)
    counts = numbers.value_counts()
    as_classes = "pass task_kind (--task classification) if they are class labels"
    if len(counts) == 2:
        return TaskDecision(TaskKind.CLASSIFICATION, f"target {shown(name)} holds two distinct values; {how}", False)
    if len(counts) > MAX_INFERRED_CLASSES:
        return TaskDecision(
            TaskKind.REGRESSION,
            f"target {shown(name)} holds {len(counts)} distinct whole numbers, "
            f"more than {MAX_INFERRED_CLASSES} classes; {as_classes}",
            False,
        )
    if int(counts.min()) < MIN_ROWS_PER_INFERRED_CLASS:
        return TaskDecision(
            TaskKind.REGRESSION,
            f"target {shown(name)} holds {len(counts)} distinct whole numbers and some have fewer "
            f"than {MIN_ROWS_PER_INFERRED_CLASS} rows, like a count; {as_classes}",
            False,
        )
    return TaskDecision(
        TaskKind.CLASSIFICATION,
        f"target {shown(name)} holds {len(counts)} distinct whole numbers, each with at least "
        f"{MIN_ROWS_PER_INFERRED_CLASS} rows; {how}",
        False,
    )


def canonical_target(target: pd.Series, name: str, task: str) -> pd.Series:
    """float64 for regression (infinite values stay, preprocess drops them as invalid);
    labels for classification: whole numbers as Int64 so classes sort 1, 2, 10 and read "1", else text."""
    if task == TaskKind.REGRESSION:
        if pd.api.types.is_bool_dtype(target) or isinstance(target.dtype, pd.CategoricalDtype):
            raise FailedPrecondition(f"regression needs a numeric target, but {shown(name)} holds labels")
        numbers = target.astype("float64") if pd.api.types.is_numeric_dtype(target) else _text_as_numbers(target)
        if numbers is None:
            raise FailedPrecondition(
                f"regression needs a numeric target, but {shown(name)} holds text; "
                "choose classification or another target"
            )
        return numbers
    if pd.api.types.is_numeric_dtype(target) and not pd.api.types.is_bool_dtype(target):
        numbers = target.astype("float64")
        finite = numbers[np.isfinite(numbers)]
        if bool(np.all(np.mod(finite, 1) == 0)):
            return numbers.where(np.isfinite(numbers)).astype("Int64")
        return numbers.where(np.isfinite(numbers))
    return _as_text(target)
