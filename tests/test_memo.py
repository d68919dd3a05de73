"""The stage memo: one computation per cache key, keys that mean what they say,
no dangling refs, and manifests that record where every artifact came from."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import sklearn

from mlmesh.common.v1.common_pb2 import ArtifactRef
from mlmesh.features.v1 import features_pb2
from mlmesh.loader.v1 import loader_pb2
from mlmesh.preprocess.v1 import preprocess_pb2
from mlmesh.trainer.v1 import trainer_pb2
from services.client.mesh import MeshClient, PipelineConfig
from services.runtime.server import RunningStage, stage_spec
from services.runtime.settings import Settings
from services.runtime.stage import Job, StageRuntime
from services.runtime.store import ArtifactStore, ref_to_dict
from services.trainer import logic as trainer_logic
from tests.helpers import DATA_LOSS, StartedStagesClient, expect_error, features_for


@pytest.fixture
def settings(artifact_root: Path) -> Settings:
    """Two workers per stage whatever the host, so the concurrency below is the same everywhere.
    Metrics unserved, as in conftest.py's settings."""
    return Settings.from_env(
        {
            "MLMESH_ARTIFACT_ROOT": str(artifact_root),
            "MLMESH_GRACE_SECONDS": "0.5",
            "MLMESH_WORKER_THREADS": "2",
            "MLMESH_METRICS": "off",
        }
    )


def memo_files(root: Path, stage: str) -> list[Path]:
    return sorted((root / "memo" / stage).glob("*.json"))


def all_files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def object_path(ref: ArtifactRef) -> Path:
    return Path(ref.uri.removeprefix("file://"))


@pytest.fixture
def fit_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts real fits in the trainer (on its worker threads)."""
    calls: list[int] = []
    lock = threading.Lock()
    real_fit = trainer_logic.fit

    def counting_fit(*args, **kwargs):
        with lock:
            calls.append(1)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(trainer_logic, "fit", counting_fit)
    return calls


# ---- one computation per key -------------------------------------------------------------
@pytest.mark.asyncio
@pytest.mark.stages("loader", "preprocess", "features", "trainer")
async def test_identical_concurrent_requests_compute_once(
    client: MeshClient,
    mesh: dict[str, RunningStage],
    artifact_root: Path,
    fit_calls: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    features = await features_for(client)
    runtime = mesh["trainer"].runtime
    callers = 5

    # Hold the one fit until every caller has joined it, so the test does not
    # depend on timing; give up after a while so a missing join cannot hang it.
    joined = threading.Event()
    real_fit = trainer_logic.fit

    def fit_after_all_joined(*args, **kwargs):
        for _ in range(500):
            # Every fit is a long-running operation: the callers join it, not the flight.
            if any(op.followers >= callers - 1 for op in runtime.operations.in_flight()):
                joined.set()
                break
            time.sleep(0.01)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(trainer_logic, "fit", fit_after_all_joined)
    request = trainer_pb2.TrainRequest(
        x_train=features.x_train,
        y_train=features.y_train,
        model="random_forest",
        hyperparameters={"n_estimators": "20"},
        seed=3,
        force_recompute=False,
    )
    progress: list[list[float]] = [[] for _ in range(callers)]
    results = await asyncio.gather(
        *(client.train(request, on_progress=lambda e, i=i: progress[i].append(e.fraction_done)) for i in range(callers))
    )
    # the wrapper above calls the counting fit
    assert joined.is_set(), "the callers never shared one computation"
    assert len(fit_calls) == 1, f"{len(fit_calls)} fits for {callers} identical requests"
    assert sorted(r.stage.cache_hit for r in results) == [False] + [True] * (callers - 1)
    assert len({r.model.SerializeToString() for r in results}) == 1
    assert len({r.stage.cache_key for r in results}) == 1
    assert len(memo_files(artifact_root, "trainer")) == 1
    trainer_manifests = [
        m
        for m in (json.loads(p.read_text()) for p in (artifact_root / "manifests").glob("*.json"))
        if m["stage"] == "trainer"
    ]
    assert len(trainer_manifests) == 1 and trainer_manifests[0]["artifact"]["sha256"] == results[0].model.sha256
    # Every caller, including those that joined, saw the shared fit's progress.
    assert all(p and p[-1] == 1.0 for p in progress), progress

    # A later identical request is served from the memo without another fit.
    later = await client.train(request)
    assert later.stage.cache_hit and later.model == results[0].model and len(fit_calls) == 1


@pytest.mark.asyncio
@pytest.mark.stages("loader", "preprocess", "features", "trainer")
async def test_different_requests_do_not_share_a_computation(
    client: MeshClient, artifact_root: Path, fit_calls: list[int]
) -> None:
    features = await features_for(client)
    requests = [
        trainer_pb2.TrainRequest(
            x_train=features.x_train, y_train=features.y_train, model="logistic_regression", seed=s
        )
        for s in (1, 2)
    ]
    results = await asyncio.gather(*(client.train(r) for r in requests))
    assert len(fit_calls) == 2
    assert not any(r.stage.cache_hit for r in results)
    assert results[0].stage.cache_key != results[1].stage.cache_key
    assert len(memo_files(artifact_root, "trainer")) == 2


# ---- what the key depends on ---------------------------------------------------------------
@pytest.fixture
def runtime(settings: Settings) -> StageRuntime:
    runtime = StageRuntime("trainer", "1.0.0", settings)
    yield runtime
    runtime.close()


def _job(**overrides) -> Job:
    base = {
        "inputs": {
            "x_train": ArtifactRef(uri="file:///a/objects/aa/x", sha256="a" * 64),
            "y_train": ArtifactRef(uri="file:///a/objects/bb/y", sha256="b" * 64),
        },
        "params": {"model": "ridge", "hyperparameters": {"alpha": 1.0}, "seed": 0},
        "force_recompute": False,
    }
    base.update(overrides)
    return Job(**base)


def test_cache_key_follows_params_and_input_digests_only(runtime: StageRuntime, settings: Settings) -> None:
    key = runtime.cache_key(_job())
    assert len(key) == 64 and key == runtime.cache_key(_job())

    # Not part of the key: force_recompute, where an input lives, the order of params.
    assert runtime.cache_key(_job(force_recompute=True)) == key
    moved = {
        "x_train": ArtifactRef(uri="s3://elsewhere/x", sha256="a" * 64, size_bytes=9),
        "y_train": ArtifactRef(uri="memory:///y", sha256="b" * 64),
    }
    assert runtime.cache_key(_job(inputs=moved)) == key
    assert runtime.cache_key(_job(params={"seed": 0, "hyperparameters": {"alpha": 1.0}, "model": "ridge"})) == key

    # Part of the key: every parameter, every input digest, input names, stage name and version.
    changed = [
        _job(params={"model": "ridge", "hyperparameters": {"alpha": 2.0}, "seed": 0}),
        _job(params={"model": "ridge", "hyperparameters": {"alpha": 1.0}, "seed": 1}),
        _job(params={"model": "ridge", "hyperparameters": {}, "seed": 0}),
        _job(params={"model": "ridge", "hyperparameters": {"alpha": "1.0"}, "seed": 0}),
        _job(
            inputs={
                "x_train": ArtifactRef(uri="file:///a/objects/aa/x", sha256="c" * 64),
                "y_train": ArtifactRef(uri="file:///a/objects/bb/y", sha256="b" * 64),
            }
        ),
        _job(
            inputs={
                "x_train": ArtifactRef(uri="file:///a/objects/bb/y", sha256="b" * 64),
                "y_train": ArtifactRef(uri="file:///a/objects/aa/x", sha256="a" * 64),
            }
        ),
    ]
    keys = [runtime.cache_key(job) for job in changed]
    assert key not in keys and len(set(keys)) == len(keys)
    other_version = StageRuntime("trainer", "1.0.1", settings)
    other_stage = StageRuntime("evaluator", "1.0.0", settings)
    try:
        assert other_version.cache_key(_job()) != key
        assert other_stage.cache_key(_job()) != key
    finally:
        other_version.close()
        other_stage.close()


@pytest.mark.asyncio
@pytest.mark.stages("loader", "preprocess", "features", "trainer")
async def test_cache_key_over_grpc(client: MeshClient, fit_calls: list[int]) -> None:
    features = await features_for(client)

    def train(**kw) -> trainer_pb2.TrainRequest:
        base = {"x_train": features.x_train, "y_train": features.y_train, "model": "logistic_regression", "seed": 1}
        return trainer_pb2.TrainRequest(**{**base, **kw})

    first = await client.train(train())
    forced = await client.train(train(force_recompute=True))
    assert forced.stage.cache_key == first.stage.cache_key and not forced.stage.cache_hit
    assert forced.model == first.model  # same inputs, same seed: same bytes
    assert len(fit_calls) == 2

    param = await client.train(train(hyperparameters={"C": "0.5"}))
    assert param.stage.cache_key != first.stage.cache_key and not param.stage.cache_hit

    minmax = await features_for(client, scaling=features_pb2.SCALING_MINMAX)
    assert minmax.x_train.sha256 != features.x_train.sha256
    other_input = await client.train(train(x_train=minmax.x_train))
    assert other_input.stage.cache_key not in {first.stage.cache_key, param.stage.cache_key}
    assert not other_input.stage.cache_hit
    assert len(fit_calls) == 4


# ---- no dangling refs ----------------------------------------------------------------------
@pytest.mark.asyncio
@pytest.mark.stages("loader", "preprocess", "features", "trainer")
async def test_deleted_output_is_recomputed_not_served(
    client: MeshClient, artifact_root: Path, fit_calls: list[int]
) -> None:
    features = await features_for(client)
    request = trainer_pb2.TrainRequest(x_train=features.x_train, y_train=features.y_train, model="logistic_regression")
    first = await client.train(request)
    object_path(first.model).unlink()

    again = await client.train(request)
    assert not again.stage.cache_hit
    assert len(fit_calls) == 2
    assert again.model == first.model
    assert object_path(again.model).is_file()
    assert ArtifactStore(str(artifact_root)).get(again.model)  # digest verified
    assert len(memo_files(artifact_root, "trainer")) == 1


@pytest.mark.asyncio
@pytest.mark.stages("loader")
async def test_an_output_rewritten_in_place_with_its_size_and_mtime_is_recomputed(
    client: MeshClient, artifact_root: Path
) -> None:
    first = await client.load(loader_pb2.LoadRequest(source="sklearn:wine"))
    path = object_path(first.dataset)
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the old mtime back
    again = await client.load(loader_pb2.LoadRequest(source="sklearn:wine"))
    assert not again.stage.cache_hit, "a memo hit vouched for changed bytes"
    assert again.dataset == first.dataset
    assert ArtifactStore(str(artifact_root)).get(again.dataset)  # rewritten whole


@pytest.mark.asyncio
@pytest.mark.stages("loader")
async def test_an_output_merely_touched_is_still_a_hit(client: MeshClient) -> None:
    first = await client.load(loader_pb2.LoadRequest(source="sklearn:wine"))
    os.utime(object_path(first.dataset))  # new mtime and ctime, same bytes: re-hashed, still good
    again = await client.load(loader_pb2.LoadRequest(source="sklearn:wine"))
    assert again.stage.cache_hit and again.dataset == first.dataset


@pytest.mark.asyncio
@pytest.mark.stages("loader", "preprocess")
async def test_one_missing_output_of_several_is_enough_to_recompute(client: MeshClient) -> None:
    loaded = await client.load(loader_pb2.LoadRequest(source="sklearn:wine"))
    request = preprocess_pb2.PreprocessRequest(dataset=loaded.dataset)
    first = await client.preprocess(request)
    object_path(first.test).unlink()
    again = await client.preprocess(request)
    assert not again.stage.cache_hit
    assert again.test == first.test and object_path(again.test).is_file()
    third = await client.preprocess(request)
    assert third.stage.cache_hit


@pytest.mark.asyncio
@pytest.mark.stages("loader")
async def test_damaged_memo_entry_is_recomputed_and_rewritten(client: MeshClient, artifact_root: Path) -> None:
    request = loader_pb2.LoadRequest(source="sklearn:iris")
    first = await client.load(request)
    [entry] = memo_files(artifact_root, "loader")
    entry.write_text('{"truncated": ')
    again = await client.load(request)
    assert not again.stage.cache_hit and again.dataset == first.dataset
    assert json.loads(entry.read_text())["cache_key"] == first.stage.cache_key
    assert (await client.load(request)).stage.cache_hit


@pytest.mark.asyncio
@pytest.mark.stages("loader")
async def test_hits_come_from_the_in_memory_index_and_still_see_every_change(
    client: MeshClient, mesh: dict[str, RunningStage], artifact_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hit reads no memo document and parses no JSON, yet a rewritten entry or output is noticed."""
    request = loader_pb2.LoadRequest(source="sklearn:iris")
    first = await client.load(request)
    store = mesh["loader"].runtime.store
    memo_reads: list[tuple[str, ...]] = []
    read_doc = store.read_doc

    def counting_read_doc(parts: tuple[str, ...]):
        if parts[0] == "memo":
            memo_reads.append(parts)
        return read_doc(parts)

    monkeypatch.setattr(store, "read_doc", counting_read_doc)
    for _ in range(3):
        hit = await client.load(request)
        assert hit.stage.cache_hit and hit.dataset == first.dataset
    assert memo_reads == [], "a hit read its memo entry from the store"

    # Another replica rewrites the entry (same content, new inode): read again, then indexed again.
    [entry] = memo_files(artifact_root, "loader")
    replacement = entry.with_suffix(".new")
    replacement.write_bytes(entry.read_bytes())
    os.replace(replacement, entry)
    assert (await client.load(request)).stage.cache_hit
    assert (await client.load(request)).stage.cache_hit
    assert len(memo_reads) == 1

    # An output changed in place is never vouched for by the index: recomputed and rewritten.
    dataset = object_path(first.dataset)
    dataset.write_bytes(b"X" + dataset.read_bytes()[1:])
    again = await client.load(request)
    assert not again.stage.cache_hit and again.dataset == first.dataset
    assert ArtifactStore(str(artifact_root)).get(again.dataset, "dataset")  # intact again


# ---- hits look like the original ------------------------------------------------------------
@pytest.mark.asyncio
async def test_cache_hits_return_the_original_responses_and_write_nothing(
    client: MeshClient, artifact_root: Path
) -> None:
    config = PipelineConfig(source="sklearn:wine", model="random_forest", hyperparameters={"n_estimators": "10"})
    first = await client.run_pipeline(config)
    files_before = all_files(artifact_root)
    second = await client.run_pipeline(config)
    # A hit writes nothing but its execution record in the run's log.
    files_after = all_files(artifact_root)
    written = {path for path, mtime in files_after.items() if files_before.get(path) != mtime}
    assert all(path.startswith("runs/") for path in written), f"a cache hit wrote {sorted(written)}"
    assert len(written) == 5 and all(path.startswith(f"runs/{client.run_id}/") for path in written)
    assert set(files_before) <= set(files_after)

    for a, b in zip(
        (first.load, first.preprocess, first.features, first.train, first.evaluate),
        (second.load, second.preprocess, second.features, second.train, second.evaluate),
        strict=True,
    ):
        assert not a.stage.cache_hit and b.stage.cache_hit
        assert a.stage.cache_key == b.stage.cache_key
        a_body, b_body = type(a)(), type(b)()
        a_body.CopyFrom(a)
        b_body.CopyFrom(b)
        a_body.ClearField("stage")
        b_body.ClearField("stage")
        assert a_body == b_body, f"{a.stage.stage}: the hit differs from the original"


# ---- manifests -----------------------------------------------------------------------------
def produced_refs(response) -> dict[str, ArtifactRef]:
    """Every ArtifactRef a stage response carries: its outputs."""
    return {field.name: value for field, value in response.ListFields() if isinstance(value, ArtifactRef)}


@pytest.mark.asyncio
async def test_every_output_has_a_complete_manifest(client: MeshClient, artifact_root: Path) -> None:
    run = await client.run_pipeline(PipelineConfig(source="sklearn:iris"))
    store = ArtifactStore(str(artifact_root))
    stages = {
        "loader": (run.load, {}),
        "preprocess": (run.preprocess, {"dataset": run.load.dataset}),
        "features": (run.features, {"train": run.preprocess.train, "test": run.preprocess.test}),
        "trainer": (
            run.train,
            {
                "x_train": run.features.x_train,
                "y_train": run.features.y_train,
                "feature_schema": run.features.feature_schema,
            },
        ),
        "evaluator": (
            run.evaluate,
            {
                "model": run.train.model,
                "x_test": run.features.x_test,
                "y_test": run.features.y_test,
                "profile": run.load.profile,
                "split_report": run.preprocess.split_report,
                "feature_schema": run.features.feature_schema,
            },
        ),
    }
    expected_outputs = {
        "loader": {"dataset", "schema", "profile"},
        "preprocess": {"train", "test", "split_report"},
        "features": {"x_train", "y_train", "x_test", "y_test", "transformer", "feature_schema"},
        "trainer": {"model"},
        "evaluator": {"metrics_report", "html_report"},
    }
    for stage, (response, inputs) in stages.items():
        info = response.stage
        produced = produced_refs(response)
        assert expected_outputs[stage] == set(produced), f"{stage}: {sorted(produced)}"
        for name, ref in produced.items():
            manifest = store.manifest(ref.sha256)
            assert manifest is not None, f"{stage}.{name} has no manifest"
            assert {"stage", "stage_version", "inputs", "params", "created_at", "duration_seconds"} <= set(manifest)
            assert manifest["stage"] == stage
            assert manifest["stage_version"] == info.version == stage_spec(stage).version
            assert manifest["output"] == name
            assert manifest["artifact"] == ref_to_dict(ref)
            assert manifest["cache_key"] == info.cache_key
            assert manifest["inputs"] == {k: ref_to_dict(v) for k, v in inputs.items()}
            assert isinstance(manifest["params"], dict)
            assert manifest["environment"]["scikit-learn"] == sklearn.__version__
            assert manifest["environment"]["machine"] == {"AMD64": "x86_64", "arm64": "aarch64"}.get(
                platform.machine(), platform.machine()
            )
            created = datetime.fromisoformat(manifest["created_at"])
            assert created.tzinfo is not None
            assert isinstance(manifest["duration_seconds"], float) and 0 <= manifest["duration_seconds"] < 60
    assert store.manifest(run.load.dataset.sha256)["params"]["source"] == "sklearn:iris"
    # The request named no model; the trainer chose the classification default and says so.
    assert store.manifest(run.train.model.sha256)["params"]["model"] == ""
    assert run.train.model_name == "logistic_regression"
    assert store.manifest(run.preprocess.train.sha256)["params"]["test_fraction"] == pytest.approx(0.2)


@pytest.mark.asyncio
@pytest.mark.stages("loader")
async def test_recomputing_keeps_the_first_manifest(client: MeshClient, artifact_root: Path) -> None:
    store = ArtifactStore(str(artifact_root))
    first = await client.load(loader_pb2.LoadRequest(source="sklearn:iris"))
    original = store.manifest(first.dataset.sha256)
    forced = await client.load(loader_pb2.LoadRequest(source="sklearn:iris", force_recompute=True))
    assert forced.dataset == first.dataset and not forced.stage.cache_hit
    assert store.manifest(first.dataset.sha256) == original


# ---- cancellation -------------------------------------------------------------------------
@pytest.mark.asyncio
@pytest.mark.stages("loader")
async def test_a_retry_after_everyone_cancelled_computes_afresh(
    client: MeshClient,
    mesh: dict[str, RunningStage],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cancel the only caller of a unary stage mid-work, retry at once: the retry must not inherit the cancellation."""
    import services.loader.logic as loader_logic

    runtime = mesh["loader"].runtime
    started, release = threading.Event(), threading.Event()
    real_load = loader_logic.load_dataset
    calls: list[int] = []

    def first_load_waits(*args, **kwargs):
        calls.append(1)
        if not started.is_set():
            started.set()
            assert release.wait(timeout=10), "test never released the first load"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(loader_logic, "load_dataset", first_load_waits)
    request = loader_pb2.LoadRequest(source="sklearn:wine")
    first = asyncio.ensure_future(client.load(request))
    try:
        assert await asyncio.to_thread(started.wait, 10), "the first load never started"
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        deadline = time.monotonic() + 10
        while not any(f.cancelled.is_set() for f in runtime._flights.values()):
            assert time.monotonic() < deadline, "the server never noticed the cancellation"
            await asyncio.sleep(0.01)
        retry = asyncio.ensure_future(client.load(request))
        # Release the abandoned load only once the retry is waiting on a computation.
        while not any(f.waiters for f in runtime._flights.values()):
            assert time.monotonic() < deadline and not retry.done(), "the retry never reached the runtime"
            await asyncio.sleep(0.01)
    finally:
        release.set()
    result = await retry
    assert not result.stage.cache_hit
    assert len(calls) == 2, "the retry should have loaded on its own"
    assert ArtifactStore(runtime.settings.artifact_root).get(result.dataset)
    while runtime._flights:
        assert time.monotonic() < deadline, "a flight was left behind"
        await asyncio.sleep(0.01)
    assert (await client.load(request)).stage.cache_hit


@pytest.mark.asyncio
@pytest.mark.stages("loader", "preprocess", "features", "trainer")
async def test_a_fit_goes_on_when_its_caller_leaves_and_a_retry_reattaches(
    client: MeshClient,
    mesh: dict[str, RunningStage],
    artifact_root: Path,
    fit_calls: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fit is a long-running operation: the caller going away does not stop it, and the same request joins it."""
    features = await features_for(client)
    runtime = mesh["trainer"].runtime
    started, release = threading.Event(), threading.Event()
    counting_fit = trainer_logic.fit

    def fit_waits(*args, **kwargs):
        started.set()
        assert release.wait(timeout=10), "test never released the fit"
        return counting_fit(*args, **kwargs)

    monkeypatch.setattr(trainer_logic, "fit", fit_waits)
    request = trainer_pb2.TrainRequest(
        x_train=features.x_train,
        y_train=features.y_train,
        model="random_forest",
        hyperparameters={"n_estimators": "10"},
    )
    first = asyncio.ensure_future(client.train(request))
    try:
        assert await asyncio.to_thread(started.wait, 10), "the fit never started"
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.sleep(0.2)
        (operation,) = runtime.operations.in_flight()
        assert not any(f.cancelled.is_set() for f in runtime._flights.values()), "leaving stopped the fit"
        retry = asyncio.ensure_future(client.train(request))
        deadline = time.monotonic() + 10
        while operation.followers < 1:
            assert time.monotonic() < deadline and not retry.done(), "the retry never joined the operation"
            await asyncio.sleep(0.01)
    finally:
        release.set()
    result = await retry
    assert result.stage.cache_hit, "the retry joined the running fit; it did not compute"
    assert len(fit_calls) == 1, "one fit for the abandoned call and its retry"
    assert ArtifactStore(str(artifact_root)).get(result.model)
    assert len(memo_files(artifact_root, "trainer")) == 1


@pytest.mark.asyncio
@pytest.mark.stages("loader", "preprocess", "features", "trainer")
async def test_a_cache_hit_is_served_while_every_worker_is_busy(
    client: MeshClient,
    mesh: dict[str, RunningStage],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    features = await features_for(client)
    remembered = trainer_pb2.TrainRequest(
        x_train=features.x_train, y_train=features.y_train, model="logistic_regression"
    )
    original = await client.train(remembered)

    # Occupy every worker thread of the trainer with a fit that waits for the test.
    busy, release = threading.Semaphore(0), threading.Event()
    real_fit = trainer_logic.fit

    def held_fit(*args, **kwargs):
        busy.release()
        assert release.wait(timeout=20), "test never released the fits"
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(trainer_logic, "fit", held_fit)
    assert settings.worker_threads == 2
    fits = [
        asyncio.ensure_future(
            client.train(
                trainer_pb2.TrainRequest(
                    x_train=features.x_train,
                    y_train=features.y_train,
                    model="random_forest",
                    hyperparameters={"n_estimators": "5"},
                    seed=seed,
                )
            )
        )
        for seed in range(settings.worker_threads)
    ]
    try:
        for _ in fits:
            assert await asyncio.to_thread(busy.acquire, True, 10), "the fits never started"
        started = time.perf_counter()
        hit = await asyncio.wait_for(client.train(remembered), timeout=3)
        waited = time.perf_counter() - started
    finally:
        release.set()
    assert hit.stage.cache_hit and hit.model == original.model, f"waited {waited:.2f}s"
    results = await asyncio.gather(*fits)
    assert not any(r.stage.cache_hit for r in results)


@pytest.mark.asyncio
@pytest.mark.parametrize("flag", ["--force", "--recompute"])
@pytest.mark.stages("loader", "preprocess")
async def test_data_loss_names_the_flag_of_the_front_end(
    mesh: dict[str, RunningStage], settings: Settings, flag: str
) -> None:
    # `mlmesh run` builds its client with recompute_flag="--force", the Flyte tasks with "--recompute".
    async with StartedStagesClient(settings, mesh, recompute_flag=flag) as client:
        loaded = await client.load(loader_pb2.LoadRequest(source="sklearn:wine"))
        path = object_path(loaded.dataset)
        data = bytearray(path.read_bytes())
        data[-20] ^= 0xFF
        path.write_bytes(bytes(data))
        details = await expect_error(
            client.preprocess(preprocess_pb2.PreprocessRequest(dataset=loaded.dataset)),
            DATA_LOSS,
            f"with {flag} (force_recompute=true)",
        )
        assert "corrupt or was replaced" in details
