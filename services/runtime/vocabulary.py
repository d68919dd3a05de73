"""The words of the domain, each defined once: task kinds, promotion decisions and the
feature options people choose (scaling, numeric imputation, categorical encoding).

On the wire they are proto enums (`mlmesh.common.v1.TaskKind`, `mlmesh.evaluator.v1.Decision`,
`mlmesh.features.v1.Scaling`, ...).
Inside the stages, in Arrow metadata, JSON reports and manifests they are these string
enums. A `StrEnum` member *is* its string, so `meta["task_kind"] == TaskKind.REGRESSION`
holds for a value read back from a file, and `json.dumps` writes the plain word.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from mlmesh.common.v1 import common_pb2
from mlmesh.evaluator.v1 import evaluator_pb2
from mlmesh.features.v1 import features_pb2
from services.runtime.errors import InvalidArgument

if TYPE_CHECKING:  # numpy and scikit-learn are imported where used: the CLI imports this module
    import numpy as np


class TaskKind(StrEnum):
    CLASSIFICATION = "classification"
    REGRESSION = "regression"

    def to_proto(self) -> common_pb2.TaskKind:
        return _TASK_TO_PROTO[self]

    @classmethod
    def from_proto(cls, value: int, field: str) -> TaskKind | None:
        """None for TASK_KIND_UNSPECIFIED; a number no release defines is the caller's mistake."""
        if value == common_pb2.TASK_KIND_UNSPECIFIED:
            return None
        if value not in _TASK_FROM_PROTO:
            raise InvalidArgument(f"{field}={value} is not a known TaskKind")
        return _TASK_FROM_PROTO[value]

    @classmethod
    def text_of(cls, value: int) -> str:
        """The kind's word for a proto value, "" for TASK_KIND_UNSPECIFIED (summaries, JSON output)."""
        kind = cls.from_proto(value, "task_kind")
        return kind.value if kind is not None else ""

    @classmethod
    def of_target(cls, y: np.ndarray) -> TaskKind:
        """The kind a stored target vector stands for: the features stage writes class
        labels as int64 and regression targets as float64 (see features.logic)."""
        import numpy as np

        return cls.CLASSIFICATION if np.issubdtype(y.dtype, np.integer) else cls.REGRESSION

    @classmethod
    def of_model(cls, model: Any) -> TaskKind:
        """The kind a fitted scikit-learn estimator (or pipeline) was built for."""
        from sklearn.base import is_classifier

        return cls.CLASSIFICATION if is_classifier(model) else cls.REGRESSION


_TASK_TO_PROTO = {
    TaskKind.CLASSIFICATION: common_pb2.TASK_KIND_CLASSIFICATION,
    TaskKind.REGRESSION: common_pb2.TASK_KIND_REGRESSION,
}
_TASK_FROM_PROTO: dict[int, TaskKind] = {value: kind for kind, value in _TASK_TO_PROTO.items()}


class Decision(StrEnum):
    """What the evaluator decided about a model against its thresholds."""

    PROMOTE = "PROMOTE"
    RETRAIN = "RETRAIN"

    def to_proto(self) -> evaluator_pb2.Decision:
        return _DECISION_TO_PROTO[self]

    @classmethod
    def from_proto(cls, value: int) -> Decision | None:
        """None for DECISION_UNSPECIFIED (an evaluation that never finished)."""
        return _DECISION_FROM_PROTO.get(value)

    @classmethod
    def text_of(cls, value: int) -> str:
        """The decision's word for a proto value, "" for DECISION_UNSPECIFIED."""
        decision = cls.from_proto(value)
        return decision.value if decision is not None else ""


_DECISION_TO_PROTO = {
    Decision.PROMOTE: evaluator_pb2.DECISION_PROMOTE,
    Decision.RETRAIN: evaluator_pb2.DECISION_RETRAIN,
}
_DECISION_FROM_PROTO: dict[int, Decision] = {value: decision for decision, value in _DECISION_TO_PROTO.items()}


# ---- what a caller chooses ------------------------------------------------------------------
# The options people type (`mlmesh run --scaling minmax`, `pyflyte run ... --scaling minmax`).
# Each member's value is the word on the command line; its name is the proto value's name
# without the enum's prefix, which is how `to_proto` and `from_proto` convert, and
# tests/test_proto.py checks that every proto value has its member and every member its value.


class TaskKindChoice(StrEnum):
    """The task kind a caller asks the loader for: one of TaskKind's, or "" to let it infer one.

    "" is a member, not a third word such as "infer" nor a None: "" has always been what
    `pyflyte run --task_kind` takes (and its default) to ask for inference, what scripts
    and launch plans pass, and what TASK_KIND_UNSPECIFIED means on the wire. `mlmesh run
    --task` offers only TaskKind's two words and leaves "" as its default.
    """

    INFERRED = ""
    CLASSIFICATION = TaskKind.CLASSIFICATION.value
    REGRESSION = TaskKind.REGRESSION.value

    def to_proto(self) -> common_pb2.TaskKind:
        return TaskKind(self.value).to_proto() if self.value else common_pb2.TASK_KIND_UNSPECIFIED


class Scaling(StrEnum):
    """How the features stage rescales numeric model inputs (SCALING_UNSPECIFIED means STANDARD)."""

    STANDARD = "standard"
    MINMAX = "minmax"
    ROBUST = "robust"
    NONE = "none"

    def to_proto(self) -> features_pb2.Scaling:
        return cast(features_pb2.Scaling, features_pb2.Scaling.Value(f"SCALING_{self.name}"))

    @classmethod
    def from_proto(cls, value: int, field: str) -> Scaling:
        return _from_proto(cls, features_pb2.Scaling, "SCALING_", cls.STANDARD, value, field)


class NumericImputation(StrEnum):
    """How missing numbers are filled in, from train statistics (UNSPECIFIED means MEDIAN)."""

    MEDIAN = "median"
    MEAN = "mean"
    MOST_FREQUENT = "most_frequent"

    def to_proto(self) -> features_pb2.NumericImputation:
        return cast(
            features_pb2.NumericImputation, features_pb2.NumericImputation.Value(f"NUMERIC_IMPUTATION_{self.name}")
        )

    @classmethod
    def from_proto(cls, value: int, field: str) -> NumericImputation:
        return _from_proto(cls, features_pb2.NumericImputation, "NUMERIC_IMPUTATION_", cls.MEDIAN, value, field)


class CategoricalEncoding(StrEnum):
    """How categorical columns become numbers. AUTO is CATEGORICAL_ENCODING_UNSPECIFIED on the
    wire: one-hot for few levels, target encoding for many (and ordinal codes for
    hist_gradient_boosting, which the client asks for: `categorical_encoding_for`)."""

    AUTO = "auto"
    ONE_HOT = "one_hot"
    TARGET = "target"
    ORDINAL = "ordinal"

    def to_proto(self) -> features_pb2.CategoricalEncoding:
        if self is CategoricalEncoding.AUTO:
            return features_pb2.CATEGORICAL_ENCODING_UNSPECIFIED
        return cast(
            features_pb2.CategoricalEncoding,
            features_pb2.CategoricalEncoding.Value(f"CATEGORICAL_ENCODING_{self.name}"),
        )

    @classmethod
    def from_proto(cls, value: int, field: str) -> CategoricalEncoding:
        return _from_proto(cls, features_pb2.CategoricalEncoding, "CATEGORICAL_ENCODING_", cls.AUTO, value, field)


class _ProtoEnum(Protocol):
    """A generated proto enum's wrapper (`features_pb2.Scaling`): its values' names by number."""

    def Name(self, number: int) -> str: ...


Choice = TypeVar("Choice", Scaling, NumericImputation, CategoricalEncoding)


def _from_proto(
    kind: type[Choice], wire: _ProtoEnum, prefix: str, unspecified: Choice, value: int, field: str
) -> Choice:
    """The member for a proto value: `unspecified` for 0; a number no release defines is the caller's mistake."""
    if value == 0:
        return unspecified
    try:
        return kind[wire.Name(value).removeprefix(prefix)]
    except (ValueError, KeyError):
        raise InvalidArgument(f"{field}={value} is not a known {kind.__name__}") from None
