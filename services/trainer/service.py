"""TrainerService: the gRPC face of the trainer; streams progress, then the result."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from mlmesh.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.runtime.errors import InvalidArgument
from services.runtime.formats import SKOPS, json_bytes_to_doc, model_to_skops, npy_to_array
from services.runtime.server import StageSpec
from services.runtime.stage import Job, Run, StageRuntime, require
from services.runtime.tasks import task_kind_value
from services.trainer import VERSION, logic

log = logging.getLogger(__name__)


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, runtime: StageRuntime):
        self.runtime = runtime

    async def Train(self, request: trainer_pb2.TrainRequest, context) -> AsyncIterator[trainer_pb2.TrainResponse]:
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
        # Catch a bad name or value before any data is read; the task is not known yet,
        # so the hyperparameters must suit at least one catalogue that has this model
        # (class_weight suits only the classifier); `work` checks against the real task.
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
        job = Job(
            inputs=inputs,
            params={
                "model": request.model,
                "hyperparameters": {k: logic.parse_value(v) for k, v in hyperparameters.items()},
                "seed": request.seed,
            },
            force_recompute=request.force_recompute,
        )

        def work(run: Run) -> trainer_pb2.TrainResult:
            x = npy_to_array(run.read(request.x_train, "x_train"), "x_train")
            y = npy_to_array(run.read(request.y_train, "y_train"), "y_train")
            columns = logic.FeatureColumns()
            if request.HasField("feature_schema"):
                schema = json_bytes_to_doc(run.read(request.feature_schema, "feature_schema"), "feature_schema")
                columns = logic.FeatureColumns.from_schema(schema, x)
            task = logic.task_of_target(y)
            model = request.model or logic.DEFAULT_MODELS[task]
            estimator = logic.build_estimator(task, model, hyperparameters, request.seed)
            columns.apply_categorical(estimator)
            fit_warnings = logic.fit(estimator, columns.frame(x), y, run.progress, run.check_cancelled)
            for warning in fit_warnings:
                run.progress(1.0, f"warning: {warning}")
                log.warning("%s: %s", model, warning)
            return trainer_pb2.TrainResult(
                model=run.put("model", model_to_skops(estimator), SKOPS),
                model_name=model,
                task_kind=task_kind_value(task),
                effective_hyperparameters={
                    name: logic.literal(value) for name, value in estimator.get_params(deep=False).items()
                },
                train_score=float(estimator.score(columns.frame(x), y)),
            )

        events: asyncio.Queue[trainer_pb2.TrainProgress] = asyncio.Queue()

        def on_progress(fraction: float, message: str) -> None:
            # Progress goes to the service log as well as to the caller's stream.
            log.info("train %s: %.0f%% %s", request.model or "default model", fraction * 100, message)
            events.put_nowait(trainer_pb2.TrainProgress(fraction_done=fraction, message=message))

        training = asyncio.ensure_future(
            self.runtime.execute(job, work, trainer_pb2.TrainResult, on_progress=on_progress)
        )
        next_event: asyncio.Future | None = None
        try:
            while not training.done():
                next_event = asyncio.ensure_future(events.get())
                await asyncio.wait({training, next_event}, return_when=asyncio.FIRST_COMPLETED)
                if next_event.done():
                    yield trainer_pb2.TrainResponse(progress=next_event.result())
                else:
                    next_event.cancel()
            while not events.empty():
                yield trainer_pb2.TrainResponse(progress=events.get_nowait())
            yield trainer_pb2.TrainResponse(result=training.result())
        finally:
            # The caller may have gone away: release our claim on the work and the queue.
            if next_event is not None and not next_event.done():
                next_event.cancel()
            if not training.done():
                training.cancel()


SPEC = StageSpec.of("trainer", VERSION, trainer_pb2, trainer_pb2_grpc, "TrainerService", TrainerServicer)
