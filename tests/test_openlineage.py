"""Stage executions exported as OpenLineage run events through the client's file transport."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from services.client.mesh import MeshClient, PipelineConfig
from services.runtime import openlineage
from services.runtime.catalog import PIPELINE_STAGES

# The parts of the OpenLineage 2-0-2 RunEvent that every consumer relies on, restated as JSON Schema
# (the published OpenLineage.json cannot be fetched offline): required fields, their formats and enums.
# jsonschema checks "uuid" itself; URIs and times get explicit patterns (their format checkers are optional extras).
_URI = {"type": "string", "pattern": r"^[a-z][a-z0-9+.-]*://\S+$"}
_TIME = {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$"}
_FACET = {
    "type": "object",
    "required": ["_producer", "_schemaURL"],
    "properties": {"_producer": _URI, "_schemaURL": _URI},
}
_DATASET = {
    "type": "object",
    "required": ["namespace", "name"],
    "properties": {
        "namespace": {"type": "string", "minLength": 1},
        "name": {"type": "string", "minLength": 1},
        "facets": {"type": "object", "additionalProperties": _FACET},
    },
}
RUN_EVENT = {
    "type": "object",
    "required": ["eventTime", "producer", "schemaURL", "run", "job"],
    "properties": {
        "eventTime": _TIME,
        "producer": _URI,
        "schemaURL": {
            "type": "string",
            "pattern": r"^https://openlineage\.io/spec/\d+-\d+-\d+/OpenLineage\.json#/\$defs/RunEvent$",
        },
        "eventType": {"enum": ["START", "RUNNING", "COMPLETE", "ABORT", "FAIL", "OTHER"]},
        "run": {
            "type": "object",
            "required": ["runId"],
            "properties": {
                "runId": {"type": "string", "format": "uuid"},
                "facets": {"type": "object", "additionalProperties": _FACET},
            },
        },
        "job": {
            "type": "object",
            "required": ["namespace", "name"],
            "properties": {
                "namespace": {"type": "string", "minLength": 1},
                "name": {"type": "string", "minLength": 1},
                "facets": {"type": "object", "additionalProperties": _FACET},
            },
        },
        "inputs": {"type": "array", "items": _DATASET},
        "outputs": {"type": "array", "items": _DATASET},
    },
}


@pytest.mark.asyncio
async def test_every_stage_call_is_exported_as_valid_openlineage_events(
    client: MeshClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "lineage.jsonl"
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__TYPE", "file")
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__LOG_FILE_PATH", str(log))
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__APPEND", "true")
    monkeypatch.setenv("OPENLINEAGE_NAMESPACE", "mlmesh-test")
    run = await client.run_pipeline(PipelineConfig(source="sklearn:iris"))

    events = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    checker = jsonschema.Draft202012Validator(RUN_EVENT, format_checker=jsonschema.FormatChecker())
    for event in events:
        checker.validate(event)
    # ...and the checker does refuse what the spec refuses.
    broken = json.loads(json.dumps(events[0]))
    broken["run"]["runId"], broken["eventTime"] = "not-a-uuid", "yesterday"
    assert len(list(checker.iter_errors(broken))) == 2
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"] * len(PIPELINE_STAGES)
    assert [e["job"]["name"] for e in events[::2]] == [f"mlmesh-test.{s}" for s in PIPELINE_STAGES]
    # One pipeline run is the parent of all five; each execution has its own run id.
    parents = {e["run"]["facets"]["parent"]["run"]["runId"] for e in events}
    assert parents == {openlineage.run_uuid(run.run_id)}
    assert len({e["run"]["runId"] for e in events}) == 5
    # The model is the trainer's output and the evaluator's input, named by its digest.
    completes = {e["job"]["name"].split(".")[-1]: e for e in events if e["eventType"] == "COMPLETE"}
    assert {"name": run.train.model.sha256} in [{"name": d["name"]} for d in completes["trainer"]["outputs"]]
    assert run.train.model.sha256 in {d["name"] for d in completes["evaluator"]["inputs"]}


def test_nothing_is_exported_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("OPENLINEAGE_URL", "OPENLINEAGE_CONFIG", "OPENLINEAGE__TRANSPORT__TYPE"):
        monkeypatch.delenv(key, raising=False)
    assert not openlineage.configured()
    assert openlineage.configured({"OPENLINEAGE_URL": "http://marquez:5000"})
    assert not openlineage.configured({"OPENLINEAGE_URL": "http://marquez:5000", "OPENLINEAGE_DISABLED": "true"})
