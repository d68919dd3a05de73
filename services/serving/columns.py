"""What a served model takes, column by column, and how a request's values become its rows.

Training canonicalised each feature column by its role (services/loader/schema.py):
float64 for numeric and boolean (1/0), text for categorical, naive UTC
datetime64[us] for datetime; missing stays missing, and an infinite number is
missing. A served row goes through exactly that, one value at a time, so a
value never reads differently because of the rows it arrived with:

    numeric      any numeric datatype -> float64; NaN is missing; +-inf is missing
    boolean      BOOL, 0/1 numbers, or BYTES true/false, t/f, yes/no, y/n, 1/0 -> 1.0/0.0; "" is missing
    categorical  BYTES (UTF-8) as is, or numbers written like the loader writes them
                 (3.0 -> "3"); "" is missing. A level the fitted encoder never saw is
                 refused unless the request allows it (parameter unseen_levels=encode)
    datetime     BYTES ISO 8601 (2024-05-31, 2024-05-31T12:00:00Z) -> naive UTC; "" is missing

The other columns of the training table (the target, identifiers, free text,
constant and ignored columns) are accepted and left out, as training left them
out, so a caller may send whole rows of the table. A name the table never had is refused.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from services.runtime.errors import InvalidArgument
from services.runtime.roles import FALSE_SPELLINGS, ISO_DATE, TRUE_SPELLINGS
from services.serving.tensors import NUMERIC_DTYPES, Column, shown

MISSING_TEXT = ""
# What ModelMetadata advertises for each role (numeric follows the column's type in the table).
ROLE_DATATYPE = {"boolean": "BOOL", "categorical": "BYTES", "datetime": "BYTES"}
# Values quoted in a refusal: a few, each cut short.
SHOWN_VALUES = 3
SHOWN_VALUE_CHARACTERS = 40
UNSEEN_POLICIES = ("reject", "encode")


@dataclass(frozen=True)
class InputColumn:
    """One column the model takes."""

    name: str
    role: str  # numeric, boolean, categorical or datetime
    datatype: str  # what ModelMetadata lists; other compatible datatypes are accepted too
    # categorical: every level the fitted encoder knows (None: it keeps no list, so none is refused)
    levels: frozenset[str] | None = None


def advertised_datatype(role: str, source_dtype: str) -> str:
    if role == "numeric":
        return "INT64" if source_dtype.lower().startswith(("int", "uint")) else "FP64"
    return ROLE_DATATYPE[role]


def encoder_levels(transformer: Any) -> dict[str, frozenset[str]]:
    """The levels each categorical column's fitted encoder learned, by column name."""
    levels: dict[str, frozenset[str]] = {}
    columns = getattr(transformer, "named_steps", {}).get("columns")
    for _, branch, names in getattr(columns, "transformers_", []):
        encoder = getattr(branch, "named_steps", {}).get("encode")
        categories = getattr(encoder, "categories_", None)
        if categories is None:
            continue
        for name, known in zip(names, categories, strict=True):
            levels[str(name)] = frozenset(str(level) for level in known)
    return levels


def _value_text(value: Any) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return repr(text if len(text) <= SHOWN_VALUE_CHARACTERS else text[:SHOWN_VALUE_CHARACTERS] + "...")


def _refuse(column: InputColumn, rows: np.ndarray, values: np.ndarray, problem: str, fix: str) -> InvalidArgument:
    examples = ", ".join(f"row {int(row)}: {_value_text(values[row])}" for row in rows[:SHOWN_VALUES])
    more = f" and {len(rows) - SHOWN_VALUES} more" if len(rows) > SHOWN_VALUES else ""
    return InvalidArgument(f"column {shown(column.name)}: {len(rows)} value(s) {problem} ({examples}{more}); {fix}")


def _decode_text(column: InputColumn, values: np.ndarray) -> np.ndarray:
    texts = np.empty(len(values), dtype=object)
    bad = []
    for index, value in enumerate(values):
        try:
            texts[index] = value.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(index)
    if bad:
        raise _refuse(column, np.asarray(bad), values, "are not UTF-8", "send text as UTF-8 bytes")
    return texts


def _numbers(column: InputColumn, given: Column) -> np.ndarray:
    if given.datatype == "BYTES":
        raise InvalidArgument(
            f"column {shown(column.name)} is numeric: send it as {column.datatype} (or another number type), not BYTES"
        )
    numbers = given.values.astype("float64")  # always a new array: the request's buffer stays read-only
    infinite = np.isinf(numbers)
    if infinite.any():
        numbers[infinite] = np.nan
    return numbers


def _booleans(column: InputColumn, given: Column) -> np.ndarray:
    if given.datatype != "BYTES":
        numbers = given.values.astype("float64")
        wrong = np.flatnonzero(~np.isnan(numbers) & (numbers != 0.0) & (numbers != 1.0))
        if wrong.size:
            raise _refuse(column, wrong, given.values, "are not 0 or 1", "send BOOL, 0/1, or true/false text")
        return numbers
    texts = _decode_text(column, given.values)
    out = np.empty(len(texts), dtype="float64")
    bad = []
    for index, text in enumerate(texts):
        word = text.strip().lower()
        if word == MISSING_TEXT:
            out[index] = np.nan
        elif word in TRUE_SPELLINGS:
            out[index] = 1.0
        elif word in FALSE_SPELLINGS:
            out[index] = 0.0
        else:
            bad.append(index)
    if bad:
        raise _refuse(column, np.asarray(bad), given.values, "are not booleans", "send true/false, yes/no or 1/0")
    return out


def _number_spellings(number: float) -> tuple[str, ...]:
    """How the loader may have written a number as a level: whole numbers without '.0', or with."""
    if not math.isfinite(number):
        return ()
    if number == int(number):
        return (str(int(number)), str(number))
    return (str(number),)


def _levels(column: InputColumn, given: Column, unseen: str) -> np.ndarray:
    out = np.empty(len(given.values), dtype=object)
    known = column.levels
    unknown = []
    if given.datatype == "BYTES":
        texts = _decode_text(column, given.values)
    else:
        texts = given.values.astype("float64") if given.datatype != "BOOL" else given.values.astype("int64")
    for index, value in enumerate(texts):
        if isinstance(value, str):
            if value == MISSING_TEXT:
                out[index] = np.nan
                continue
            candidates: tuple[str, ...] = (value,)
            if known is not None and value not in known:
                with contextlib.suppress(ValueError):
                    candidates = (value, *_number_spellings(float(value)))
        else:
            if isinstance(value, float) and math.isnan(value):
                out[index] = np.nan
                continue
            candidates = _number_spellings(float(value))
            if not candidates:
                out[index] = np.nan  # an infinite number is missing, as in training
                continue
        chosen = next((c for c in candidates if known is None or c in known), None)
        if chosen is None:
            unknown.append(index)
            chosen = candidates[0]
        out[index] = chosen
    if unknown and unseen == "reject":
        raise _refuse(
            column,
            np.asarray(unknown),
            np.asarray([out[i] for i in range(len(out))], dtype=object),
            "are levels the model never saw in training",
            "send a known level (ModelMetadata's inputs; the report's profile lists them), an empty value for "
            "missing, or set the request parameter unseen_levels=encode to encode them as the encoder does",
        )
    return out


def _datetimes(column: InputColumn, given: Column) -> pd.Series:
    if given.datatype != "BYTES":
        raise InvalidArgument(f"column {shown(column.name)} is a datetime: send ISO 8601 text as BYTES")
    texts = _decode_text(column, given.values)
    present = np.asarray([text != MISSING_TEXT for text in texts], dtype=bool)
    bad: list[int] = [index for index, text in enumerate(texts) if present[index] and not ISO_DATE.match(text)]
    parsed = pd.Series(pd.NaT, index=pd.RangeIndex(len(texts)), dtype="datetime64[us, UTC]")
    if not bad:
        # Each value alone, as the loader read text dates: ISO 8601, converted to UTC.
        text_values: Any = pd.Series([text if text else None for text in texts], dtype="object")
        parsed = pd.to_datetime(text_values, format="ISO8601", errors="coerce", utc=True)
        bad = [int(i) for i in np.flatnonzero(present & parsed.isna().to_numpy())]
    if bad:
        raise _refuse(
            column,
            np.asarray(bad),
            given.values,
            "are not ISO 8601 dates or times",
            "send values like 2024-05-31 or 2024-05-31T12:00:00Z, or an empty value for missing",
        )
    return parsed.dt.tz_convert("UTC").dt.tz_localize(None).astype("datetime64[us]")


Rows = dict[str, np.ndarray]  # one request's columns, read: the values training had, by column name


def read_rows(
    inputs: list[InputColumn], other_columns: frozenset[str], given: list[Column], rows: int, unseen: str
) -> Rows:
    """The request's columns, each read as training read it (InvalidArgument names what cannot be)."""
    by_name = {column.name: column for column in given}
    expected = {column.name for column in inputs}
    extra = [name for name in by_name if name not in expected and name not in other_columns]
    if extra:
        raise InvalidArgument(
            f"input {shown(extra[0])} is not a column of the training table"
            + (f" ({len(extra) - 1} more like it)" if len(extra) > 1 else "")
            + "; ModelMetadata lists the inputs"
        )
    missing = [column.name for column in inputs if column.name not in by_name]
    if missing:
        listed = ", ".join(shown(name) for name in missing[:5])
        raise InvalidArgument(
            f"the request lacks {len(missing)} input column(s): {listed}"
            + (" ..." if len(missing) > 5 else "")
            + "; send one tensor per column (an empty or NaN value is a missing value)"
        )
    data: dict[str, Any] = {}
    for column in inputs:
        value = by_name[column.name]
        if value.datatype not in NUMERIC_DTYPES and value.datatype != "BYTES":
            raise InvalidArgument(f"column {shown(column.name)}: unsupported datatype")
        if column.role == "numeric":
            data[column.name] = _numbers(column, value)
        elif column.role == "boolean":
            data[column.name] = _booleans(column, value)
        elif column.role == "categorical":
            data[column.name] = _levels(column, value, unseen)
        else:
            data[column.name] = _datetimes(column, value).to_numpy()
    return data


def check_magnitudes(inputs: list[InputColumn], read: Rows, given: list[Column], limit: float) -> None:
    """Numbers beyond what the model computes in (tree models work in float32) are the caller's to fix."""
    by_name = {column.name: column for column in given}
    for column in inputs:
        if column.role != "numeric":
            continue
        values = read[column.name]
        beyond = np.flatnonzero(np.abs(np.nan_to_num(values, nan=0.0)) > limit)
        if beyond.size:
            raise _refuse(
                column,
                beyond,
                by_name[column.name].values,
                f"are beyond what this model computes in (float32, at most {limit:.3g} in size)",
                "send values within that range",
            )


def batch_frame(inputs: list[InputColumn], parts: list[Rows]) -> pd.DataFrame:
    """Several requests' rows, in order, as the one frame the fitted transformer takes: training's
    column order and types (the loader's text columns are pandas' string dtype, missing values NaN)."""
    data: dict[str, Any] = {}
    for column in inputs:
        values = parts[0][column.name] if len(parts) == 1 else np.concatenate([part[column.name] for part in parts])
        data[column.name] = pd.Series(values, dtype="str") if column.role == "categorical" else values
    return pd.DataFrame(data)
