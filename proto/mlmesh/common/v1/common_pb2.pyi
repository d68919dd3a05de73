from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    TASK_KIND_CLASSIFICATION: _ClassVar[TaskKind]
    TASK_KIND_REGRESSION: _ClassVar[TaskKind]

class ColumnRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COLUMN_ROLE_UNSPECIFIED: _ClassVar[ColumnRole]
    COLUMN_ROLE_NUMERIC: _ClassVar[ColumnRole]
    COLUMN_ROLE_BOOLEAN: _ClassVar[ColumnRole]
    COLUMN_ROLE_CATEGORICAL: _ClassVar[ColumnRole]
    COLUMN_ROLE_DATETIME: _ClassVar[ColumnRole]
    COLUMN_ROLE_IDENTIFIER: _ClassVar[ColumnRole]
    COLUMN_ROLE_TEXT: _ClassVar[ColumnRole]
    COLUMN_ROLE_CONSTANT: _ClassVar[ColumnRole]
    COLUMN_ROLE_IGNORE: _ClassVar[ColumnRole]
TASK_KIND_UNSPECIFIED: TaskKind
TASK_KIND_CLASSIFICATION: TaskKind
TASK_KIND_REGRESSION: TaskKind
COLUMN_ROLE_UNSPECIFIED: ColumnRole
COLUMN_ROLE_NUMERIC: ColumnRole
COLUMN_ROLE_BOOLEAN: ColumnRole
COLUMN_ROLE_CATEGORICAL: ColumnRole
COLUMN_ROLE_DATETIME: ColumnRole
COLUMN_ROLE_IDENTIFIER: ColumnRole
COLUMN_ROLE_TEXT: ColumnRole
COLUMN_ROLE_CONSTANT: ColumnRole
COLUMN_ROLE_IGNORE: ColumnRole

class ArtifactRef(_message.Message):
    __slots__ = ("uri", "sha256", "size_bytes", "media_type")
    URI_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    uri: str
    sha256: str
    size_bytes: int
    media_type: str
    def __init__(self, uri: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., media_type: _Optional[str] = ...) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("stage", "version", "cache_hit", "cache_key", "seconds")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    CACHE_KEY_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    version: str
    cache_hit: bool
    cache_key: str
    seconds: float
    def __init__(self, stage: _Optional[str] = ..., version: _Optional[str] = ..., cache_hit: _Optional[bool] = ..., cache_key: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...
