from mlmesh.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoadRequest(_message.Message):
    __slots__ = ("source", "target_column", "task_kind", "force_recompute", "column_roles")
    class ColumnRolesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.ColumnRole
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.ColumnRole, str]] = ...) -> None: ...
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_COLUMN_FIELD_NUMBER: _ClassVar[int]
    TASK_KIND_FIELD_NUMBER: _ClassVar[int]
    FORCE_RECOMPUTE_FIELD_NUMBER: _ClassVar[int]
    COLUMN_ROLES_FIELD_NUMBER: _ClassVar[int]
    source: str
    target_column: str
    task_kind: _common_pb2.TaskKind
    force_recompute: bool
    column_roles: _containers.ScalarMap[str, _common_pb2.ColumnRole]
    def __init__(self, source: _Optional[str] = ..., target_column: _Optional[str] = ..., task_kind: _Optional[_Union[_common_pb2.TaskKind, str]] = ..., force_recompute: _Optional[bool] = ..., column_roles: _Optional[_Mapping[str, _common_pb2.ColumnRole]] = ...) -> None: ...

class ColumnSummary(_message.Message):
    __slots__ = ("name", "role", "reason", "overridden", "source_dtype", "missing_ratio", "distinct_values", "infinite_values")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OVERRIDDEN_FIELD_NUMBER: _ClassVar[int]
    SOURCE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    MISSING_RATIO_FIELD_NUMBER: _ClassVar[int]
    DISTINCT_VALUES_FIELD_NUMBER: _ClassVar[int]
    INFINITE_VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: _common_pb2.ColumnRole
    reason: str
    overridden: bool
    source_dtype: str
    missing_ratio: float
    distinct_values: int
    infinite_values: int
    def __init__(self, name: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.ColumnRole, str]] = ..., reason: _Optional[str] = ..., overridden: _Optional[bool] = ..., source_dtype: _Optional[str] = ..., missing_ratio: _Optional[float] = ..., distinct_values: _Optional[int] = ..., infinite_values: _Optional[int] = ...) -> None: ...

class LoadResponse(_message.Message):
    __slots__ = ("dataset", "stage", "rows", "feature_names", "target_column", "task_kind", "schema", "profile", "columns", "task_kind_reason", "warnings")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    TARGET_COLUMN_FIELD_NUMBER: _ClassVar[int]
    TASK_KIND_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    TASK_KIND_REASON_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    dataset: _common_pb2.ArtifactRef
    stage: _common_pb2.StageInfo
    rows: int
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    target_column: str
    task_kind: _common_pb2.TaskKind
    schema: _common_pb2.ArtifactRef
    profile: _common_pb2.ArtifactRef
    columns: _containers.RepeatedCompositeFieldContainer[ColumnSummary]
    task_kind_reason: str
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, dataset: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., stage: _Optional[_Union[_common_pb2.StageInfo, _Mapping]] = ..., rows: _Optional[int] = ..., feature_names: _Optional[_Iterable[str]] = ..., target_column: _Optional[str] = ..., task_kind: _Optional[_Union[_common_pb2.TaskKind, str]] = ..., schema: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., profile: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., columns: _Optional[_Iterable[_Union[ColumnSummary, _Mapping]]] = ..., task_kind_reason: _Optional[str] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...
