"""TrainerService: the gRPC face of the trainer; fits run as long-running operations."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from google.longrunning import operations_proto_pb2 as operations_pb2

from mlmesh.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.runtime.errors import InvalidArgument
from services.runtime.formats import SKOPS, json_bytes_to_doc, model_to_skops
from services.runtime.operations import Operation, operation_name, parse_operation_name
from services.runtime.server import StageSpec
from services.runtime.stage import Job, Progress, Run, StageRuntime, require
from services.runtime.tasks import task_kind_value
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

    async def StartTraining(self, request: trainer_pb2.TrainRequest, context) -> operations_pb2.Operation:
        operation, _, _ = await self._operation(request)
        # A memo hit finishes at once: answer it done, so one call shows the result.
        await self.runtime.operations.wait_done(operation, MEMO_HIT_WAIT_SECONDS)
        return operation.to_proto()

    async def Train(self, request: trainer_pb2.TrainRequest, context) -> AsyncIterator[trainer_pb2.TrainResponse]:
        started_at = datetime.now(UTC)
        operation, joined, job = await self._operation(request)
        sent = 0
        while True:
            finished = operation.done  # read first: every event of a done operation is in its history
            while sent < len(operation.history):  # grows while we yield
                yield trainer_pb2.TrainResponse(progress=operation.history[sent])
                sent += 1
            if finished:
                break
            await self.runtime.operations.wait(operation, 30.0)
        result = trainer_pb2.TrainResult()
        result.CopyFrom(operation.result())
        if joined:
            result.stage.cache_hit = True  # a caller that joined someone else's fit did not compute
            await self.runtime.record_execution(job, result.stage.cache_key, result, True, started_at)
        yield trainer_pb2.TrainResponse(result=result)

    async def recall_operation(self, name: str) -> Operation | None:
        """A finished fit this process does not hold (it restarted), found in the memo."""
        kind, key = parse_operation_name(name)
        if kind != "train":
            return None
        result = await self.runtime.recall(key, trainer_pb2.TrainResult)
        if result is None:
            return None
        done = trainer_pb2.TrainProgress(fraction_done=1.0, message="fit complete", operation_name=name)
        return self.runtime.operations.adopt_finished(name, result, done)

    # ---- one request, one operation ----------------------------------------------------------
    async def _operation(self, request: trainer_pb2.TrainRequest) -> tuple[Operation, bool, Job]:
        """The operation for this request, whether it was already running (joined), and the job."""
        job = _job(request)
        self.runtime.check_inputs(job)
        key = self.runtime.cache_key(job)
        name = operation_name("train", key)
        running = self.runtime.operations.get(name)
        joined = running is not None and not running.done
        work = functools.partial(_fit, request)

        async def run(operation: Operation) -> trainer_pb2.TrainResult:
            started = time.monotonic()
            first_fraction: list[float] = []

            def on_progress(progress: Progress) -> None:
                # Progress goes to the service log as well as to the operation's followers.
                log.info(
                    "train %s: %.0f%% %s", request.model or "default model", progress.fraction * 100, progress.message
                )
                elapsed = time.monotonic() - started
                if not first_fraction:
                    first_fraction.append(progress.fraction)  # where this run started (0, or the checkpoint)
                gained = progress.fraction - first_fraction[0]
                eta = elapsed * (1 - progress.fraction) / gained if gained > 0 else 0.0
                operation.update(
                    trainer_pb2.TrainProgress(
                        fraction_done=progress.fraction,
                        message=progress.message,
                        step=progress.step,
                        total_steps=progress.total_steps,
                        elapsed_seconds=elapsed,
                        eta_seconds=eta,
                        resumed_from_step=progress.resumed_from_step,
                        operation_name=name,
                    )
                )

            # What GetOperation shows before the first step (not a progress event).
            operation.metadata = trainer_pb2.TrainProgress(message="waiting for a worker", operation_name=name)
            try:
                return await self.runtime.execute(job, work, trainer_pb2.TrainResult, on_progress=on_progress)
            except asyncio.CancelledError:
                # Cancelled (CancelOperation, idle): done only once the fit has stopped and
                # saved its checkpoint, so a follower never sees a half-stopped operation.
                await self.runtime.settle(key)
                raise

        return self.runtime.operations.start(name, run), joined, job


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
    # The task is not known yet, so the hyperparameters must suit at least one
    # catalogue that has this model (class_weight suits only the classifier);
    # `_fit` checks against the real task.
    tasks = [task for task in ("classification", "regression") if request.model in logic.MODELS[task]]
    rejections = []
    for task in tasks:
        try:
            logic.build_estimator(task, request.model, hyperparameters, request.seed)
        except InvalidArgument as exc:
            rejections.append(exc)
    if tasks and len(rejections) == len(tasks):
        raise rejections[0]
    inputs = {"x_train": request.x_train, "y_train": request.y_train}
    if request.HasField("feature_schema"):
        inputs["feature_schema"] = request.feature_schema
    return Job(
        inputs=inputs,
        params={
            "model": request.model,
            "hyperparameters": {k: logic.parse_value(v) for k, v in hyperparameters.items()},
            "seed": request.seed,
        },
        force_recompute=request.force_recompute,
    )


def _fit(request: trainer_pb2.TrainRequest, run: Run) -> trainer_pb2.TrainResult:
    """The work, on a worker thread: read, fit (resuming from a checkpoint), store the model."""
    x = run.read_array(request.x_train, "x_train")
    y = run.read_array(request.y_train, "y_train")
    columns = logic.FeatureColumns()
    if request.HasField("feature_schema"):
        schema = json_bytes_to_doc(run.read(request.feature_schema, "feature_schema"), "feature_schema")
        columns = logic.FeatureColumns.from_schema(schema, x)
    task = logic.task_of_target(y)
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
        model=run.put("model", model_to_skops(estimator), SKOPS),
        model_name=model,
        task_kind=task_kind_value(task),
        effective_hyperparameters={
            name: logic.literal(value) for name, value in estimator.get_params(deep=False).items()
        },
        train_score=float(estimator.score(frame, y)),
    )
    checkpoints.discard()  # the model is stored: its partial states are garbage now
    return result


# StartTraining waits this long for an operation that finishes at once (a memo hit).
MEMO_HIT_WAIT_SECONDS = 0.2

SPEC = StageSpec.of(
    "trainer", VERSION, trainer_pb2, trainer_pb2_grpc, "TrainerService", TrainerServicer, long_running=True
)
