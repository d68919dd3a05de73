from mlmesh.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Scaling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCALING_UNSPECIFIED: _ClassVar[Scaling]
    SCALING_STANDARD: _ClassVar[Scaling]
    SCALING_MINMAX: _ClassVar[Scaling]
    SCALING_ROBUST: _ClassVar[Scaling]
    SCALING_NONE: _ClassVar[Scaling]

class NumericImputation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NUMERIC_IMPUTATION_UNSPECIFIED: _ClassVar[NumericImputation]
    NUMERIC_IMPUTATION_MEDIAN: _ClassVar[NumericImputation]
    NUMERIC_IMPUTATION_MEAN: _ClassVar[NumericImputation]
    NUMERIC_IMPUTATION_MOST_FREQUENT: _ClassVar[NumericImputation]

class CategoricalEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CATEGORICAL_ENCODING_UNSPECIFIED: _ClassVar[CategoricalEncoding]
    CATEGORICAL_ENCODING_ONE_HOT: _ClassVar[CategoricalEncoding]
    CATEGORICAL_ENCODING_TARGET: _ClassVar[CategoricalEncoding]
    CATEGORICAL_ENCODING_ORDINAL: _ClassVar[CategoricalEncoding]
SCALING_UNSPECIFIED: Scaling
SCALING_STANDARD: Scaling
SCALING_MINMAX: Scaling
SCALING_ROBUST: Scaling
SCALING_NONE: Scaling
NUMERIC_IMPUTATION_UNSPECIFIED: NumericImputation
NUMERIC_IMPUTATION_MEDIAN: NumericImputation
NUMERIC_IMPUTATION_MEAN: NumericImputation
NUMERIC_IMPUTATION_MOST_FREQUENT: NumericImputation
CATEGORICAL_ENCODING_UNSPECIFIED: CategoricalEncoding
CATEGORICAL_ENCODING_ONE_HOT: CategoricalEncoding
CATEGORICAL_ENCODING_TARGET: CategoricalEncoding
CATEGORICAL_ENCODING_ORDINAL: CategoricalEncoding

class BuildFeaturesRequest(_message.Message):
    __slots__ = ("train", "test", "scaling", "polynomial_degree", "select_k_best", "force_recompute", "numeric_imputation", "missing_indicators", "categorical_encoding", "max_one_hot_levels", "min_level_count", "seed")
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    TEST_FIELD_NUMBER: _ClassVar[int]
    SCALING_FIELD_NUMBER: _ClassVar[int]
    POLYNOMIAL_DEGREE_FIELD_NUMBER: _ClassVar[int]
    SELECT_K_BEST_FIELD_NUMBER: _ClassVar[int]
    FORCE_RECOMPUTE_FIELD_NUMBER: _ClassVar[int]
    NUMERIC_IMPUTATION_FIELD_NUMBER: _ClassVar[int]
    MISSING_INDICATORS_FIELD_NUMBER: _ClassVar[int]
    CATEGORICAL_ENCODING_FIELD_NUMBER: _ClassVar[int]
    MAX_ONE_HOT_LEVELS_FIELD_NUMBER: _ClassVar[int]
    MIN_LEVEL_COUNT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    train: _common_pb2.ArtifactRef
    test: _common_pb2.ArtifactRef
    scaling: Scaling
    polynomial_degree: int
    select_k_best: int
    force_recompute: bool
    numeric_imputation: NumericImputation
    missing_indicators: bool
    categorical_encoding: CategoricalEncoding
    max_one_hot_levels: int
    min_level_count: int
    seed: int
    def __init__(self, train: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., test: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., scaling: _Optional[_Union[Scaling, str]] = ..., polynomial_degree: _Optional[int] = ..., select_k_best: _Optional[int] = ..., force_recompute: _Optional[bool] = ..., numeric_imputation: _Optional[_Union[NumericImputation, str]] = ..., missing_indicators: _Optional[bool] = ..., categorical_encoding: _Optional[_Union[CategoricalEncoding, str]] = ..., max_one_hot_levels: _Optional[int] = ..., min_level_count: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class BuildFeaturesResponse(_message.Message):
    __slots__ = ("x_train", "y_train", "x_test", "y_test", "transformer", "stage", "feature_names", "task_kind", "feature_schema", "missing_values_imputed")
    X_TRAIN_FIELD_NUMBER: _ClassVar[int]
    Y_TRAIN_FIELD_NUMBER: _ClassVar[int]
    X_TEST_FIELD_NUMBER: _ClassVar[int]
    Y_TEST_FIELD_NUMBER: _ClassVar[int]
    TRANSFORMER_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    TASK_KIND_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    MISSING_VALUES_IMPUTED_FIELD_NUMBER: _ClassVar[int]
    x_train: _common_pb2.ArtifactRef
    y_train: _common_pb2.ArtifactRef
    x_test: _common_pb2.ArtifactRef
    y_test: _common_pb2.ArtifactRef
    transformer: _common_pb2.ArtifactRef
    stage: _common_pb2.StageInfo
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    task_kind: _common_pb2.TaskKind
    feature_schema: _common_pb2.ArtifactRef
    missing_values_imputed: int
    def __init__(self, x_train: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., y_train: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., x_test: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., y_test: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., transformer: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., stage: _Optional[_Union[_common_pb2.StageInfo, _Mapping]] = ..., feature_names: _Optional[_Iterable[str]] = ..., task_kind: _Optional[_Union[_common_pb2.TaskKind, str]] = ..., feature_schema: _Optional[_Union[_common_pb2.ArtifactRef, _Mapping]] = ..., missing_values_imputed: _Optional[int] = ...) -> None: ...
