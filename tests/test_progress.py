"""Following a unary stage call while it runs (ProgressService.WatchCall), through real servers and grpcurl."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from mlmesh.common.v1 import progress_pb2, progress_pb2_grpc
from services.client.mesh import MeshClient, PipelineConfig, load_request
from services.runtime import watch as watch_module
from services.runtime.errors import NotFound, ResourceExhausted
from services.runtime.watch import CallWatch

GRPCURL = Path(sys.executable).parent / "grpcurl"
BIG = "synthetic:classification?rows=200000&features=20&seed=3"


@pytest.mark.asyncio
async def test_every_stage_reports_its_phases_to_a_watching_caller(client: MeshClient) -> None:
    seen: dict[str, list[progress_pb2.WatchCallResponse]] = {
        stage: [] for stage in ("loader", "preprocess", "features", "evaluator")
    }
    config = PipelineConfig(source=BIG, model="sgd")
    loaded = await client.load(load_request(config), seen["loader"].append)
    assert loaded.rows == 200_000
    from services.client.mesh import evaluate_request, features_request, preprocess_request, train_request

    prepared = await client.preprocess(preprocess_request(config, loaded.dataset), seen["preprocess"].append)
    features = await client.build_features(
        features_request(config, prepared.train, prepared.test, "sgd"), seen["features"].append
    )
    trained = await client.train(train_request(config, features))
    await client.evaluate(
        evaluate_request(config, trained.model, features, prepared, loaded.profile), seen["evaluator"].append
    )
    expected = {
        "loader": "parsing",
        "preprocess": "cleaning and splitting 200,000 rows",
        "features": "fitting encoders on",
        "evaluator": "scoring",
    }
    for stage, updates in seen.items():
        messages = [u.message for u in updates]
        assert any(expected[stage] in m for m in messages), (stage, messages)
        fractions = [u.fraction_done for u in updates]
        assert fractions == sorted(fractions) and all(0 <= f < 1 for f in fractions), (stage, fractions)
    assert any(u.message.startswith("writing 200,000 rows") for u in seen["loader"])

    # A repeat is a memo hit: the watch just ends, and the call's answer is unchanged.
    again: list[progress_pb2.WatchCallResponse] = []
    assert (await client.load(load_request(config), again.append)).dataset.sha256 == loaded.dataset.sha256
    assert all("parsing" not in u.message for u in again)


def _grpcurl(address: str, body: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(GRPCURL),
            "-plaintext",
            "-max-time",
            "20",
            "-d",
            json.dumps(body),
            address,
            "mlmesh.common.v1.ProgressService/WatchCall",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.asyncio
@pytest.mark.stages("loader")
@pytest.mark.slow  # eight grpcurl processes
async def test_watch_refuses_bad_ids_and_unknown_calls_with_honest_codes(mesh) -> None:
    address = mesh["loader"].address
    for bad in ("", "short", "a" * 65, "has space in it", "../../../etc", "é" * 10, "z" * 10_000):
        result = await asyncio.to_thread(_grpcurl, address, {"call_id": bad})
        assert "Code: InvalidArgument" in result.stderr and "8 to 64 letters" in result.stderr, result.stderr
        assert "z" * 100 not in result.stderr  # a long input is quoted only in part
    unknown = await asyncio.to_thread(_grpcurl, address, {"call_id": "no-such-call-123"})
    assert "Code: NotFound" in unknown.stderr and "mlmesh-call-id" in unknown.stderr, unknown.stderr


@pytest.mark.asyncio
@pytest.mark.stages("loader")
async def test_two_watchers_of_one_call_both_see_it_end(mesh, client: MeshClient) -> None:
    stub = progress_pb2_grpc.ProgressServiceStub(client.channel("loader"))
    call_id = "two-watchers-0001"

    async def follow() -> list[progress_pb2.WatchCallResponse]:
        return [u async for u in stub.WatchCall(progress_pb2.WatchCallRequest(call_id=call_id), timeout=60)]

    watchers = [asyncio.ensure_future(follow()) for _ in range(2)]
    await asyncio.sleep(0.2)
    request = load_request(PipelineConfig(source="synthetic:regression?rows=50000&seed=9"))
    await client.stub("loader").Load(request, timeout=60, metadata=(*client.metadata, ("mlmesh-call-id", call_id)))
    for updates in await asyncio.gather(*watchers):
        assert updates[-1].done and updates[-1].fraction_done == 1.0
        assert any("parsing" in u.message for u in updates)


@pytest.mark.asyncio
@pytest.mark.stages("loader")
async def test_a_bad_call_id_on_the_call_itself_is_invalid_argument(client: MeshClient) -> None:
    request = load_request(PipelineConfig(source="sklearn:iris"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.stub("loader").Load(request, timeout=30, metadata=(*client.metadata, ("mlmesh-call-id", "x")))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "mlmesh-call-id" in refused.value.details()


@pytest.mark.asyncio
async def test_waiting_watches_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch_module, "MAX_WAITING_WATCHES", 2)
    watch = CallWatch()

    async def wait(call_id: str) -> None:
        async for _ in watch.follow(call_id, timeout=0.3):
            pass

    waiting = [asyncio.ensure_future(wait(f"waiting-{i:04d}")) for i in range(2)]
    await asyncio.sleep(0.05)
    with pytest.raises(ResourceExhausted):
        await wait("one-too-many")
    for task in waiting:
        with pytest.raises(NotFound):
            await task
