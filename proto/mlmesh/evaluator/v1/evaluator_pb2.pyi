from mlmesh.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_PROMOTE: _ClassVar[Decision]
    DECISION_RETRAIN: _ClassVar[Decision]
DECISION_UNSPECIFIED: Decision
DECISION_PROMOTE: Decision
DECISION_RETRAIN: Decision

class EvaluateRequest(_message.Message):
    __slots__ = ("model", "x_test", "y_test", "minimums", "maximums", "class_names", "force_recompute", "profile", "split_report", "feature_schema")
    class MinimumsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class MaximumsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    X_TEST_FIELD_NUMBER: _ClassVar[int]
    Y_TEST_FIELD_NUMBER: _ClassVar[int]
    MINIMUMS_FIELD_NUMBER: _ClassVar[int]
    MAXIMUMS_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    FORCE_RECOMPUTE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    SPLIT_REPORT_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ArtifactRef
    x_test: _common_pb2.ArtifactRef
    y_test: _common_pb2.ArtifactRef
    minimums: _containers.ScalarMap[str, float]
    maximums: _containers.ScalarMap[str, float]
    class_names: _containers.RepeatedScalarFieldContainer[str]
    force_recompute: bool
    profile: _common_pb2.ArtifactRef
    split_report: _common_pb2.ArtifactRef
    feature_schema: _common_pb2.ArtifactRef
    def __init__(self, model: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., x_test: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., y_test: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., minimums: _Optional[_Mapping[str, float]] = ..., maximums: _Optional[_Mapping[str, float]] = ..., class_names: _Optional[_Iterable[str]] = ..., force_recompute: _Optional[bool] = ..., profile: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., split_report: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., feature_schema: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ...) -> None: ...

class ConfusionMatrixRow(_message.Message):
    __slots__ = ("counts",)
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, counts: _Optional[_Iterable[int]] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("metrics_report", "stage", "metrics", "decision", "reasons", "confusion_matrix", "task_kind", "html_report")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    METRICS_REPORT_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    CONFUSION_MATRIX_FIELD_NUMBER: _ClassVar[int]
    TASK_KIND_FIELD_NUMBER: _ClassVar[int]
    HTML_REPORT_FIELD_NUMBER: _ClassVar[int]
    metrics_report: _common_pb2.ArtifactRef
    stage: _common_pb2.StageInfo
    metrics: _containers.ScalarMap[str, float]
    decision: Decision
    reasons: _containers.RepeatedScalarFieldContainer[str]
    confusion_matrix: _containers.RepeatedCompositeFieldContainer[ConfusionMatrixRow]
    task_kind: _common_pb2.TaskKind
    html_report: _common_pb2.ArtifactRef
    def __init__(self, metrics_report: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., stage: _Optional[_Union[_common_pb2.StageInfo, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., decision: _Optional[_Union[Decision, str]] = ..., reasons: _Optional[_Iterable[str]] = ..., confusion_matrix: _Optional[_Iterable[_Union[ConfusionMatrixRow, _Mapping]]] = ..., task_kind: _Optional[_Union[_common_pb2.TaskKind, str]] = ..., html_report: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ...) -> None: ...

class RegisterModelRequest(_message.Message):
    __slots__ = ("name", "model", "metrics_report", "lineage")
    class LineageEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.ArtifactRef
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METRICS_REPORT_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: _common_pb2.ArtifactRef
    metrics_report: _common_pb2.ArtifactRef
    lineage: _containers.MessageMap[str, _common_pb2.ArtifactRef]
    def __init__(self, name: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., metrics_report: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., lineage: _Optional[_Mapping[str, _common_pb2.ArtifactRef]] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("name", "version", "model", "metrics_report", "metrics", "lineage", "registered_at")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class LineageEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.ArtifactRef
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METRICS_REPORT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    model: _common_pb2.ArtifactRef
    metrics_report: _common_pb2.ArtifactRef
    metrics: _containers.ScalarMap[str, float]
    lineage: _containers.MessageMap[str, _common_pb2.ArtifactRef]
    registered_at: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., model: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., metrics_report: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., lineage: _Optional[_Mapping[str, _common_pb2.ArtifactRef]] = ..., registered_at: _Optional[str] = ...) -> None: ...

class RegisterModelResponse(_message.Message):
    __slots__ = ("model_version", "already_registered")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ALREADY_REGISTERED_FIELD_NUMBER: _ClassVar[int]
    model_version: ModelVersion
    already_registered: bool
    def __init__(self, model_version: _Optional[_Union[ModelVersion, _Mapping]] = ..., already_registered: _Optional[bool] = ...) -> None: ...
