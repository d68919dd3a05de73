"""The serving stage through its real entry points: the Open Inference Protocol over gRPC.

One mesh of the six stages runs in this module's event loop on real ports (start_stage); the
pipeline trains and registers small models once (a mixed CSV with every kind of column, and
builtin tables), and every test here calls the serving stage as its clients do: grpc stubs,
tritonclient (sync and aio, in .venv-clients), and the real grpcurl.

What it proves:
- the protocol's RPCs answer as KServe V2 clients expect (liveness, readiness, metadata, the
  repository extension), and tritonclient and grpcurl work against it unmodified;
- a prediction served for the stored test split is the evaluator's own, value for value,
  whether the rows come in one request, one at a time, or in batches shared with other callers;
- every malformed request gets its honest status code, names the column, and quotes nothing
  unbounded; fuzzed requests never get INTERNAL or UNKNOWN and leave the stage healthy;
- the repository extension pins, follows, unloads and loads, and a version whose artifacts are
  corrupt in the store never replaces the one being served; a poll that read the store just
  before a load, pin or unload never undoes it (made certain by holding the poll's read);
- tokens: a predict token predicts and may do nothing else; register may load and unload;
- batches hold at most MLMESH_SERVING_MAX_BATCH_ROWS rows, and never split a request.

The module's mesh polls the registry every 0.1 s and takes at most MAX_REQUEST_ROWS rows a request.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import json
import random
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlmesh.serving.v2 import open_inference_pb2 as pb
from mlmesh.serving.v2 import open_inference_pb2_grpc as pb_grpc
from services.client.mesh import MeshClient, PipelineConfig, PipelineRun, register_request
from services.runtime import registry
from services.runtime.catalog import STAGES
from services.runtime.server import RunningStage, stage_spec, start_stage
from services.runtime.settings import Settings
from services.runtime.store import ArtifactStore, ref_to_dict
from services.serving.repository import POLICY
from tests.helpers import StartedStagesClient
from tests.serving_support import (
    CLIENTS_PYTHON,
    MAX_DETAIL_BYTES,
    Trained,
    assert_bounded,
    assert_outputs_match,
    client_script,
    columns_document,
    decode_response,
    grpcurl,
    request_for,
    run_async,
    trained,
    write_mixed_csv,
)
from tests.test_fuzz import Gen, raw_bodies
from tests.test_observability import scrape
from tests.test_observability import value as sample

# One mesh and one set of trained models for the whole module: its tests share one xdist worker.
pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.xdist_group("serving")]

MAX_REQUEST_ROWS = 200  # MLMESH_SERVING_MAX_REQUEST_ROWS of this module's mesh: every test split fits
CLASSIFY = {"accuracy": 0.0}  # thresholds every model meets, so each run is a PROMOTE and registered
REGRESS = {"rmse": 1e12}
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
CONCURRENT = 32


@dataclass(frozen=True)
class Recipe:
    """A model to train and register: where from, which model, and how exact its answers are."""

    source: str  # "mixed" is this module's CSV
    target: str
    model: str
    kind: str  # "tree" (bitwise in any batch) or "linear" (BLAS: within 1e-12, see serving_support)
    hyperparameters: tuple[tuple[str, str], ...] = ()


RECIPES = {
    "mixed-lr": Recipe("mixed", "label", "logistic_regression", "linear"),
    "mixed-rf": Recipe("mixed", "label", "random_forest", "tree", (("n_estimators", "20"),)),
    "mixed-ridge": Recipe("mixed", "score", "ridge", "linear"),
    "mixed-rf-score": Recipe("mixed", "score", "random_forest", "tree", (("n_estimators", "20"),)),
    "cancer-lr": Recipe("sklearn:breast_cancer", "", "logistic_regression", "linear"),
    "diabetes-ridge": Recipe("sklearn:diabetes", "", "ridge", "linear"),
    "diabetes-rf": Recipe("sklearn:diabetes", "", "random_forest", "tree", (("n_estimators", "20"),)),
    "iris-rf": Recipe("sklearn:iris", "", "random_forest", "tree", (("n_estimators", "10"),)),
}
# Names the repository tests change (pin, unload, load), so the exactness tests' models never move.
# Each lists the recipes of its versions, in order.
SCRATCH = {
    "cycle": ["iris-rf"],
    "pinned": ["mixed-lr", "mixed-rf"],
    "fuzzed": ["iris-rf", "mixed-rf"],
    "guarded": ["mixed-rf"],
    "unloaded": ["iris-rf"],
    "raced": ["iris-rf"],
    "raced-pin": ["mixed-lr", "mixed-rf"],
    "secured": ["iris-rf"],
}


@dataclass
class World:
    stages: dict[str, RunningStage]
    settings: Settings
    root: Path
    store: ArtifactStore
    client: MeshClient
    stub: pb_grpc.GRPCInferenceServiceStub
    runs: dict[str, PipelineRun]
    models: dict[str, Trained]
    csv: Path

    @property
    def address(self) -> str:
        return self.stages["serving"].address

    @property
    def metrics_url(self) -> str:
        return self.stages["serving"].metrics_url

    async def register(self, name: str, recipe: str) -> int:
        reply = await self.client.register_model(register_request(self.runs[recipe], name))
        return reply.model_version.version

    async def index(self) -> dict[str, pb.RepositoryIndexResponse.ModelIndex]:
        reply = await self.stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
        return {model.name: model for model in reply.models}

    async def wait_served(self, name: str, version: int, timeout: float = 30) -> None:
        """Until RepositoryIndex says `name` is READY at `version` (the poller's pace, a fraction of a second)."""
        deadline = time.monotonic() + timeout
        while True:
            shown = (await self.index()).get(name)
            if shown is not None and shown.state == "READY" and shown.version == str(version):
                return
            assert time.monotonic() < deadline, f"{name} v{version} is not served: {shown}"
            await asyncio.sleep(0.05)

    async def infer(self, request: pb.ModelInferRequest, timeout: float = 30) -> pb.ModelInferResponse:
        return await self.stub.ModelInfer(request, timeout=timeout)

    async def infer_all(self, requests: list[pb.ModelInferRequest]) -> list[pb.ModelInferResponse]:
        """Every request at once, at most CONCURRENT in flight: below the stage's admission limit
        (MLMESH_MAX_CONCURRENT_RPCS, 64), which would refuse the rest with RESOURCE_EXHAUSTED."""
        gate = asyncio.Semaphore(CONCURRENT)

        async def one(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
            async with gate:
                return await self.infer(request)

        return await asyncio.gather(*(one(request) for request in requests))


def _config(recipe: Recipe, csv: Path) -> PipelineConfig:
    source = str(csv) if recipe.source == "mixed" else recipe.source
    regression = recipe.target == "score" or "diabetes" in recipe.source
    return PipelineConfig(
        source=source,
        target_column=recipe.target,
        model=recipe.model,
        hyperparameters=dict(recipe.hyperparameters),
        minimums={} if regression else CLASSIFY,
        maximums=REGRESS if regression else {},
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory, data_roots: str) -> AsyncIterator[World]:
    base = tmp_path_factory.mktemp("serving")  # under the session's data roots: the loader may read it
    csv = write_mixed_csv(base / "mixed.csv")
    settings = Settings.from_env(
        {
            "MLMESH_ARTIFACT_ROOT": str(base / "artifacts"),
            "MLMESH_DATA_ROOTS": data_roots,
            "MLMESH_GRACE_SECONDS": "0.5",
            "MLMESH_SERVING_POLL_SECONDS": "0.1",
            "MLMESH_SERVING_MAX_REQUEST_ROWS": str(MAX_REQUEST_ROWS),
            "MLMESH_METRICS": "off",
        }
    )
    # Only serving serves /metrics (on a free port: start_stage with port 0); each endpoint costs
    # half a second to stop (conftest.py's settings fixture says why).
    served_metrics = dataclasses.replace(settings, metrics=True)
    stages: dict[str, RunningStage] = {}
    try:
        for name in STAGES:
            stages[name] = await start_stage(
                stage_spec(name), served_metrics if name == "serving" else settings, port=0
            )
        async with StartedStagesClient(settings, stages) as client:
            channel = grpc.aio.insecure_channel(stages["serving"].address)
            runs = {}
            for name, recipe in RECIPES.items():
                runs[name] = await client.run_pipeline(_config(recipe, csv))
            store = ArtifactStore(settings.artifact_root)
            world = World(
                stages, settings, Path(settings.artifact_root), store, client, pb_grpc.GRPCInferenceServiceStub(channel),
                runs, {}, csv,
            )  # fmt: skip
            for name in RECIPES:
                assert await world.register(name, name) == 1
            for name, versions in SCRATCH.items():
                for number, recipe in enumerate(versions, 1):
                    assert await world.register(name, recipe) == number
            for name in RECIPES:
                await world.wait_served(name, 1)
                metadata = await world.stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=10)
                world.models[name] = trained(store, world.root, name, 1, RECIPES[name].kind, metadata)
            for name, versions in SCRATCH.items():
                await world.wait_served(name, len(versions))
            yield world
            await channel.close()
    finally:
        for stage in stages.values():
            await stage.stop(0.5)


def code_of(error: BaseException) -> grpc.StatusCode:
    assert isinstance(error, grpc.aio.AioRpcError), error
    return error.code()


async def refused(
    world: World, request: Any, code: grpc.StatusCode, *fragments: str, method: str = "ModelInfer"
) -> str:
    """The call fails with `code`, its message holds every fragment and is bounded."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(world.stub, method)(request, timeout=30)
    details = caught.value.details() or ""
    assert caught.value.code() == code, f"expected {code.name}, got {caught.value.code().name}: {details}"
    for fragment in fragments:
        assert fragment in details, f"{fragment!r} not in {details!r}"
    assert_bounded(details)
    return details


# ---- the protocol's core RPCs ------------------------------------------------------------------
async def test_liveness_readiness_and_server_metadata(world: World) -> None:
    stub = world.stub
    assert (await stub.ServerLive(pb.ServerLiveRequest(), timeout=5)).live
    assert (await stub.ServerReady(pb.ServerReadyRequest(), timeout=5)).ready
    metadata = await stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=5)
    assert metadata.name == "mlmesh" and metadata.version and list(metadata.extensions) == ["model_repository"]
    assert (await stub.ModelReady(pb.ModelReadyRequest(name="mixed-rf"), timeout=5)).ready
    assert (await stub.ModelReady(pb.ModelReadyRequest(name="mixed-rf", version="1"), timeout=5)).ready
    assert not (await stub.ModelReady(pb.ModelReadyRequest(name="mixed-rf", version="2"), timeout=5)).ready
    # A model nobody registered is not ready: clients ask this as a yes-or-no question
    # (tritonclient's is_model_ready returns a bool), so it is no error. A malformed name or version is.
    assert not (await stub.ModelReady(pb.ModelReadyRequest(name="no-such-model"), timeout=5)).ready
    await refused(
        world,
        pb.ModelReadyRequest(name="no such model"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "model name",
        method="ModelReady",
    )
    await refused(
        world,
        pb.ModelReadyRequest(name="mixed-rf", version="v1"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "model_version",
        method="ModelReady",
    )
    # grpc.health.v1 answers for the server and for the protocol's service.
    async with grpc.aio.insecure_channel(world.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_model_metadata_lists_one_input_per_feature_column_with_its_datatype(world: World) -> None:
    metadata = await world.stub.ModelMetadata(pb.ModelMetadataRequest(name="mixed-lr"), timeout=5)
    assert metadata.name == "mixed-lr" and list(metadata.versions) == ["1"] and metadata.platform == "mlmesh_sklearn"
    inputs = {tensor.name: (tensor.datatype, list(tensor.shape)) for tensor in metadata.inputs}
    # The identifier (row_id) and the target (label) are not inputs; score is a feature of the label model.
    assert inputs == {
        "num": ("FP64", [-1]),
        "count": ("INT64", [-1]),
        "cat": ("BYTES", [-1]),
        "city": ("BYTES", [-1]),
        "flag": ("BOOL", [-1]),
        "when": ("BYTES", [-1]),
        "score": ("FP64", [-1]),
    }
    outputs = {tensor.name: (tensor.datatype, list(tensor.shape)) for tensor in metadata.outputs}
    assert outputs == {"predicted": ("BYTES", [-1]), "probabilities": ("FP64", [-1, 2]), "classes": ("BYTES", [2])}
    regression = await world.stub.ModelMetadata(pb.ModelMetadataRequest(name="mixed-ridge"), timeout=5)
    assert {t.name: t.datatype for t in regression.outputs} == {"predicted": "FP64"}
    assert "label" in {t.name for t in regression.inputs} and "score" not in {t.name for t in regression.inputs}
    iris = await world.stub.ModelMetadata(pb.ModelMetadataRequest(name="iris-rf", version="1"), timeout=5)
    assert [t.datatype for t in iris.inputs] == ["FP64"] * 4
    assert {t.name: list(t.shape) for t in iris.outputs}["probabilities"] == [-1, 3]
    await refused(
        world, pb.ModelMetadataRequest(name="nope"), grpc.StatusCode.NOT_FOUND, "nope", method="ModelMetadata"
    )
    await refused(
        world,
        pb.ModelMetadataRequest(name="iris-rf", version="4"),
        grpc.StatusCode.NOT_FOUND,
        "version 4",
        method="ModelMetadata",
    )


# ---- exactness ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(RECIPES))
async def test_the_test_split_in_one_request_gets_the_evaluators_predictions(world: World, name: str) -> None:
    model = world.models[name]
    for raw in (False, True):
        response = await world.infer(request_for(model, raw=raw))
        assert response.model_name == name and response.model_version == "1"
        assert response.parameters["model_sha256"].string_param == model.model_sha256
        assert bool(response.raw_output_contents) == raw  # raw inputs get raw outputs
        assert_outputs_match(model, decode_response(response), range(model.rows), f"{name} raw={raw}")
    # Numbers and booleans as FP64 (0/1), INT64 columns too: the same answers.
    response = await world.infer(request_for(model, style="fp64"))
    assert_outputs_match(model, decode_response(response), range(model.rows), f"{name} as FP64")


@pytest.mark.parametrize("name", sorted(RECIPES))
async def test_rows_alone_and_in_shared_batches_get_the_evaluators_predictions(world: World, name: str) -> None:
    model = world.models[name]
    rnd = random.Random(name)
    # Every row on its own, all at once: the stage batches concurrent requests together.
    alone = await world.infer_all([request_for(model, [row]) for row in range(model.rows)])
    for row, response in enumerate(alone):
        assert_outputs_match(model, decode_response(response), [row], f"{name} row {row} alone")
    # Mixed batches: random slices of shuffled rows, concurrently, some raw, some with the other columns.
    order = list(range(model.rows))
    rnd.shuffle(order)
    chunks, start = [], 0
    while start < len(order):
        size = rnd.randint(1, 9)
        chunks.append(order[start : start + size])
        start += size
    requests = [request_for(model, chunk, raw=rnd.random() < 0.3) for chunk in chunks]
    responses = await world.infer_all(requests)
    for chunk, response in zip(chunks, responses, strict=True):
        assert_outputs_match(model, decode_response(response), chunk, f"{name} rows {chunk}")


async def test_concurrent_requests_really_share_batches(world: World) -> None:
    """Not a timing claim: concurrent requests for one model were computed in fewer batches than
    requests (mlmesh_serving_batch_rows counts batches and their rows)."""
    model = world.models["mixed-rf"]
    before = scrape(world.metrics_url)
    await world.infer_all([request_for(model, [row % model.rows]) for row in range(64)])
    after = scrape(world.metrics_url)
    batches = sample(after, "mlmesh_serving_batch_rows_count") - sample(before, "mlmesh_serving_batch_rows_count")
    rows = sample(after, "mlmesh_serving_batch_rows_sum") - sample(before, "mlmesh_serving_batch_rows_sum")
    assert rows == 64 and 1 <= batches < 64, (batches, rows)


async def test_other_columns_of_the_table_are_accepted_and_ignored(world: World) -> None:
    model = world.models["mixed-lr"]
    rows = list(range(5))
    extra = {
        "row_id": pd.Series([10_000 + r for r in rows], dtype="float64"),
        "label": pd.Series(["yes"] * 5, dtype=object),
    }
    response = await world.infer(request_for(model, rows, extra=extra))
    assert_outputs_match(model, decode_response(response), rows, "with row_id and label")


async def test_requested_outputs_and_ids_come_back(world: World) -> None:
    model = world.models["mixed-rf"]
    request = request_for(model, [0, 1, 2])
    request.id = "call-42"
    request.outputs.add(name="probabilities")
    response = await world.infer(request)
    assert response.id == "call-42" and [o.name for o in response.outputs] == ["probabilities"]
    assert list(response.outputs[0].shape) == [3, 2]


async def test_a_version_asked_by_number_answers_and_names_itself(world: World) -> None:
    model = world.models["mixed-rf"]
    response = await world.infer(request_for(model, [0, 1], version="1"))
    assert response.model_version == "1"
    assert_outputs_match(model, decode_response(response), [0, 1], "version 1 by number")


# ---- third-party clients -----------------------------------------------------------------------
def _error(result: Any, code: str, *fragments: str) -> None:
    assert isinstance(result, dict) and result.get("error") == code, result
    for fragment in fragments:
        assert fragment in result["message"], (fragment, result["message"])
    assert_bounded(result["message"])


async def test_tritonclient_sync_and_aio_speak_to_the_stage_unmodified(world: World, tmp_path: Path) -> None:
    model, cycle = world.models["mixed-rf"], world.models["iris-rf"]
    rows = model.seen_rows[:6]
    assert len(rows) == 6, "the test split has rows whose levels training saw"
    plan = {
        "address": world.address,
        "model": model.name,
        "columns": columns_document(model, rows),
        "unseen_column": "cat",
        "cycle_model": "cycle",
        "cycle_columns": columns_document(cycle, range(3)),
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    results = await client_script("triton_battery.py", str(tmp_path / "plan.json"))
    names = set(RECIPES) | set(SCRATCH)
    for mode in ("sync", "aio"):
        got = results[mode]
        where = f"tritonclient {mode}"
        assert got["server_live"] is True and got["server_ready"] is True, where
        assert got["server_metadata"]["extensions"] == ["model_repository"], where
        assert got["model_ready"] is True and got["model_ready_version_1"] is True, where
        assert got["model_ready_unknown"] is False, where
        metadata = got["model_metadata"]
        assert [(t["name"], t["datatype"]) for t in metadata["inputs"]] == model.inputs, where
        assert metadata["versions"] == ["1"] and metadata["platform"] == "mlmesh_sklearn", where

        # set_data_from_numpy sends raw_input_contents; the answers come back raw, and are the evaluator's.
        infer = got["infer"]
        assert infer["model_name"] == model.name and infer["model_version"] == "1", where
        assert infer["model_sha256"] == model.model_sha256 and infer["raw_outputs"] == 3, where
        assert infer["outputs"] == {
            "predicted": {"datatype": "BYTES", "shape": [6]},
            "probabilities": {"datatype": "FP64", "shape": [6, 2]},
            "classes": {"datatype": "BYTES", "shape": [2]},
        }, where
        outputs = {
            "predicted": np.asarray(infer["predicted"], dtype=object),
            "probabilities": np.asarray(infer["probabilities"], dtype="float64").reshape(6, 2),
            "classes": np.asarray(infer["classes"], dtype=object),
        }
        assert_outputs_match(model, outputs, rows, where)
        only = got["infer_predicted_only"]
        assert list(only["outputs"]) == ["predicted"] and only["id"] == "req-7", where
        assert got["infer_version_1"]["model_version"] == "1", where
        index = {m["name"]: m for m in got["repository_index"]["models"]}
        assert set(index) == names and index[model.name]["state"] == "READY", where

        _error(got["infer_unknown_model"], "NOT_FOUND", "no-such-model")
        _error(got["infer_bad_version"], "INVALID_ARGUMENT", "model_version")
        _error(got["infer_missing_version"], "NOT_FOUND", "version 99")
        _error(got["infer_missing_column"], "INVALID_ARGUMENT", model.inputs[0][0])
        _error(got["infer_wrong_datatype"], "INVALID_ARGUMENT", model.inputs[0][0], "BYTES")
        _error(got["infer_unknown_column"], "INVALID_ARGUMENT", "no_such_column")
        _error(got["infer_unknown_output"], "INVALID_ARGUMENT", "nope")
        _error(got["infer_unseen_level"], "INVALID_ARGUMENT", "'cat'", "never-seen-level", "unseen_levels=encode")
        assert got["infer_unseen_level_encoded"]["model_version"] == "1", where
        _error(got["load_unknown_model"], "NOT_FOUND", "no-such-model")
        # load_model cannot pin a version: its only parameters are `config` and override files.
        _error(got["load_with_config"], "INVALID_ARGUMENT", "config")

        # Unload: not ready, refused with FAILED_PRECONDITION, UNLOADED in the index; load: back.
        assert got["cycle_unload"] is None and got["cycle_ready_after_unload"] is False, where
        _error(got["cycle_infer_after_unload"], "FAILED_PRECONDITION", "unloaded")
        assert [(m["state"], m.get("version", "")) for m in got["cycle_index_after_unload"]] == [("UNLOADED", "")], (
            where
        )
        assert got["cycle_load"] is None and got["cycle_ready_after_load"] is True, where
        assert got["cycle_infer_after_load"]["model_version"] == "1", where
    await world.wait_served("cycle", 1)


# ---- grpcurl -------------------------------------------------------------------------------------
async def test_grpcurl_lists_describes_and_calls_through_reflection(world: World) -> None:
    listed = await grpcurl(world.address, "list")
    assert listed.returncode == 0, listed.stderr
    assert "inference.GRPCInferenceService" in listed.stdout.split()
    methods = await grpcurl(world.address, "list", "inference.GRPCInferenceService")
    assert {m.rsplit(".", 1)[-1] for m in methods.stdout.split()} == {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",
    }  # fmt: skip

    metadata = await grpcurl(world.address, "inference.GRPCInferenceService/ModelMetadata", data={"name": "mixed-rf"})
    assert metadata.returncode == 0, metadata.stderr
    shown = json.loads(metadata.stdout)
    assert [(t["name"], t["datatype"]) for t in shown["inputs"]] == world.models["mixed-rf"].inputs

    # Typed contents as JSON: numbers in fp64_contents, text in bytes_contents (base64 in JSON).
    model = world.models["mixed-rf"]
    rows = model.seen_rows[:3]
    frame = model.test.iloc[rows]
    inputs = []
    for name, datatype in model.inputs:
        if datatype == "BYTES":
            texts = [
                b"" if pd.isna(v) else (pd.Timestamp(v).isoformat() if name == "when" else str(v)).encode()
                for v in frame[name]
            ]
            contents = {"bytes_contents": [base64.b64encode(t).decode() for t in texts]}
        else:  # FP64 for every number and boolean (INT64 and BOOL columns take FP64 too); NaN as JSON's "NaN"
            contents = {"fp64_contents": ["NaN" if pd.isna(v) else float(v) for v in frame[name]]}
        inputs.append(
            {"name": name, "datatype": "BYTES" if datatype == "BYTES" else "FP64", "shape": [3], "contents": contents}
        )
    answer = await grpcurl(
        world.address, "inference.GRPCInferenceService/ModelInfer", data={"model_name": "mixed-rf", "inputs": inputs}
    )
    assert answer.returncode == 0, answer.stderr
    reply = json.loads(answer.stdout)
    assert reply["model_name"] == "mixed-rf" and reply["model_version"] == "1"
    outputs = {o["name"]: o for o in reply["outputs"]}
    predicted = [base64.b64decode(v).decode() for v in outputs["predicted"]["contents"]["bytes_contents"]]
    probabilities = np.asarray(outputs["probabilities"]["contents"]["fp64_contents"], dtype="float64").reshape(3, 2)
    classes = [base64.b64decode(v).decode() for v in outputs["classes"]["contents"]["bytes_contents"]]
    decoded = {
        "predicted": np.asarray(predicted, dtype=object),
        "probabilities": probabilities,
        "classes": np.asarray(classes, dtype=object),
    }
    assert_outputs_match(model, decoded, rows, "grpcurl ModelInfer")

    index = await grpcurl(world.address, "inference.GRPCInferenceService/RepositoryIndex", data={})
    assert index.returncode == 0, index.stderr
    states = {m["name"]: (m["version"], m["state"]) for m in json.loads(index.stdout)["models"]}
    assert states["mixed-rf"] == ("1", "READY") and states["pinned"] == ("2", "READY")

    # Pin the older version of "pinned" with the repository extension's "version" parameter.
    pin = {"model_name": "pinned", "parameters": {"version": {"int64_param": 1}}}
    loaded = await grpcurl(world.address, "inference.GRPCInferenceService/RepositoryModelLoad", data=pin)
    assert loaded.returncode == 0, loaded.stderr
    try:
        states = {m.name: (m.version, m.state, m.reason) for m in (await world.index()).values()}
        assert states["pinned"] == ("1", "READY", "pinned to version 1")
        answered = await world.infer(_named(world.models["mixed-lr"], "pinned", [0, 1]))
        assert answered.model_version == "1"
        await asyncio.sleep(0.5)  # several polls (every 0.1 s): the pin holds against the newer version
        assert (await world.index())["pinned"].version == "1"
    finally:
        follow = await grpcurl(
            world.address, "inference.GRPCInferenceService/RepositoryModelLoad", data={"model_name": "pinned"}
        )
        assert follow.returncode == 0, follow.stderr
    assert (await world.index())["pinned"].reason == "follows the newest version"
    assert (await world.infer(_named(world.models["mixed-lr"], "pinned", [0]))).model_version == "2"


def _named(model: Trained, name: str, rows: list[int], version: str = "") -> pb.ModelInferRequest:
    """A request for `rows` of `model`'s test split, addressed to another registered name."""
    request = request_for(model, rows, version=version)
    request.model_name = name
    return request


# ---- bad input: each its honest code, the column named, nothing unbounded ------------------------
INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
LONG_NAME = "n" * 1_000_000  # a 1 MB column name: a message may name it, never quote it whole


def _base(world: World, rows: int = 3, raw: bool = False) -> pb.ModelInferRequest:
    model = world.models["mixed-rf"]
    return request_for(model, model.seen_rows[:rows], raw=raw, encode=False)


def _input(request: pb.ModelInferRequest, name: str) -> Any:
    return next(tensor for tensor in request.inputs if tensor.name == name)


def _position(request: pb.ModelInferRequest, name: str) -> int:
    return next(i for i, tensor in enumerate(request.inputs) if tensor.name == name)


def _drop(request: pb.ModelInferRequest, name: str) -> pb.ModelInferRequest:
    kept = [tensor for tensor in request.inputs if tensor.name != name]
    del request.inputs[:]
    request.inputs.extend(kept)
    return request


def _add(
    request: pb.ModelInferRequest, name: str, datatype: str = "FP64", values: Any = (1.0, 2.0, 3.0), shape: Any = None
) -> pb.ModelInferRequest:
    tensor = request.inputs.add(name=name, datatype=datatype, shape=list(shape or [len(values)]))
    field = {"FP64": "fp64_contents", "BYTES": "bytes_contents", "INT64": "int64_contents", "BOOL": "bool_contents"}[
        datatype
    ]
    getattr(tensor.contents, field).extend(values)
    return request


def _retype(request: pb.ModelInferRequest, name: str, datatype: str, **contents: Any) -> pb.ModelInferRequest:
    tensor = _input(request, name)
    tensor.datatype = datatype
    tensor.ClearField("contents")
    for field, values in contents.items():
        getattr(tensor.contents, field).extend(values)
    return request


def _set_bytes(request: pb.ModelInferRequest, name: str, values: list[bytes]) -> pb.ModelInferRequest:
    return _retype(request, name, "BYTES", bytes_contents=values)


def _raw_set(request: pb.ModelInferRequest, name: str, data: bytes) -> pb.ModelInferRequest:
    request.raw_input_contents[_position(request, name)] = data
    return request


def _rows(world: World, count: int) -> pb.ModelInferRequest:
    model = world.models["mixed-rf"]
    return request_for(model, [model.seen_rows[i % len(model.seen_rows)] for i in range(count)], encode=False)


def _with(request: pb.ModelInferRequest, **fields: Any) -> pb.ModelInferRequest:
    for key, value in fields.items():
        setattr(request, key, value)
    return request


def _parameter(request: pb.ModelInferRequest, key: str, **choice: Any) -> pb.ModelInferRequest:
    for field, value in choice.items():
        setattr(request.parameters[key], field, value)
    return request


BAD_INPUTS = {
    # columns
    "missing column": (lambda w: _drop(_base(w), "cat"), INVALID, ("lacks 1 input column", "'cat'")),
    "several missing columns": (
        lambda w: _drop(_drop(_base(w), "cat"), "when"),
        INVALID,
        ("lacks 2", "'cat'", "'when'"),
    ),
    "extra column": (lambda w: _add(_base(w), "colour"), INVALID, ("'colour'", "not a column of the training table")),
    "extra column, 1 MB name": (lambda w: _add(_base(w), LONG_NAME), INVALID, ("not a column", "...")),
    "duplicated column": (lambda w: _add(_base(w), "num"), INVALID, ("'num'", "twice")),
    "duplicated column, 1 MB name": (lambda w: _add(_add(_base(w), LONG_NAME), LONG_NAME), INVALID, ("twice",)),
    "no inputs": (lambda w: _with(pb.ModelInferRequest(), model_name="mixed-rf"), INVALID, ("no inputs",)),
    # datatypes
    "number as BYTES": (lambda w: _set_bytes(_base(w), "num", [b"1", b"2", b"3"]), INVALID, ("'num'", "BYTES")),
    "datetime as FP64": (
        lambda w: _retype(_base(w), "when", "FP64", fp64_contents=[1.0, 2.0, 3.0]),
        INVALID,
        ("'when'", "ISO 8601"),
    ),
    "not a protocol datatype": (
        lambda w: _retype(_base(w), "num", "FLOAT64", fp64_contents=[1.0, 2.0, 3.0]),
        INVALID,
        ("'num'", "'FLOAT64'"),
    ),
    "FP16 in typed contents": (
        lambda w: _retype(_base(w), "num", "FP16", fp32_contents=[1.0, 2.0, 3.0]),
        INVALID,
        ("'num'", "raw_input_contents"),
    ),
    "values in another type's field": (
        lambda w: _retype(_base(w), "num", "FP64", int64_contents=[1, 2, 3]),
        INVALID,
        ("'num'", "int64_contents"),
    ),
    "INT8 out of range": (
        lambda w: _retype(_base(w), "count", "INT8", int_contents=[1, 300, 2]),
        INVALID,
        ("'count'", "INT8"),
    ),
    "boolean 2": (
        lambda w: _retype(_base(w), "flag", "FP64", fp64_contents=[1.0, 2.0, 0.0]),
        INVALID,
        ("'flag'", "row 1"),
    ),
    "boolean maybe": (
        lambda w: _set_bytes(_base(w), "flag", [b"true", b"maybe", b"no"]),
        INVALID,
        ("'flag'", "'maybe'"),
    ),
    # shapes
    "shape [3, 2]": (lambda w: _with_shape(_base(w), "num", [3, 2]), INVALID, ("'num'", "[3, 2]", "one column")),
    "shape [2, 2]": (lambda w: _with_shape(_base(w), "num", [2, 2]), INVALID, ("'num'", "[2, 2]")),
    "shape []": (lambda w: _with_shape(_base(w), "num", []), INVALID, ("'num'", "shape")),
    "negative rows": (lambda w: _with_shape(_base(w), "num", [-3]), INVALID, ("'num'", "negative")),
    "mismatched rows": (lambda w: _with_shape(_base(w), "cat", [2], values=2), INVALID, ("'cat'", "2 rows", "have 3")),
    "contents count is not the shape": (
        lambda w: _with_shape(_base(w), "num", [4]),
        INVALID,
        ("'num'", "shape [4] but 3 values"),
    ),
    "shape [3, 1] is one column": (lambda w: _with_shape(_base(w), "num", [3, 1]), None, ()),
    # values
    "unseen category": (
        lambda w: _set_bytes(_base(w), "cat", [b"red", b"purple", b"blue"]),
        INVALID,
        ("'cat'", "row 1: 'purple'", "unseen_levels=encode"),
    ),
    "unseen category, encoded": (
        lambda w: _parameter(
            _set_bytes(_base(w), "cat", [b"red", b"purple", b"blue"]), "unseen_levels", string_param="encode"
        ),
        None,
        (),
    ),
    "unseen_levels not a policy": (
        lambda w: _parameter(_base(w), "unseen_levels", string_param="ENCODE"),
        INVALID,
        ("unseen_levels",),
    ),
    "unseen_levels not a string": (
        lambda w: _parameter(_base(w), "unseen_levels", bool_param=True),
        INVALID,
        ("unseen_levels", "string"),
    ),
    "unparseable datetime": (
        lambda w: _set_bytes(_base(w), "when", [b"2024-01-02", b"yesterday", b""]),
        INVALID,
        ("'when'", "row 1: 'yesterday'", "ISO 8601"),
    ),
    "impossible date": (
        lambda w: _set_bytes(_base(w), "when", [b"2024-13-45", b"2024-01-01", b""]),
        INVALID,
        ("'when'", "row 0"),
    ),
    "bad UTF-8": (
        lambda w: _set_bytes(_base(w), "cat", [b"red", b"\xff\xfe", b"blue"]),
        INVALID,
        ("'cat'", "row 1", "UTF-8"),
    ),
    "a long bad value is cut short": (
        lambda w: _set_bytes(_base(w), "cat", [b"x" * 100_000, b"red", b"blue"]),
        INVALID,
        ("'cat'", "row 0", "..."),
    ),
    "empty and NaN are missing": (
        lambda w: _retype(
            _set_bytes(_base(w), "cat", [b"", b"", b""]), "num", "FP64", fp64_contents=[float("nan")] * 3
        ),
        None,
        (),
    ),
    "booleans as text and numbers as INT32": (
        lambda w: _retype(
            _set_bytes(_base(w), "flag", [b"true", b"False", b"1"]), "count", "INT32", int_contents=[1, 2, 3]
        ),
        None,
        (),
    ),
    # sizes
    "more rows than MLMESH_SERVING_MAX_REQUEST_ROWS": (
        lambda w: _rows(w, MAX_REQUEST_ROWS + 1),
        EXHAUSTED,
        (f"at most {MAX_REQUEST_ROWS} rows", "split the batch"),
    ),
    "a huge row count claimed": (
        lambda w: _with_shape(_base(w), "num", [2**62]),
        EXHAUSTED,
        ("'num'", f"at most {MAX_REQUEST_ROWS}"),
    ),
    "as many rows as allowed": (lambda w: _rows(w, MAX_REQUEST_ROWS), None, ()),
    "over 4 MiB": (
        lambda w: _set_bytes(_base(w), "cat", [b"x" * (5 << 20), b"", b""]),
        EXHAUSTED,
        ("larger than max",),
    ),
    "too many parameters": (lambda w: _many_parameters(_base(w), 17), INVALID, ("17 parameters",)),
    "a long id": (lambda w: _with(_base(w), id="i" * 10_000), INVALID, ("id is longer",)),
    # which model
    "unknown model": (
        lambda w: _with(_base(w), model_name="no-such-model"),
        grpc.StatusCode.NOT_FOUND,
        ("no-such-model", "RepositoryIndex"),
    ),
    "a model name no registry takes": (
        lambda w: _with(_base(w), model_name="../../etc/passwd"),
        INVALID,
        ("model name",),
    ),
    "a 1 MB model name": (lambda w: _with(_base(w), model_name=LONG_NAME), INVALID, ("model name",)),
    "version text": (lambda w: _with(_base(w), model_version="latest"), INVALID, ("model_version", "'latest'")),
    "version zero": (lambda w: _with(_base(w), model_version="0"), INVALID, ("model_version",)),
    "version negative": (lambda w: _with(_base(w), model_version="-1"), INVALID, ("model_version",)),
    "version with a dot": (lambda w: _with(_base(w), model_version="1.0"), INVALID, ("model_version",)),
    "version in other digits": (lambda w: _with(_base(w), model_version="\uff11"), INVALID, ("model_version",)),
    "version too long": (lambda w: _with(_base(w), model_version="1" * 100_000), INVALID, ("model_version",)),
    "version not registered": (
        lambda w: _with(_base(w), model_version="7"),
        grpc.StatusCode.NOT_FOUND,
        ("no version 7", "1 to 1"),
    ),
    "unknown output": (lambda w: _requested(_base(w), "scores"), INVALID, ("'scores'", "predicted")),
    "an output a regressor lacks": (
        lambda w: _requested(_named(w.models["mixed-ridge"], "mixed-ridge", [0]), "probabilities"),
        INVALID,
        ("'probabilities'",),
    ),
    # raw contents
    "raw contents count": (
        lambda w: _raw_count(_base(w, raw=True), 2),
        INVALID,
        ("raw_input_contents has 2 entries for 7 inputs",),
    ),
    "raw byte length": (
        lambda w: _raw_set(_base(w, raw=True), "num", b"\x00" * 20),
        INVALID,
        ("'num'", "20 bytes", "24 bytes"),
    ),
    "raw BYTES element overrun": (
        lambda w: _raw_set(_base(w, raw=True), "cat", (1000).to_bytes(4, "little") + b"red"),
        INVALID,
        ("'cat'", "runs past the end"),
    ),
    "raw BYTES too few elements": (
        lambda w: _raw_set(_base(w, raw=True), "cat", (3).to_bytes(4, "little") + b"red"),
        INVALID,
        ("'cat'", "hold 1 elements, not 3"),
    ),
    "raw BYTES too many elements": (
        lambda w: _raw_set(_base(w, raw=True), "cat", b"".join((3).to_bytes(4, "little") + b"red" for _ in range(4))),
        INVALID,
        ("'cat'", "more than the 3"),
    ),
    "raw BYTES a truncated length": (lambda w: _raw_set(_base(w, raw=True), "cat", b"\x03\x00"), INVALID, ("'cat'",)),
    "raw and typed at once": (
        lambda w: _both(_base(w, raw=True), "num"),
        INVALID,
        ("'num'", "both contents and raw_input_contents"),
    ),
    "raw BOOL of 2": (lambda w: _raw_set(_base(w, raw=True), "flag", b"\x01\x02\x00"), INVALID, ("'flag'",)),
}


def _with_shape(
    request: pb.ModelInferRequest, name: str, shape: list[int], values: int | None = None
) -> pb.ModelInferRequest:
    """`name`'s shape becomes `shape`; with `values`, its contents keep only that many values."""
    tensor = _input(request, name)
    del tensor.shape[:]
    tensor.shape.extend(shape)
    if values is not None:
        for descriptor, _ in tensor.contents.ListFields():
            del getattr(tensor.contents, descriptor.name)[values:]
    return request


def _many_parameters(request: pb.ModelInferRequest, count: int) -> pb.ModelInferRequest:
    for index in range(count):
        request.parameters[f"p{index}"].int64_param = index
    return request


def _requested(request: pb.ModelInferRequest, name: str) -> pb.ModelInferRequest:
    request.outputs.add(name=name)
    return request


def _raw_count(request: pb.ModelInferRequest, count: int) -> pb.ModelInferRequest:
    del request.raw_input_contents[count:]
    return request


def _both(request: pb.ModelInferRequest, name: str) -> pb.ModelInferRequest:
    _input(request, name).contents.fp64_contents.extend([1.0, 2.0, 3.0])
    return request


@pytest.mark.parametrize("case", list(BAD_INPUTS))
async def test_each_bad_input_gets_its_honest_code_and_names_the_column(world: World, case: str) -> None:
    build, code, fragments = BAD_INPUTS[case]
    request = build(world)
    if code is None:  # the accepted neighbours of the refusals
        response = await world.infer(request)
        assert response.model_version == "1" and response.outputs
        return
    details = await refused(world, request, code, *fragments)
    assert LONG_NAME[:MAX_ECHO] not in details and "x" * MAX_ECHO not in details and "1" * MAX_ECHO not in details
    # Refused alone: the stage answers the next caller.
    assert (await world.infer(_base(world))).model_version == "1"


MAX_ECHO = 200


# ---- the repository extension ----------------------------------------------------------------------
def _load(name: str, **parameters: Any) -> pb.RepositoryModelLoadRequest:
    request = pb.RepositoryModelLoadRequest(model_name=name)
    for key, choice in parameters.items():
        field, value = choice
        setattr(request.parameters[key], field, value)
    return request


async def test_a_version_asked_by_number_answers_beside_the_served_one(world: World) -> None:
    """The model "pinned" serves version 2 (mixed-rf's model); version 1 (mixed-lr's) answers requests naming it."""
    assert (await world.index())["pinned"].version == "2"
    for version, recipe in (("1", "mixed-lr"), ("2", "mixed-rf"), ("", "mixed-rf")):
        model = world.models[recipe]
        rows = list(range(model.rows))
        response = await world.infer(_named(model, "pinned", rows, version=version))
        assert response.model_version == (version or "2")
        assert_outputs_match(model, decode_response(response), rows, f"pinned version {version or 'served'}")
    assert (await world.stub.ModelReady(pb.ModelReadyRequest(name="pinned", version="1"), timeout=5)).ready
    assert (await world.index())["pinned"].version == "2", "answering version 1 by number rolls nothing back"


async def test_repository_load_and_unload_refuse_what_they_cannot_do(world: World) -> None:
    method = "RepositoryModelLoad"
    await refused(world, _load("no-such-model"), grpc.StatusCode.NOT_FOUND, "no-such-model", method=method)
    await refused(
        world, _load("pinned", version=("int64_param", 9)), grpc.StatusCode.NOT_FOUND, "no version 9", method=method
    )
    for bad in (0, -1, 2**63 - 1):
        await refused(world, _load("pinned", version=("int64_param", bad)), INVALID, "model_version", method=method)
    for bad in ("latest", "1.5", "v1", " 1"):
        await refused(world, _load("pinned", version=("string_param", bad)), INVALID, "model_version", method=method)
    await refused(world, _load("pinned", version=("bool_param", True)), INVALID, "version", method=method)
    await refused(world, _load("pinned", version=("bytes_param", b"1")), INVALID, "version", method=method)
    await refused(world, _load("pinned", config=("string_param", "{}")), INVALID, "'config'", method=method)
    await refused(
        world, _load("pinned", **{LONG_NAME: ("string_param", "x")}), INVALID, "unknown parameter", method=method
    )
    await refused(world, _with(_load("pinned"), repository_name="elsewhere"), INVALID, "'elsewhere'", method=method)
    await refused(world, _load("../x"), INVALID, "model name", method=method)
    await refused(world, _load(LONG_NAME), INVALID, "model name", method=method)
    unload = "RepositoryModelUnload"
    await refused(
        world,
        pb.RepositoryModelUnloadRequest(model_name="no-such-model"),
        grpc.StatusCode.NOT_FOUND,
        "no-such-model",
        method=unload,
    )
    request = pb.RepositoryModelUnloadRequest(model_name="pinned")
    request.parameters["cascade"].bool_param = True
    await refused(world, request, INVALID, "'cascade'", method=unload)
    await refused(
        world, pb.RepositoryIndexRequest(repository_name=LONG_NAME), INVALID, "does not exist", method="RepositoryIndex"
    )
    # None of it moved the model; the repository name "registry" is the one repository.
    assert (await world.index())["pinned"].version == "2"
    reply = await world.stub.RepositoryIndex(
        pb.RepositoryIndexRequest(repository_name="registry", ready=True), timeout=5
    )
    assert {m.state for m in reply.models} == {"READY"} and "pinned" in {m.name for m in reply.models}


async def test_a_string_version_pins_and_no_version_follows_the_newest(world: World) -> None:
    await world.stub.RepositoryModelLoad(_load("pinned", version=("string_param", "1")), timeout=30)
    try:
        assert (await world.index())["pinned"].reason == "pinned to version 1"
        assert (await world.infer(_named(world.models["mixed-lr"], "pinned", [0]))).model_version == "1"
    finally:
        await world.stub.RepositoryModelLoad(_load("pinned"), timeout=30)
    assert (await world.infer(_named(world.models["mixed-lr"], "pinned", [0]))).model_version == "2"


async def test_an_unloaded_model_answers_no_request_until_it_is_loaded_again(world: World) -> None:
    model = world.models["iris-rf"]
    name = "unloaded"
    await world.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name), timeout=30)
    try:
        await asyncio.sleep(0.5)  # several polls (every 0.1 s): none serves it again
        shown = (await world.index())[name]
        assert (shown.state, shown.version) == ("UNLOADED", ""), shown
        assert not (await world.stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=5)).ready
        assert not (await world.stub.ModelReady(pb.ModelReadyRequest(name=name, version="1"), timeout=5)).ready
        await refused(
            world, _named(model, name, [0]), grpc.StatusCode.FAILED_PRECONDITION, "unloaded", "RepositoryModelLoad"
        )
        await refused(
            world,
            pb.ModelMetadataRequest(name=name),
            grpc.StatusCode.FAILED_PRECONDITION,
            "unloaded",
            method="ModelMetadata",
        )
    finally:
        await world.stub.RepositoryModelLoad(_load(name), timeout=30)
    assert (await world.stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=5)).ready
    response = await world.infer(_named(model, name, [0, 1]))
    assert response.model_version == "1"
    assert_outputs_match(model, decode_response(response), [0, 1], "loaded again")


async def test_an_unloaded_model_answers_no_request_that_names_its_version(world: World) -> None:
    """RepositoryModelUnload stops serving the name: naming a version must not load it back
    behind the operator's back (and then report it ready)."""
    model = world.models["iris-rf"]
    name = "unloaded"
    await world.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name), timeout=30)
    try:
        await refused(world, _named(model, name, [0], version="1"), grpc.StatusCode.FAILED_PRECONDITION, "unloaded")
        assert not (await world.stub.ModelReady(pb.ModelReadyRequest(name=name, version="1"), timeout=5)).ready
        await refused(
            world,
            pb.ModelMetadataRequest(name=name, version="1"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "unloaded",
            method="ModelMetadata",
        )
    finally:
        await world.stub.RepositoryModelLoad(_load(name), timeout=30)


async def test_an_empty_version_parameter_is_refused_not_taken_as_follow_the_newest(world: World) -> None:
    """A "version" parameter that names no version (a script's empty variable) must not silently
    unpin: without the parameter the model follows the newest; with it, it names one version."""
    await world.stub.RepositoryModelLoad(_load("pinned", version=("int64_param", 1)), timeout=30)
    try:
        await refused(
            world, _load("pinned", version=("string_param", "")), INVALID, "version", method="RepositoryModelLoad"
        )
        assert (await world.index())["pinned"].reason == "pinned to version 1"
    finally:
        await world.stub.RepositoryModelLoad(_load("pinned"), timeout=30)


def _corrupt(store: ArtifactStore, ref: Any) -> None:
    """Overwrite an object's bytes in the store (same size, other bytes): bit rot, a bad copy."""
    path = Path(store.resolve(ref.uri))
    data = bytearray(path.read_bytes())
    for index in range(0, len(data), max(1, len(data) // 64)):
        data[index] ^= 0x5A
    path.chmod(0o644)
    path.write_bytes(bytes(data))


async def test_a_version_with_corrupt_artifacts_never_replaces_the_served_one(world: World) -> None:
    name = "guarded"
    good = world.models["mixed-rf"]
    before = scrape(world.metrics_url)
    failures = sample(before, "mlmesh_serving_load_failures_total", model=name)
    assert sample(before, "mlmesh_serving_live_version", model=name) == 1

    # Version 2: its model is corrupted after it was registered. The evaluator reads a model's
    # bytes before registering it, so the test writes the entry itself, with the same function.
    run = await world.client.run_pipeline(
        dataclasses.replace(_config(RECIPES["mixed-rf"], world.csv), hyperparameters={"n_estimators": "7"})
    )
    _corrupt(world.store, run.train.model)
    entry = {
        "model": ref_to_dict(run.train.model),
        "metrics_report": ref_to_dict(run.evaluate.metrics_report),
        "metrics": dict(run.evaluate.metrics),
        "lineage": {key: ref_to_dict(ref) for key, ref in run.lineage().items()},
    }
    assert registry.register(world.store, name, entry)[0]["version"] == 2
    reason = await _until_not_rolled_out(world, name, 2)
    assert "model" in reason and "corrupt" in reason, reason

    # Version 3: registered through the evaluator, whose lineage check reads sizes, not bytes; its
    # transformer (a run of its own, minmax scaling) was corrupted before.
    run = await world.client.run_pipeline(
        dataclasses.replace(_config(RECIPES["mixed-rf"], world.csv), scaling="minmax")
    )
    _corrupt(world.store, run.features.transformer)
    assert (await world.client.register_model(register_request(run, name))).model_version.version == 3
    reason = await _until_not_rolled_out(world, name, 3)
    assert "transformer" in reason and "corrupt" in reason, reason

    # All along, version 1 answers every request, as the evaluator would.
    rows = list(range(good.rows))
    response = await world.infer(_named(good, name, rows))
    assert response.model_version == "1"
    assert_outputs_match(good, decode_response(response), rows, "the version kept")
    await refused(world, _named(good, name, [0], version="2"), grpc.StatusCode.DATA_LOSS, "corrupt")
    after = scrape(world.metrics_url)
    assert sample(after, "mlmesh_serving_load_failures_total", model=name) == failures + 2
    assert sample(after, "mlmesh_serving_live_version", model=name) == 1

    # A good version 4 rolls out past them.
    assert await world.register(name, "mixed-lr") == 4
    await world.wait_served(name, 4)
    assert (await world.infer(_named(world.models["mixed-lr"], name, [0]))).model_version == "4"


async def test_a_replica_starting_on_a_damaged_newest_version_serves_the_last_good_one_and_retries_it(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica that starts (a restart, a new pod) when the newest version is damaged serves the
    newest version that passes every check instead of nothing; once the damage is repaired, the
    version is tried again and rolls out."""
    import services.serving.repository as repository

    name, good = "fallback", world.models["mixed-rf"]
    assert await world.register(name, "mixed-rf") == 1
    run = await world.client.run_pipeline(
        dataclasses.replace(_config(RECIPES["mixed-rf"], world.csv), hyperparameters={"n_estimators": "9"})
    )
    path = Path(world.store.resolve(run.train.model.uri))
    intact = path.read_bytes()
    _corrupt(world.store, run.train.model)
    entry = {
        "model": ref_to_dict(run.train.model),
        "metrics_report": ref_to_dict(run.evaluate.metrics_report),
        "metrics": dict(run.evaluate.metrics),
        "lineage": {key: ref_to_dict(ref) for key, ref in run.lineage().items()},
    }
    assert registry.register(world.store, name, entry)[0]["version"] == 2

    replica = await start_stage(stage_spec("serving"), world.settings, port=0)
    try:
        async with grpc.aio.insecure_channel(replica.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            deadline = time.monotonic() + 30
            while True:
                shown = {
                    m.name: m for m in (await stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)).models
                }
                if shown.get(name) and shown[name].state == "READY":
                    break
                assert time.monotonic() < deadline, shown.get(name)
                await asyncio.sleep(0.05)
            assert shown[name].version == "1" and shown[name].reason.startswith("version 2 was not rolled out"), shown
            assert "corrupt" in shown[name].reason
            response = await stub.ModelInfer(_named(good, name, [0, 1]), timeout=30)
            assert response.model_version == "1"

            # Repaired: the next poll after the retry delay rolls version 2 out.
            path.chmod(0o644)
            path.write_bytes(intact)
            monkeypatch.setattr(repository, "RETRY_FAILED_SECONDS", 0.0)
            deadline = time.monotonic() + 30
            while (await stub.ModelInfer(_named(good, name, [0]), timeout=30)).model_version != "2":
                assert time.monotonic() < deadline, "the repaired version 2 was never tried again"
                await asyncio.sleep(0.05)
    finally:
        await replica.stop(0)


async def test_a_regression_that_overflows_is_the_callers_input_to_fix(world: World) -> None:
    """A number so large that the model's answer is not finite is refused, as the evaluator refuses
    a non-finite prediction, naming the row; the other rows of a batch were never at fault."""
    model = world.models["diabetes-ridge"]
    request = request_for(model, [0, 1, 2], encode=False)
    tensor = next(t for t in request.inputs if t.datatype == "FP64")
    tensor.contents.fp64_contents[1] = 1e308
    details = await refused(world, request, INVALID, "not a finite number", "row 1")
    assert "far outside the training range" in details
    assert (await world.infer(request_for(model, [0, 2]))).model_version == "1"


async def _until_not_rolled_out(world: World, name: str, version: int, timeout: float = 30) -> str:
    """RepositoryIndex's reason once it says `version` was not rolled out; meanwhile version 1 stays."""
    deadline = time.monotonic() + timeout
    while True:
        shown = (await world.index())[name]
        assert (shown.state, shown.version) == ("READY", "1"), shown
        if shown.reason.startswith(f"version {version} was not rolled out"):
            assert_bounded(shown.reason)
            return shown.reason
        assert time.monotonic() < deadline, shown
        await asyncio.sleep(0.05)


async def test_metrics_count_requests_by_model_version_and_code(world: World) -> None:
    model = world.models["iris-rf"]
    labels = {"model": "iris-rf", "version": "1"}
    before = scrape(world.metrics_url)
    for _ in range(3):
        await world.infer(request_for(model, [0, 1]))
    await refused(world, _drop(request_for(model, [0]), model.inputs[0][0]), INVALID)
    after = scrape(world.metrics_url)

    def grew(name: str, **more: str) -> float:
        return sample(after, name, **labels, **more) - sample(before, name, **labels, **more)

    assert grew("mlmesh_serving_requests_total", code="OK") == 3
    assert grew("mlmesh_serving_requests_total", code="INVALID_ARGUMENT") == 1
    assert grew("mlmesh_serving_request_seconds_count") == 4
    assert grew("mlmesh_serving_rows_total") == 6
    assert sample(after, "mlmesh_serving_live_version", model="iris-rf") == 1
    assert sample(after, "mlmesh_serving_batch_rows_count") > sample(before, "mlmesh_serving_batch_rows_count")


# ---- a poll that read the registry before a repository call must not undo it -----------------------
class HeldPolicyRead:
    """Holds the serving poller's next read of serving/policy.json once it has read the file, until
    released: a poll that started just before a repository call and ends just after it, made
    certain instead of left to chance (the window is a few milliseconds of a 0.1 s poll)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.armed = False
        self.read, self.released = threading.Event(), threading.Event()
        original = ArtifactStore.load_doc

        def load_doc(store: ArtifactStore, parts: tuple[str, ...]) -> Any:
            document = original(store, parts)
            if parts == POLICY and self.armed:
                self.armed = False
                self.read.set()
                self.released.wait(10)
            return document

        monkeypatch.setattr(ArtifactStore, "load_doc", load_doc)

    async def poller_has_read(self) -> None:
        self.armed = True
        assert await asyncio.to_thread(self.read.wait, 10), "the poller did not read the policy"


async def _answers_only(world: World, request: pb.ModelInferRequest, version: str, seconds: float = 0.6) -> None:
    """Every request for `seconds` (several polls) is answered, by `version`."""
    deadline = time.monotonic() + seconds
    seen = collections.Counter()
    while time.monotonic() < deadline:
        try:
            seen[(await world.infer(request)).model_version] += 1
        except grpc.aio.AioRpcError as error:
            seen[error.code().name] += 1
        await asyncio.sleep(0.01)
    assert set(seen) == {version}, f"answers after the call returned: {dict(seen)}"


async def test_a_load_is_not_undone_by_a_poll_that_read_the_policy_before_it(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, model = "raced", world.models["iris-rf"]
    held = HeldPolicyRead(monkeypatch)
    await world.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name), timeout=30)
    try:
        await held.poller_has_read()  # the poll saw {"unloaded": true}
        await world.stub.RepositoryModelLoad(_load(name), timeout=30)
        assert (await world.stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=5)).ready
        held.released.set()
        await _answers_only(world, _named(model, name, [0]), "1")
    finally:
        held.released.set()
        await world.stub.RepositoryModelLoad(_load(name), timeout=30)


async def test_a_pin_is_not_undone_by_a_poll_that_read_the_policy_before_it(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, model = "raced-pin", world.models["mixed-lr"]
    held = HeldPolicyRead(monkeypatch)
    try:
        await held.poller_has_read()  # the poll saw no pin: it wants version 2
        await world.stub.RepositoryModelLoad(_load(name, version=("int64_param", 1)), timeout=30)
        assert (await world.infer(_named(model, name, [0]))).model_version == "1"
        held.released.set()
        await _answers_only(world, _named(model, name, [0]), "1")
    finally:
        held.released.set()
        await world.stub.RepositoryModelLoad(_load(name), timeout=30)


# ---- fuzz ----------------------------------------------------------------------------------------
FUZZ_SEED = 20261207
FUZZ_REQUESTS = 520  # per family: ModelInfer, and the repository with metadata and readiness
FUZZ_CONCURRENCY = 8
DATATYPES = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]
CONTENT_FIELDS = [
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp32_contents",
    "fp64_contents",
    "bytes_contents",
]


def _fuzz_value(g: Gen, field: str) -> Any:
    r = g.r
    if field == "bytes_contents":
        return r.choice(
            [
                b"",
                b"red",
                b"blue",
                b"2024-01-02",
                b"2024-01-02T03:04:05+02:00",
                b"true",
                b"\xff\xfe",
                b"\x00",
                g.text().encode("utf-8", "surrogatepass"),
                b"9" * 400,
                b"1e400",
                b"nan",
                b"-0",
                b"(missing)",
            ]
        )
    if field == "bool_contents":
        return r.random() < 0.5
    if field in ("fp32_contents", "fp64_contents"):
        return r.choice(
            [
                0.0,
                -0.0,
                1.0,
                0.5,
                3.0,
                float("nan"),
                float("inf"),
                -float("inf"),
                1e308,
                -1e308,
                5e-324,
                r.uniform(-9, 9),
            ]
        )
    if field == "int_contents":
        return r.choice([0, 1, 2, -1, 255, 256, 2**31 - 1, -(2**31)])
    if field == "uint_contents":
        return r.choice([0, 1, 2, 255, 65536, 2**32 - 1])
    if field == "uint64_contents":
        return r.choice([0, 1, 2, 2**63, 2**64 - 1])
    return r.choice([0, 1, 2, -1, 2**63 - 1, -(2**63), 10**12])


def _fuzz_raw(g: Gen, rows: int) -> bytes:
    r = g.r
    kind = r.randrange(6)
    if kind == 0:
        return bytes(r.getrandbits(8) for _ in range(r.choice([0, 1, 3, rows * 8, rows * 8 + 1, 64])))
    if kind == 1:  # BYTES elements, some lengths lying
        out = b""
        for _ in range(rows + r.choice([-1, 0, 0, 1])):
            item = r.choice([b"red", b"", b"\xff", b"2024-01-01", b"x" * 50])
            length = len(item) + r.choice([0, 0, 0, 1, -1, 2**31, 2**32 - 1]) if r.random() < 0.3 else len(item)
            out += (length % 2**32).to_bytes(4, "little") + item
        return out
    if kind == 2:
        return np.asarray([_fuzz_value(g, "fp64_contents") for _ in range(rows)], dtype="<f8").tobytes()
    if kind == 3:
        return np.asarray([r.choice([0, 1, 2, 255]) for _ in range(rows)], dtype="u1").tobytes()
    if kind == 4:
        return b"\x03\x00"
    return np.asarray([r.choice([0, 1, -1, 2**62]) for _ in range(rows)], dtype="<i8").tobytes()


def _fuzz_infer(g: Gen, world: World) -> pb.ModelInferRequest:
    """A valid request of a served model, then 1-4 mutations of its names, types, shapes, values."""
    r = g.r
    model = world.models[r.choice(["mixed-rf", "mixed-lr", "iris-rf", "mixed-ridge"])]
    rows = r.sample(range(model.rows), r.randint(1, 6))
    request = request_for(model, rows, raw=r.random() < 0.3, encode=r.random() < 0.5)
    raw = bool(request.raw_input_contents)
    for _ in range(r.randint(1, 4)):
        kind = r.randrange(16)
        tensors = list(request.inputs)
        target = r.choice(tensors) if tensors else None
        if kind == 0 and tensors:
            position = r.randrange(len(tensors))
            del request.inputs[position]
            if raw and position < len(request.raw_input_contents):
                del request.raw_input_contents[position]
        elif kind == 1 and target is not None:
            request.inputs.add().CopyFrom(target)
            if raw:
                request.raw_input_contents.append(request.raw_input_contents[0] if request.raw_input_contents else b"")
        elif kind == 2 and target is not None:
            target.name = r.choice([g.text(), "", target.name.upper(), "row_id", "label", "score", "target"])
        elif kind == 3 and target is not None:
            target.datatype = r.choice([*DATATYPES, "", "STRING", "fp64", g.text()])
        elif kind == 4 and target is not None:
            del target.shape[:]
            target.shape.extend(
                r.choice(
                    [
                        [],
                        [len(rows)],
                        [len(rows), 1],
                        [len(rows), 2],
                        [1, len(rows)],
                        [-1],
                        [0],
                        [2**62],
                        [MAX_REQUEST_ROWS + 1],
                        [len(rows) + 1],
                        [len(rows), 1, 1],
                    ]
                )
            )
        elif kind == 5 and target is not None and not raw:
            field = r.choice(CONTENT_FIELDS)
            target.ClearField("contents")
            getattr(target.contents, field).extend(
                _fuzz_value(g, field) for _ in range(r.choice([len(rows), len(rows), 0, len(rows) + 1]))
            )
        elif kind == 6 and target is not None and not raw:
            for descriptor, values in target.contents.ListFields():
                if values:
                    values[r.randrange(len(values))] = _fuzz_value(g, descriptor.name)
        elif kind == 7 and raw and request.raw_input_contents:
            request.raw_input_contents[r.randrange(len(request.raw_input_contents))] = _fuzz_raw(g, len(rows))
        elif kind == 8:
            if raw:
                request.raw_input_contents.append(b"\x00" * 8) if r.random() < 0.5 else request.raw_input_contents.pop()
            else:
                request.raw_input_contents.extend(_fuzz_raw(g, len(rows)) for _ in range(r.choice([1, len(tensors)])))
                raw = True
        elif kind == 9:
            request.model_name = r.choice(
                [model.name, model.name, "no-such-model", "guarded", "unloaded", g.text(), "", "a" * 129]
            )
        elif kind == 10:
            request.model_version = r.choice(["", "1", "2", "3", "0", "-1", "99", "1.0", "\uff11", g.text(), "9" * 30])
        elif kind == 11:
            key = r.choice(["unseen_levels", "unseen_levels", "priority", "timeout", g.text()])
            choice = r.randrange(5)
            if choice == 0:
                request.parameters[key].string_param = r.choice(["encode", "reject", "ENCODE", "", g.text()])
            elif choice == 1:
                request.parameters[key].bool_param = True
            elif choice == 2:
                request.parameters[key].int64_param = r.choice([0, -1, 2**63 - 1])
            elif choice == 3:
                request.parameters[key].double_param = float("nan")
            else:
                request.parameters[key].uint64_param = 2**64 - 1
        elif kind == 12:
            request.outputs.add(name=r.choice(["predicted", "probabilities", "classes", "", g.text()]))
        elif kind == 13:
            request.id = r.choice(["", "x" * 256, "x" * 257, g.text()])
        elif kind == 14 and target is not None:
            target.parameters[r.choice(["binary_data_size", g.text()])].int64_param = r.randint(-5, 5)
        elif kind == 15:
            for index in range(r.choice([16, 17, 40])):
                request.parameters[f"p{index}"].bool_param = True
    return request


def _fuzz_repository(g: Gen, world: World) -> tuple[str, Any]:
    """A repository, metadata or readiness request: names real, unknown and hostile; versions and parameters anything."""
    r = g.r
    # Only "fuzzed" is loaded and unloaded; any name is asked about.
    asked = r.choice([*RECIPES, *SCRATCH, "fuzzed", "fuzzed", "no-such-model", "", g.text(), "a" * 128, "../x"])
    changed = r.choice(["fuzzed", "fuzzed", "fuzzed", "no-such-model", "", g.text(), "x/y"])
    version = r.choice(["", "", "1", "2", "3", "0", "-1", "1.5", "\uff12", g.text(), "9" * 12])

    def parameters(message: Any) -> None:
        for _ in range(r.choice([0, 0, 1, 1, 2, 5])):
            key = r.choice(["version", "version", "version", "unload_dependents", "config", g.text()])
            choice = r.randrange(6)
            if choice == 0:
                message.parameters[key].int64_param = r.choice([1, 2, 2, 3, 0, -1, 2**63 - 1, 10**10])
            elif choice == 1:
                message.parameters[key].string_param = r.choice(["1", "2", "", "3", "01", " 2", "two", g.text()])
            elif choice == 2:
                message.parameters[key].bool_param = r.random() < 0.5
            elif choice == 3:
                message.parameters[key].bytes_param = r.choice([b"1", b"\xff", b""])
            else:
                message.ClearField("parameters") if r.random() < 0.5 else None

    method = r.choice(
        [
            "RepositoryIndex",
            "RepositoryModelLoad",
            "RepositoryModelLoad",
            "RepositoryModelUnload",
            "ModelMetadata",
            "ModelReady",
        ]
    )
    if method == "RepositoryIndex":
        return method, pb.RepositoryIndexRequest(
            repository_name=r.choice(["", "", "registry", g.text()]), ready=r.random() < 0.5
        )
    if method == "RepositoryModelLoad":
        message = pb.RepositoryModelLoadRequest(
            model_name=changed, repository_name=r.choice(["", "", "", "registry", g.text()])
        )
        parameters(message)
        return method, message
    if method == "RepositoryModelUnload":
        message = pb.RepositoryModelUnloadRequest(
            model_name=changed, repository_name=r.choice(["", "", "registry", g.text()])
        )
        if r.random() < 0.3:
            parameters(message)
        return method, message
    if method == "ModelMetadata":
        return method, pb.ModelMetadataRequest(name=asked, version=version)
    return method, pb.ModelReadyRequest(name=asked, version=version)


async def _fuzz(
    world: World, cases: list[tuple[str, Any, tuple[str, ...]]], allowed: set[grpc.StatusCode]
) -> collections.Counter:
    """Send every case (method, request, long inputs it holds); collect problems; return the codes."""
    codes: collections.Counter = collections.Counter()
    problems: list[str] = []
    gate = asyncio.Semaphore(FUZZ_CONCURRENCY)

    async def one(method: str, request: Any, longs: tuple[str, ...]) -> None:
        async with gate:
            try:
                await getattr(world.stub, method)(request, timeout=30)
                code, details = grpc.StatusCode.OK, ""
            except grpc.aio.AioRpcError as error:
                code, details = error.code(), error.details() or ""
        codes[f"{method}:{code.name}"] += 1
        shown = str(request)[:300]
        if (
            code in FORBIDDEN
            or code == grpc.StatusCode.DEADLINE_EXCEEDED
            or (code not in allowed and code != grpc.StatusCode.OK)
        ):
            problems.append(f"{method}: {code.name}: {details[:300]!r} for {shown!r}")
        if len(details.encode()) > MAX_DETAIL_BYTES:
            problems.append(f"{method}: a message of {len(details.encode())} bytes: {details[:200]!r}")
        for text in longs:
            if len(text) >= 500 and text[:500] in details:
                problems.append(f"{method}: {code.name} message echoes a {len(text)}-character input")

    await asyncio.gather(*(one(*case) for case in cases))
    print("\nserving fuzz status codes:", dict(sorted(codes.items())))
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:30])
    return codes


async def _still_healthy(world: World) -> None:
    async with grpc.aio.insecure_channel(world.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert (await world.stub.ServerReady(pb.ServerReadyRequest(), timeout=5)).ready
    model = world.models["mixed-rf"]
    response = await world.infer(request_for(model))
    assert_outputs_match(model, decode_response(response), range(model.rows), "after the fuzz")


async def test_fuzzed_infer_requests_never_get_internal_or_unknown(world: World) -> None:
    g = Gen(FUZZ_SEED, {}, world.root, world.csv)
    cases = []
    for _ in range(FUZZ_REQUESTS):
        g.start()
        cases.append(("ModelInfer", _fuzz_infer(g, world), tuple(g.longs)))
    # And bodies that are not (or only by chance are) a ModelInferRequest.
    valid = request_for(world.models["iris-rf"], [0, 1]).SerializeToString()
    bodies = [("ModelInfer", body, ()) for body in raw_bodies(random.Random(FUZZ_SEED), valid)]
    codes = await _fuzz_raw_and_messages(world, cases, bodies)
    assert codes["ModelInfer:OK"] >= 10, "some fuzzed requests are still valid"
    await _still_healthy(world)


async def _fuzz_raw_and_messages(world: World, cases: list, bodies: list) -> collections.Counter:
    allowed = {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,  # "unloaded" and "guarded"'s corrupt versions
        grpc.StatusCode.DATA_LOSS,  # "guarded" version 2, asked by number: its model is corrupt
    }
    codes = await _fuzz(world, cases, allowed)
    async with grpc.aio.insecure_channel(world.address) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer", request_serializer=None, response_deserializer=None
        )
        for _, body, _ in bodies:
            try:
                await call(body, timeout=10)
                codes["raw:OK"] += 1
            except grpc.aio.AioRpcError as error:
                assert error.code() not in FORBIDDEN, (error.code(), error.details(), body[:100])
                codes[f"raw:{error.code().name}"] += 1
    return codes


async def test_fuzzed_repository_metadata_and_readiness_requests_never_get_internal_or_unknown(world: World) -> None:
    g = Gen(FUZZ_SEED + 1, {}, world.root, world.csv)
    cases = []
    for _ in range(FUZZ_REQUESTS):
        g.start()
        method, request = _fuzz_repository(g, world)
        cases.append((method, request, tuple(g.longs)))
    allowed = {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,  # metadata of an unloaded model
        grpc.StatusCode.UNAVAILABLE,  # metadata of "fuzzed" between an unload and a load's swap: "loading"
    }
    try:
        codes = await _fuzz(world, cases, allowed)
    finally:
        await world.stub.RepositoryModelLoad(_load("fuzzed"), timeout=30)
    for method in ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload", "ModelMetadata", "ModelReady"):
        assert codes[f"{method}:OK"] >= 5, f"too few valid {method} requests to judge: {codes}"
    await world.wait_served("fuzzed", 2)
    await _still_healthy(world)


# ---- tokens and roles ------------------------------------------------------------------------------
@dataclass
class Secured:
    """A serving stage and a loader that require bearer tokens, over the same artifact store (so the
    same registry and models), and the tokens of each role."""

    stages: dict[str, RunningStage]
    tokens: dict[str, str]  # role name -> token

    def stub(self, channel: grpc.aio.Channel) -> pb_grpc.GRPCInferenceServiceStub:
        return pb_grpc.GRPCInferenceServiceStub(channel)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secured(world: World, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Secured]:
    folder = tmp_path_factory.mktemp("tokens")
    tokens = {role: secrets.token_hex(32) for role in ("predict", "pipeline", "register", "release", "admin")}
    roles = {"release": "pipeline,register"}
    (folder / "tokens").write_text(
        "".join(f"{name} {roles.get(name, name)} {token}\n" for name, token in tokens.items())
    )
    settings = dataclasses.replace(world.settings, auth_tokens_file=str(folder / "tokens"))
    stages: dict[str, RunningStage] = {}
    try:
        for name in ("loader", "serving"):
            stages[name] = await start_stage(stage_spec(name), settings, port=0)
        # Ready once its first look at the registry is done: every registered model is loaded.
        async with grpc.aio.insecure_channel(stages["serving"].address) as channel:
            stub, deadline = pb_grpc.GRPCInferenceServiceStub(channel), time.monotonic() + 30
            while not (
                await stub.ServerReady(pb.ServerReadyRequest(), metadata=_bearer(tokens["admin"]), timeout=5)
            ).ready:
                assert time.monotonic() < deadline, "the secured serving stage never became ready"
                await asyncio.sleep(0.05)
        yield Secured(stages, tokens)
    finally:
        for stage in stages.values():
            await stage.stop(0.5)


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


async def _code(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        assert_bounded(error.details() or "")
        return error.code()
    return grpc.StatusCode.OK


async def test_a_predict_token_predicts_and_may_do_nothing_else(world: World, secured: Secured) -> None:
    from mlmesh.loader.v1 import loader_pb2, loader_pb2_grpc

    model = world.models["iris-rf"]
    infer = _named(model, "secured", [0, 1])
    OK, DENIED = grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED
    UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
    async with (
        grpc.aio.insecure_channel(secured.stages["serving"].address) as serving,
        grpc.aio.insecure_channel(secured.stages["loader"].address) as loader,
    ):
        stub = secured.stub(serving)
        ready = await stub.ModelReady(
            pb.ModelReadyRequest(name="secured"), metadata=_bearer(secured.tokens["predict"]), timeout=5
        )
        assert ready.ready, "a ready server has loaded every registered model"

        async def codes(token: str) -> dict[str, grpc.StatusCode]:
            metadata = _bearer(token)
            return {
                "ModelInfer": await _code(stub.ModelInfer(infer, metadata=metadata, timeout=10)),
                "ModelMetadata": await _code(
                    stub.ModelMetadata(pb.ModelMetadataRequest(name="secured"), metadata=metadata, timeout=10)
                ),
                "ServerReady": await _code(stub.ServerReady(pb.ServerReadyRequest(), metadata=metadata, timeout=10)),
                "RepositoryIndex": await _code(
                    stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=metadata, timeout=10)
                ),
                "RepositoryModelLoad": await _code(
                    stub.RepositoryModelLoad(_load("secured"), metadata=metadata, timeout=30)
                ),
                "RepositoryModelUnload": await _code(
                    stub.RepositoryModelUnload(
                        pb.RepositoryModelUnloadRequest(model_name="no-such-model"), metadata=metadata, timeout=10
                    )
                ),
                "Load": await _code(
                    loader_pb2_grpc.LoaderServiceStub(loader).Load(
                        loader_pb2.LoadRequest(source="sklearn:nope"), metadata=metadata, timeout=10
                    )
                ),
            }

        # Unload of an unknown name gets past the role check to NOT_FOUND; Load of an unknown dataset to INVALID_ARGUMENT.
        admitted = {"RepositoryModelUnload": grpc.StatusCode.NOT_FOUND, "Load": grpc.StatusCode.INVALID_ARGUMENT}
        everything = {
            method: admitted.get(method, OK)
            for method in (
                "ModelInfer",
                "ModelMetadata",
                "ServerReady",
                "RepositoryIndex",
                "RepositoryModelLoad",
                "RepositoryModelUnload",
                "Load",
            )
        }
        assert await codes(secured.tokens["predict"]) == {
            **everything, "RepositoryModelLoad": DENIED, "RepositoryModelUnload": DENIED, "Load": DENIED,
        }  # fmt: skip
        # Pipeline tokens may predict (the workflow's smoke request), not change what serving serves.
        assert await codes(secured.tokens["pipeline"]) == {
            **everything,
            "RepositoryModelLoad": DENIED,
            "RepositoryModelUnload": DENIED,
        }
        assert (await codes(secured.tokens["register"]))["RepositoryModelLoad"] == OK
        assert await codes(secured.tokens["release"]) == everything
        assert await codes(secured.tokens["admin"]) == everything
        assert set((await codes("")).values()) == {UNAUTHENTICATED}
        assert set((await codes("not-a-token-of-this-mesh-at-all")).values()) == {UNAUTHENTICATED}
        # The refusal says which role the method needs.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.RepositoryModelLoad(_load("secured"), metadata=_bearer(secured.tokens["predict"]), timeout=10)
        assert "may not call RepositoryModelLoad: it needs the role 'register'" in (caught.value.details() or "")
        # Health stays open to probes without a token.
        reply = await health_pb2_grpc.HealthStub(serving).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_tritonclient_and_grpcurl_carry_tokens(world: World, secured: Secured, tmp_path: Path) -> None:
    address = secured.stages["serving"].address
    script = tmp_path / "with_token.py"
    script.write_text(
        "import json, sys\n"
        "import numpy as np\n"
        "import tritonclient.grpc as g\n"
        "from tritonclient.utils import InferenceServerException\n"
        "address, token = sys.argv[1], sys.argv[2]\n"
        "client = g.InferenceServerClient(address)\n"
        "out = {}\n"
        "for name, headers in (('none', None), ('token', {'authorization': f'Bearer {token}'})):\n"
        "    try:\n"
        "        out[name] = client.get_model_metadata('secured', headers=headers, as_json=True)['name']\n"
        "    except InferenceServerException as error:\n"
        "        out[name] = str(error.status())\n"
        "    try:\n"
        "        client.load_model('secured', headers=headers)\n"
        "        out[name + '_load'] = 'OK'\n"
        "    except InferenceServerException as error:\n"
        "        out[name + '_load'] = str(error.status())\n"
        "print(json.dumps(out))\n"
    )
    result = await run_async(str(CLIENTS_PYTHON), str(script), address, secured.tokens["predict"])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "none": "StatusCode.UNAUTHENTICATED",
        "none_load": "StatusCode.UNAUTHENTICATED",
        "token": "secured",
        "token_load": "StatusCode.PERMISSION_DENIED",
    }
    pin = {"model_name": "secured", "parameters": {"version": {"int64_param": 1}}}
    try:
        await _pin_with_grpcurl(address, pin, secured)
    finally:  # the store, so the policy, is the module mesh's too
        await world.stub.RepositoryModelLoad(_load("secured"), timeout=30)


async def _pin_with_grpcurl(address: str, pin: dict[str, Any], secured: Secured) -> None:
    for token, ok in ((secured.tokens["predict"], False), (secured.tokens["register"], True)):
        loaded = await grpcurl(
            address,
            "inference.GRPCInferenceService/RepositoryModelLoad",
            data=pin,
            headers=(f"authorization: Bearer {token}",),
        )
        assert (loaded.returncode == 0) == ok, loaded.stdout + loaded.stderr
        # -format-error: the status as JSON on stderr (code 7 is PERMISSION_DENIED).
        assert ok or json.loads(loaded.stderr)["code"] == grpc.StatusCode.PERMISSION_DENIED.value[0], loaded.stderr


# ---- edges of a batch ------------------------------------------------------------------------------
def _empty(world: World) -> pb.ModelInferRequest:
    model = world.models["mixed-rf"]
    return request_for(model, [], encode=False)


async def test_an_empty_batch_gets_empty_outputs(world: World) -> None:
    """Zero rows is a batch like any other: every output, with zero rows (clients read outputs by name)."""
    response = await world.infer(_empty(world))
    shapes = {tensor.name: list(tensor.shape) for tensor in response.outputs}
    assert shapes == {"predicted": [0], "probabilities": [0, 2], "classes": [2]}, shapes


async def test_an_empty_batch_is_still_checked_column_by_column(world: World) -> None:
    """No rows is no reason to take columns the model does not have, or to lack its columns."""
    await refused(world, _add(_empty(world), "colour", values=()), INVALID, "'colour'")
    await refused(world, _drop(_empty(world), "cat"), INVALID, "'cat'")
    await refused(world, _retype(_empty(world), "when", "FP64"), INVALID, "'when'")


async def test_a_number_beyond_float32_is_refused_by_a_tree_model_and_its_largest_is_not(world: World) -> None:
    """Tree ensembles compute in float32: a finite number beyond its range is the caller's value to
    fix (INVALID_ARGUMENT with the column and row), never an internal error; a large number within
    the range is served (num's spread is 2, so the fitted scaling keeps 1e38 in range). Linear
    models compute in float64 and take it."""
    large = 1e38
    for name, huge, accepted in (("mixed-rf", 1e300, False), ("mixed-rf", -1e300, False), ("mixed-lr", 1e300, True)):
        model = world.models[name]
        rows = model.seen_rows[:3]
        request = _retype(request_for(model, rows, encode=False), "num", "FP64", fp64_contents=[1.0, huge, 2.0])
        if accepted:
            assert (await world.infer(request)).model_version == "1"
        else:
            await refused(world, request, INVALID, "'num'", "row 1", "float32")
        edge = _retype(request_for(model, rows, encode=False), "num", "FP64", fp64_contents=[1.0, large, -large])
        assert (await world.infer(edge)).model_version == "1"


async def test_the_same_instant_in_any_zone_and_booleans_in_any_spelling_give_the_same_answer(world: World) -> None:
    model = world.models["mixed-rf"]
    rows = model.seen_rows[:8]
    reference = decode_response(await world.infer(request_for(model, rows, encode=False)))
    request = request_for(model, rows, encode=False)
    when = _input(request, "when")
    shifted = [
        (pd.Timestamp(value.decode()) + pd.Timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S+02:00").encode()
        if value
        else b""
        for value in when.contents.bytes_contents
    ]
    _set_bytes(request, "when", shifted)
    flags = [bool(value) for value in _input(request, "flag").contents.bool_contents]
    _set_bytes(request, "flag", [(b"yes" if flag else b"No") for flag in flags])
    answer = decode_response(await world.infer(request))
    assert list(answer["predicted"]) == list(reference["predicted"])
    assert np.array_equal(answer["probabilities"], reference["probabilities"])


# ---- batch limits -------------------------------------------------------------------------------
async def test_batches_hold_at_most_max_batch_rows_and_a_larger_request_runs_alone(world: World) -> None:
    """A serving stage with MLMESH_SERVING_MAX_BATCH_ROWS=4 and a 20 ms wait to fill a batch, over the
    same store: concurrent requests share batches of at most 4 rows; a 10-row request is one batch of
    its own, never split; every answer is still the evaluator's."""
    settings = dataclasses.replace(
        world.settings, metrics=True, serving_max_batch_rows=4, serving_max_batch_wait_ms=20.0
    )
    stage = await start_stage(stage_spec("serving"), settings, port=0)
    try:
        async with grpc.aio.insecure_channel(stage.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            deadline = time.monotonic() + 30
            while not (await stub.ServerReady(pb.ServerReadyRequest(), timeout=5)).ready:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            model = world.models["diabetes-rf"]
            chunks = [[row] for row in range(24)] + [[24, 25, 26], [27, 28, 29], [30, 31, 32]] + [list(range(40, 50))]
            responses = await asyncio.gather(
                *(stub.ModelInfer(request_for(model, chunk), timeout=30) for chunk in chunks)
            )
            for chunk, response in zip(chunks, responses, strict=True):
                assert_outputs_match(model, decode_response(response), chunk, f"rows {chunk} in batches of 4")
        samples = scrape(stage.metrics_url)
    finally:
        await stage.stop(0.5)
    batches = sample(samples, "mlmesh_serving_batch_rows_count")
    at_most_four = sample(samples, "mlmesh_serving_batch_rows_bucket", le="4.0")
    assert sample(samples, "mlmesh_serving_batch_rows_sum") == 24 + 9 + 10  # every row once (a warm-up is no batch)
    assert batches - at_most_four == 1, "only the 10-row request made a batch over 4 rows"
    assert batches < len(chunks), "concurrent requests shared batches"
