"""The workflow's tasks: one per stage call, each sending references and getting references back.

The five stage tasks, one RPC each: load, preprocess, build_features, train and
evaluate. promote registers a PROMOTE and assembles the PipelineResult. The sweep
trains and evaluates every candidate in one task (train_candidates: many
concurrent fits in the trainer), picks the best (pick_best) and compares them
(compare). Each task builds its request with the helpers the mlmesh CLI uses
(services/client/mesh.py), so both entry points mean the same by each option.
"""

from __future__ import annotations

import asyncio
import html
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from flytekit import Deck, task

from mlmesh.evaluator.v1 import evaluator_pb2
from mlmesh.features.v1 import features_pb2
from mlmesh.preprocess.v1 import preprocess_pb2
from services.client.mesh import (
    LINEAGE,
    MeshClient,
    PipelineConfig,
    default_registry_name,
    evaluate_request,
    features_request,
    load_request,
    preprocess_request,
    rows_dropped,
    train_request,
)
from services.client.progress import PipelineProgress, stage_outcome
from services.runtime.pages import deck_html, profile_page
from services.runtime.roles import role_name
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
from workflow.calls import StageFailed, call, close_run_trace, local, run_id, run_started, stored_page, unary
from workflow.values import (
    ArtifactRef,
    CandidateOutcome,
    Dataset,
    Evaluation,
    Features,
    HyperparameterValue,
    ModelCandidate,
    PipelineResult,
    Splits,
    StageTiming,
    SweepChoice,
    SweepResult,
    Threshold,
    TrainedModel,
)

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


# ---- the five stage tasks ----------------------------------------------------------------
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
        lambda c, shown: unary(shown, "loader", lambda watch: c.load(load_request(config), watch), lambda r: r.rows),
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
    profile = json.loads(stored_page(dataset.profile, "profile"))
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
        lambda c, shown: unary(shown, "preprocess", lambda watch: c.preprocess(request, watch), lambda r: r.rows_in),
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
        lambda c, shown: unary(shown, "features", lambda watch: c.build_features(request, watch)), "build_features"
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
    Deck("Evaluation", deck_html(stored_page(evaluation.html_report, "html_report").decode()))
    return evaluation


# ---- registering a PROMOTE, and the run's result -------------------------------------------
def _local_deck() -> str:
    """Where flytekit wrote the evaluate task's deck, under a local `pyflyte run` ('' elsewhere).

    flytekit names the file only in a log line, after the task returns, in a folder of this
    process's own sandbox; the newest deck there holding the evaluation is the one.
    """
    if not local():
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
    return result


@task(**_TASK_DEFAULTS)
def serve(result: PipelineResult) -> PipelineResult:
    """After a PROMOTE: serving loads the registered version now and answers one smoke request.
    The run's last task: it closes the run's trace, and its time counts in the run's."""
    if result.registered_as:
        name = result.registered_as.rsplit(" v", 1)[0]

        async def roll_out(client: MeshClient, progress: PipelineProgress) -> str:
            return await client.serve_promoted(name, progress)

        result.served = call(roll_out, "serve")
    result.seconds = (datetime.now(UTC) - run_started()).total_seconds()
    close_run_trace(decision=result.decision)
    return result


# ---- the sweep ----------------------------------------------------------------------------
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
