"""EvaluatorService: the gRPC face of the evaluator stage."""

from __future__ import annotations

from mlmesh.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
from services.evaluator import logic
from services.runtime.formats import JSON, npy_to_array, skops_to_model, to_json_bytes
from services.runtime.server import StageSpec
from services.runtime.stage import Job, Run, StageRuntime, require
from services.runtime.tasks import task_kind_value

VERSION = "1.0.0"


class EvaluatorServicer(evaluator_pb2_grpc.EvaluatorServiceServicer):
    def __init__(self, runtime: StageRuntime):
        self.runtime = runtime

    async def Evaluate(self, request: evaluator_pb2.EvaluateRequest, context) -> evaluator_pb2.EvaluateResponse:
        for name in ("model", "x_test", "y_test"):
            require(request.HasField(name), f"{name} is required: pass the ref the previous stage returned")
        minimums, maximums = dict(request.minimums), dict(request.maximums)
        logic.check_threshold_names(minimums, maximums)
        class_names = list(request.class_names)
        job = Job(
            inputs={"model": request.model, "x_test": request.x_test, "y_test": request.y_test},
            params={"minimums": minimums, "maximums": maximums, "class_names": class_names},
            force_recompute=request.force_recompute,
        )

        def work(run: Run) -> evaluator_pb2.EvaluateResponse:
            model = skops_to_model(run.read(request.model, "model"), "model")
            x = npy_to_array(run.read(request.x_test, "x_test"), "x_test")
            y = npy_to_array(run.read(request.y_test, "y_test"), "y_test")
            evaluation = logic.evaluate(model, x, y)
            promote, reasons = logic.decide(evaluation, minimums, maximums)
            decision = evaluator_pb2.DECISION_PROMOTE if promote else evaluator_pb2.DECISION_RETRAIN
            report = {
                "task_kind": evaluation.task,
                "metrics": evaluation.metrics,
                "thresholds": {"minimums": minimums, "maximums": maximums},
                "decision": evaluator_pb2.Decision.Name(decision).removeprefix("DECISION_"),
                "reasons": reasons,
                "notes": evaluation.notes,
                "test_rows": int(len(y)),
                "class_names": class_names,
                "confusion_matrix": evaluation.confusion_matrix,
                "roc_curves": evaluation.roc_curves,
                "predictions": evaluation.predictions,
            }
            return evaluator_pb2.EvaluateResponse(
                metrics_report=run.put("metrics_report", to_json_bytes(report), JSON),
                metrics=evaluation.metrics,
                decision=decision,
                reasons=[*reasons, *evaluation.notes],
                confusion_matrix=[
                    evaluator_pb2.ConfusionMatrixRow(counts=row) for row in evaluation.confusion_matrix
                ],
                task_kind=task_kind_value(evaluation.task),
            )

        return await self.runtime.execute(job, work, evaluator_pb2.EvaluateResponse)


SPEC = StageSpec(
    name="evaluator",
    version=VERSION,
    service_name=evaluator_pb2.DESCRIPTOR.services_by_name["EvaluatorService"].full_name,
    add_servicer=evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server,
    make_servicer=EvaluatorServicer,
)
