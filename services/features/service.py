"""FeaturesService: the gRPC face of the features stage."""

from __future__ import annotations

import grpc

from mlmesh.features.v1 import features_pb2, features_pb2_grpc
from services.features import VERSION, logic
from services.runtime.errors import FailedPrecondition
from services.runtime.server import StageSpec
from services.runtime.stage import Job, Run, StageRuntime, require
from services.runtime.vocabulary import CategoricalEncoding, NumericImputation, Scaling, TaskKind

MAX_ONE_HOT_LEVELS = 1_000
MAX_MIN_LEVEL_COUNT = 1_000_000


class FeaturesServicer(features_pb2_grpc.FeaturesServiceServicer):
    def __init__(self, runtime: StageRuntime):
        self.runtime = runtime

    async def BuildFeatures(
        self,
        request: features_pb2.BuildFeaturesRequest,
        context: grpc.aio.ServicerContext[features_pb2.BuildFeaturesRequest, features_pb2.BuildFeaturesResponse],
    ) -> features_pb2.BuildFeaturesResponse:
        require(request.HasField("train"), "train is required: pass the train ref preprocess returned")
        require(request.HasField("test"), "test is required: pass the test ref preprocess returned")
        degree = request.polynomial_degree
        require(
            0 <= degree <= logic.MAX_POLYNOMIAL_DEGREE,
            f"polynomial_degree must be between 0 and {logic.MAX_POLYNOMIAL_DEGREE}, got {degree}",
        )
        require(
            request.select_k_best >= 0, f"select_k_best must be 0 (keep all) or positive, got {request.select_k_best}"
        )
        require(
            0 <= request.max_one_hot_levels <= MAX_ONE_HOT_LEVELS,
            f"max_one_hot_levels must be between 1 and {MAX_ONE_HOT_LEVELS} (0 for the default), "
            f"got {request.max_one_hot_levels}",
        )
        require(
            0 <= request.min_level_count <= MAX_MIN_LEVEL_COUNT,
            f"min_level_count must be between 1 and {MAX_MIN_LEVEL_COUNT} (0 for the default), got {request.min_level_count}",
        )
        require(0 <= request.seed < 2**32, f"seed must be in [0, 2^32), got {request.seed}")
        options = logic.FeatureOptions(
            # The options' words, as the memo's cache key has always held them.
            scaling=Scaling.from_proto(request.scaling, "scaling").value,
            polynomial_degree=degree if degree > 1 else 1,
            select_k_best=request.select_k_best,
            imputation=NumericImputation.from_proto(request.numeric_imputation, "numeric_imputation").value,
            missing_indicators=request.missing_indicators,
            categorical_encoding=CategoricalEncoding.from_proto(
                request.categorical_encoding, "categorical_encoding"
            ).value,
            max_one_hot_levels=request.max_one_hot_levels or logic.DEFAULT_MAX_ONE_HOT_LEVELS,
            min_level_count=request.min_level_count or logic.DEFAULT_MIN_LEVEL_COUNT,
            seed=request.seed,
        )
        job = Job(
            inputs={"train": request.train, "test": request.test},
            params={name: getattr(options, name) for name in logic.FeatureOptions.__dataclass_fields__},
            force_recompute=request.force_recompute,
        )
        max_bytes = self.runtime.settings.max_dataset_bytes

        def work(run: Run) -> features_pb2.BuildFeaturesResponse:
            run.progress(0.05, "reading the splits")
            train, meta = run.read_frame(request.train, "train")
            test, test_meta = run.read_frame(request.test, "test")
            if meta.get("split") != "train" or test_meta.get("split") != "test":
                raise FailedPrecondition(
                    "train and test must be the train and test refs preprocess returned, in that order"
                )
            same_run = ("target_column", "task_kind", "roles", "class_names", "schema_sha256")
            if any(meta.get(key) != test_meta.get(key) for key in same_run):
                raise FailedPrecondition("train and test must both come from the same preprocess run")
            task = meta["task_kind"]
            run.progress(0.2, f"fitting encoders on {len(train):,} rows, transforming both splits")
            result = logic.engineer(
                train, test, meta["target_column"], task, meta["roles"], meta.get("class_names", []), options, max_bytes
            )
            run.progress(0.8, f"writing {result.x_train.shape[1]} model inputs")
            return features_pb2.BuildFeaturesResponse(
                x_train=run.put_array("x_train", result.x_train),
                y_train=run.put_array("y_train", result.y_train),
                x_test=run.put_array("x_test", result.x_test),
                y_test=run.put_array("y_test", result.y_test),
                transformer=run.put_model("transformer", result.transformer),
                feature_schema=run.put_doc("feature_schema", result.schema),
                feature_names=result.feature_names,
                task_kind=TaskKind(task).to_proto(),
                missing_values_imputed=result.missing_values_imputed,
            )

        return await self.runtime.execute(job, work, features_pb2.BuildFeaturesResponse)


SPEC = StageSpec.of("features", VERSION, FeaturesServicer)
