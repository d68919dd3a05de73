"""LoaderService: the gRPC face of the loader stage."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import cast

import grpc

from mlmesh.common.v1 import common_pb2
from mlmesh.loader.v1 import loader_pb2, loader_pb2_grpc
from services.loader import VERSION, logic, sources
from services.runtime.roles import role_name, role_value
from services.runtime.server import StageSpec
from services.runtime.stage import Job, Run, StageRuntime, require
from services.runtime.store import sha256_hex
from services.runtime.vocabulary import TaskKind

MAX_ROLE_OVERRIDES = 10_000
MAX_COLUMN_NAME = 1_000


class LoaderServicer(loader_pb2_grpc.LoaderServiceServicer):
    def __init__(self, runtime: StageRuntime):
        self.runtime = runtime
        self.policy = sources.SourcePolicy.from_settings(runtime.settings)

    async def Load(
        self,
        request: loader_pb2.LoadRequest,
        context: grpc.aio.ServicerContext[loader_pb2.LoadRequest, loader_pb2.LoadResponse],
    ) -> loader_pb2.LoadResponse:
        source = logic.parse_source(request.source)
        requested_task = TaskKind.from_proto(request.task_kind, "task_kind")
        require(
            len(request.column_roles) <= MAX_ROLE_OVERRIDES,
            f"column_roles has {len(request.column_roles)} entries; at most {MAX_ROLE_OVERRIDES} are accepted",
        )
        roles = {}
        for name, value in request.column_roles.items():
            require(0 < len(name) <= MAX_COLUMN_NAME, f"column_roles keys must be 1-{MAX_COLUMN_NAME} characters long")
            roles[name] = role_name(value, f"column_roles[{logic.shown(name)}]")
        params = {
            "source": request.source.strip(),
            "target_column": request.target_column,
            "task_kind": requested_task,
            "column_roles": dict(sorted(roles.items())),
        }
        data = None
        if source.kind == "file":
            # Files change under the same name; their content is part of the key. Read once,
            # here, and parsed by work() below on a miss.
            self.runtime.tell(0.0, f"reading {source.name[-80:]}")
            data, params["source_sha256"] = await self._read(source, context)
        job = Job(inputs={}, params=params, force_recompute=request.force_recompute)
        max_bytes = self.runtime.settings.max_dataset_bytes

        def work(run: Run) -> loader_pb2.LoadResponse:
            # Phases, for a caller following the call (ProgressService): parsing and profiling
            # take most of the time; writing the table is the rest.
            run.progress(0.1, "parsing, deciding column roles, profiling")
            loaded = logic.load_dataset(source, request.target_column, requested_task, max_bytes, roles, data)
            run.progress(0.7, f"writing {len(loaded.frame):,} rows × {loaded.frame.shape[1]} columns")
            schema_doc = loaded.schema()
            schema = run.put_doc("schema", schema_doc)
            profile = run.put_doc("profile", loaded.profile)
            metadata = {
                "target_column": loaded.target_column,
                "task_kind": loaded.task.kind,
                "source": params["source"],
                "roles": {name: role for name, role in schema_doc["roles"].items() if name in loaded.feature_names},
                "schema_sha256": schema.sha256,
            }
            dataset = run.put_frame("dataset", loaded.frame, metadata)
            return loader_pb2.LoadResponse(
                dataset=dataset,
                schema=schema,
                profile=profile,
                rows=len(loaded.frame),
                feature_names=loaded.feature_names,
                target_column=loaded.target_column,
                task_kind=TaskKind(loaded.task.kind).to_proto(),
                task_kind_reason=loaded.task.reason,
                columns=[
                    loader_pb2.ColumnSummary(
                        name=c.name,
                        role=cast(common_pb2.ColumnRole, role_value(c.role)),
                        reason=c.reason,
                        overridden=c.overridden,
                        source_dtype=c.source_dtype,
                        missing_ratio=c.missing_ratio,
                        distinct_values=c.distinct_values,
                        infinite_values=c.infinite_values,
                    )
                    for c in loaded.columns
                ],
                warnings=loaded.warnings,
            )

        return await self.runtime.execute(job, work, loader_pb2.LoadResponse)

    async def _read(
        self, source: logic.Source, context: grpc.aio.ServicerContext[loader_pb2.LoadRequest, loader_pb2.LoadResponse]
    ) -> tuple[bytes, str]:
        """The file's bytes and their digest, read on a worker thread within MLMESH_DATA_ROOTS.

        The read stops (and frees its worker) when the caller goes away or its deadline
        passes: grpc cancels this handler then, and the event tells the worker thread.
        """
        cancelled = threading.Event()
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + max(0.0, remaining)

        def read() -> tuple[bytes, str]:
            data = logic.read_file_bytes(source, self.policy, cancelled, deadline)
            return data, sha256_hex(data)

        try:
            return await self.runtime.to_thread(read)
        except asyncio.CancelledError:
            cancelled.set()
            raise


SPEC = StageSpec.of("loader", VERSION, LoaderServicer)
