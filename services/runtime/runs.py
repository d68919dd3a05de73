"""Pipeline runs and the stage executions they are made of.

Manifests say which computation first produced an artifact; a run says what
happened this time. Every pipeline run has a run id: the CLI makes one, the
Flyte workflow uses its execution id, and it travels to each stage in the
gRPC metadata `mlmesh-run-id`. Every stage call, a cache hit as much as a
computation, writes one execution record:

    <root>/runs/<run id>/<started>-<stage>-<token>.json

with the stage and version, cache key and hit, inputs, outputs, parameters,
start, end and host. An artifact may thus have many producing executions,
and `mlmesh lineage --run ID` shows one run's graph with nothing from others.
"""

from __future__ import annotations

import re
import secrets
import socket
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import Message

from mlmesh.common.v1.common_pb2 import ArtifactRef
from services.runtime.errors import InvalidArgument, bounded
from services.runtime.store import ArtifactStore, DamagedDocument, ref_to_dict

RUN_ID_METADATA = "mlmesh-run-id"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
HOST = socket.gethostname()


def new_run_id(prefix: str = "run") -> str:
    """A readable, sortable, unique id: run-20261124T203512-3fa9c1."""
    return f"{prefix}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def check_run_id(text: str) -> str:
    if not _RUN_ID.match(text):
        raise InvalidArgument(
            f"metadata {RUN_ID_METADATA} {bounded(repr(text), 80)} is not a run id: 1 to 128 letters, digits, '.', '_', ':' "
            "or '-', starting with a letter or digit"
        )
    return text


def refs_in(message: Message) -> dict[str, ArtifactRef]:
    """The artifact references a response carries, by field name."""
    return {
        field.name: value for field, value in message.ListFields() if isinstance(value, ArtifactRef) and value.sha256
    }


def summary_of(message: Message) -> dict[str, Any]:
    """A response's small facts for the run list: its scalars, enum names and number maps (metrics)."""
    summary: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entries = dict(value)
            if all(isinstance(v, (int, float)) for v in entries.values()) and len(entries) <= 64:
                summary[field.name] = entries
        elif field.is_repeated or field.message_type is not None:
            continue
        elif field.enum_type is not None:
            summary[field.name] = (
                field.enum_type.values_by_number[value].name.removeprefix(f"{field.enum_type.name.upper()}_")
                if value in field.enum_type.values_by_number
                else value
            )
        elif isinstance(value, str):
            summary[field.name] = bounded(value, 200)
        else:
            summary[field.name] = value
    return summary


def record_execution(store: ArtifactStore, execution: dict[str, Any]) -> None:
    started = execution["started_at"].replace("-", "").replace(":", "").split(".")[0]
    name = f"{started}-{execution['stage']}-{secrets.token_hex(3)}.json"
    # Not fsynced and not indented: every call writes one, cache hits included, so it must
    # cost well under a millisecond; a crash loses at most this line of the log.
    store.write_doc(("runs", execution["run_id"], name), execution, durable=False, pretty=False)


def execution_doc(
    run_id: str,
    stage: str,
    version: str,
    cache_key: str,
    cache_hit: bool,
    inputs: dict[str, ArtifactRef],
    outputs: dict[str, ArtifactRef],
    params: dict[str, Any],
    started: datetime,
    ended: datetime,
    summary: dict[str, Any],
    caller: str = "",
) -> dict[str, Any]:
    """One stage call of a run; `caller` is who made it ("token:<name>", "cert:<subject>") when the mesh checks identity."""
    return {
        "run_id": run_id,
        "stage": stage,
        "stage_version": version,
        "cache_key": cache_key,
        "cache_hit": cache_hit,
        "inputs": {name: ref_to_dict(ref) for name, ref in inputs.items()},
        "outputs": {name: ref_to_dict(ref) for name, ref in outputs.items()},
        "params": params,
        "started_at": started.isoformat(),
        "ended_at": ended.isoformat(),
        "host": HOST,
        "summary": summary,
        **({"caller": caller} if caller else {}),
    }


def _docs(store: ArtifactStore, folder: tuple[str, ...]) -> list[dict[str, Any]]:
    documents = []
    for name in store.list_names(folder):
        if name.endswith(".json"):
            try:
                doc = store.load_doc((*folder, name))
            except DamagedDocument:
                continue
            if doc is not None:
                documents.append(doc)
    return documents


def executions(store: ArtifactStore, run_id: str) -> list[dict[str, Any]]:
    """One run's executions, in the order they started."""
    return sorted(_docs(store, ("runs", check_run_id(run_id))), key=lambda e: str(e.get("started_at")))


def run_ids(store: ArtifactStore) -> list[str]:
    return [name for name in store.list_names(("runs",)) if _RUN_ID.match(name)]


def runs(store: ArtifactStore, limit: int) -> list[dict[str, Any]]:
    """Recent runs, newest first: id, start, end, stages, and the evaluator's decision and metrics."""
    found = []
    for run_id in run_ids(store):
        steps = executions(store, run_id)
        if not steps:
            continue
        evaluated = [e for e in steps if e.get("stage") == "evaluator" and "decision" in (e.get("summary") or {})]
        summary = evaluated[-1]["summary"] if evaluated else {}
        found.append(
            {
                "run_id": run_id,
                "started_at": steps[0].get("started_at"),
                "ended_at": steps[-1].get("ended_at"),
                "stages": [e.get("stage") for e in steps],
                "cache_hits": sum(bool(e.get("cache_hit")) for e in steps),
                "decision": summary.get("decision", ""),
                "metrics": summary.get("metrics", {}),
            }
        )
    found.sort(key=lambda r: str(r["started_at"]), reverse=True)
    return found[:limit]


def runs_touching(store: ArtifactStore, digest: str) -> list[dict[str, Any]]:
    """Every execution, in any run, that produced or used the artifact with this digest."""
    touching = []
    for run_id in run_ids(store):
        for execution in executions(store, run_id):
            produced = [n for n, ref in (execution.get("outputs") or {}).items() if ref.get("sha256") == digest]
            used = [n for n, ref in (execution.get("inputs") or {}).items() if ref.get("sha256") == digest]
            if produced or used:
                touching.append({**execution, "produced_as": produced, "used_as": used})
    return sorted(touching, key=lambda e: str(e.get("started_at")))
