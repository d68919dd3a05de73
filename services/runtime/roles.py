"""Column roles: the proto enum on the wire, short names inside the stages and the CLI."""

from __future__ import annotations

import re

from mlmesh.common.v1.common_pb2 import ColumnRole
from services.runtime.errors import InvalidArgument

ROLES: tuple[str, ...] = (
    "numeric",
    "boolean",
    "categorical",
    "datetime",
    "identifier",
    "text",
    "constant",
    "ignore",
)
# Roles whose columns become model inputs; the others are left out with a reason.
FEATURE_ROLES: tuple[str, ...] = ("numeric", "boolean", "categorical", "datetime")

# How a text value reads as a datetime or a boolean, for the loader (training) and serving
# (new rows) alike, so a value a model was trained on is read the same way when it is served.
ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?)?(Z|[+-]\d{2}(:?\d{2})?)?$")
TRUE_SPELLINGS = frozenset({"true", "t", "yes", "y", "1"})
FALSE_SPELLINGS = frozenset({"false", "f", "no", "n", "0"})

_VALUES = {name: ColumnRole.Value(f"COLUMN_ROLE_{name.upper()}") for name in ROLES}
_NAMES = {value: name for name, value in _VALUES.items()}


def role_name(value: int, what: str) -> str:
    """The short name of a ColumnRole number; UNSPECIFIED or an unknown number is the caller's mistake."""
    if value not in _NAMES:
        raise InvalidArgument(
            f"{what} has role number {value}; use one of COLUMN_ROLE_{', COLUMN_ROLE_'.join(r.upper() for r in ROLES)}"
        )
    return _NAMES[value]


def role_value(name: str) -> int:
    return _VALUES[name]


def parse_role(text: str, what: str) -> str:
    """A role typed by a person (CLI, pyflyte): 'categorical', 'CATEGORICAL' or 'COLUMN_ROLE_CATEGORICAL'."""
    name = text.strip().lower().removeprefix("column_role_")
    if name not in _VALUES:
        raise InvalidArgument(f"{what}: unknown role {text[:40]!r}; choose one of {', '.join(ROLES)}")
    return name
