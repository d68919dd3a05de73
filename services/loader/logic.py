"""Source parsing, reading and validation for the loader. No gRPC here."""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any, Literal
from urllib.parse import parse_qsl

import numpy as np
import pandas as pd

from services.loader import sources
from services.loader.profile import profile
from services.loader.schema import (
    ColumnDecision,
    TaskDecision,
    canonical_target,
    column_list,
    decide_columns,
    decide_task,
    shown,
)
from services.runtime.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, bounded
from services.runtime.formats import human_bytes
from services.runtime.settings import Settings
from services.runtime.vocabulary import TaskKind

# Each name's sklearn.datasets loader, by name: scikit-learn is imported on first use
# (about 1 s), so the loader answers health before anyone asks for these.
SKLEARN_DATASETS = {
    "iris": ("load_iris", TaskKind.CLASSIFICATION),
    "wine": ("load_wine", TaskKind.CLASSIFICATION),
    "breast_cancer": ("load_breast_cancer", TaskKind.CLASSIFICATION),
    "digits": ("load_digits", TaskKind.CLASSIFICATION),
    "diabetes": ("load_diabetes", TaskKind.REGRESSION),
}


def _datasets() -> ModuleType:
    from sklearn import datasets

    return datasets


_SYNTHETIC_DEFAULTS: dict[str, dict[str, float | int]] = {
    TaskKind.CLASSIFICATION: {"rows": 1000, "features": 20, "classes": 2, "seed": 0},
    TaskKind.REGRESSION: {"rows": 1000, "features": 20, "noise": 10.0, "seed": 0},
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
                f"unknown sklearn dataset {shown(name)}; choose one of {', '.join(sorted(SKLEARN_DATASETS))}"
            )
        return Source("sklearn", name)
    if source.startswith("synthetic:"):
        task, _, query = source.removeprefix("synthetic:").partition("?")
        if task not in _SYNTHETIC_DEFAULTS:
            raise InvalidArgument(
                f"unknown synthetic task {shown(task)}; use synthetic:classification or synthetic:regression"
            )
        options: dict[str, float | int] = dict(_SYNTHETIC_DEFAULTS[task])
        for key, raw in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
            if key not in options:
                raise InvalidArgument(f"unknown option {shown(key)} for synthetic:{task}; valid: {', '.join(options)}")
            try:
                options[key] = float(raw) if key == "noise" else int(raw)
            except ValueError:
                raise InvalidArgument(f"synthetic option {key}={shown(raw)} is not a number") from None
        return Source("synthetic", task, options)
    # Before the extension check: /etc/shadow::x.csv ends in .csv but fsspec would open /etc/shadow.
    sources.refuse_chain(source)
    lowered = source.lower().split("?")[0]
    for suffix, fmt in ((".csv", "csv"), (".csv.gz", "csv"), (".parquet", "parquet"), (".pq", "parquet")):
        if lowered.endswith(suffix):
            return Source("file", source, file_format=fmt)
    raise InvalidArgument(
        f"cannot tell the format of {shown(source)}: files must end in .csv, .csv.gz, .parquet or .pq; "
        "other sources start with sklearn: or synthetic:"
    )


def read_file_bytes(
    source: Source,
    policy: sources.SourcePolicy,
    cancelled: threading.Event | None = None,
    deadline: float | None = None,
) -> bytes:
    """A file source's bytes, read only if the policy (MLMESH_DATA_ROOTS) allows it; see sources.py."""
    return sources.read_source(source.name, policy, cancelled, deadline)


# Each column is profiled and given a role one by one; past this many, that alone takes minutes
# (a 30-row table of a million columns is small in bytes but not in work).
MAX_COLUMNS = 10_000


def _check_columns(columns: int) -> None:
    if columns > MAX_COLUMNS:
        raise ResourceExhausted(f"a dataset of {columns} columns is over the loader's limit of {MAX_COLUMNS} columns")


def _check_size(rows: int, features: int, max_bytes: int) -> None:
    _check_columns(features + 1)
    needed = rows * (features + 1) * 8
    if needed > max_bytes:
        raise ResourceExhausted(
            f"a dataset of {rows} rows x {features} features needs about {human_bytes(needed)}, "
            f"over this loader's limit of {human_bytes(max_bytes)} (MLMESH_MAX_DATASET_BYTES)"
        )


def _synthetic(source: Source, max_bytes: int) -> tuple[pd.DataFrame, TaskKind]:
    opts = source.options
    rows, features, seed = int(opts["rows"]), int(opts["features"]), int(opts["seed"])
    if rows < 1 or features < 1:
        raise InvalidArgument("synthetic rows and features must be at least 1")
    _check_size(rows, features, max_bytes)
    if source.name == TaskKind.CLASSIFICATION:
        classes = int(opts["classes"])
        if classes < 2:
            raise InvalidArgument(f"synthetic classes={classes}: a classification needs at least 2")
        informative = max(2, min(features, int(np.ceil(np.log2(classes))) + 2))
        if informative > features:
            raise InvalidArgument(
                f"synthetic classification with {classes} classes needs at least {informative} features"
            )
        try:
            x, y = _datasets().make_classification(
                n_samples=rows,
                n_features=features,
                n_informative=informative,
                n_redundant=min(2, features - informative),
                n_classes=classes,
                n_clusters_per_class=1,
                random_state=seed,
            )
        except ValueError as exc:
            raise InvalidArgument(f"cannot make that synthetic classification: {bounded(exc)}") from None
    else:
        try:
            x, y = _datasets().make_regression(
                n_samples=rows,
                n_features=features,
                n_informative=max(1, features // 2),
                noise=float(opts["noise"]),
                random_state=seed,
            )
        except ValueError as exc:  # e.g. a negative noise or a seed out of range
            raise InvalidArgument(f"cannot make that synthetic regression: {bounded(exc)}") from None
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(features)])
    frame["target"] = y
    return frame, TaskKind(source.name)


def _sklearn(source: Source) -> tuple[pd.DataFrame, TaskKind]:
    loader_name, task = SKLEARN_DATASETS[source.name]
    load = getattr(_datasets(), loader_name)
    bunch = load(as_frame=True)
    frame = bunch.frame.copy()
    if task == TaskKind.CLASSIFICATION:
        # Store readable labels ("malignant", "benign") rather than codes.
        names = np.asarray(bunch.target_names).astype(str)
        frame["target"] = names[frame["target"].to_numpy()]
    return frame, task


def _read_file(
    source: Source, max_bytes: int, text_columns: Sequence[str] = (), data: bytes | None = None
) -> pd.DataFrame:
    """The table as read; in CSV, `text_columns` stay text, so a declared-categorical "02134" keeps its zero."""
    if data is None:
        # A direct call (tests, benchmarks): the read policy of this process's environment.
        policy = replace(sources.SourcePolicy.from_settings(Settings.from_env()), max_bytes=max_bytes)
        data = read_file_bytes(source, policy)
    # No size check here: sources.py capped the read at MLMESH_MAX_DATASET_BYTES, on every path.
    try:
        if source.file_format == "csv":
            compression: Literal["gzip"] | None = "gzip" if source.name.lower().endswith(".gz") else None
            # low_memory=False reads each column whole, so its type does not depend on chunking.
            frame = pd.read_csv(
                io.BytesIO(data),
                compression=compression,
                low_memory=False,
                dtype={name: "str" for name in text_columns} or None,
            )
        else:
            frame = pd.read_parquet(io.BytesIO(data))
    except (ValueError, pd.errors.ParserError, OSError) as exc:
        raise FailedPrecondition(f"cannot parse {shown(source.name)} as {source.file_format}: {bounded(exc)}") from None
    _check_columns(frame.shape[1])
    return frame


@dataclass
class LoadedDataset:
    frame: pd.DataFrame  # feature columns in canonical types, then the target
    target_column: str
    task: TaskDecision
    columns: list[ColumnDecision]
    warnings: list[str]
    profile: dict[str, Any]

    @property
    def feature_names(self) -> list[str]:
        return [c for c in self.frame.columns if c != self.target_column]

    def schema(self) -> dict[str, Any]:
        return {
            "target_column": self.target_column,
            "task_kind": self.task.kind,
            "task_kind_reason": self.task.reason,
            "task_kind_overridden": self.task.overridden,
            "rows": len(self.frame),
            "features": self.feature_names,
            "roles": {c.name: c.role for c in self.columns},
            "columns": [c.as_dict() for c in self.columns],
        }


def load_dataset(
    source: Source,
    target_column: str,
    requested_task: TaskKind | None,
    max_bytes: int,
    roles: dict[str, str] | None = None,
    data: bytes | None = None,
) -> LoadedDataset:
    """Read the source, decide every column's role and the task, and profile the table.

    `data` is a file source's bytes when the caller has read them already (the service
    does, through sources.py, to hash them for the cache key); otherwise they are read here.
    """
    frame, target_column, source_task = _read_source(source, target_column, max_bytes, roles, data)
    _check_table(frame, source, target_column, max_bytes)
    frame = frame.reset_index(drop=True)
    raw_target = frame[target_column]
    decision = _decide_task(raw_target, source, target_column, requested_task, source_task)
    target = canonical_target(raw_target, target_column, decision.kind)
    if decision.kind == TaskKind.CLASSIFICATION:
        distinct = target.dropna().unique()
        if len(distinct) < 2:
            raise FailedPrecondition(
                f"classification needs at least two classes, but target {shown(target_column)} has {len(distinct)}"
            )
    features, columns, warnings = decide_columns(frame, target_column, roles or {})
    if features.shape[1] == 0:
        left_out = ", ".join(f"{shown(c.name)} ({c.role})" for c in columns[:10])
        raise FailedPrecondition(
            f"no column is usable as a feature: {left_out}; set roles with column_roles (--column NAME=ROLE)"
        )
    out = features.copy()
    out[target_column] = target.to_numpy()
    return LoadedDataset(
        frame=out,
        target_column=target_column,
        task=decision,
        columns=columns,
        warnings=warnings,
        profile=profile(frame, features, target, target_column, columns),
    )


def _read_source(
    source: Source, target_column: str, max_bytes: int, roles: dict[str, str] | None, data: bytes | None
) -> tuple[pd.DataFrame, str, TaskKind | None]:
    """The table, its target column, and the task kind the source itself defines (built-in sources)."""
    if source.kind == "sklearn":
        frame, task = _sklearn(source)
        return frame, target_column or "target", task
    if source.kind == "synthetic":
        frame, task = _synthetic(source, max_bytes)
        return frame, target_column or "target", task
    if not target_column:
        raise InvalidArgument(f"target_column is required for file sources such as {shown(source.name)}")
    declared_categorical = [name for name, role in (roles or {}).items() if role == "categorical"]
    return _read_file(source, max_bytes, declared_categorical, data), target_column, None


def _check_table(frame: pd.DataFrame, source: Source, target_column: str, max_bytes: int) -> None:
    """A table the rest of the pipeline can use: unique names, the target, rows, a feature, a size that fits."""
    frame.columns = [str(c) for c in frame.columns]
    if len(set(frame.columns)) != len(frame.columns):
        raise FailedPrecondition("the dataset has two columns with the same name; rename one of them")
    if target_column not in frame.columns:
        raise InvalidArgument(
            f"target column {shown(target_column)} is not in the dataset; its columns are: {column_list(frame.columns)}"
        )
    if len(frame) == 0:
        raise FailedPrecondition(f"source {shown(source.name)} has no rows")
    if len(frame.columns) < 2:
        raise FailedPrecondition(f"source {shown(source.name)} has no feature columns besides the target")
    _check_size(len(frame), len(frame.columns) - 1, max_bytes)
    if frame[target_column].notna().sum() == 0:
        raise FailedPrecondition(f"target column {shown(target_column)} has no values")


def _decide_task(
    raw_target: pd.Series,
    source: Source,
    target_column: str,
    requested: TaskKind | None,
    defined: TaskKind | None,
) -> TaskDecision:
    """The caller's kind wins; then the built-in source's; otherwise the target's values decide."""
    if requested:
        return TaskDecision(requested, f"{requested}, as requested", True)
    if defined:
        return TaskDecision(defined, f"{defined}, as defined by {source.kind}:{source.name}", False)
    return decide_task(raw_target, target_column)
