"""EvaluatorService: the gRPC face of the evaluator stage."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import grpc

from mlmesh.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
from services.evaluator import VERSION, logic
from services.evaluator.report import render_html
from services.runtime import registry
from services.runtime.errors import FailedPrecondition
from services.runtime.formats import HTML, json_bytes_to_doc
from services.runtime.server import StageSpec
from services.runtime.stage import Job, Run, StageRuntime, require
from services.runtime.store import ref_from_dict, ref_to_dict
from services.runtime.vocabulary import Decision, TaskKind

# Optional JSON artifacts from earlier stages that the HTML report shows.
CONTEXT_REFS = ("profile", "split_report", "feature_schema")
MAX_CLASS_NAMES = 100_000
# A registry entry records where its model came from; every name and ref is checked like any input.
MAX_LINEAGE_REFS = 64
_LINEAGE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class EvaluatorServicer(evaluator_pb2_grpc.EvaluatorServiceServicer):
    def __init__(self, runtime: StageRuntime):
        self.runtime = runtime
        self._registry_lock = asyncio.Lock()  # one registry writer per process

    async def Evaluate(
        self,
        request: evaluator_pb2.EvaluateRequest,
        context: grpc.aio.ServicerContext[evaluator_pb2.EvaluateRequest, evaluator_pb2.EvaluateResponse],
    ) -> evaluator_pb2.EvaluateResponse:
        for name in ("model", "x_test", "y_test"):
            require(request.HasField(name), f"{name} is required: pass the ref the previous stage returned")
        minimums, maximums = dict(request.minimums), dict(request.maximums)
        logic.check_threshold_names(minimums, maximums)
        class_names = list(request.class_names)
        require(
            len(class_names) <= MAX_CLASS_NAMES,
            f"class_names has {len(class_names)} entries; at most {MAX_CLASS_NAMES}",
        )
        inputs = {"model": request.model, "x_test": request.x_test, "y_test": request.y_test}
        for name in CONTEXT_REFS:
            if request.HasField(name):
                inputs[name] = getattr(request, name)
        job = Job(
            inputs=inputs,
            params={"minimums": minimums, "maximums": maximums, "class_names": class_names},
            force_recompute=request.force_recompute,
        )

        def work(run: Run) -> evaluator_pb2.EvaluateResponse:
            run.progress(0.05, "reading the model and the test split")
            model = run.read_model(request.model, "model")
            logic.check_is_model(model)
            x = run.read_array(request.x_test, "x_test")
            y = run.read_array(request.y_test, "y_test")
            context = {
                name: run.read_doc(getattr(request, name), name) for name in CONTEXT_REFS if request.HasField(name)
            }
            run.progress(0.2, f"scoring {len(y):,} test rows: metrics, curves, importances")
            evaluation = logic.evaluate(model, x, y)
            run.progress(0.8, "writing the report")
            # No run id and no clock: the report is a pure function of the inputs and the store's
            # manifests, so a recomputation in any run (after the report object was deleted, or
            # forced) makes the same bytes, and the memo hands the same report to every later run.
            lineage = logic.provenance(run.store, request.model.sha256, request.x_test.sha256)
            promote, reasons = logic.decide(evaluation, minimums, maximums)
            applied_minimums, applied_maximums, _ = logic.effective_thresholds(evaluation.task, minimums, maximums)
            decision = Decision.PROMOTE if promote else Decision.RETRAIN
            report = logic.report_document(
                evaluation,
                decision,
                reasons,
                thresholds={"minimums": applied_minimums, "maximums": applied_maximums},
                class_names=class_names,
                context={name: doc for name, doc in context.items() if isinstance(doc, dict)},
                model={**logic.model_description(model), "features": int(x.shape[1])},
                provenance={**lineage, "evaluator_version": VERSION},
            )
            return evaluator_pb2.EvaluateResponse(
                metrics_report=run.put_doc("metrics_report", report),
                html_report=run.put("html_report", render_html(report).encode(), HTML),
                metrics=evaluation.metrics,
                decision=decision.to_proto(),
                reasons=[*reasons, *evaluation.notes],
                confusion_matrix=[evaluator_pb2.ConfusionMatrixRow(counts=row) for row in evaluation.confusion_matrix],
                task_kind=TaskKind(evaluation.task).to_proto(),
            )

        return await self.runtime.execute(job, work, evaluator_pb2.EvaluateResponse)

    async def RegisterModel(
        self,
        request: evaluator_pb2.RegisterModelRequest,
        context: grpc.aio.ServicerContext[evaluator_pb2.RegisterModelRequest, evaluator_pb2.RegisterModelResponse],
    ) -> evaluator_pb2.RegisterModelResponse:
        registry.check_name(request.name)
        for name in ("model", "metrics_report"):
            require(request.HasField(name), f"{name} is required: pass the refs the trainer and evaluator returned")
        require(
            len(request.lineage) <= MAX_LINEAGE_REFS,
            f"lineage has {len(request.lineage)} refs; at most {MAX_LINEAGE_REFS} are kept",
        )
        for name in request.lineage:
            require(
                bool(_LINEAGE_NAME.match(name)),
                "lineage names must be 1-64 letters, digits, '_', '.' or '-', such as 'dataset' or 'x_train'",
            )
        store = self.runtime.store

        def check_promoted() -> dict[str, Any]:
            store.get(request.model, "model")  # present and intact
            report = json_bytes_to_doc(store.get(request.metrics_report, "metrics_report"), "metrics_report")
            if report.get("decision") != Decision.PROMOTE:
                raise FailedPrecondition(
                    f"the metrics report says {str(report.get('decision'))[:20]!r}, not PROMOTE; only promoted "
                    "models are registered (the Evaluate reply's reasons say which threshold failed). Retrain "
                    "(more data, another model or hyperparameters), or evaluate again with thresholds it meets "
                    "(minimums/maximums)"
                )
            # The report must be this model's: the evaluator's manifest names the model it scored.
            made = store.manifest(request.metrics_report.sha256) or {}
            scored = ((made.get("inputs") or {}).get("model") or {}).get("sha256")
            if made.get("stage") != "evaluator" or scored != request.model.sha256:
                raise FailedPrecondition(
                    "the metrics report was not made by evaluating this model; pass the metrics_report "
                    "the evaluator returned for it"
                )
            for name, ref in sorted(request.lineage.items()):
                store.check_stored(ref, f"lineage[{name!r}]")
            return report

        report = await self.runtime.to_thread(check_promoted)
        entry = {
            "model": ref_to_dict(request.model),
            "metrics_report": ref_to_dict(request.metrics_report),
            "metrics": report["metrics"],
            "lineage": {name: ref_to_dict(ref) for name, ref in sorted(request.lineage.items())},
        }
        async with self._registry_lock:
            version, existed = await self.runtime.to_thread(registry.register, store, request.name, entry)
        return evaluator_pb2.RegisterModelResponse(
            model_version=evaluator_pb2.ModelVersion(
                name=version["name"],
                version=version["version"],
                model=ref_from_dict(version["model"]),
                metrics_report=ref_from_dict(version["metrics_report"]),
                metrics=version["metrics"],
                lineage={name: ref_from_dict(ref) for name, ref in version["lineage"].items()},
                registered_at=version["registered_at"],
            ),
            already_registered=existed,
        )


SPEC = StageSpec.of("evaluator", VERSION, EvaluatorServicer)
