"""PreprocessService: the gRPC face of the preprocess stage."""

from __future__ import annotations

import math

from mlmesh.preprocess.v1 import preprocess_pb2, preprocess_pb2_grpc
from services.preprocess import VERSION, logic
from services.runtime.errors import FailedPrecondition, InvalidArgument
from services.runtime.formats import PARQUET, frame_to_parquet, parquet_to_frame
from services.runtime.server import StageSpec
from services.runtime.stage import Job, Run, StageRuntime, require
from services.runtime.tasks import task_kind_value
DEFAULT_TEST_FRACTION = 0.2

_STRATEGIES = {
    preprocess_pb2.IMPUTE_STRATEGY_UNSPECIFIED: "median",
    preprocess_pb2.IMPUTE_STRATEGY_MEAN: "mean",
    preprocess_pb2.IMPUTE_STRATEGY_MEDIAN: "median",
    preprocess_pb2.IMPUTE_STRATEGY_MOST_FREQUENT: "most_frequent",
    preprocess_pb2.IMPUTE_STRATEGY_DROP_ROWS: "drop_rows",
}


class PreprocessServicer(preprocess_pb2_grpc.PreprocessServiceServicer):
    def __init__(self, runtime: StageRuntime):
        self.runtime = runtime

    async def Preprocess(self, request: preprocess_pb2.PreprocessRequest, context) -> preprocess_pb2.PreprocessResponse:
        require(request.HasField("dataset"), "dataset is required: pass the ref the loader returned")
        if request.impute_strategy not in _STRATEGIES:
            raise InvalidArgument(f"impute_strategy={request.impute_strategy} is not a known ImputeStrategy")
        fraction = request.test_fraction or DEFAULT_TEST_FRACTION
        require(
            math.isfinite(fraction) and 0 < fraction < 1,
            f"test_fraction must be between 0 and 1 (exclusive), got {request.test_fraction}",
        )
        # train_test_split takes seeds in [0, 2^32); a larger one is the caller's mistake.
        require(0 <= request.seed < 2**32, f"seed must be in [0, 2^32), got {request.seed}")
        strategy = _STRATEGIES[request.impute_strategy]
        job = Job(
            inputs={"dataset": request.dataset},
            params={"impute_strategy": strategy, "test_fraction": fraction, "seed": request.seed},
            force_recompute=request.force_recompute,
        )

        def work(run: Run) -> preprocess_pb2.PreprocessResponse:
            frame, meta = parquet_to_frame(run.read(request.dataset, "dataset"), "dataset")
            if "target_column" not in meta or "task_kind" not in meta:
                raise FailedPrecondition("dataset lacks mlmesh metadata; pass a dataset written by the loader")
            prepared = logic.preprocess(
                frame, meta["target_column"], meta["task_kind"], strategy, fraction, request.seed
            )
            out_meta = {**meta, "class_names": prepared.class_names}
            train = run.put("train", frame_to_parquet(prepared.train, out_meta), PARQUET)
            test = run.put("test", frame_to_parquet(prepared.test, out_meta), PARQUET)
            return preprocess_pb2.PreprocessResponse(
                train=train,
                test=test,
                rows_in=prepared.rows_in,
                duplicate_rows_removed=prepared.duplicate_rows_removed,
                incomplete_rows_removed=prepared.incomplete_rows_removed,
                rows_out=len(prepared.train) + len(prepared.test),
                train_rows=len(prepared.train),
                test_rows=len(prepared.test),
                missing_values_imputed=prepared.missing_values_imputed,
                class_names=prepared.class_names,
                task_kind=task_kind_value(meta["task_kind"]),
            )

        return await self.runtime.execute(job, work, preprocess_pb2.PreprocessResponse)


SPEC = StageSpec.of("preprocess", VERSION, preprocess_pb2, preprocess_pb2_grpc, "PreprocessService", PreprocessServicer)
