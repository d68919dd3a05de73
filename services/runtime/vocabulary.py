"""The words of the domain, each defined once: task kinds and promotion decisions.

On the wire they are proto enums (`mlmesh.common.v1.TaskKind`, `mlmesh.evaluator.v1.Decision`).
Inside the stages, in Arrow metadata, JSON reports and manifests they are these string
enums. A `StrEnum` member *is* its string, so `meta["task_kind"] == TaskKind.REGRESSION`
holds for a value read back from a file, and `json.dumps` writes the plain word.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Any

from mlmesh.common.v1 import common_pb2
from mlmesh.evaluator.v1 import evaluator_pb2
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
