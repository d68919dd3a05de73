"""The thin Flyte workflow: five tasks, one RPC each, passing artifact references.

    pyflyte run workflow/pipeline.py training_pipeline
    pyflyte run workflow/pipeline.py sweep_pipeline
    pyflyte run --remote workflow/pipeline.py training_pipeline   # on a Flyte cluster

Nothing heavier than a reference, a metric or a reason ever passes through
Flyte: datasets, matrices and models stay in the artifact store. The services
are found through the same MLMESH_*_ADDRESS variables as the `mlmesh` CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import html
import json
import os
import signal
import sys
import threading
import warnings
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol, TypeVar

import flytekit
from flytekit import CronSchedule, Deck, LaunchPlan, task, workflow
from flytekit.exceptions.user import FlyteRecoverableException

from mlmesh.common.v1 import common_pb2
from mlmesh.evaluator.v1 import evaluator_pb2
from mlmesh.features.v1 import features_pb2
from mlmesh.preprocess.v1 import preprocess_pb2
from services.client.mesh import (
    LINEAGE,
    ConfigError,
    MeshClient,
    OnCallProgress,
    PipelineConfig,
    StageCallError,
    default_registry_name,
    evaluate_request,
    features_request,
    load_request,
    preprocess_request,
    rows_dropped,
    train_request,
)
from services.client.progress import PipelineProgress, stage_outcome
from services.client.summary import RunOutcome, StageTime, local_path, render
from services.runtime import tracing
from services.runtime.pages import deck_html, profile_page
from services.runtime.roles import role_name
from services.runtime.runs import new_run_id
from services.runtime.settings import Settings
from services.runtime.store import ArtifactStore
from services.runtime.vocabulary import (
    CategoricalEncoding,
    Decision,
    NumericImputation,
    Scaling,
    TaskKind,
    TaskKindChoice,
)

T = TypeVar("T")


class _StageReply(Protocol):
    """What every stage's response has: how the call went (StageInfo)."""

    stage: common_pb2.StageInfo


Reply = TypeVar("Reply", bound=_StageReply)

# pyflyte declares every bool input twice (--x/--no_x and --x/--no-x), and click
# warns about the repeated --x on every run. The flags work; the warning is noise.
warnings.filterwarnings("ignore", message=r"The parameter --\w+ is used more than once", category=UserWarning)

# The image the tasks run in on a cluster: the `pipeline` target of
# deploy/Dockerfile (the project with flytekit), built for Axion with
#   docker buildx build --platform linux/arm64 --target pipeline -f deploy/Dockerfile -t <registry>/mlmesh-pipeline:<tag> .
# A plain image name, not an ImageSpec, so that `pyflyte package` and
# `pyflyte run --remote` never try to build images on the machine they run on.
PIPELINE_IMAGE = os.environ.get("MLMESH_PIPELINE_IMAGE", "mlmesh-pipeline:latest")

# Every task retries transient failures on a cluster and gives up after its timeout.
_TASK_DEFAULTS = {"retries": 3, "timeout": timedelta(minutes=30), "container_image": PIPELINE_IMAGE}


# No task is cached by Flyte. Flyte's cache maps inputs to the references a run
# returned, but cannot see whether those objects still exist, nor which store
# they are in: after the store is wiped, or from another checkout sharing
# ~/.flyte, a hit would hand out references to nothing. Each service memoizes by
# content digest and checks its outputs are still there, so a repeat costs one
# RPC of a few milliseconds per stage and never returns a dangling reference.


# ---- typed references -------------------------------------------------------------------
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


# ---- calling the services -----------------------------------------------------------------
class StageFailed(Exception):
    """A stage refused the request; retrying would not help."""


# `pyflyte run` without --remote runs every task in this process, and its execution is named "local".
_LOCAL_RUN_ID = new_run_id("local")
_LOCAL_RUN_STARTED = datetime.now(UTC)


def run_id() -> str:
    """The pipeline run's id: the Flyte execution's name on a cluster, one per process locally."""
    name = flytekit.current_context().execution_id.name
    return _LOCAL_RUN_ID if name in ("", "local") else f"flyte-{name}"


def run_started() -> datetime:
    """When the pipeline run began: the Flyte execution's date on a cluster, this process's start locally."""
    name = flytekit.current_context().execution_id.name
    started = getattr(flytekit.current_context(), "execution_date", None)
    return _LOCAL_RUN_STARTED if name in ("", "local") or not isinstance(started, datetime) else started


def _close_run_trace(**attributes: str) -> None:
    """Write the root span of the run's trace, from the run's start to now (promote, the last
    task of a training run; a sweep's compare after it only writes its page).

    No process lives as long as a Flyte run, so the root is written at the end; the
    task spans before it already named it as their parent (tracing.run_task_span).
    """
    if not tracing.enabled():
        return
    started = int(run_started().timestamp() * 1e9)
    with tracing.run_span(
        run_id(), "flyte run", start_time_ns=started, **{f"mlmesh.{k}": v for k, v in attributes.items()}
    ):
        pass


def _local() -> bool:
    """True under `pyflyte run` without --remote: every task in this process, a person watching."""
    return flytekit.current_context().execution_id.name in ("", "local")


def call(stage_call: Callable[[MeshClient, PipelineProgress], Awaitable[T]], task_name: str) -> T:
    """Run one task's RPCs with a fresh client and a progress display; map failures to Flyte's.

    With OTEL_* set, the task is a span in the run's trace (see services/runtime/tracing.py),
    and each RPC a child of it.

    On a cluster a failure raises, so that Flyte retries what may heal and records the
    stage's message. Under a local `pyflyte run` there is no retry, and a person reads the
    terminal: the stage's message is printed as one paragraph, and the run exits without
    a traceback of this file (1, or 130 after Ctrl-C, which also stops a fit in progress).
    """

    async def run() -> T:
        async with MeshClient(Settings.from_env(), recompute_flag="--recompute", run_id=run_id()) as client:
            try:
                with PipelineProgress() as progress:
                    return await stage_call(client, progress)
            except asyncio.CancelledError:
                if await client.cancel_fits():
                    print("mlmesh: asked the trainer to stop the fit", file=sys.stderr)
                raise

    try:
        tracing.configure("workflow")
    except (ValueError, ImportError) as exc:
        raise StageFailed(f"invalid tracing configuration: {exc}") from None
    try:
        with tracing.run_task_span(run_id(), f"flyte.task {task_name}"), _ctrl_c_cancels():
            return asyncio.run(run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"\nmlmesh: interrupted during the {task_name} task", file=sys.stderr)
        raise SystemExit(130) from None
    except (StageCallError, ConfigError) as error:
        if _local():
            print(f"\nmlmesh: the {task_name} task failed.\n{error}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        if isinstance(error, StageCallError) and error.recoverable:
            raise FlyteRecoverableException(str(error)) from None
        raise StageFailed(str(error)) from None


@contextlib.contextmanager
def _ctrl_c_cancels() -> Iterator[None]:
    """During a task's calls, Ctrl-C cancels them (asyncio's own handling of SIGINT).

    flytekit's SIGINT handler exits with status 1 wherever the process is; asyncio.run
    installs its graceful handler only over Python's default one. So the default is put
    back for the call, and flytekit's restored after it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


async def _one(
    progress: PipelineProgress,
    stage: str,
    rpc: Callable[[OnCallProgress], Awaitable[Reply]],
    count: Callable[[Reply], int] = lambda _: 0,
) -> Reply:
    """One unary stage call, shown on the progress display with the stage's own reports."""
    with progress.stage(stage) as shown:
        reply = await rpc(shown.step)
        shown.done(stage_outcome(stage, reply.stage, count(reply)))
    return reply


def _stored_page(ref: ArtifactRef, what: str) -> bytes:
    """An artifact's bytes from the store, digest-checked (for decks)."""
    with tracing.run_task_span(run_id(), f"flyte.deck {what}"):
        return ArtifactStore(Settings.from_env().artifact_root).get(ref.proto(), what)


# ---- the five stage tasks ----------------------------------------------------------------
# Each task builds its request with the same helpers the mlmesh CLI uses
# (services/client/mesh.py), so both entry points mean the same by each option.
#
# The loader memoizes by file content, not by source name, since a file behind a
# name can change.
@task(enable_deck=True, **_TASK_DEFAULTS)
def load(
    source: str, target_column: str, task_kind: TaskKindChoice, column_roles: dict[str, str], recompute: bool
) -> Dataset:
    config = PipelineConfig(
        source=source,
        target_column=target_column,
        task_kind=task_kind,
        column_roles=column_roles,
        force_recompute=recompute,
    )
    reply = call(
        lambda c, shown: _one(shown, "loader", lambda watch: c.load(load_request(config), watch), lambda r: r.rows),
        "load",
    )
    dataset = Dataset(
        dataset=ArtifactRef.of(reply.dataset),
        rows=reply.rows,
        task_kind=TaskKind.text_of(reply.task_kind),
        task_kind_reason=reply.task_kind_reason,
        schema=ArtifactRef.of(reply.schema),
        profile=ArtifactRef.of(reply.profile),
        roles={c.name: role_name(c.role, c.name) for c in reply.columns},
        stage=StageTiming.of(reply.stage),
    )
    # Flyte's view of the data going in: the loader's profile, with a histogram per column.
    profile = json.loads(_stored_page(dataset.profile, "profile"))
    Deck("Data profile", deck_html(profile_page(profile)))
    return dataset


@task(**_TASK_DEFAULTS)
def preprocess(
    dataset: Dataset,
    test_fraction: float,
    seed: int,
    drop_duplicates: bool,
    drop_incomplete_rows: bool,
    recompute: bool,
) -> Splits:
    config = PipelineConfig(
        test_fraction=test_fraction,
        seed=seed,
        drop_duplicates=drop_duplicates,
        drop_incomplete_rows=drop_incomplete_rows,
        force_recompute=recompute,
    )
    request = preprocess_request(config, dataset.dataset.proto())
    reply = call(
        lambda c, shown: _one(shown, "preprocess", lambda watch: c.preprocess(request, watch), lambda r: r.rows_in),
        "preprocess",
    )
    return Splits(
        train=ArtifactRef.of(reply.train),
        test=ArtifactRef.of(reply.test),
        class_names=list(reply.class_names),
        split_report=ArtifactRef.of(reply.split_report),
        rows_dropped=rows_dropped(reply),
        stage=StageTiming.of(reply.stage),
    )


@task(**_TASK_DEFAULTS)
def build_features(
    splits: Splits,
    model: str,
    seed: int,
    numeric_imputation: NumericImputation,
    missing_indicators: bool,
    categorical_encoding: CategoricalEncoding,
    scaling: Scaling,
    polynomial_degree: int,
    select_k_best: int,
    recompute: bool,
) -> Features:
    config = PipelineConfig(
        seed=seed,
        numeric_imputation=numeric_imputation,
        missing_indicators=missing_indicators,
        categorical_encoding=categorical_encoding,
        scaling=scaling,
        polynomial_degree=polynomial_degree,
        select_k_best=select_k_best,
        force_recompute=recompute,
    )
    request = features_request(config, splits.train.proto(), splits.test.proto(), model)
    reply = call(
        lambda c, shown: _one(shown, "features", lambda watch: c.build_features(request, watch)), "build_features"
    )
    return Features(
        x_train=ArtifactRef.of(reply.x_train),
        y_train=ArtifactRef.of(reply.y_train),
        x_test=ArtifactRef.of(reply.x_test),
        y_test=ArtifactRef.of(reply.y_test),
        transformer=ArtifactRef.of(reply.transformer),
        feature_schema=ArtifactRef.of(reply.feature_schema),
        stage=StageTiming.of(reply.stage),
    )


def _features_reply(features: Features) -> features_pb2.BuildFeaturesResponse:
    return features_pb2.BuildFeaturesResponse(
        **{
            name: getattr(features, name).proto()
            for name in ("x_train", "y_train", "x_test", "y_test", "transformer", "feature_schema")
        }
    )


# A fit may run for hours: no gRPC deadline bounds it (the client follows the
# trainer's long-running operation and re-attaches after a restart); this
# task's own timeout and retries do. A retry sends the same request, which
# joins the running fit or resumes it from its last checkpoint.
_TRAIN_DEFAULTS = {**_TASK_DEFAULTS, "timeout": timedelta(hours=24)}


# Hyperparameters and thresholds as people type them on the pyflyte command line:
# --hyperparameters '{"n_estimators": 300}' and '{"n_estimators": "300"}' mean the same,
# as do --minimums '{"rmse": 5000}' and '{"rmse": 5000.0}'.
HyperparameterValue = str | int | float
Threshold = float | int


def _hyperparameters(values: dict[str, HyperparameterValue]) -> dict[str, str]:
    """As the trainer takes them: text, with a whole float written as an integer (300.0 -> '300')."""
    return {name: str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) for name, v in values.items()}


def _thresholds(values: dict[str, Threshold]) -> dict[str, float]:
    return {name: float(v) for name, v in values.items()}


@task(**_TRAIN_DEFAULTS)
def train(
    features: Features, model: str, hyperparameters: dict[str, HyperparameterValue], seed: int, recompute: bool
) -> TrainedModel:
    config = PipelineConfig(
        model=model, hyperparameters=_hyperparameters(hyperparameters), seed=seed, force_recompute=recompute
    )
    return call(lambda c, progress: _train(c, config, features, progress), "train")


async def _train(
    client: MeshClient, config: PipelineConfig, features: Features, progress: PipelineProgress, label: str = "trainer"
) -> TrainedModel:
    with progress.stage("trainer", label) as shown:
        result = await client.train(train_request(config, _features_reply(features)), shown.fit)
        shown.done(stage_outcome("trainer", result.stage) + f", {result.model_name}")
    return TrainedModel(
        ArtifactRef.of(result.model),
        result.model_name,
        dict(result.effective_hyperparameters),
        StageTiming.of(result.stage),
    )


async def _evaluate(
    client: MeshClient,
    config: PipelineConfig,
    trained: TrainedModel,
    features: Features,
    splits: Splits,
    dataset: Dataset,
    progress: PipelineProgress,
    label: str = "evaluator",
) -> Evaluation:
    prepared = preprocess_pb2.PreprocessResponse(
        class_names=splits.class_names, split_report=splits.split_report.proto()
    )
    with progress.stage("evaluator", label) as shown:
        reply = await client.evaluate(
            evaluate_request(
                config, trained.model.proto(), _features_reply(features), prepared, dataset.profile.proto()
            ),
            shown.step,
        )
        shown.done(stage_outcome("evaluator", reply.stage) + f", {Decision.text_of(reply.decision)}")
    return Evaluation(
        metrics=dict(reply.metrics),
        decision=Decision.text_of(reply.decision),
        reasons=list(reply.reasons),
        metrics_report=ArtifactRef.of(reply.metrics_report),
        html_report=ArtifactRef.of(reply.html_report),
        stage=StageTiming.of(reply.stage),
    )


@task(enable_deck=True, **_TASK_DEFAULTS)
def evaluate(
    trained: TrainedModel,
    features: Features,
    splits: Splits,
    dataset: Dataset,
    minimums: dict[str, Threshold],
    maximums: dict[str, Threshold],
    recompute: bool,
) -> Evaluation:
    config = PipelineConfig(minimums=_thresholds(minimums), maximums=_thresholds(maximums), force_recompute=recompute)
    evaluation = call(
        lambda c, progress: _evaluate(c, config, trained, features, splits, dataset, progress), "evaluate"
    )
    # The deck is the evaluator's own HTML report, read (and digest-checked) from the store,
    # in an iframe so that its styles never touch Flyte's page around it.
    Deck("Evaluation", deck_html(_stored_page(evaluation.html_report, "html_report").decode()))
    return evaluation


def _local_deck() -> str:
    """Where flytekit wrote the evaluate task's deck, under a local `pyflyte run` ('' elsewhere).

    flytekit names the file only in a log line, after the task returns, in a folder of this
    process's own sandbox; the newest deck there holding the evaluation is the one.
    """
    if not _local():
        return ""
    from flytekit.core.context_manager import FlyteContextManager

    sandbox = Path(FlyteContextManager.current_context().file_access.local_sandbox_dir)
    decks = sorted(sandbox.glob("*/deck.html"), key=lambda p: p.stat().st_mtime, reverse=True)
    return next((str(d) for d in decks if "mlmesh evaluation" in d.read_text(errors="replace")), "")


@task(**_TASK_DEFAULTS)
def promote(
    registry_name: str,
    source: str,
    trained: TrainedModel,
    evaluation: Evaluation,
    dataset: Dataset,
    splits: Splits,
    features: Features,
) -> PipelineResult:
    """Register the model when the decision is PROMOTE; always assemble the result."""
    replies = {"load": dataset, "preprocess": splits, "features": features, "train": trained, "evaluate": evaluation}
    lineage = {name: getattr(replies[task_name], name) for name, task_name in LINEAGE.items()}
    registered = ""
    if evaluation.decision == Decision.PROMOTE:
        name = registry_name or default_registry_name(source, trained.model_name)
        request = evaluator_pb2.RegisterModelRequest(
            name=name,
            model=trained.model.proto(),
            metrics_report=evaluation.metrics_report.proto(),
            lineage={k: v.proto() for k, v in lineage.items()},
        )

        async def register(client: MeshClient, progress: PipelineProgress) -> evaluator_pb2.RegisterModelResponse:
            with progress.stage("registry") as shown:
                reply = await client.register_model(request)
                shown.done(
                    f"{reply.model_version.name} v{reply.model_version.version}"
                    + (" (already registered)" if reply.already_registered else "")
                )
            return reply

        reply = call(register, "promote")
        registered = f"{reply.model_version.name} v{reply.model_version.version}"
    result = PipelineResult(
        model=trained.model,
        task_kind=dataset.task_kind,
        metrics=evaluation.metrics,
        decision=evaluation.decision,
        reasons=evaluation.reasons,
        rows_dropped=splits.rows_dropped,
        report=evaluation.metrics_report,
        html_report=evaluation.html_report,
        lineage=lineage,
        registered_as=registered,
        run_id=run_id(),
        source=source,
        model_name=trained.model_name,
        stages=[dataset.stage, splits.stage, features.stage, trained.stage, evaluation.stage],
        deck=_local_deck(),
        seconds=(datetime.now(UTC) - run_started()).total_seconds(),
    )
    _close_run_trace(decision=evaluation.decision)
    return result


# ---- workflows -----------------------------------------------------------------------------
# Empty minimums and maximums mean the evaluator's defaults for the task kind
# (accuracy >= 0.9 for classification, r2 >= 0.3 for regression), as in the CLI.
@workflow
def training_pipeline(
    source: str = "sklearn:breast_cancer",
    target_column: str = "",
    task_kind: TaskKindChoice = TaskKindChoice.INFERRED,
    column_roles: dict[str, str] = {},  # noqa: B006 - Flyte defaults are literals
    model: str = "",  # "": logistic_regression for classification, ridge for regression
    hyperparameters: dict[str, HyperparameterValue] = {},  # noqa: B006
    test_fraction: float = 0.2,
    seed: int = 42,
    drop_duplicates: bool = False,
    drop_incomplete_rows: bool = False,
    numeric_imputation: NumericImputation = NumericImputation.MEDIAN,
    missing_indicators: bool = False,
    categorical_encoding: CategoricalEncoding = CategoricalEncoding.AUTO,
    scaling: Scaling = Scaling.STANDARD,
    polynomial_degree: int = 0,
    select_k_best: int = 0,
    minimums: dict[str, Threshold] = {},  # noqa: B006
    maximums: dict[str, Threshold] = {},  # noqa: B006
    registry_name: str = "",
    recompute: bool = False,
) -> PipelineResult:
    dataset = load(
        source=source, target_column=target_column, task_kind=task_kind, column_roles=column_roles, recompute=recompute
    )
    splits = preprocess(
        dataset=dataset,
        test_fraction=test_fraction,
        seed=seed,
        drop_duplicates=drop_duplicates,
        drop_incomplete_rows=drop_incomplete_rows,
        recompute=recompute,
    )
    features = build_features(
        splits=splits,
        model=model,
        seed=seed,
        numeric_imputation=numeric_imputation,
        missing_indicators=missing_indicators,
        categorical_encoding=categorical_encoding,
        scaling=scaling,
        polynomial_degree=polynomial_degree,
        select_k_best=select_k_best,
        recompute=recompute,
    )
    trained = train(features=features, model=model, hyperparameters=hyperparameters, seed=seed, recompute=recompute)
    evaluation = evaluate(
        trained=trained,
        features=features,
        splits=splits,
        dataset=dataset,
        minimums=minimums,
        maximums=maximums,
        recompute=recompute,
    )
    return promote(
        registry_name=registry_name,
        source=source,
        trained=trained,
        evaluation=evaluation,
        dataset=dataset,
        splits=splits,
        features=features,
    )


# What a sweep tries, and by which metric it picks, when the caller does not say.
DEFAULT_CANDIDATES: dict[str, list[ModelCandidate]] = {
    TaskKind.CLASSIFICATION: [
        ModelCandidate("logistic_regression"),
        ModelCandidate("random_forest", {"n_estimators": "200"}),
        ModelCandidate("hist_gradient_boosting"),
        ModelCandidate("sgd"),
    ],
    TaskKind.REGRESSION: [
        ModelCandidate("ridge"),
        ModelCandidate("random_forest", {"n_estimators": "200"}),
        ModelCandidate("hist_gradient_boosting"),
    ],
}
DEFAULT_METRICS: dict[str, str] = {TaskKind.CLASSIFICATION: "f1_macro", TaskKind.REGRESSION: "r2"}
LOWER_IS_BETTER = frozenset({"log_loss", "mae", "rmse"})


def _candidates(candidates: list[ModelCandidate], task_kind: str) -> list[ModelCandidate]:
    return candidates or DEFAULT_CANDIDATES[task_kind]


@dataclass
class CandidateOutcome:
    candidate: ModelCandidate
    trained: TrainedModel
    evaluation: Evaluation


def _sweep_concurrency() -> int:
    # As many fits at once as the trainer has workers (MLMESH_WORKER_THREADS): more would only queue.
    return max(1, Settings.from_env().worker_threads)


@task(**_TRAIN_DEFAULTS)
def train_candidates(
    candidates: list[ModelCandidate],
    dataset: Dataset,
    splits: Splits,
    features: Features,
    seed: int,
    minimums: dict[str, Threshold],
    maximums: dict[str, Threshold],
) -> list[CandidateOutcome]:
    """Train and evaluate every candidate, concurrently, on the one feature build upstream.

    One task, many concurrent RPCs: the fits run in the trainer, which is where
    the parallelism is, on a laptop and on a cluster alike.
    """
    chosen = _candidates(candidates, dataset.task_kind)
    gate = asyncio.Semaphore(_sweep_concurrency())

    async def one(
        client: MeshClient, progress: PipelineProgress, index: int, candidate: ModelCandidate
    ) -> CandidateOutcome:
        config = PipelineConfig(
            model=candidate.model,
            hyperparameters=candidate.hyperparameters,
            seed=seed,
            minimums=_thresholds(minimums),
            maximums=_thresholds(maximums),
        )
        label = f"#{index} {candidate.model}"
        async with gate:
            trained = await _train(client, config, features, progress, label)
        evaluation = await _evaluate(client, config, trained, features, splits, dataset, progress, label)
        return CandidateOutcome(candidate, trained, evaluation)

    async def every(client: MeshClient, progress: PipelineProgress) -> list[CandidateOutcome]:
        return list(await asyncio.gather(*(one(client, progress, i, c) for i, c in enumerate(chosen))))

    return call(every, "train_candidates")


@dataclass
class SweepChoice:
    index: int
    trained: TrainedModel
    evaluation: Evaluation


@task(**_TASK_DEFAULTS)
def pick_best(metric: str, dataset: Dataset, outcomes: list[CandidateOutcome]) -> SweepChoice:
    metric = metric or DEFAULT_METRICS[dataset.task_kind]
    scored = {i: o.evaluation.metrics[metric] for i, o in enumerate(outcomes) if metric in o.evaluation.metrics}
    if not scored:
        raise StageFailed(f"no candidate reported metric {metric[:40]!r}; choose one the evaluator computes")
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    best = max(scored, key=lambda i: (sign * scored[i], -i))
    return SweepChoice(best, outcomes[best].trained, outcomes[best].evaluation)


@task(enable_deck=True, **_TASK_DEFAULTS)
def compare(
    metric: str, dataset: Dataset, outcomes: list[CandidateOutcome], choice: SweepChoice, best: PipelineResult
) -> SweepResult:
    """The sweep's result and its one comparison report: every candidate side by side, stored and shown as a deck."""
    metric = metric or DEFAULT_METRICS[dataset.task_kind]
    page = comparison_page(metric, outcomes, choice.index)
    stored = ArtifactStore(Settings.from_env().artifact_root).put(page.encode(), "text/html")
    Deck("Sweep comparison", page)
    return SweepResult(
        metric=metric,
        best_index=choice.index,
        best=best,
        candidates=[o.candidate for o in outcomes],
        candidate_metrics=[o.evaluation.metrics for o in outcomes],
        comparison_report=ArtifactRef.of(stored),
    )


def comparison_page(metric: str, outcomes: list[CandidateOutcome], best: int) -> str:
    """One HTML page: a row per candidate, its metrics, decision and report; the winner marked."""
    names = sorted({name for o in outcomes for name in o.evaluation.metrics})
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = []
    for index, outcome in enumerate(outcomes):
        params = ", ".join(f"{k}={v}" for k, v in sorted(outcome.candidate.hyperparameters.items())) or "defaults"
        cells = "".join(
            f"<td>{outcome.evaluation.metrics[n]:.4f}</td>" if n in outcome.evaluation.metrics else "<td></td>"
            for n in names
        )
        mark = ' class="winner"' if index == best else ""
        rows.append(
            f"<tr{mark}><td>{index}</td><td>{html.escape(outcome.candidate.model)}</td><td>{html.escape(params)}</td>"
            f"{cells}<td>{outcome.evaluation.decision}</td>"
            f'<td><a href="{html.escape(outcome.evaluation.html_report.uri)}">report</a></td></tr>'
        )
    return (
        '<section class="mlmesh-sweep"><style>.mlmesh-sweep table{border-collapse:collapse}'
        ".mlmesh-sweep td,.mlmesh-sweep th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        ".mlmesh-sweep tr.winner{background:#e6f4e6;font-weight:bold}</style>"
        f"<h2>Sweep: {len(outcomes)} candidates by {html.escape(metric)}</h2>"
        f"<p>Winner: candidate {best}, {html.escape(outcomes[best].candidate.model)}. Only the winner is registered.</p>"
        f'<table class="comparison"><tr><th>#</th><th>model</th><th>hyperparameters</th>{head}<th>decision</th>'
        f"<th>report</th></tr>{''.join(rows)}</table></section>"
    )


@workflow
def sweep_pipeline(
    source: str = "sklearn:breast_cancer",
    target_column: str = "",
    task_kind: TaskKindChoice = TaskKindChoice.INFERRED,
    column_roles: dict[str, str] = {},  # noqa: B006
    # Empty: the task kind's default candidates (see DEFAULT_CANDIDATES), e.g.
    # --candidates '[{"model": "ridge"}, {"model": "random_forest", "hyperparameters": {"max_depth": "8"}}]'
    candidates: list[ModelCandidate] = [],  # noqa: B006
    # Empty: f1_macro for classification, r2 for regression. log_loss, mae and rmse are minimised.
    metric: str = "",
    test_fraction: float = 0.2,
    seed: int = 42,
    drop_duplicates: bool = False,
    minimums: dict[str, Threshold] = {},  # noqa: B006
    maximums: dict[str, Threshold] = {},  # noqa: B006
) -> SweepResult:
    dataset = load(
        source=source, target_column=target_column, task_kind=task_kind, column_roles=column_roles, recompute=False
    )
    splits = preprocess(
        dataset=dataset,
        test_fraction=test_fraction,
        seed=seed,
        drop_duplicates=drop_duplicates,
        drop_incomplete_rows=False,
        recompute=False,
    )
    # One feature build serves every candidate, so categorical columns get the general encoding.
    features = build_features(
        splits=splits,
        model="",
        seed=seed,
        numeric_imputation=NumericImputation.MEDIAN,
        missing_indicators=False,
        categorical_encoding=CategoricalEncoding.AUTO,
        scaling=Scaling.STANDARD,
        polynomial_degree=0,
        select_k_best=0,
        recompute=False,
    )
    outcomes = train_candidates(
        candidates=candidates,
        dataset=dataset,
        splits=splits,
        features=features,
        seed=seed,
        minimums=minimums,
        maximums=maximums,
    )
    choice = pick_best(metric=metric, dataset=dataset, outcomes=outcomes)
    # Only the winner is registered (if it passes its thresholds).
    best = promote(
        registry_name="",
        source=source,
        trained=choice.trained,
        evaluation=choice.evaluation,
        dataset=dataset,
        splits=splits,
        features=features,
    )
    return compare(metric=metric, dataset=dataset, outcomes=outcomes, choice=choice, best=best)


# ---- launch plans ----------------------------------------------------------------------------
demo_launch_plan = LaunchPlan.get_or_create(training_pipeline, name="training_pipeline_demo")

# Fires only on a Flyte cluster: retrain every night at 03:00 UTC and promote if it still passes.
nightly_retrain = LaunchPlan.get_or_create(
    training_pipeline,
    name="training_pipeline_nightly",
    schedule=CronSchedule(schedule="0 3 * * *"),
    default_inputs={"recompute": False},
)


if __name__ == "__main__":
    print(training_pipeline())
