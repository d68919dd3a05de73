"""The five stages over real channels: quality, determinism, memoization, lineage."""

from __future__ import annotations

import pytest

from mlmesh.evaluator.v1 import evaluator_pb2
from services.client.mesh import MeshClient, PipelineConfig
from services.runtime.store import ArtifactStore


@pytest.mark.asyncio
async def test_breast_cancer_logistic_regression_scores_and_promotes(client: MeshClient) -> None:
    run = await client.run_pipeline(PipelineConfig(minimums={"accuracy": 0.95}))
    assert run.evaluate.metrics["accuracy"] >= 0.95
    assert run.evaluate.decision == evaluator_pb2.DECISION_PROMOTE
    assert 0.5 < run.evaluate.metrics["roc_auc"] <= 1.0
    assert run.preprocess.rows_in == 569 and run.preprocess.train_rows + run.preprocess.test_rows == 569
    assert not any(info.cache_hit for info in run.stages)


@pytest.mark.asyncio
async def test_second_identical_run_is_all_cache_hits(client: MeshClient) -> None:
    first = await client.run_pipeline(PipelineConfig())
    second = await client.run_pipeline(PipelineConfig())
    assert all(info.cache_hit for info in second.stages)
    assert [i.cache_key for i in first.stages] == [i.cache_key for i in second.stages]
    assert second.train.model == first.train.model
    forced = await client.run_pipeline(PipelineConfig(force_recompute=True))
    assert not any(info.cache_hit for info in forced.stages)
    assert forced.train.model.sha256 == first.train.model.sha256


@pytest.mark.asyncio
async def test_lineage_walks_from_report_back_to_source(client: MeshClient, settings) -> None:
    run = await client.run_pipeline(PipelineConfig())
    chain = ArtifactStore(settings.artifact_root).lineage(run.evaluate.metrics_report.sha256)
    stages = [m["stage"] for m in chain]
    assert stages[0] == "evaluator" and stages[-1] == "loader"
    assert {"evaluator", "trainer", "features", "preprocess", "loader"} == set(stages)
    assert chain[-1]["params"]["source"] == "sklearn:breast_cancer"
    assert all(m["duration_seconds"] >= 0 and m["created_at"] for m in chain)
