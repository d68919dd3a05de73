"""The model registry (services/runtime/registry.py) through the evaluator's RegisterModel RPC on a
real mesh, read back as `mlmesh models` and registry.list_models show it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from mlmesh.evaluator.v1 import evaluator_pb2
from services.client.mesh import MeshClient, PipelineConfig, PipelineRun, register_request
from services.runtime import registry
from services.runtime.formats import json_bytes_to_doc
from services.runtime.server import RunningStage
from services.runtime.settings import Settings
from services.runtime.store import ArtifactStore, ref_to_dict
from tests.helpers import assert_serving, expect_error

MLMESH = Path(sys.executable).parent / "mlmesh"


async def promoted(client: MeshClient, seed: int) -> PipelineRun:
    """An iris run that PROMOTEs; another seed splits the rows differently, so it is another model."""
    run = await client.run_pipeline(PipelineConfig(source="sklearn:iris", seed=seed, minimums={"accuracy": 0.5}))
    assert run.evaluate.decision == evaluator_pb2.DECISION_PROMOTE
    return run


def models_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLMESH_ARTIFACT_ROOT": str(settings.artifact_root)}
    result = subprocess.run([str(MLMESH), "models", *args], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def registry_files(settings: Settings) -> dict[str, bytes]:
    root = Path(settings.artifact_root) / "registry"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.json"))} if root.exists() else {}


@pytest.mark.asyncio
async def test_registering_counts_versions_from_one_and_a_repeat_returns_the_existing_version(
    client: MeshClient, mesh: dict[str, RunningStage], settings: Settings
) -> None:
    first, second = await promoted(client, seed=1), await promoted(client, seed=2)
    assert first.train.model.sha256 != second.train.model.sha256

    started = datetime.now(UTC).replace(microsecond=0)
    one = await client.register_model(register_request(first, "iris"))
    assert (one.model_version.name, one.model_version.version, one.already_registered) == ("iris", 1, False)
    two = await client.register_model(register_request(second, "iris"))
    assert (two.model_version.version, two.already_registered) == (2, False)

    # What a version records: the refs it was given and the metrics of the PROMOTE report.
    version = one.model_version
    assert version.model == first.train.model and version.metrics_report == first.evaluate.metrics_report
    report = json_bytes_to_doc(ArtifactStore(settings.artifact_root).get(first.evaluate.metrics_report), "report")
    assert dict(version.metrics) == pytest.approx(report["metrics"]) and "accuracy" in version.metrics
    assert dict(version.lineage) == dict(first.lineage()) and "dataset" in version.lineage
    registered_at = datetime.fromisoformat(version.registered_at)
    assert registered_at.tzinfo == UTC and started <= registered_at <= datetime.now(UTC)

    # The same model under the same name again: its version 1, and nothing is written.
    before = registry_files(settings)
    again = await client.register_model(register_request(first, "iris"))
    assert again.already_registered and again.model_version == version
    assert registry_files(settings) == before
    # Another name keeps its own count.
    other = await client.register_model(register_request(second, "iris-other"))
    assert (other.model_version.version, other.already_registered) == (1, False)
    await assert_serving(mesh["evaluator"])

    # Read back: the current document lists both versions in order; revision n is the document as it
    # was when version n was registered.
    store = ArtifactStore(settings.artifact_root)
    current = registry.load(store, "iris")
    assert [(v["version"], v["model"]["sha256"]) for v in current["versions"]] == [
        (1, first.train.model.sha256),
        (2, second.train.model.sha256),
    ]
    assert current["versions"][0]["metrics_report"] == ref_to_dict(first.evaluate.metrics_report)
    assert current["versions"][0]["registered_at"] == version.registered_at
    files = registry_files(settings)
    assert sorted(files) == ["iris-other.json", "iris-other/1.json", "iris.json", "iris/1.json", "iris/2.json"]
    assert [v["version"] for v in json.loads(files["iris/1.json"])["versions"]] == [1]
    assert json.loads(files["iris/2.json"]) == json.loads(files["iris.json"]) == current
    listed = registry.list_models(store)
    # in the order of the documents' file names: "iris-other.json" sorts before "iris.json"
    assert [(d["name"], [v["version"] for v in d["versions"]]) for d in listed] == [
        ("iris-other", [1]),
        ("iris", [1, 2]),
    ]

    # `mlmesh models`, as a person reads it and as JSON.
    assert json.loads(models_cli(settings, "--json").stdout) == listed
    lines = models_cli(settings).stdout.splitlines()
    assert len(lines) == 5 and lines[0] == "iris-other" and lines[2] == "iris"
    assert lines[3].split()[:3] == ["v1", version.registered_at, first.train.model.sha256[:12]]
    assert lines[4].split()[:3] == ["v2", two.model_version.registered_at, second.train.model.sha256[:12]]
    assert f"accuracy={version.metrics['accuracy']:.4f}" in lines[3]


@pytest.mark.asyncio
async def test_register_model_refuses_a_retrain_report_and_says_only_promoted_models_register(
    client: MeshClient, mesh: dict[str, RunningStage], settings: Settings
) -> None:
    # A log loss no model reaches: the evaluator says RETRAIN.
    run = await client.run_pipeline(PipelineConfig(source="sklearn:iris", maximums={"log_loss": 1e-9}))
    assert run.evaluate.decision == evaluator_pb2.DECISION_RETRAIN
    details = await expect_error(
        client.register_model(register_request(run, "iris")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "the metrics report says 'RETRAIN', not PROMOTE",
        "only promoted models are registered",
    )
    assert "Retrain" in details and "thresholds it meets" in details  # what to do next
    assert len(details) < 500
    assert registry_files(settings) == {}, "a refused registration wrote to the registry"
    assert models_cli(settings).stdout.strip() == f"no registered models in {settings.artifact_root}"
    await assert_serving(mesh["evaluator"])
