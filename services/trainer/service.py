"""TrainerService: the gRPC face of the trainer; fits run as long-running operations."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator

import grpc
from google.longrunning import operations_proto_pb2 as operations_pb2

from mlmesh.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.runtime.errors import FailedPrecondition
from services.runtime.operations import Operation
from services.runtime.server import StageSpec
from services.runtime.stage import Job, LongRunning, Progress, Run, StageRuntime, require
from services.runtime.vocabulary import TaskKind
from services.trainer import VERSION, logic
from services.trainer.checkpoints import Checkpoints

log = logging.getLogger(__name__)


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    """Every fit runs as a long-running operation named after its cache key.

    StartTraining returns the operation at once; Train streams the same
    operation's progress. Either way the fit belongs to the trainer: a caller
    that goes away, or whose deadline passes, does not stop it.
    """

    def __init__(self, runtime: StageRuntime):
        self.runtime = runtime
        self.fits = LongRunning(runtime, "train", _progress_message)

    async def StartTraining(
        self,
        request: trainer_pb2.TrainRequest,
        context: grpc.aio.ServicerContext[trainer_pb2.TrainRequest, operations_pb2.Operation],
    ) -> operations_pb2.Operation:
        job = _job(request)
        operation, _ = self.fits.start(job, functools.partial(_fit, request), trainer_pb2.TrainResult, _label(request))
        # A memo hit finishes at once: answer it done, so one call shows the result.
        await self.runtime.operations.wait_done(operation, MEMO_HIT_WAIT_SECONDS)
        return operation.to_proto()

    async def Train(
        self,
        request: trainer_pb2.TrainRequest,
        context: grpc.aio.ServicerContext[trainer_pb2.TrainRequest, trainer_pb2.TrainResponse],
    ) -> AsyncIterator[trainer_pb2.TrainResponse]:
        job = _job(request)
        events = self.fits.stream(job, functools.partial(_fit, request), trainer_pb2.TrainResult, _label(request))
        async for event in events:
            if isinstance(event, trainer_pb2.TrainProgress):
                yield trainer_pb2.TrainResponse(progress=event)
            elif isinstance(event, trainer_pb2.TrainResult):
                yield trainer_pb2.TrainResponse(result=event)

    async def recall_operation(self, name: str) -> Operation | None:
        return await self.fits.recall(name, trainer_pb2.TrainResult, "fit complete")


def _progress_message(progress: Progress, elapsed: float, eta: float, name: str) -> trainer_pb2.TrainProgress:
    return trainer_pb2.TrainProgress(
        fraction_done=progress.fraction,
        message=progress.message,
        step=progress.step,
        total_steps=progress.total_steps,
        elapsed_seconds=elapsed,
        eta_seconds=eta,
        resumed_from_step=progress.resumed_from_step,
        operation_name=name,
    )


def _label(request: trainer_pb2.TrainRequest) -> str:
    return f"train {request.model or 'default model'}"


def _job(request: trainer_pb2.TrainRequest) -> Job:
    """The validated request; bad names and values are refused before any data is read."""
    require(request.HasField("x_train"), "x_train is required: pass the ref the features stage returned")
    require(request.HasField("y_train"), "y_train is required: pass the ref the features stage returned")
    require(
        request.model == "" or request.model in logic.all_model_names(),
        f"model {request.model[:60]!r} is unknown; choose one of {', '.join(logic.all_model_names())}, "
        "or leave it empty for the task kind's default",
    )
    require(0 <= request.seed < 2**32, f"seed must be in [0, 2^32), got {request.seed}")
    hyperparameters = dict(request.hyperparameters)
    require(
        request.model != "" or not hyperparameters,
        "hyperparameters need a model: name one (the default model depends on the task kind)",
    )
    task = TaskKind.from_proto(request.task_kind, "task_kind")
    if task is not None:  # otherwise `_fit` checks them once y_train tells the kind
        logic.build_estimator(task, request.model or logic.DEFAULT_MODELS[task], hyperparameters, request.seed)
    inputs = {"x_train": request.x_train, "y_train": request.y_train}
    if request.HasField("feature_schema"):
        inputs["feature_schema"] = request.feature_schema
    return Job(
        inputs=inputs,
        params={
            "model": request.model,
            "hyperparameters": {k: logic.parse_value(v) for k, v in hyperparameters.items()},
            "seed": request.seed,
            # y_train decides the kind; a stated kind is in the key so that a request whose
            # kind disagrees with y_train is never answered from the memo, but refused.
            **({"task_kind": str(task)} if task is not None else {}),
        },
        force_recompute=request.force_recompute,
    )


def _fit(request: trainer_pb2.TrainRequest, run: Run) -> trainer_pb2.TrainResult:
    """The work, on a worker thread: read, fit (resuming from a checkpoint), store the model."""
    x = run.read_array(request.x_train, "x_train")
    y = run.read_array(request.y_train, "y_train")
    columns = logic.FeatureColumns()
    if request.HasField("feature_schema"):
        schema = run.read_doc(request.feature_schema, "feature_schema")
        columns = logic.FeatureColumns.from_schema(schema, x)
    task = TaskKind.of_target(y)
    stated = TaskKind.from_proto(request.task_kind, "task_kind")
    if stated is not None and stated != task:
        raise FailedPrecondition(
            f"task_kind is {stated} but y_train holds {task} targets "
            f"({'int64 class labels' if task == TaskKind.CLASSIFICATION else 'float64 values'}); "
            "pass the task_kind and y_train of the same features run"
        )
    model = request.model or logic.DEFAULT_MODELS[task]
    estimator = logic.build_estimator(task, model, dict(request.hyperparameters), request.seed)
    columns.apply_categorical(estimator)
    checkpoints = Checkpoints(run.store, run.cache_key, run.settings.checkpoint_seconds)
    frame = columns.frame(x)
    estimator, fit_warnings = logic.fit(estimator, frame, y, run, checkpoints)
    for warning in fit_warnings:
        run.progress(1.0, f"warning: {warning}", 1, 1)
        log.warning("%s: %s", model, warning)
    result = trainer_pb2.TrainResult(
        model=run.put_model("model", estimator),
        model_name=model,
        task_kind=task.to_proto(),
        effective_hyperparameters={
            name: logic.literal(value) for name, value in estimator.get_params(deep=False).items()
        },
        train_score=float(estimator.score(frame, y)),
    )
    checkpoints.discard()  # the model is stored: its partial states are garbage now
    return result


# StartTraining waits this long for an operation that finishes at once (a memo hit).
MEMO_HIT_WAIT_SECONDS = 0.2

SPEC = StageSpec.of("trainer", VERSION, TrainerServicer, long_running=True)
