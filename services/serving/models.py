"""One registered model version, loaded for serving: its inputs, its transformer, its model.

A registry entry names its model and, in its lineage, the artifacts training
made on the way: the loader's schema (every column and its role), the features
stage's schema (task, class names) and the fitted transformer. Serving loads
them by digest (the store verifies every byte) and the model through skops'
allow-list, exactly as the evaluator did, so a row is parsed, transformed and
predicted the way the test split was.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import sklearn

from services.runtime import formats
from services.runtime.errors import FailedPrecondition, InvalidArgument, StageError
from services.runtime.roles import FEATURE_ROLES
from services.runtime.store import ArtifactStore, ref_from_dict
from services.serving.columns import (
    InputColumn,
    Rows,
    advertised_datatype,
    batch_frame,
    check_magnitudes,
    encoder_levels,
    read_rows,
)
from services.serving.compiled import CompiledTransformer, compile_transformer
from services.serving.tensors import Column

# The artifacts a version must record in its lineage to be served.
NEEDED_LINEAGE = ("schema", "feature_schema", "transformer")
PLATFORM = "mlmesh_sklearn"
# Output names, and what each holds.
PREDICTED = "predicted"  # class names (BYTES) or regression values (FP64), one per row
PROBABILITIES = "probabilities"  # FP64 [rows, classes], classification models that give them
CLASSES = "classes"  # BYTES [classes]: the class of each probabilities column
# Models whose predictions cast inputs to float32 (scikit-learn's trees and forests).
FLOAT32_MODULES = ("sklearn.tree.", "sklearn.ensemble._forest", "sklearn.ensemble._gb")
FLOAT32_MAX = float(np.finfo(np.float32).max)

# Two warnings scikit-learn would print on every prediction, for what serving does on purpose: a
# level never seen (with unseen_levels=encode) is encoded as the encoder does, and the model gets
# the matrix that a named frame would hand it (see predict_matrix). Filtered once for the process:
# catch_warnings() on every call is process-wide too, and not safe from several worker threads.
warnings.filterwarnings("ignore", message="Found unknown categories", category=UserWarning)
warnings.filterwarnings("ignore", message="X does not have valid feature names", category=UserWarning)


@dataclass
class Prediction:
    outputs: dict[str, np.ndarray]


@dataclass
class ServedVersion:
    name: str
    version: int
    model_sha256: str
    registered_at: str
    task: str
    target_column: str
    class_names: list[str]
    inputs: list[InputColumn]
    # Columns of the training table the model does not use: accepted in a request, and left out.
    other_columns: frozenset[str]
    transformer: Any
    model: Any
    metrics: dict[str, float] = field(default_factory=dict)
    # The transformer compiled for serving (compiled.py), when it reproduces the fitted one exactly.
    compiled: CompiledTransformer | None = None
    # A DataFrame made around a matrix (copy=False) hands the model that very matrix (checked at load).
    frame_is_matrix: bool = False

    @property
    def label(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def classes(self) -> np.ndarray:
        codes = getattr(self.model, "classes_", np.arange(len(self.class_names)))
        return np.asarray([self.class_names[int(code)] for code in codes], dtype=object)

    @property
    def gives_probabilities(self) -> bool:
        if self.task != "classification" or not hasattr(self.model, "predict_proba"):
            return False
        try:
            getattr(self.model, "predict_proba")  # noqa: B009 - a property that raises for some losses
        except AttributeError:
            return False
        return True

    def outputs_metadata(self) -> list[tuple[str, str, list[int]]]:
        if self.task != "classification":
            return [(PREDICTED, "FP64", [-1])]
        listed = [(PREDICTED, "BYTES", [-1])]
        if self.gives_probabilities:
            listed += [(PROBABILITIES, "FP64", [-1, len(self.classes)]), (CLASSES, "BYTES", [len(self.classes)])]
        return listed

    @property
    def computes_in_float32(self) -> bool:
        """Tree models (forests, single trees, gradient boosting) cast their inputs to float32."""
        return type(self.model).__module__.startswith(FLOAT32_MODULES)

    def read(self, given: list[Column], rows: int, unseen: str) -> Rows:
        read = read_rows(self.inputs, self.other_columns, given, rows, unseen)
        if self.computes_in_float32:
            check_magnitudes(self.inputs, read, given, FLOAT32_MAX)
        return read

    def no_rows(self) -> dict[str, np.ndarray]:
        """The outputs of a batch of zero rows: empty, with the shapes and types of any other."""
        if self.task != "classification":
            return {PREDICTED: np.empty(0, dtype="float64")}
        outputs = {PREDICTED: np.empty(0, dtype=object)}
        if self.gives_probabilities:
            outputs[PROBABILITIES] = np.empty((0, len(self.classes)), dtype="float64")
            outputs[CLASSES] = self.classes
        return outputs

    def predict_rows(self, parts: list[Rows]) -> dict[str, np.ndarray]:
        """Every output for several requests' rows, in order: one batch."""
        if self.compiled is None:
            return self.predict(batch_frame(self.inputs, parts))
        columns = {
            column.name: parts[0][column.name]
            if len(parts) == 1
            else np.concatenate([part[column.name] for part in parts])
            for column in self.inputs
        }
        rows = len(columns[self.inputs[0].name]) if self.inputs else 0
        with sklearn.config_context(assume_finite=True):
            return self.predict_matrix(self.compiled.transform(columns, rows))

    def predict(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """Every output for the rows of `frame`: the evaluator's computation, row for row."""
        # Inputs were checked as they were read: scikit-learn need not scan them again for infinities.
        with sklearn.config_context(assume_finite=True):
            return self.predict_matrix(np.ascontiguousarray(self.transformer.transform(frame), dtype="float64"))

    def predict_matrix(self, matrix: np.ndarray) -> dict[str, np.ndarray]:
        """Every output for the transformed rows: what the evaluator computes on x_test (the
        same frame around the matrix, so the same arithmetic)."""
        if self.computes_in_float32 and np.abs(matrix).max(initial=0.0) > FLOAT32_MAX:
            raise InvalidArgument(
                "after the fitted scaling, a value is beyond what this model computes in (float32, at most "
                f"{FLOAT32_MAX:.3g} in size); send values closer to the training range"
            )
        # The evaluator wraps x_test in a DataFrame (copy=False) when the model knows its feature
        # names. Such a frame's values are the matrix itself (same memory, same C order), so the model
        # computes exactly the same; passing the matrix skips 2 ms of pandas checks per batch.
        # frame_is_matrix checks that at load time; where it is not so, the frame is built.
        names = getattr(self.model, "feature_names_in_", None)
        x: Any = matrix
        if names is not None and not self.frame_is_matrix:
            x = pd.DataFrame(matrix, columns=[str(n) for n in names], copy=False)
        with np.errstate(over="ignore", invalid="ignore"):
            if self.task != "classification":
                return {PREDICTED: _finite(np.asarray(self.model.predict(x), dtype="float64"))}
            if not self.gives_probabilities:
                codes = np.asarray(self.model.predict(x), dtype="int64")
                return {PREDICTED: np.asarray(self.class_names, dtype=object)[codes]}
            probabilities = _finite(np.asarray(self.model.predict_proba(x), dtype="float64"))
            codes = self._codes(x, probabilities)
        return {
            PREDICTED: np.asarray(self.class_names, dtype=object)[codes],
            PROBABILITIES: probabilities,
            CLASSES: self.classes,
        }

    def _codes(self, x: Any, probabilities: np.ndarray) -> np.ndarray:
        """The classes `model.predict` gives, from the probabilities already computed: one pass, not two.

        Every classifier served here predicts the class of its largest decision value, and its
        probabilities rise with those values, so where one probability is the largest its class is
        the prediction. Rows whose top two probabilities tie (rounding can tie decision values that
        differ) ask `predict` itself, so the answer is always exactly the model's."""
        classes = np.asarray(self.model.classes_, dtype="int64")
        top = np.argmax(probabilities, axis=1)
        codes = classes[top]
        if probabilities.shape[1] > 1:
            ordered = np.sort(probabilities, axis=1)
            tied = np.flatnonzero(ordered[:, -1] == ordered[:, -2])
            if tied.size:
                rows = x.iloc[tied] if isinstance(x, pd.DataFrame) else x[tied]
                codes[tied] = np.asarray(self.model.predict(rows), dtype="int64")
        return codes

    def warm_rows(self) -> Rows:
        """One row of missing values: every fitted imputer fills it, so it exercises the whole path."""
        given = []
        for column in self.inputs:
            if column.role in ("numeric", "boolean"):
                given.append(Column(column.name, "FP64", np.asarray([np.nan])))
            else:
                given.append(Column(column.name, "BYTES", np.asarray([b""], dtype=object)))
        return self.read(given, 1, "encode")


def _finite(values: np.ndarray) -> np.ndarray:
    """A prediction that overflowed (inputs far beyond the training range) is refused, as the
    evaluator refuses one: it is the caller's input to fix, not an answer."""
    if not np.all(np.isfinite(values)):
        rows = np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))
        raise InvalidArgument(
            f"the model's answer for {len(rows)} row(s) is not a finite number (row {int(rows[0])} first): "
            "their values are far outside the training range; send values closer to it"
        )
    return values


def _doc(store: ArtifactStore, entry: dict[str, Any], name: str) -> dict[str, Any]:
    document = formats.json_bytes_to_doc(store.get(ref_from_dict(entry["lineage"][name]), name), name)
    if not isinstance(document, dict):
        raise FailedPrecondition(f"the {name} of this version is not a JSON object")
    return document


def load_version(store: ArtifactStore, name: str, entry: dict[str, Any]) -> ServedVersion:
    """Read, verify and assemble one registry entry; FailedPrecondition or DataLoss when it cannot serve."""
    version = int(entry["version"])
    lineage = entry.get("lineage") or {}
    lacking = [needed for needed in NEEDED_LINEAGE if not isinstance(lineage.get(needed), dict)]
    if lacking:
        raise FailedPrecondition(
            f"version {version} of {name!r} was registered without {', '.join(lacking)} in its lineage, so its rows "
            "cannot be prepared as in training; register it with every ref the pipeline returned (mlmesh run does)"
        )
    schema = _doc(store, entry, "schema")
    feature_schema = _doc(store, entry, "feature_schema")
    transformer = formats.skops_to_model(store.get(ref_from_dict(lineage["transformer"]), "transformer"), "transformer")
    model = formats.skops_to_model(store.get(ref_from_dict(entry["model"]), "model"), "model")
    if not callable(getattr(model, "predict", None)) or not callable(getattr(transformer, "transform", None)):
        raise FailedPrecondition(f"version {version} of {name!r} does not hold a fitted model and transformer")
    try:
        source_dtypes = {str(c["name"]): str(c.get("source_dtype", "")) for c in schema.get("columns", [])}
        roles = {str(c["name"]): str(c["role"]) for c in feature_schema["columns"]}
        target = str(feature_schema["target_column"])
        task = str(feature_schema["task_kind"])
        class_names = [str(c) for c in feature_schema.get("class_names", [])]
    except (KeyError, TypeError) as exc:
        raise FailedPrecondition(f"the feature schema of version {version} of {name!r} lacks {exc}") from None
    levels = encoder_levels(transformer)
    ordered = [str(c) for c in getattr(transformer, "feature_names_in_", list(roles))]
    inputs = []
    for column in ordered:
        role = roles.get(column)
        if role not in FEATURE_ROLES:
            raise FailedPrecondition(f"the transformer of version {version} of {name!r} takes a column with no role")
        inputs.append(
            InputColumn(
                name=column,
                role=role,
                datatype=advertised_datatype(role, source_dtypes.get(column, "")),
                levels=levels.get(column) if role == "categorical" else None,
            )
        )
    served = ServedVersion(
        name=name,
        version=version,
        model_sha256=str(entry["model"]["sha256"]),
        registered_at=str(entry.get("registered_at", "")),
        task=task,
        target_column=target,
        class_names=class_names,
        inputs=inputs,
        other_columns=frozenset({target, *source_dtypes}) - set(ordered),
        transformer=transformer,
        model=model,
        metrics={k: float(v) for k, v in (entry.get("metrics") or {}).items() if isinstance(v, (int, float))},
    )
    probe = np.zeros((2, len(getattr(model, "feature_names_in_", [])) or 1), dtype="float64")
    served.frame_is_matrix = np.shares_memory(np.asarray(pd.DataFrame(probe, copy=False)), probe) and bool(
        np.asarray(pd.DataFrame(probe, copy=False)).flags["C_CONTIGUOUS"]
    )
    kinds = {c.name: {"categorical": "text", "datetime": "time"}.get(c.role, "number") for c in inputs}
    served.compiled = compile_transformer(
        transformer, kinds, {name: sorted(known) for name, known in levels.items() if name in kinds}
    )
    if task == "classification" and not class_names:
        raise FailedPrecondition(f"version {version} of {name!r} is a classifier without class names")
    # Warm it: the first prediction pays for lazy imports and caches, not a caller.
    try:
        served.predict_rows([served.warm_rows()])
    except StageError:
        raise
    except Exception as exc:  # noqa: BLE001 - a model that cannot predict is not served
        raise FailedPrecondition(
            f"version {version} of {name!r} failed its warm-up prediction ({type(exc).__name__}); it is not served"
        ) from None
    return served
