"""GRPCInferenceService: the serving stage's face, the Open Inference Protocol (KServe V2).

Every RPC the protocol's clients call is here: liveness, readiness, server and
model metadata, inference, and the model-repository extension. Which version of
a model answers is the repository's business (repository.py); how a row is read
is columns.py's; how requests share a prediction is batching.py's.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import Counter, Gauge, Histogram

from mlmesh.serving.v2 import open_inference_pb2 as pb
from mlmesh.serving.v2 import open_inference_pb2_grpc as pb_grpc
from services.runtime.errors import InvalidArgument, StageError, bounded
from services.runtime.server import StageSpec
from services.runtime.stage import StageRuntime
from services.serving import VERSION
from services.serving.columns import UNSEEN_POLICIES
from services.serving.models import PLATFORM, ServedVersion
from services.serving.repository import Repository, parse_version
from services.serving.tensors import decode_inputs, encode_output, shown

SERVER_NAME = "mlmesh"
EXTENSIONS = ("model_repository",)
MAX_PARAMETERS = 16
MAX_ID_CHARACTERS = 256
# Requests up to this size are read and answered on the event loop (a few hundred rows).
INLINE_BYTES = 32 * 1024
BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)
REQUEST_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


class ServingMetrics:
    """Requests and latency by model and version, batch sizes, the live version, failed rollouts."""

    def __init__(self, registry: Any):
        self.requests = Counter(
            "mlmesh_serving_requests_total",
            "ModelInfer requests by model, version and status code.",
            ("model", "version", "code"),
            registry=registry,
        )
        self.rows = Counter(
            "mlmesh_serving_rows_total",
            "Rows predicted, by model and version.",
            ("model", "version"),
            registry=registry,
        )
        self.latency = Histogram(
            "mlmesh_serving_request_seconds",
            "ModelInfer time from decoded request to encoded response, by model and version.",
            ("model", "version"),
            buckets=REQUEST_SECONDS_BUCKETS,
            registry=registry,
        )
        self.batch_rows = Histogram(
            "mlmesh_serving_batch_rows",
            "Rows per prediction batch (requests batched together).",
            buckets=BATCH_ROWS_BUCKETS,
            registry=registry,
        )
        self.live_version = Gauge(
            "mlmesh_serving_live_version", "The version each model serves (0: none).", ("model",), registry=registry
        )
        self.load_failures = Counter(
            "mlmesh_serving_load_failures_total",
            "Versions that failed verification or warm-up and were not rolled out.",
            ("model",),
            registry=registry,
        )


def _string_parameter(parameters: Any, key: str, default: str) -> str:
    if key not in parameters:
        return default
    value = parameters[key]
    if value.WhichOneof("parameter_choice") != "string_param":
        raise InvalidArgument(f"parameter {key} must be a string")
    return str(value.string_param)


class ServingServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, runtime: StageRuntime):
        self.runtime = runtime
        self.settings = runtime.settings
        self.metrics = ServingMetrics(runtime.metrics.registry)
        self.repository = Repository(runtime, self.metrics)
        runtime.background.append(asyncio.get_running_loop().create_task(self.repository.poll()))
        # Health says SERVING once every registered model has had its first load (or its failure):
        # a new replica in a rolling update gets no request it would answer UNAVAILABLE.
        runtime.before_serving.append(self.repository.first_pass)

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        # Ready once the first look at the registry is done: every servable model has been loaded.
        return pb.ServerReadyResponse(ready=self.repository.first_pass.is_set() and not self.runtime.stopping.is_set())

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=VERSION, extensions=EXTENSIONS)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.repository.ready(request.name, request.version))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        slot = await self.repository.slot(request.name, request.version)
        served = slot.served
        response = pb.ModelMetadataResponse(
            name=served.name, versions=self.repository.versions(served.name), platform=PLATFORM
        )
        for column in served.inputs:
            response.inputs.add(name=column.name, datatype=column.datatype, shape=[-1])
        for name, datatype, shape in served.outputs_metadata():
            response.outputs.add(name=name, datatype=datatype, shape=shape)
        return response

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        if len(request.parameters) > MAX_PARAMETERS:
            raise InvalidArgument(f"the request has {len(request.parameters)} parameters; at most {MAX_PARAMETERS}")
        unseen = _string_parameter(request.parameters, "unseen_levels", self.settings.serving_unseen_levels)
        if unseen not in UNSEEN_POLICIES:
            raise InvalidArgument(f"parameter unseen_levels must be one of {', '.join(UNSEEN_POLICIES)}")
        if len(request.id) > MAX_ID_CHARACTERS:
            raise InvalidArgument(f"id is longer than {MAX_ID_CHARACTERS} characters")
        slot = await self.repository.slot(request.model_name, request.model_version)
        served = slot.served
        version = str(served.version)
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            # A small request is read on the loop (a thread hop costs more than the work);
            # a large one on a worker, so health and other callers are never held up.
            small = request.ByteSize() <= INLINE_BYTES
            prepared = (
                _prepare(served, request, unseen, self.settings.serving_max_request_rows)
                if small
                else await self.runtime.to_thread(
                    _prepare, served, request, unseen, self.settings.serving_max_request_rows
                )
            )
            outputs = await slot.batcher.predict(prepared.read, prepared.rows) if prepared.rows else served.no_rows()
            if small:
                response = _respond(served, request, prepared.wanted, outputs)
            else:
                response = await self.runtime.to_thread(_respond, served, request, prepared.wanted, outputs)
            self.metrics.rows.labels(served.name, version).inc(prepared.rows)
            return response
        except StageError as exc:
            code = exc.code
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            raise
        finally:
            self.metrics.requests.labels(served.name, version, code.name).inc()
            self.metrics.latency.labels(served.name, version).observe(time.perf_counter() - started)

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        _check_repository(request.repository_name)
        response = pb.RepositoryIndexResponse()
        for name, version, state, reason in self.repository.index(request.ready):
            response.models.add(name=name, version=version, state=state, reason=bounded(reason, 400))
        return response

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        _check_repository(request.repository_name)
        version = None
        unknown = sorted(set(request.parameters) - {"version"})
        if unknown:
            raise InvalidArgument(f"unknown parameter {shown(unknown[0])}; the one parameter is version")
        if "version" in request.parameters:
            value = request.parameters["version"]
            choice = value.WhichOneof("parameter_choice")
            if choice == "int64_param":
                version = parse_version(str(value.int64_param))
            elif choice == "string_param":
                if not value.string_param:
                    raise InvalidArgument(
                        'parameter version is empty; name a version such as "3", or leave the parameter out '
                        "to follow the newest version"
                    )
                version = parse_version(value.string_param)
            else:
                raise InvalidArgument('parameter version must be a number or a string such as "3"')
        await self.repository.load(request.model_name, version)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        _check_repository(request.repository_name)
        # tritonclient's unload_model always sends unload_dependents; a model here has no dependents.
        unknown = sorted(set(request.parameters) - {"unload_dependents"})
        if unknown:
            raise InvalidArgument(f"unknown parameter {shown(unknown[0])}; RepositoryModelUnload takes none")
        await self.repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


@dataclass
class _Prepared:
    read: Any  # the request's columns, read as training read them
    rows: int
    wanted: list[str]  # the outputs asked for, in order; empty: all


def _prepare(served: ServedVersion, request: pb.ModelInferRequest, unseen: str, max_rows: int) -> _Prepared:
    """Check and read a request's inputs and requested outputs (InvalidArgument names what is wrong)."""
    columns, rows = decode_inputs(request, max_rows, len(served.inputs) + len(served.other_columns))
    produced = [name for name, _, _ in served.outputs_metadata()]
    wanted = [output.name for output in request.outputs]
    for name in wanted:
        if name not in produced:
            raise InvalidArgument(f"output {shown(name)} is not one this model gives; it gives {', '.join(produced)}")
    # Even an empty batch is checked column by column: its columns must be the model's.
    return _Prepared(served.read(columns, rows, unseen), rows, wanted or produced)


def _respond(
    served: ServedVersion, request: pb.ModelInferRequest, wanted: list[str], outputs: dict[str, Any]
) -> pb.ModelInferResponse:
    """The response: the outputs asked for, raw when the inputs came raw, and who computed them."""
    response = pb.ModelInferResponse(model_name=served.name, model_version=str(served.version), id=request.id)
    response.parameters["model_sha256"].string_param = served.model_sha256
    raw = bool(request.raw_input_contents)
    for name in wanted:
        if name not in outputs:
            continue
        tensor, data = encode_output(name, outputs[name], raw)
        response.outputs.append(tensor)
        if raw:
            response.raw_output_contents.append(data)
    return response


def _check_repository(name: str) -> None:
    if name not in ("", "registry"):
        raise InvalidArgument(
            f"repository {shown(name)} does not exist; the one repository is the model registry "
            "(leave repository_name empty)"
        )


SPEC = StageSpec.of("serving", VERSION, ServingServicer)
