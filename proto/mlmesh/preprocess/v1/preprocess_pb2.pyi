from mlmesh.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PreprocessRequest(_message.Message):
    __slots__ = ("dataset", "test_fraction", "seed", "force_recompute", "drop_duplicate_rows", "drop_incomplete_rows")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    TEST_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FORCE_RECOMPUTE_FIELD_NUMBER: _ClassVar[int]
    DROP_DUPLICATE_ROWS_FIELD_NUMBER: _ClassVar[int]
    DROP_INCOMPLETE_ROWS_FIELD_NUMBER: _ClassVar[int]
    dataset: _common_pb2.ArtifactRef
    test_fraction: float
    seed: int
    force_recompute: bool
    drop_duplicate_rows: bool
    drop_incomplete_rows: bool
    def __init__(self, dataset: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., test_fraction: _Optional[float] = ..., seed: _Optional[int] = ..., force_recompute: _Optional[bool] = ..., drop_duplicate_rows: _Optional[bool] = ..., drop_incomplete_rows: _Optional[bool] = ...) -> None: ...

class PreprocessResponse(_message.Message):
    __slots__ = ("train", "test", "stage", "rows_in", "duplicate_rows_removed", "rows_out", "train_rows", "test_rows", "class_names", "task_kind", "missing_target_rows_removed", "invalid_target_rows_removed", "incomplete_rows_removed", "duplicate_rows_found", "split_report")
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    TEST_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ROWS_IN_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_ROWS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    ROWS_OUT_FIELD_NUMBER: _ClassVar[int]
    TRAIN_ROWS_FIELD_NUMBER: _ClassVar[int]
    TEST_ROWS_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    TASK_KIND_FIELD_NUMBER: _ClassVar[int]
    MISSING_TARGET_ROWS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    INVALID_TARGET_ROWS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    INCOMPLETE_ROWS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_ROWS_FOUND_FIELD_NUMBER: _ClassVar[int]
    SPLIT_REPORT_FIELD_NUMBER: _ClassVar[int]
    train: _common_pb2.ArtifactRef
    test: _common_pb2.ArtifactRef
    stage: _common_pb2.StageInfo
    rows_in: int
    duplicate_rows_removed: int
    rows_out: int
    train_rows: int
    test_rows: int
    class_names: _containers.RepeatedScalarFieldContainer[str]
    task_kind: _common_pb2.TaskKind
    missing_target_rows_removed: int
    invalid_target_rows_removed: int
    incomplete_rows_removed: int
    duplicate_rows_found: int
    split_report: _common_pb2.ArtifactRef
    def __init__(self, train: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., test: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., stage: _Optional[_Union[_common_pb2.StageInfo, _Mapping]] = ..., rows_in: _Optional[int] = ..., duplicate_rows_removed: _Optional[int] = ..., rows_out: _Optional[int] = ..., train_rows: _Optional[int] = ..., test_rows: _Optional[int] = ..., class_names: _Optional[_Iterable[str]] = ..., task_kind: _Optional[_Union[_common_pb2.TaskKind, str]] = ..., missing_target_rows_removed: _Optional[int] = ..., invalid_target_rows_removed: _Optional[int] = ..., incomplete_rows_removed: _Optional[int] = ..., duplicate_rows_found: _Optional[int] = ..., split_report: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ...) -> None: ...
