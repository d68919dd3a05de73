from mlmesh.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoadRequest(_message.Message):
    __slots__ = ("source", "target_column", "task_kind", "force_recompute")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_COLUMN_FIELD_NUMBER: _ClassVar[int]
    TASK_KIND_FIELD_NUMBER: _ClassVar[int]
    FORCE_RECOMPUTE_FIELD_NUMBER: _ClassVar[int]
    source: str
    target_column: str
    task_kind: _common_pb2.TaskKind
    force_recompute: bool
    def __init__(self, source: _Optional[str] = ..., target_column: _Optional[str] = ..., task_kind: _Optional[_Union[_common_pb2.TaskKind, str]] = ..., force_recompute: _Optional[bool] = ...) -> None: ...

class LoadResponse(_message.Message):
    __slots__ = ("dataset", "stage", "rows", "feature_names", "target_column", "task_kind")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    TARGET_COLUMN_FIELD_NUMBER: _ClassVar[int]
    TASK_KIND_FIELD_NUMBER: _ClassVar[int]
    dataset: _common_pb2.ArtifactRef
    stage: _common_pb2.StageInfo
    rows: int
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    target_column: str
    task_kind: _common_pb2.TaskKind
    def __init__(self, dataset: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., stage: _Optional[_Union[_common_pb2.StageInfo, _Mapping]] = ..., rows: _Optional[int] = ..., feature_names: _Optional[_Iterable[str]] = ..., target_column: _Optional[str] = ..., task_kind: _Optional[_Union[_common_pb2.TaskKind, str]] = ...) -> None: ...
