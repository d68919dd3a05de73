"""Source parsing, reading and validation for the loader. No gRPC here."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

import fsspec
import numpy as np
import pandas as pd
from sklearn import datasets

from services.runtime.formats import human_bytes
from services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

CLASSIFICATION = "classification"
REGRESSION = "regression"

SKLEARN_DATASETS = {
    "iris": (datasets.load_iris, CLASSIFICATION),
    "wine": (datasets.load_wine, CLASSIFICATION),
    "breast_cancer": (datasets.load_breast_cancer, CLASSIFICATION),
    "digits": (datasets.load_digits, CLASSIFICATION),
    "diabetes": (datasets.load_diabetes, REGRESSION),
}

# A numeric target with at most this many distinct integer values is taken as class labels.
MAX_INFERRED_CLASSES = 20

_SYNTHETIC_DEFAULTS = {
    CLASSIFICATION: {"rows": 1000, "features": 20, "classes": 2, "seed": 0},
    REGRESSION: {"rows": 1000, "features": 20, "noise": 10.0, "seed": 0},
}


@dataclass(frozen=True)
class Source:
    kind: str  # "sklearn", "synthetic" or "file"
    name: str  # dataset name, synthetic task, or file URL
    options: dict[str, float | int] = field(default_factory=dict)
    file_format: str = ""  # "csv" or "parquet" for files


def parse_source(source: str) -> Source:
    source = source.strip()
    if not source:
        raise InvalidArgument(
            "source is required: e.g. sklearn:breast_cancer, "
            "synthetic:classification?rows=1000&features=20&classes=2&seed=0, or a CSV/Parquet path"
        )
    if source.startswith("sklearn:"):
        name = source.removeprefix("sklearn:")
        if name not in SKLEARN_DATASETS:
            raise InvalidArgument(
                f"unknown sklearn dataset {name!r}; choose one of {', '.join(sorted(SKLEARN_DATASETS))}"
            )
        return Source("sklearn", name)
    if source.startswith("synthetic:"):
        task, _, query = source.removeprefix("synthetic:").partition("?")
        if task not in _SYNTHETIC_DEFAULTS:
            raise InvalidArgument(
                f"unknown synthetic task {task!r}; use synthetic:classification or synthetic:regression"
            )
        options: dict[str, float | int] = dict(_SYNTHETIC_DEFAULTS[task])
        for key, raw in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
            if key not in options:
                raise InvalidArgument(
                    f"unknown option {key!r} for synthetic:{task}; valid: {', '.join(options)}"
                )
            try:
                options[key] = float(raw) if key == "noise" else int(raw)
            except ValueError:
                raise InvalidArgument(f"synthetic option {key}={raw!r} is not a number") from None
        return Source("synthetic", task, options)
    lowered = source.lower().split("?")[0]
    for suffix, fmt in ((".csv", "csv"), (".csv.gz", "csv"), (".parquet", "parquet"), (".pq", "parquet")):
        if lowered.endswith(suffix):
            return Source("file", source, file_format=fmt)
    raise InvalidArgument(
        f"cannot tell the format of {source!r}: files must end in .csv, .csv.gz, .parquet or .pq; "
        "other sources start with sklearn: or synthetic:"
    )


def file_digest(source: Source) -> str:
    """Hash of the file's bytes, so a changed file never hits an old cache entry."""
    return hashlib.sha256(read_file_bytes(source)).hexdigest()


def read_file_bytes(source: Source) -> bytes:
    try:
        with fsspec.open(source.name, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise NotFound(f"source file {source.name!r} does not exist") from None
    except IsADirectoryError:
        # e.g. a Spark or Dask "table.parquet" folder of part files
        raise InvalidArgument(
            f"source {source.name!r} is a directory; pass a single CSV or Parquet file"
        ) from None
    except (ValueError, ImportError) as exc:
        # fsspec raises these for unknown protocols or missing optional backends.
        raise InvalidArgument(f"cannot open {source.name!r}: {exc}") from None
    except PermissionError:
        raise FailedPrecondition(f"source file {source.name!r} is not readable by the loader") from None


def _check_size(rows: int, features: int, max_bytes: int) -> None:
    needed = rows * (features + 1) * 8
    if needed > max_bytes:
        raise ResourceExhausted(
            f"a dataset of {rows} rows x {features} features needs about {human_bytes(needed)}, "
            f"over this loader's limit of {human_bytes(max_bytes)} (MLMESH_MAX_DATASET_BYTES)"
        )


def _synthetic(source: Source, max_bytes: int) -> tuple[pd.DataFrame, str]:
    opts = source.options
    rows, features, seed = int(opts["rows"]), int(opts["features"]), int(opts["seed"])
    if rows < 1 or features < 1:
        raise InvalidArgument("synthetic rows and features must be at least 1")
    _check_size(rows, features, max_bytes)
    if source.name == CLASSIFICATION:
        classes = int(opts["classes"])
        if classes < 2:
            raise InvalidArgument(f"synthetic classes={classes}: a classification needs at least 2")
        informative = max(2, min(features, int(np.ceil(np.log2(classes))) + 2))
        if informative > features:
            raise InvalidArgument(
                f"synthetic classification with {classes} classes needs at least {informative} features"
            )
        try:
            x, y = datasets.make_classification(
                n_samples=rows, n_features=features, n_informative=informative,
                n_redundant=min(2, features - informative), n_classes=classes,
                n_clusters_per_class=1, random_state=seed,
            )
        except ValueError as exc:
            raise InvalidArgument(f"cannot make that synthetic classification: {exc}") from None
    else:
        x, y = datasets.make_regression(
            n_samples=rows, n_features=features, n_informative=max(1, features // 2),
            noise=float(opts["noise"]), random_state=seed,
        )
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(features)])
    frame["target"] = y
    return frame, source.name


def _sklearn(source: Source) -> tuple[pd.DataFrame, str]:
    load, task = SKLEARN_DATASETS[source.name]
    bunch = load(as_frame=True)
    frame = bunch.frame.copy()
    if task == CLASSIFICATION:
        # Store readable labels ("malignant", "benign") rather than codes.
        names = np.asarray(bunch.target_names).astype(str)
        frame["target"] = names[frame["target"].to_numpy()]
    return frame, task


def _read_file(source: Source, max_bytes: int) -> pd.DataFrame:
    data = read_file_bytes(source)
    if len(data) > max_bytes:
        raise ResourceExhausted(
            f"source file is {human_bytes(len(data))}, over the limit of "
            f"{human_bytes(max_bytes)} (MLMESH_MAX_DATASET_BYTES)"
        )
    try:
        if source.file_format == "csv":
            compression = "gzip" if source.name.lower().endswith(".gz") else None
            return pd.read_csv(io.BytesIO(data), compression=compression)
        return pd.read_parquet(io.BytesIO(data))
    except (ValueError, pd.errors.ParserError, OSError) as exc:
        raise FailedPrecondition(f"cannot parse {source.name!r} as {source.file_format}: {exc}") from None


def _infer_task(target: pd.Series) -> str:
    if not pd.api.types.is_numeric_dtype(target) or pd.api.types.is_bool_dtype(target):
        return CLASSIFICATION
    values = target.dropna().to_numpy(dtype=float)
    integral = bool(np.all(np.equal(np.mod(values, 1), 0)))
    return CLASSIFICATION if integral and len(np.unique(values)) <= MAX_INFERRED_CLASSES else REGRESSION


def _numeric_features(frame: pd.DataFrame, target_column: str) -> pd.DataFrame:
    features = frame.drop(columns=[target_column])
    unusable = []
    converted = {}
    for column in features.columns:
        series = features[column]
        if pd.api.types.is_bool_dtype(series):
            converted[column] = series.astype("float64")
        elif pd.api.types.is_numeric_dtype(series):
            converted[column] = series.astype("float64")
        else:
            numeric = pd.to_numeric(series, errors="coerce")
            # Text that is numbers apart from blanks is accepted; anything else is not.
            if numeric.notna().sum() == series.notna().sum():
                converted[column] = numeric.astype("float64")
            else:
                unusable.append(str(column))
    if unusable:
        raise FailedPrecondition(
            f"feature columns {unusable} are not numeric and cannot be used as they are; "
            "encode them as numbers or remove them from the file"
        )
    return pd.DataFrame(converted, index=frame.index)


def load_dataset(
    source: Source, target_column: str, requested_task: str | None, max_bytes: int
) -> tuple[pd.DataFrame, str, str]:
    """Return (frame with float64 features + target, target column, task kind)."""
    if source.kind == "sklearn":
        frame, task = _sklearn(source)
        target_column = target_column or "target"
    elif source.kind == "synthetic":
        frame, task = _synthetic(source, max_bytes)
        target_column = target_column or "target"
    else:
        if not target_column:
            raise InvalidArgument(f"target_column is required for file sources such as {source.name!r}")
        frame, task = _read_file(source, max_bytes), ""

    frame.columns = [str(c) for c in frame.columns]
    if target_column not in frame.columns:
        raise InvalidArgument(
            f"target column {target_column!r} is not in the dataset; its columns are: "
            f"{', '.join(frame.columns[:50])}"
        )
    if len(frame) == 0:
        raise FailedPrecondition(f"source {source.name!r} has no rows")
    if len(frame.columns) < 2:
        raise FailedPrecondition(f"source {source.name!r} has no feature columns besides the target")
    _check_size(len(frame), len(frame.columns) - 1, max_bytes)

    target = frame[target_column]
    if target.notna().sum() == 0:
        raise FailedPrecondition(f"target column {target_column!r} has no values")
    task = requested_task or task or _infer_task(target)
    if task == REGRESSION:
        if not pd.api.types.is_numeric_dtype(target) or pd.api.types.is_bool_dtype(target):
            raise FailedPrecondition(
                f"regression needs a numeric target, but {target_column!r} holds {target.dtype} values"
            )
        target = target.astype("float64")
    else:
        distinct = target.dropna().unique()
        if len(distinct) < 2:
            raise FailedPrecondition(
                f"classification needs at least two classes, but target {target_column!r} has only "
                f"{len(distinct)} ({', '.join(map(str, distinct[:1]))})"
            )
        if not pd.api.types.is_numeric_dtype(target) or pd.api.types.is_bool_dtype(target):
            target = target.astype("string").astype(object)
        elif bool(np.all(np.mod(target.dropna().to_numpy(dtype=float), 1) == 0)):
            # Whole-number labels stay integers even when blanks made the column float,
            # so classes are named "1", not "1.0".
            target = target.astype("Int64")

    features = _numeric_features(frame, target_column)
    out = features.copy()
    out[target_column] = target.to_numpy()
    return out.reset_index(drop=True), target_column, task
