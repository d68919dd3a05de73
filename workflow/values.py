"""What passes between the workflow's tasks, and what the workflows return.

References, metrics and reasons only: datasets, matrices and models stay in the
artifact store. Each is a dataclass Flyte serializes; `PipelineResult` and
`SweepResult` print as the summary people read at the end of `pyflyte run`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import NamedTuple

from mlmesh.common.v1 import common_pb2
from services.client.summary import RunOutcome, StageTime, local_path, render
from services.runtime import tracing


@dataclass
class ArtifactRef:
    uri: str = ""
    sha256: str = ""
    size_bytes: int = 0
    media_type: str = ""

    @classmethod
    def of(cls, ref: common_pb2.ArtifactRef) -> ArtifactRef:
        return cls(ref.uri, ref.sha256, ref.size_bytes, ref.media_type)

    def proto(self) -> common_pb2.ArtifactRef:
        return common_pb2.ArtifactRef(
            uri=self.uri, sha256=self.sha256, size_bytes=self.size_bytes, media_type=self.media_type
        )


@dataclass
class StageTiming:
    """How one stage call went: its time, and whether the stage answered from its memo."""

    stage: str = ""
    cache_hit: bool = False
    seconds: float = 0.0

    @classmethod
    def of(cls, info: common_pb2.StageInfo) -> StageTiming:
        return cls(info.stage, info.cache_hit, info.seconds)


@dataclass
class Dataset:
    dataset: ArtifactRef
    rows: int
    task_kind: str
    task_kind_reason: str
    # Every column's role and why; the profile's per-column statistics.
    schema: ArtifactRef
    profile: ArtifactRef
    roles: dict[str, str]
    stage: StageTiming = field(default_factory=StageTiming)


@dataclass
class Splits:
    train: ArtifactRef
    test: ArtifactRef
    class_names: list[str]
    split_report: ArtifactRef
    rows_dropped: dict[str, int]
    stage: StageTiming = field(default_factory=StageTiming)


@dataclass
class Features:
    x_train: ArtifactRef
    y_train: ArtifactRef
    x_test: ArtifactRef
    y_test: ArtifactRef
    transformer: ArtifactRef
    feature_schema: ArtifactRef
    stage: StageTiming = field(default_factory=StageTiming)


@dataclass
class TrainedModel:
    model: ArtifactRef
    model_name: str
    effective_hyperparameters: dict[str, str]
    stage: StageTiming = field(default_factory=StageTiming)


@dataclass
class Evaluation:
    metrics: dict[str, float]
    decision: str
    reasons: list[str]
    metrics_report: ArtifactRef
    html_report: ArtifactRef
    stage: StageTiming = field(default_factory=StageTiming)


class Prepared(NamedTuple):
    """The `prepare` sub-workflow's outputs: the data both pipelines train on."""

    dataset: Dataset
    splits: Splits
    features: Features


@dataclass
class ModelCandidate:
    model: str
    hyperparameters: dict[str, str] = field(default_factory=dict)


@dataclass
class PipelineResult:
    model: ArtifactRef
    task_kind: str
    metrics: dict[str, float]
    decision: str
    reasons: list[str]
    rows_dropped: dict[str, int]
    report: ArtifactRef
    html_report: ArtifactRef
    lineage: dict[str, ArtifactRef]
    registered_as: str
    # The run every stage recorded its execution under: `mlmesh lineage --run RUN_ID`.
    run_id: str = ""
    source: str = ""
    model_name: str = ""
    # Each stage's time and memo hit, in pipeline order.
    stages: list[StageTiming] = field(default_factory=list)
    # The evaluate task's Flyte deck, when the run was local (on a cluster: the Flyte console).
    deck: str = ""
    seconds: float = 0.0
    # After a PROMOTE, which version serving answered the smoke request with (or why not yet).
    served: str = ""

    def outcome(self) -> RunOutcome:
        return {
            "run_id": self.run_id,
            "source": self.source,
            "task_kind": self.task_kind,
            "decision": self.decision,
            "reasons": self.reasons,
            "metrics": self.metrics,
            "model_name": self.model_name,
            "model_uri": self.model.uri,
            "model_sha256": self.model.sha256,
            "registered_as": self.registered_as,
            "served": self.served,
            "report_path": local_path(self.html_report.uri),
            "deck_path": self.deck,
            "stages": [StageTime(stage=s.stage, cache_hit=s.cache_hit, seconds=s.seconds) for s in self.stages],
            "seconds": self.seconds,
            **({"trace_id": tracing.trace_id_of(self.run_id)} if tracing.enabled() else {}),
        }

    def __str__(self) -> str:
        # What `pyflyte run` prints at the end (it echoes the workflow's result), a line below the progress.
        if _json_output():
            return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)
        return "\n" + render(self.outcome())


@dataclass
class SweepResult:
    metric: str
    best_index: int
    best: PipelineResult
    candidates: list[ModelCandidate]
    candidate_metrics: list[dict[str, float]]
    # Every candidate side by side (HTML in the store; also the compare task's deck).
    comparison_report: ArtifactRef

    def __str__(self) -> str:
        if _json_output():
            return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)
        rows = []
        for index, (candidate, metrics) in enumerate(zip(self.candidates, self.candidate_metrics, strict=True)):
            params = ", ".join(f"{k}={v}" for k, v in sorted(candidate.hyperparameters.items())) or "defaults"
            mark = "*" if index == self.best_index else " "
            score = metrics.get(self.metric)
            rows.append(
                f"{mark} {index}  {candidate.model:<24} {self.metric} "
                f"{'-' if score is None else f'{score:.4f}'}  ({params})"
            )
        return "\n".join(
            [
                "",
                f"sweep     {len(self.candidates)} candidates by {self.metric}; * marks the winner",
                *rows,
                f"compared  {local_path(self.comparison_report.uri)}",
                "",
                render(self.best.outcome()),
            ]
        )


def _json_output() -> bool:
    """MLMESH_OUTPUT=json: `pyflyte run` prints the whole result as JSON instead of the summary."""
    return os.environ.get("MLMESH_OUTPUT", "").strip().lower() == "json"


# Hyperparameters and thresholds as people type them on the pyflyte command line:
# --hyperparameters '{"n_estimators": 300}' and '{"n_estimators": "300"}' mean the same,
# as do --minimums '{"rmse": 5000}' and '{"rmse": 5000.0}'.
HyperparameterValue = str | int | float
Threshold = float | int


@dataclass
class CandidateOutcome:
    candidate: ModelCandidate
    trained: TrainedModel
    evaluation: Evaluation


@dataclass
class SweepChoice:
    index: int
    trained: TrainedModel
    evaluation: Evaluation
