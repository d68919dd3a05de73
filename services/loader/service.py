"""LoaderService: the gRPC face of the loader stage."""

from __future__ import annotations

from mlmesh.loader.v1 import loader_pb2, loader_pb2_grpc
from services.loader import VERSION, logic
from services.runtime.formats import PARQUET, frame_to_parquet
from services.runtime.server import StageSpec
from services.runtime.stage import Job, Run, StageRuntime
from services.runtime.tasks import task_kind_name, task_kind_value


class LoaderServicer(loader_pb2_grpc.LoaderServiceServicer):
    def __init__(self, runtime: StageRuntime):
        self.runtime = runtime

    async def Load(self, request: loader_pb2.LoadRequest, context) -> loader_pb2.LoadResponse:
        source = logic.parse_source(request.source)
        requested_task = task_kind_name(request.task_kind, "task_kind")
        params = {
            "source": request.source.strip(),
            "target_column": request.target_column,
            "task_kind": requested_task,
        }
        if source.kind == "file":
            # Files change under the same name; their content is part of the key.
            params["source_sha256"] = await self.runtime.to_thread(logic.file_digest, source)
        job = Job(inputs={}, params=params, force_recompute=request.force_recompute)
        max_bytes = self.runtime.settings.max_dataset_bytes

        def work(run: Run) -> loader_pb2.LoadResponse:
            frame, target_column, task = logic.load_dataset(
                source, request.target_column, requested_task, max_bytes
            )
            features = [c for c in frame.columns if c != target_column]
            metadata = {"target_column": target_column, "task_kind": task, "source": params["source"]}
            dataset = run.put("dataset", frame_to_parquet(frame, metadata), PARQUET)
            return loader_pb2.LoadResponse(
                dataset=dataset,
                rows=len(frame),
                feature_names=features,
                target_column=target_column,
                task_kind=task_kind_value(task),
            )

        return await self.runtime.execute(job, work, loader_pb2.LoadResponse)


SPEC = StageSpec.of("loader", VERSION, loader_pb2, loader_pb2_grpc, "LoaderService", LoaderServicer)
