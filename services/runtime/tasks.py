"""Task kinds: the proto enum on the wire, short names inside the stages."""

from __future__ import annotations

from mlmesh.common.v1.common_pb2 import TaskKind
from services.runtime.errors import InvalidArgument

_NAMES = {
    TaskKind.TASK_KIND_CLASSIFICATION: "classification",
    TaskKind.TASK_KIND_REGRESSION: "regression",
}
_VALUES = {name: value for value, name in _NAMES.items()}


def task_kind_name(value: int, field: str) -> str | None:
    """None for UNSPECIFIED; an unknown number is the caller's mistake."""
    if value == TaskKind.TASK_KIND_UNSPECIFIED:
        return None
    if value not in _NAMES:
        raise InvalidArgument(f"{field}={value} is not a known TaskKind")
    return _NAMES[value]


def task_kind_value(name: str) -> int:
    return _VALUES[name]
