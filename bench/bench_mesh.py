"""Benchmarks for the mesh, as ratios and medians on this machine.

    .venv/bin/python bench/bench_mesh.py [--repeats 5]

Measures, with all five services in this process on ephemeral ports:
  1. pipeline wall time, cold (empty store) vs warm (all cache hits);
  2. cache-hit latency of one stage (loader), median of many calls;
  3. health Check latency while idle and while the trainer fits a large
     random forest, median and max;
  4. the mesh's cold pipeline against the same stage logic called directly in
     one process (no gRPC, no store), as a ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlmesh.loader.v1 import loader_pb2
from services.client.mesh import MeshClient, PipelineConfig
from services.evaluator import logic as evaluator_logic
from services.features import logic as features_logic
from services.loader import logic as loader_logic
from services.preprocess import logic as preprocess_logic
from services.runtime.catalog import STAGES
from services.runtime.server import stage_spec, start_stage
from services.runtime.settings import Settings
from services.runtime.stage import Run
from services.trainer import logic as trainer_logic


async def start_mesh(root: str):
    settings = Settings.from_env({"MLMESH_ARTIFACT_ROOT": root})
    running = {n: await start_stage(stage_spec(n), settings, port=0) for n in STAGES}
    client = MeshClient(settings, addresses={n: s.address for n, s in running.items()})
    return settings, running, client


async def stop_mesh(running, client) -> None:
    await client.close()
    for stage in running.values():
        await stage.stop(0.1)


def in_process(config: PipelineConfig) -> None:
    """The same stage logic, called directly: the baseline for the mesh's overhead."""
    source = loader_logic.parse_source(config.source)
    loaded = loader_logic.load_dataset(source, "", None, 2**31)
    target, task = loaded.target_column, loaded.task.kind
    roles = {c.name: c.role for c in loaded.columns}
    prepared = preprocess_logic.preprocess(loaded.frame, target, task, config.test_fraction, config.seed)
    eng = features_logic.engineer(
        prepared.train,
        prepared.test,
        target,
        task,
        roles,
        prepared.class_names,
        features_logic.FeatureOptions(seed=config.seed),
        2**31,
    )
    model_name = config.model or trainer_logic.DEFAULT_MODELS[task]
    model = trainer_logic.build_estimator(task, model_name, config.hyperparameters, config.seed)
    model, _ = trainer_logic.fit(model, eng.x_train, eng.y_train, Run.detached())
    evaluator_logic.evaluate(model, eng.x_test, eng.y_test)


async def pipeline_times(config: PipelineConfig, repeats: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"cold": [], "warm": [], "direct": []}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as root:
            _, running, client = await start_mesh(root)
            started = time.perf_counter()
            await client.run_pipeline(config)
            out["cold"].append(time.perf_counter() - started)
            started = time.perf_counter()
            run = await client.run_pipeline(config)
            out["warm"].append(time.perf_counter() - started)
            assert all(s.cache_hit for s in run.stages)
            await stop_mesh(running, client)
        started = time.perf_counter()
        in_process(config)
        out["direct"].append(time.perf_counter() - started)
    return out


async def cache_hit_latency(calls: int) -> list[float]:
    with tempfile.TemporaryDirectory() as root:
        _, running, client = await start_mesh(root)
        request = loader_pb2.LoadRequest(source="sklearn:breast_cancer")
        await client.load(request)
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            reply = await client.load(request)
            times.append(time.perf_counter() - started)
            assert reply.stage.cache_hit
        await stop_mesh(running, client)
    return times


async def health_latency(address: str, stop: asyncio.Event | None, count: int) -> list[float]:
    times = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(count):
            if stop is not None and stop.is_set():
                break
            started = time.perf_counter()
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            times.append(time.perf_counter() - started)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            await asyncio.sleep(0.02)
    return times


async def health_under_load() -> tuple[list[float], list[float], float]:
    with tempfile.TemporaryDirectory() as root:
        _, running, client = await start_mesh(root)
        trainer = running["trainer"].address
        idle = await health_latency(trainer, None, 100)
        config = PipelineConfig(
            source="synthetic:classification?rows=20000&features=40&classes=2&seed=1",
            model="random_forest",
            hyperparameters={"n_estimators": "300"},
        )
        # Prepare the trainer's inputs first, so only the fit overlaps the checks.
        loaded = await client.load(loader_pb2.LoadRequest(source=config.source))
        from mlmesh.features.v1 import features_pb2
        from mlmesh.preprocess.v1 import preprocess_pb2
        from mlmesh.trainer.v1 import trainer_pb2

        prep = await client.preprocess(preprocess_pb2.PreprocessRequest(dataset=loaded.dataset, seed=1))
        feats = await client.build_features(features_pb2.BuildFeaturesRequest(train=prep.train, test=prep.test))
        started = time.perf_counter()
        training = asyncio.ensure_future(
            client.train(
                trainer_pb2.TrainRequest(
                    x_train=feats.x_train,
                    y_train=feats.y_train,
                    model=config.model,
                    hyperparameters=config.hyperparameters,
                    seed=1,
                )
            )
        )
        busy: list[float] = []
        while not training.done():
            busy += await health_latency(trainer, None, 10)
        await training
        fit_seconds = time.perf_counter() - started
        await stop_mesh(running, client)
    return idle, busy, fit_seconds


def ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:.2f} ms, max {max(values) * 1000:.2f} ms (n={len(values)})"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    config = PipelineConfig()
    times = await pipeline_times(config, args.repeats)
    cold, warm, direct = (statistics.median(times[k]) for k in ("cold", "warm", "direct"))
    print(f"pipeline sklearn:breast_cancer/logistic_regression, medians of {args.repeats}:")
    print(f"  mesh cold {cold * 1000:.1f} ms | mesh warm {warm * 1000:.1f} ms | one process {direct * 1000:.1f} ms")
    print(f"  warm/cold = {warm / cold:.3f}   mesh cold / one process = {cold / direct:.2f}x")
    print(f"loader cache hit: {ms(await cache_hit_latency(200))}")
    idle, busy, fit = await health_under_load()
    print(f"health Check on trainer, idle: {ms(idle)}")
    print(f"health Check on trainer, busy fitting random_forest(300 trees, 16k x 40) for {fit:.1f}s: {ms(busy)}")


if __name__ == "__main__":
    asyncio.run(main())
