"""Stage executions as OpenLineage run events, for Marquez or any other consumer.

Off unless OpenLineage is configured the standard way: `OPENLINEAGE_URL`
(HTTP), `OPENLINEAGE_CONFIG` (an openlineage.yml), or
`OPENLINEAGE__TRANSPORT__TYPE` and friends (file, console, kafka, ...).
`OPENLINEAGE_DISABLED=true` turns it off again. The events are built with
the openlineage-python client's typed model and sent by its transports.

Each stage call becomes a START and a COMPLETE event of the job
`<namespace>.<stage>`: its run id is derived from the execution, its parent
run facet names the pipeline run (`mlmesh-run-id`), and its inputs and
outputs are the artifacts, named by digest in the artifact store's namespace.
`OPENLINEAGE_NAMESPACE` sets the job namespace (default `mlmesh`).
"""

from __future__ import annotations

import logging
import os
import uuid
from functools import cache
from typing import Any

from services.runtime.errors import bounded

log = logging.getLogger(__name__)

PRODUCER = "https://github.com/mlmesh/mlmesh"
_NAMES = uuid.uuid5(uuid.NAMESPACE_URL, PRODUCER)


def configured(env: dict[str, str] | None = None) -> bool:
    env = dict(os.environ) if env is None else env
    if env.get("OPENLINEAGE_DISABLED", "").strip().lower() == "true":
        return False
    return bool(env.get("OPENLINEAGE_URL") or env.get("OPENLINEAGE_CONFIG")) or any(
        key.startswith("OPENLINEAGE__TRANSPORT") for key in env
    )


def namespace() -> str:
    return os.environ.get("OPENLINEAGE_NAMESPACE") or "mlmesh"


def run_uuid(*parts: str) -> str:
    """OpenLineage run ids are UUIDs: a stable one per pipeline run or execution."""
    return str(uuid.uuid5(_NAMES, "/".join(parts)))


def _client() -> Any:
    # One client per configuration: the transport is read from the environment when it is built.
    return _client_for(tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("OPENLINEAGE"))))


@cache
def _client_for(_configuration: tuple[tuple[str, str], ...]) -> Any:
    from openlineage.client import OpenLineageClient

    return OpenLineageClient()


def events(execution: dict[str, Any], store_namespace: str) -> list[Any]:
    """The START and COMPLETE events of one execution record (see runs.py)."""
    from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
    from openlineage.client.facet_v2 import job_type_job, parent_run, processing_engine_run

    ns = namespace()
    pipeline = run_uuid(execution["run_id"])
    this_run = run_uuid(execution["run_id"], execution["stage"], execution["started_at"], execution["cache_key"])
    facets = {
        "parent": parent_run.ParentRunFacet(
            run=parent_run.Run(runId=pipeline),
            job=parent_run.Job(namespace=ns, name=f"{ns}.pipeline"),
        ),
        "processing_engine": processing_engine_run.ProcessingEngineRunFacet(
            version=str(execution["stage_version"]),
            name=f"mlmesh {execution['stage']}",
        ),
    }
    job = Job(
        namespace=ns,
        name=f"{ns}.{execution['stage']}",
        facets={"jobType": job_type_job.JobTypeJobFacet(processingType="BATCH", integration="MLMESH", jobType="STAGE")},
    )
    inputs = [InputDataset(namespace=store_namespace, name=ref["sha256"]) for ref in execution["inputs"].values()]
    outputs = [OutputDataset(namespace=store_namespace, name=ref["sha256"]) for ref in execution["outputs"].values()]
    return [
        RunEvent(
            eventType=RunState.START,
            eventTime=execution["started_at"],
            run=Run(runId=this_run, facets=facets),
            job=job,
            inputs=inputs,
            producer=PRODUCER,
        ),
        RunEvent(
            eventType=RunState.COMPLETE,
            eventTime=execution["ended_at"],
            run=Run(runId=this_run, facets=facets),
            job=job,
            inputs=inputs,
            outputs=outputs,
            producer=PRODUCER,
        ),
    ]


def emit(execution: dict[str, Any], store_namespace: str) -> None:
    """Send an execution's events, if OpenLineage is configured; a failure is logged, never raised."""
    if not configured():
        return
    try:
        client = _client()
        for event in events(execution, store_namespace):
            client.emit(event)
    except Exception as exc:  # noqa: BLE001 - lineage export must never fail a stage call
        log.warning("could not emit OpenLineage events for %s: %s", execution.get("stage"), bounded(exc, 200))
