"""A small async client for the mesh: one channel per stage, deadlines on every call.

Tests, benchmarks, the CLI and the Flyte tasks all use it, so the rules live
in one place: retry UNAVAILABLE through the channel's service config only,
never retry anything else, and turn failures into errors that name the stage
and its address.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar, cast

import grpc
from google.longrunning import operations_grpc_pb2, operations_proto_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlmesh.common.v1 import common_pb2, progress_pb2, progress_pb2_grpc
from mlmesh.common.v1.common_pb2 import ArtifactRef
from mlmesh.evaluator.v1 import evaluator_pb2
from mlmesh.features.v1 import features_pb2
from mlmesh.loader.v1 import loader_pb2
from mlmesh.preprocess.v1 import preprocess_pb2
from mlmesh.serving.v2 import open_inference_pb2
from mlmesh.trainer.v1 import trainer_pb2
from services.client import serving
from services.client.progress import PipelineProgress, stage_outcome
from services.client.serving import ServedAnswer
from services.runtime import tracing
from services.runtime.catalog import BY_NAME, CATALOG, STAGES
from services.runtime.errors import InvalidArgument
from services.runtime.roles import parse_role, role_value
from services.runtime.runs import RUN_ID_METADATA, new_run_id
from services.runtime.security import call_metadata, open_channel
from services.runtime.settings import Settings
from services.runtime.vocabulary import CategoricalEncoding, NumericImputation, Scaling, TaskKindChoice
from services.runtime.watch import CALL_ID_METADATA

# Each stage's service, for naming calls (trace spans).
SERVICES = {entry.name: entry.full_service_name for entry in CATALOG}

# Transient failures (a restarting service) are retried by gRPC itself, with backoff.
RETRY_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "3s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)

# Sees a unary call's progress reports (ProgressService.WatchCall) while it runs.
OnCallProgress = Callable[[progress_pb2.WatchCallResponse], None]

RECOVERABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class StageCallError(Exception):
    """A stage call failed; says which stage, where, and what the stage said."""

    def __init__(self, stage: str, address: str, code: grpc.StatusCode, details: str):
        self.stage, self.address, self.code, self.details = stage, address, code, details
        super().__init__(f"{stage} at {address} failed with {code.name}: {details}")

    @property
    def recoverable(self) -> bool:
        return self.code in RECOVERABLE_CODES


# The stores' remedy names the request field; each front end names its own flag.
_PROTO_REMEDY = "with force_recompute=true"


def transport_mismatch(error: grpc.aio.AioRpcError) -> str:
    """Why a connection failed when the cause is security settings rather than a stage that is down, or "".

    A stage that is restarting refuses connections; one whose TLS settings
    disagree with ours accepts and then fails the handshake or closes the socket.
    """
    details = error.details() or ""
    if error.code() != grpc.StatusCode.UNAVAILABLE or "failed to connect" not in details:
        return ""
    if "handshake failed" in details.lower():
        return (
            "the TLS handshake failed: check MLMESH_TLS_CA (the CA that signed the stages' certificates), "
            "MLMESH_TLS_SERVER_NAME (a name in their certificates), and that the stage serves TLS"
        )
    if "Socket closed" in details:
        return (
            "the stage closed the connection before answering: if the mesh serves TLS, set MLMESH_TLS_CA; "
            "if it requires client certificates (mTLS), set MLMESH_TLS_CLIENT_CERT and MLMESH_TLS_CLIENT_KEY"
        )
    return ""


def _explain(stage: str, address: str, error: grpc.aio.AioRpcError, recompute_flag: str = "") -> StageCallError:
    details = error.details() or ""
    mismatch = transport_mismatch(error)
    if mismatch:
        details = f"cannot reach the {stage} service securely: {mismatch} ({details[:300]})"
    elif error.code() == grpc.StatusCode.UNAVAILABLE and "connect" in details.lower():
        details = f"the {stage} service is not reachable ({details}); is it running?"
    if recompute_flag and _PROTO_REMEDY in details:
        details = details.replace(_PROTO_REMEDY, f"with {recompute_flag} (force_recompute=true)")
    return StageCallError(stage, address, error.code(), details)


def channel_options(settings: Settings) -> list[tuple[str, Any]]:
    return [
        ("grpc.service_config", RETRY_SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
    ]


@dataclass
class PipelineConfig:
    """Every option of one pipeline run, in the words people type (CLI flags, pyflyte inputs).

    The options with choices hold their enum (services/runtime/vocabulary.py); text given for
    one is converted on construction, and a word that is not a choice is a ConfigError.
    """

    source: str = "sklearn:breast_cancer"
    target_column: str = ""
    task_kind: TaskKindChoice = TaskKindChoice.INFERRED  # "": the loader infers it
    column_roles: dict[str, str] = field(default_factory=dict)  # column -> role name
    model: str = ""  # "" trains the task kind's default: logistic_regression or ridge
    hyperparameters: dict[str, str] = field(default_factory=dict)
    test_fraction: float = 0.2
    seed: int = 42
    drop_duplicates: bool = False
    drop_incomplete_rows: bool = False
    numeric_imputation: NumericImputation = NumericImputation.MEDIAN
    missing_indicators: bool = False
    categorical_encoding: CategoricalEncoding = CategoricalEncoding.AUTO
    scaling: Scaling = Scaling.STANDARD
    polynomial_degree: int = 0
    select_k_best: int = 0
    minimums: dict[str, float] = field(default_factory=dict)
    maximums: dict[str, float] = field(default_factory=dict)
    force_recompute: bool = False

    def __post_init__(self) -> None:
        for option, kind in OPTION_CHOICES.items():
            setattr(self, option, _choice(option, kind, getattr(self, option)))


# The options with choices, each an enum of services/runtime/vocabulary.py: the CLI's
# flags, the workflow's inputs and the requests all take these, so they cannot diverge.
OPTION_CHOICES: dict[str, type[StrEnum]] = {
    "task_kind": TaskKindChoice,
    "numeric_imputation": NumericImputation,
    "categorical_encoding": CategoricalEncoding,
    "scaling": Scaling,
}
# Each option's choices as the words people type, in the enum's order ("" first for task_kind).
CHOICES: dict[str, tuple[str, ...]] = {
    option: tuple(member.value for member in kind) for option, kind in OPTION_CHOICES.items()
}


class ConfigError(ValueError):
    """An option a person typed is not one of its choices; the message says which are."""


Choice = TypeVar("Choice", bound=StrEnum)


def _choice(option: str, kind: type[Choice], value: object) -> Choice:
    """`value` as the option's enum member (from the member itself or its word)."""
    try:
        return kind(str(value))
    except ValueError:
        raise ConfigError(
            f"{option} {str(value)[:40]!r} is not one of: {', '.join(c or '(infer)' for c in CHOICES[option])}"
        ) from None


def resolve_source(source: str) -> str:
    """A relative file path means the caller's working directory, not the service's."""
    text = source.strip()
    if not text or text.startswith(("sklearn:", "synthetic:")) or "://" in text:
        return text
    return os.path.abspath(os.path.expanduser(text))


def categorical_encoding_for(model: str, requested: CategoricalEncoding) -> CategoricalEncoding:
    """'auto' uses hist_gradient_boosting's native categorical support (ordinal codes) where it fits."""
    if requested == CategoricalEncoding.AUTO and model == "hist_gradient_boosting":
        return CategoricalEncoding.ORDINAL
    return requested


def _role_values(roles: dict[str, str]) -> dict[str, common_pb2.ColumnRole]:
    try:
        return {
            name: cast(common_pb2.ColumnRole, role_value(parse_role(role, f"role of {name[:40]!r}")))
            for name, role in roles.items()
        }
    except InvalidArgument as exc:
        raise ConfigError(str(exc)) from None


# ---- requests, built in one place for the CLI, the tests and the Flyte tasks ----------------
def load_request(config: PipelineConfig) -> loader_pb2.LoadRequest:
    return loader_pb2.LoadRequest(
        source=resolve_source(config.source),
        target_column=config.target_column,
        task_kind=config.task_kind.to_proto(),
        column_roles=_role_values(config.column_roles),
        force_recompute=config.force_recompute,
    )


def preprocess_request(config: PipelineConfig, dataset: ArtifactRef) -> preprocess_pb2.PreprocessRequest:
    return preprocess_pb2.PreprocessRequest(
        dataset=dataset,
        test_fraction=config.test_fraction,
        seed=config.seed,
        drop_duplicate_rows=config.drop_duplicates,
        drop_incomplete_rows=config.drop_incomplete_rows,
        force_recompute=config.force_recompute,
    )


def features_request(
    config: PipelineConfig, train: ArtifactRef, test: ArtifactRef, model: str = ""
) -> features_pb2.BuildFeaturesRequest:
    return features_pb2.BuildFeaturesRequest(
        train=train,
        test=test,
        scaling=config.scaling.to_proto(),
        numeric_imputation=config.numeric_imputation.to_proto(),
        categorical_encoding=categorical_encoding_for(model, config.categorical_encoding).to_proto(),
        missing_indicators=config.missing_indicators,
        polynomial_degree=config.polynomial_degree,
        select_k_best=config.select_k_best,
        seed=config.seed,
        force_recompute=config.force_recompute,
    )


def train_request(
    config: PipelineConfig,
    features: features_pb2.BuildFeaturesResponse,
    model: str = "",
    hyperparameters: dict[str, str] | None = None,
) -> trainer_pb2.TrainRequest:
    return trainer_pb2.TrainRequest(
        x_train=features.x_train,
        y_train=features.y_train,
        feature_schema=features.feature_schema,
        task_kind=features.task_kind,
        model=model or config.model,
        hyperparameters=config.hyperparameters if hyperparameters is None else hyperparameters,
        seed=config.seed,
        force_recompute=config.force_recompute,
    )


def evaluate_request(
    config: PipelineConfig,
    model: ArtifactRef,
    features: features_pb2.BuildFeaturesResponse,
    prepared: preprocess_pb2.PreprocessResponse,
    profile: ArtifactRef | None,
) -> evaluator_pb2.EvaluateRequest:
    return evaluator_pb2.EvaluateRequest(
        model=model,
        x_test=features.x_test,
        y_test=features.y_test,
        minimums=config.minimums,
        maximums=config.maximums,
        class_names=prepared.class_names,
        profile=profile,
        split_report=prepared.split_report,
        feature_schema=features.feature_schema,
        force_recompute=config.force_recompute,
    )


def rows_dropped(prepared: preprocess_pb2.PreprocessResponse) -> dict[str, int]:
    """Preprocess's dropped rows by reason, as the CLI and the workflow report them."""
    return {
        "missing_target": prepared.missing_target_rows_removed,
        "invalid_target": prepared.invalid_target_rows_removed,
        "incomplete": prepared.incomplete_rows_removed,
        "duplicate": prepared.duplicate_rows_removed,
    }


def default_registry_name(source: str, model: str) -> str:
    """The registry name a PROMOTE gets when none is given: '<dataset>-<model>', e.g. 'breast_cancer-logistic_regression'."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", source.split("?")[0].split(":")[-1].rsplit("/", 1)[-1])
    return f"{base.strip('._-') or 'dataset'}-{model}"[:128]


# The refs a registered model records as its lineage, by name, and where each comes from.
LINEAGE = {
    "dataset": "load",
    "schema": "load",
    "profile": "load",
    "train": "preprocess",
    "test": "preprocess",
    "split_report": "preprocess",
    "x_train": "features",
    "y_train": "features",
    "x_test": "features",
    "y_test": "features",
    "transformer": "features",
    "feature_schema": "features",
    "model": "train",
    "metrics_report": "evaluate",
    "html_report": "evaluate",
}


@dataclass
class PipelineRun:
    load: loader_pb2.LoadResponse
    preprocess: preprocess_pb2.PreprocessResponse
    features: features_pb2.BuildFeaturesResponse
    train: trainer_pb2.TrainResult
    evaluate: evaluator_pb2.EvaluateResponse
    seconds: float
    run_id: str = ""

    @property
    def stages(self) -> list[Any]:
        return [self.load.stage, self.preprocess.stage, self.features.stage, self.train.stage, self.evaluate.stage]

    def lineage(self) -> dict[str, ArtifactRef]:
        return {name: getattr(getattr(self, reply), name) for name, reply in LINEAGE.items()}


def register_request(run: PipelineRun, name: str) -> evaluator_pb2.RegisterModelRequest:
    return evaluator_pb2.RegisterModelRequest(
        name=name, model=run.train.model, metrics_report=run.evaluate.metrics_report, lineage=run.lineage()
    )


class MeshClient:
    def __init__(
        self,
        settings: Settings | None = None,
        addresses: dict[str, str] | None = None,
        recompute_flag: str = "",
        run_id: str = "",
    ):
        """`recompute_flag` is how the caller's user asks for recomputation (`--force`,
        `--recompute`); error messages that suggest it name that flag."""
        self.recompute_flag = recompute_flag
        # Every call carries it, so each stage records its execution under this pipeline run.
        self.run_id = run_id or new_run_id()
        self.settings = settings or Settings.from_env()
        self.metadata = ((RUN_ID_METADATA, self.run_id), *call_metadata(self.settings))
        self.addresses = {**self.settings.addresses, **(addresses or {})}
        self.timeout = self.settings.rpc_timeout_seconds
        self._channels: dict[str, grpc.aio.Channel] = {}
        # Fits this client is following and that have not finished: what `cancel_fits` stops.
        self.following: set[str] = set()

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    def channel(self, stage: str) -> grpc.aio.Channel:
        if stage not in self._channels:
            self._channels[stage] = open_channel(self.addresses[stage], self.settings, channel_options(self.settings))
        return self._channels[stage]

    def stub(self, stage: str) -> Any:
        return BY_NAME[stage].stub(self.channel(stage))

    async def _unary(self, stage: str, method: str, request: Any, on_progress: OnCallProgress | None = None) -> Any:
        """One call, retried while the stage is unreachable; `on_progress` sees the stage's
        progress reports while it works (a WatchCall stream beside the call)."""
        call_id = secrets.token_hex(8) if on_progress is not None else ""
        tag = ((CALL_ID_METADATA, call_id),) if call_id else ()

        async def call() -> Any:
            # With tracing on, each attempt is a client span, and its context travels in the metadata.
            with tracing.client_span(f"/{SERVICES[stage]}/{method}") as trace_context:
                return await getattr(self.stub(stage), method)(
                    request, timeout=self.timeout, metadata=(*self.metadata, *tag, *trace_context)
                )

        if on_progress is None:
            return await self._reconnecting(stage, call)
        watching = asyncio.ensure_future(self._watch(stage, call_id, on_progress))
        try:
            return await self._reconnecting(stage, call)
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching

    async def _watch(self, stage: str, call_id: str, on_progress: OnCallProgress) -> None:
        """Follow one call's progress until it ends. Best effort: progress is for people, and a
        stage that cannot report it (an older version, a lost stream) must not fail the call."""
        stub = progress_pb2_grpc.ProgressServiceStub(self.channel(stage))
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for update in stub.WatchCall(
                progress_pb2.WatchCallRequest(call_id=call_id), timeout=self.timeout, metadata=self.metadata
            ):
                if update.done:
                    return
                on_progress(update)

    async def _reconnecting(self, stage: str, call: Callable[[], Any]) -> Any:
        """`call()`, tried again while the stage is unreachable, for up to MLMESH_RECONNECT_SECONDS.

        gRPC's own retries (RETRY_SERVICE_CONFIG) cover a few seconds. A stage that
        died and is being restarted (by `mlmesh up`, compose or Kubernetes) takes
        longer, and every stage call is safe to repeat: outputs are content-addressed
        and the memo answers a repeat.
        """
        deadline = time.monotonic() + self.settings.reconnect_seconds
        pause = 0.25
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as error:
                # Mismatched security settings do not heal by waiting. (One failed call already
                # spans gRPC's own retries, RETRY_SERVICE_CONFIG, so a stage that merely closed
                # connections while stopping has had its chance.)
                misconfigured = bool(transport_mismatch(error))
                if error.code() != grpc.StatusCode.UNAVAILABLE or misconfigured or time.monotonic() + pause > deadline:
                    raise _explain(stage, self.addresses[stage], error, self.recompute_flag) from None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)

    # ---- one call per stage ---------------------------------------------------------
    async def load(
        self, request: loader_pb2.LoadRequest, on_progress: OnCallProgress | None = None
    ) -> loader_pb2.LoadResponse:
        return await self._unary("loader", "Load", request, on_progress)

    async def preprocess(
        self, request: preprocess_pb2.PreprocessRequest, on_progress: OnCallProgress | None = None
    ) -> preprocess_pb2.PreprocessResponse:
        return await self._unary("preprocess", "Preprocess", request, on_progress)

    async def build_features(
        self, request: features_pb2.BuildFeaturesRequest, on_progress: OnCallProgress | None = None
    ) -> features_pb2.BuildFeaturesResponse:
        return await self._unary("features", "BuildFeatures", request, on_progress)

    async def train(
        self,
        request: trainer_pb2.TrainRequest,
        on_progress: Callable[[trainer_pb2.TrainProgress], None] | None = None,
    ) -> trainer_pb2.TrainResult:
        """Start (or join) the fit's long-running operation and follow its progress stream to the end.

        No deadline bounds the fit, only each stream. When a stream ends early,
        or the trainer goes away (a restart, a preemption), the same request is
        sent again: it re-attaches to the running operation, or resumes the fit
        from its checkpoint on a restarted trainer.
        """
        address = self.addresses["trainer"]
        seen: set[bytes] = set()
        gave_up_at = time.monotonic() + self.settings.reconnect_seconds
        pause = 0.25
        while True:
            result = None
            try:
                # Each stream has the client's deadline; the fit does not. A stream that
                # ends early (deadline, lost connection, a trainer that checkpointed and
                # stopped) is simply opened again on the same operation.
                with tracing.client_span(f"/{SERVICES['trainer']}/Train") as trace_context:
                    stream = self.stub("trainer").Train(
                        request, timeout=self.timeout, metadata=(*self.metadata, *trace_context)
                    )
                    async for event in stream:
                        if event.HasField("result"):
                            # The result is the stream's last event; reading on to the stream's status
                            # closes the call now (and its span), not when it is collected.
                            result = event.result
                            continue
                        # A re-attached stream replays the operation's progress from the start.
                        key = event.progress.SerializeToString()
                        if event.progress.operation_name:
                            self.following.add(event.progress.operation_name)
                        if on_progress is not None and key not in seen:
                            on_progress(event.progress)
                        seen.add(key)
                        gave_up_at = time.monotonic() + self.settings.reconnect_seconds
                        pause = 0.25
            except grpc.aio.AioRpcError as error:
                if result is not None:  # the stream broke after the result: the result stands
                    self.following.clear()
                    return result
                if error.code() not in RECOVERABLE_CODES or time.monotonic() + pause > gave_up_at:
                    raise _explain("trainer", address, error, self.recompute_flag) from None
            else:
                if result is not None:
                    self.following.clear()
                    return result
                raise StageCallError("trainer", address, grpc.StatusCode.INTERNAL, "stream ended without a result")
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)

    async def cancel_fits(self, timeout: float = 3.0) -> list[str]:
        """Ask the trainer to stop the fits this client was following (after Ctrl-C).

        A fit outlives its client on purpose, so that a restarted client re-attaches to
        it; a person who interrupts a run wants it stopped. The trainer stops the fit at
        its next step, keeping its last checkpoint. Returns the operations asked.
        """
        names, self.following = sorted(self.following), set()
        stub = operations_grpc_pb2.OperationsStub(self.channel("trainer"))
        for name in names:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.CancelOperation(
                    operations_proto_pb2.CancelOperationRequest(name=name), timeout=timeout, metadata=self.metadata
                )
        return names

    async def evaluate(
        self, request: evaluator_pb2.EvaluateRequest, on_progress: OnCallProgress | None = None
    ) -> evaluator_pb2.EvaluateResponse:
        return await self._unary("evaluator", "Evaluate", request, on_progress)

    async def register_model(self, request: evaluator_pb2.RegisterModelRequest) -> evaluator_pb2.RegisterModelResponse:
        return await self._unary("evaluator", "RegisterModel", request)

    # ---- serving (the Open Inference Protocol) ----------------------------------------
    async def infer(self, request: open_inference_pb2.ModelInferRequest) -> open_inference_pb2.ModelInferResponse:
        return await self._unary("serving", "ModelInfer", request)

    async def model_metadata(self, name: str, version: str = "") -> open_inference_pb2.ModelMetadataResponse:
        request = open_inference_pb2.ModelMetadataRequest(name=name, version=version)
        return await self._unary("serving", "ModelMetadata", request)

    async def served_models(self) -> list[open_inference_pb2.RepositoryIndexResponse.ModelIndex]:
        reply = await self._unary("serving", "RepositoryIndex", open_inference_pb2.RepositoryIndexRequest())
        return list(reply.models)

    async def serve(self, name: str, version: int | None = None) -> None:
        """Serving serves `name`: pinned to `version`, or (None) following its newest version."""
        request = open_inference_pb2.RepositoryModelLoadRequest(model_name=name)
        if version is not None:
            request.parameters["version"].int64_param = version
        await self._unary("serving", "RepositoryModelLoad", request)

    async def unserve(self, name: str) -> None:
        request = open_inference_pb2.RepositoryModelUnloadRequest(model_name=name)
        await self._unary("serving", "RepositoryModelUnload", request)

    async def roll_out(self, name: str) -> ServedAnswer:
        """After a promotion: serving loads the newest version of `name` now (rather than at its
        next poll), and one smoke request shows which version answers."""
        await self.serve(name)
        metadata = await self.model_metadata(name)
        reply = await self.infer(serving.smoke_request(name, "", metadata))
        predicted = serving.decode(reply).get("predicted")
        shown = str(predicted[0]) if predicted is not None and len(predicted) else ""
        return ServedAnswer(name=reply.model_name, version=reply.model_version, predicted=shown[:60])

    async def serve_promoted(self, name: str, progress: PipelineProgress) -> str:
        """The end of a promotion, for `mlmesh run` and the workflow alike: serving loads the new
        version now and answers one smoke request. Returns "<name> v<N> at <address> (...)", or why
        not yet when serving is not running (it then loads the version at its first poll)."""
        address = self.addresses["serving"]
        health = await check_health(address, timeout=2.0, settings=self.settings)
        if health != "SERVING":
            return (
                f"not yet: serving at {address} is {health.split(' (')[0].lower()}; it loads the version when it runs"
            )
        with progress.stage("serving") as shown:
            answer = await self.roll_out(name)
            shown.done(f"{answer.name} v{answer.version}")
        return f"{answer.name} v{answer.version} at {address} (smoke request answered {answer.predicted!r})"

    # ---- the whole pipeline -----------------------------------------------------------
    async def run_pipeline(self, config: PipelineConfig, progress: PipelineProgress | None = None) -> PipelineRun:
        """The five stages in order; `progress` (if given) shows each one as it runs."""
        display = progress or PipelineProgress(quiet=True)
        started = time.perf_counter()
        with display.stage("loader") as shown:
            loaded = await self.load(load_request(config), shown.step)
            shown.done(stage_outcome("loader", loaded.stage, loaded.rows))
        with display.stage("preprocess") as shown:
            prepared = await self.preprocess(preprocess_request(config, loaded.dataset), shown.step)
            shown.done(stage_outcome("preprocess", prepared.stage, prepared.rows_in))
        with display.stage("features") as shown:
            features = await self.build_features(
                features_request(config, prepared.train, prepared.test, config.model), shown.step
            )
            shown.done(stage_outcome("features", features.stage) + f", {len(features.feature_names)} inputs")
        with display.stage("trainer") as shown:
            trained = await self.train(train_request(config, features), shown.fit)
            shown.done(stage_outcome("trainer", trained.stage) + f", {trained.model_name}")
        with display.stage("evaluator") as shown:
            evaluated = await self.evaluate(
                evaluate_request(config, trained.model, features, prepared, loaded.profile), shown.step
            )
            shown.done(
                stage_outcome("evaluator", evaluated.stage)
                + f", {evaluator_pb2.Decision.Name(evaluated.decision).removeprefix('DECISION_')}"
            )
        return PipelineRun(loaded, prepared, features, trained, evaluated, time.perf_counter() - started, self.run_id)


async def running_operations(
    address: str,
    timeout: float = 2.0,
    settings: Settings | None = None,
) -> list[trainer_pb2.TrainProgress]:
    """The latest progress of each fit running at the trainer at `address` (empty if unreachable)."""
    settings = settings or Settings.from_env()
    async with open_channel(address, settings) as channel:
        try:
            reply = await operations_grpc_pb2.OperationsStub(channel).ListOperations(
                operations_proto_pb2.ListOperationsRequest(filter="done=false"),
                timeout=timeout,
                metadata=call_metadata(settings),
            )
        except grpc.aio.AioRpcError:
            return []
    running = []
    for operation in reply.operations:
        progress = trainer_pb2.TrainProgress(operation_name=operation.name)
        if operation.HasField("metadata"):
            operation.metadata.Unpack(progress)
        running.append(progress)
    return running


async def check_health(address: str, service: str = "", timeout: float = 2.0, settings: Settings | None = None) -> str:
    """The serving status name of `service` at `address`, or why it could not be asked.

    `settings` (default: from the environment) say whether to use TLS and a token."""
    settings = settings or Settings.from_env()
    async with open_channel(address, settings) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=timeout,
                metadata=call_metadata(settings),
            )
        except grpc.aio.AioRpcError as error:
            mismatch = transport_mismatch(error)
            return f"UNREACHABLE ({error.code().name}{': ' + mismatch if mismatch else ''})"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


__all__ = ["STAGES", "ConfigError", "MeshClient", "PipelineConfig", "PipelineRun", "StageCallError", "check_health"]
