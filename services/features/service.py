"""FeaturesService: the gRPC face of the features stage."""

from __future__ import annotations

from mlmesh.features.v1 import features_pb2, features_pb2_grpc
from services.features import VERSION, logic
from services.runtime.errors import FailedPrecondition, InvalidArgument
from services.runtime.formats import NPY, SKOPS, array_to_npy, model_to_skops, parquet_to_frame
from services.runtime.server import StageSpec
from services.runtime.stage import Job, Run, StageRuntime, require
from services.runtime.tasks import task_kind_value

_SCALING = {
    features_pb2.SCALING_UNSPECIFIED: "standard",
    features_pb2.SCALING_STANDARD: "standard",
    features_pb2.SCALING_MINMAX: "minmax",
    features_pb2.SCALING_ROBUST: "robust",
    features_pb2.SCALING_NONE: "none",
}


class FeaturesServicer(features_pb2_grpc.FeaturesServiceServicer):
    def __init__(self, runtime: StageRuntime):
        self.runtime = runtime

    async def BuildFeatures(self, request: features_pb2.BuildFeaturesRequest, context) -> features_pb2.BuildFeaturesResponse:
        require(request.HasField("train"), "train is required: pass the train ref preprocess returned")
        require(request.HasField("test"), "test is required: pass the test ref preprocess returned")
        if request.scaling not in _SCALING:
            raise InvalidArgument(f"scaling={request.scaling} is not a known Scaling")
        degree = request.polynomial_degree
        require(
            0 <= degree <= logic.MAX_POLYNOMIAL_DEGREE,
            f"polynomial_degree must be between 0 and {logic.MAX_POLYNOMIAL_DEGREE}, got {degree}",
        )
        require(request.select_k_best >= 0, f"select_k_best must be 0 (keep all) or positive, got {request.select_k_best}")
        scaling = _SCALING[request.scaling]
        degree = degree if degree > 1 else 1
        job = Job(
            inputs={"train": request.train, "test": request.test},
            params={"scaling": scaling, "polynomial_degree": degree, "select_k_best": request.select_k_best},
            force_recompute=request.force_recompute,
        )
        max_bytes = self.runtime.settings.max_dataset_bytes

        def work(run: Run) -> features_pb2.BuildFeaturesResponse:
            train, meta = parquet_to_frame(run.read(request.train, "train"), "train")
            test, test_meta = parquet_to_frame(run.read(request.test, "test"), "test")
            if not meta.get("target_column") or meta.get("target_column") != test_meta.get("target_column"):
                raise FailedPrecondition("train and test must both come from the same preprocess run")
            task = meta["task_kind"]
            result = logic.engineer(
                train, test, meta["target_column"], task, scaling, degree, request.select_k_best, max_bytes
            )
            return features_pb2.BuildFeaturesResponse(
                x_train=run.put("x_train", array_to_npy(result.x_train), NPY),
                y_train=run.put("y_train", array_to_npy(result.y_train), NPY),
                x_test=run.put("x_test", array_to_npy(result.x_test), NPY),
                y_test=run.put("y_test", array_to_npy(result.y_test), NPY),
                transformer=run.put("transformer", model_to_skops(result.transformer), SKOPS),
                feature_names=result.feature_names,
                task_kind=task_kind_value(task),
            )

        return await self.runtime.execute(job, work, features_pb2.BuildFeaturesResponse)


SPEC = StageSpec.of("features", VERSION, features_pb2, features_pb2_grpc, "FeaturesService", FeaturesServicer)
