"""PreprocessService: the gRPC face of the preprocess stage."""

from __future__ import annotations

import math

import grpc

from mlmesh.preprocess.v1 import preprocess_pb2, preprocess_pb2_grpc
from services.preprocess import VERSION, logic
from services.runtime.errors import FailedPrecondition
from services.runtime.server import StageSpec
from services.runtime.stage import Job, Run, StageRuntime, require
from services.runtime.vocabulary import TaskKind

DEFAULT_TEST_FRACTION = 0.2


class PreprocessServicer(preprocess_pb2_grpc.PreprocessServiceServicer):
    def __init__(self, runtime: StageRuntime):
        self.runtime = runtime

    async def Preprocess(
        self,
        request: preprocess_pb2.PreprocessRequest,
        context: grpc.aio.ServicerContext[preprocess_pb2.PreprocessRequest, preprocess_pb2.PreprocessResponse],
    ) -> preprocess_pb2.PreprocessResponse:
        require(request.HasField("dataset"), "dataset is required: pass the ref the loader returned")
        fraction = request.test_fraction or DEFAULT_TEST_FRACTION
        require(
            math.isfinite(fraction) and 0 < fraction < 1,
            f"test_fraction must be between 0 and 1 (exclusive), got {request.test_fraction}",
        )
        # train_test_split takes seeds in [0, 2^32); a larger one is the caller's mistake.
        require(0 <= request.seed < 2**32, f"seed must be in [0, 2^32), got {request.seed}")
        job = Job(
            inputs={"dataset": request.dataset},
            params={
                "test_fraction": fraction,
                "seed": request.seed,
                "drop_duplicate_rows": request.drop_duplicate_rows,
                "drop_incomplete_rows": request.drop_incomplete_rows,
            },
            force_recompute=request.force_recompute,
        )

        def work(run: Run) -> preprocess_pb2.PreprocessResponse:
            run.progress(0.05, "reading the dataset")
            frame, meta = run.read_frame(request.dataset, "dataset")
            if "target_column" not in meta or "task_kind" not in meta or "roles" not in meta:
                raise FailedPrecondition("dataset lacks mlmesh metadata; pass a dataset written by the loader")
            target_column = meta["target_column"]
            run.progress(0.3, f"cleaning and splitting {len(frame):,} rows")
            prepared = logic.preprocess(
                frame,
                target_column,
                meta["task_kind"],
                fraction,
                request.seed,
                drop_duplicates=request.drop_duplicate_rows,
                drop_incomplete=request.drop_incomplete_rows,
            )
            run.progress(0.7, f"writing {len(prepared.train):,} train and {len(prepared.test):,} test rows")
            out_meta = {**meta, "class_names": prepared.class_names}
            # Each split says which it is, so the features stage can refuse a swapped or foreign ref.
            train = run.put_frame("train", prepared.train, {**out_meta, "split": "train"})
            test = run.put_frame("test", prepared.test, {**out_meta, "split": "test"})
            report = prepared.report(target_column, fraction, request.seed)
            return preprocess_pb2.PreprocessResponse(
                train=train,
                test=test,
                split_report=run.put_doc("split_report", report),
                rows_in=prepared.rows_in,
                missing_target_rows_removed=prepared.missing_target_rows_removed,
                invalid_target_rows_removed=prepared.invalid_target_rows_removed,
                incomplete_rows_removed=prepared.incomplete_rows_removed,
                duplicate_rows_found=prepared.duplicate_rows_found,
                duplicate_rows_removed=prepared.duplicate_rows_removed,
                rows_out=report["rows_out"],
                train_rows=len(prepared.train),
                test_rows=len(prepared.test),
                class_names=prepared.class_names,
                task_kind=TaskKind(meta["task_kind"]).to_proto(),
            )

        return await self.runtime.execute(job, work, preprocess_pb2.PreprocessResponse)


SPEC = StageSpec.of("preprocess", VERSION, PreprocessServicer)
