"""The stages of the mesh, declared once.

Everything that needs "every stage" derives it from CATALOG: the default ports,
`mlmesh up`'s processes, the health checks of `mlmesh status`, the client's
stubs, the health probe's choices and the tests' tables. Adding a stage means
adding its line here (in the order a pipeline calls it), its .proto and its
package under services/; docs/architecture.md lists the rest.

Only names live here, not imports of the stage packages: the kernel never
imports a stage (the layer contract in pyproject.toml checks it). The generated
gRPC modules are imported on first use, so a process that never calls a stage,
the health probe for one, pays nothing for it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class StageEntry:
    """One stage: its name (the package services/<name>, the MLMESH_<NAME>_* settings) and its gRPC service."""

    name: str
    proto_module: str  # the generated module of its .proto, without the _pb2 suffix
    service: str  # the service's name in that .proto
    # A step of the training pipeline, called in catalog order by `mlmesh run` and the workflow.
    in_pipeline: bool = True

    def pb2(self) -> ModuleType:
        return importlib.import_module(f"{self.proto_module}_pb2")

    def pb2_grpc(self) -> ModuleType:
        return importlib.import_module(f"{self.proto_module}_pb2_grpc")

    @property
    def full_service_name(self) -> str:
        """The service's full proto name, e.g. mlmesh.loader.v1.LoaderService (what reflection lists)."""
        return str(self.pb2().DESCRIPTOR.services_by_name[self.service].full_name)

    def stub(self, channel: Any) -> Any:
        """A client stub for this stage's service on `channel`."""
        return getattr(self.pb2_grpc(), f"{self.service}Stub")(channel)


CATALOG: tuple[StageEntry, ...] = (
    StageEntry("loader", "mlmesh.loader.v1.loader", "LoaderService"),
    StageEntry("preprocess", "mlmesh.preprocess.v1.preprocess", "PreprocessService"),
    StageEntry("features", "mlmesh.features.v1.features", "FeaturesService"),
    StageEntry("trainer", "mlmesh.trainer.v1.trainer", "TrainerService"),
    StageEntry("evaluator", "mlmesh.evaluator.v1.evaluator", "EvaluatorService"),
    # Not a step of training: it serves what the pipeline registered, over the Open Inference Protocol.
    StageEntry("serving", "mlmesh.serving.v2.open_inference", "GRPCInferenceService", in_pipeline=False),
)

BY_NAME: dict[str, StageEntry] = {entry.name: entry for entry in CATALOG}

# Every stage of the mesh, in pipeline order; also each stage's default port, from 50051 up.
STAGES: tuple[str, ...] = tuple(entry.name for entry in CATALOG)
# The steps of a training run, in the order they are called.
PIPELINE_STAGES: tuple[str, ...] = tuple(entry.name for entry in CATALOG if entry.in_pipeline)
# The steps whose executions a model's evaluation reports as its provenance: all before the evaluator.
UPSTREAM_OF_EVALUATOR: tuple[str, ...] = PIPELINE_STAGES[: PIPELINE_STAGES.index("evaluator")]
