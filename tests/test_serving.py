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
  corrupt in the store never replaces the one being served.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import random
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
from services.runtime.catalog import STAGES
from services.runtime.server import RunningStage, stage_spec, start_stage
from services.runtime.settings import Settings
from services.runtime.store import ArtifactStore
from tests.helpers import StartedStagesClient
from tests.serving_support import (
    Trained,
    assert_bounded,
    assert_outputs_match,
    client_script,
    columns_document,
    decode_response,
    grpcurl,
    request_for,
    trained,
    write_mixed_csv,
)
from tests.test_observability import scrape, value

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_REQUEST_ROWS = 200  # MLMESH_SERVING_MAX_REQUEST_ROWS of this module's mesh: every test split fits
CLASSIFY = {"accuracy": 0.0}  # thresholds every model meets, so each run is a PROMOTE and registered
REGRESS = {"rmse": 1e12}
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


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
    await refused(
        world,
        pb.ModelReadyRequest(name="no-such-model"),
        grpc.StatusCode.NOT_FOUND,
        "no-such-model",
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
    alone = await asyncio.gather(*(world.infer(request_for(model, [row])) for row in range(model.rows)))
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
    responses = await asyncio.gather(*(world.infer(request) for request in requests))
    for chunk, response in zip(chunks, responses, strict=True):
        assert_outputs_match(model, decode_response(response), chunk, f"{name} rows {chunk}")


async def test_concurrent_requests_really_share_batches(world: World) -> None:
    """Not a timing claim: concurrent requests for one model were computed in fewer batches than
    requests (mlmesh_serving_batch_rows counts batches and their rows)."""
    model = world.models["mixed-rf"]
    before = scrape(world.metrics_url)
    await asyncio.gather(*(world.infer(request_for(model, [row % model.rows])) for row in range(64)))
    after = scrape(world.metrics_url)
    batches = value(after, "mlmesh_serving_batch_rows_count") - value(before, "mlmesh_serving_batch_rows_count")
    rows = value(after, "mlmesh_serving_batch_rows_sum") - value(before, "mlmesh_serving_batch_rows_sum")
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
        _error(got["model_ready_unknown"], "NOT_FOUND", "no-such-model")
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
