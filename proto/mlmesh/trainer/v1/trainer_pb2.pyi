from google.longrunning import operations_pb2 as _operations_pb2
from mlmesh.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TrainRequest(_message.Message):
    __slots__ = ("x_train", "y_train", "model", "hyperparameters", "seed", "force_recompute", "feature_schema", "task_kind")
    class HyperparametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    X_TRAIN_FIELD_NUMBER: _ClassVar[int]
    Y_TRAIN_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FORCE_RECOMPUTE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    TASK_KIND_FIELD_NUMBER: _ClassVar[int]
    x_train: _common_pb2.ArtifactRef
    y_train: _common_pb2.ArtifactRef
    model: str
    hyperparameters: _containers.ScalarMap[str, str]
    seed: int
    force_recompute: bool
    feature_schema: _common_pb2.ArtifactRef
    task_kind: _common_pb2.TaskKind
    def __init__(self, x_train: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., y_train: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., model: _Optional[str] = ..., hyperparameters: _Optional[_Mapping[str, str]] = ..., seed: _Optional[int] = ..., force_recompute: _Optional[bool] = ..., feature_schema: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., task_kind: _Optional[_Union[_common_pb2.TaskKind, str]] = ...) -> None: ...

class TrainProgress(_message.Message):
    __slots__ = ("fraction_done", "message", "step", "total_steps", "elapsed_seconds", "eta_seconds", "resumed_from_step", "operation_name")
    FRACTION_DONE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    OPERATION_NAME_FIELD_NUMBER: _ClassVar[int]
    fraction_done: float
    message: str
    step: int
    total_steps: int
    elapsed_seconds: float
    eta_seconds: float
    resumed_from_step: int
    operation_name: str
    def __init__(self, fraction_done: _Optional[float] = ..., message: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., elapsed_seconds: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., resumed_from_step: _Optional[int] = ..., operation_name: _Optional[str] = ...) -> None: ...

class TrainResult(_message.Message):
    __slots__ = ("model", "stage", "task_kind", "effective_hyperparameters", "train_score", "model_name")
    class EffectiveHyperparametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    TASK_KIND_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ArtifactRef
    stage: _common_pb2.StageInfo
    task_kind: _common_pb2.TaskKind
    effective_hyperparameters: _containers.ScalarMap[str, str]
    train_score: float
    model_name: str
    def __init__(self, model: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., stage: _Optional[_Union[_common_pb2.StageInfo, _Mapping]] = ..., task_kind: _Optional[_Union[_common_pb2.TaskKind, str]] = ..., effective_hyperparameters: _Optional[_Mapping[str, str]] = ..., train_score: _Optional[float] = ..., model_name: _Optional[str] = ...) -> None: ...

class TrainResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: TrainProgress
    result: TrainResult
    def __init__(self, progress: _Optional[_Union[TrainProgress, _Mapping]] = ..., result: _Optional[_Union[TrainResult, _Mapping]] = ...) -> None: ...
