"""What checkpoints cost, and how much work a kill loses with them.

    .venv/bin/python bench/bench_checkpoint.py overhead [--rows 1000000] [--trees 10] [--pairs 2]
    .venv/bin/python bench/bench_checkpoint.py kills [--rows 200000] [--trees 40] [--kills 5]

overhead: the trainer in this process (real gRPC on a free port), a random
forest on synthetic classification (ROWS x 32 features), fitted with periodic
checkpoints off (MLMESH_CHECKPOINT_SECONDS=0), every 30 s (the default) and
every 5 s, in alternating order, force_recompute each time. Reports the
trainer's own fit time (TrainResult.stage.seconds) as medians, the ratio to
"off", and the number, size and time of checkpoint saves.

kills: `mlmesh up` on free ports, the default 30 s interval unless --interval;
the forest is fitted, the trainer SIGKILLed at a uniformly random moment,
restarted by `mlmesh up`, and the client re-attaches. Work lost per kill is
(trees done before the kill - trees resumed from) x seconds per tree, from the
progress events. Each resumed model is checked against an uninterrupted fit.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlmesh.features.v1 import features_pb2  # noqa: E402
from mlmesh.loader.v1 import loader_pb2  # noqa: E402
from mlmesh.preprocess.v1 import preprocess_pb2  # noqa: E402
from mlmesh.trainer.v1 import trainer_pb2  # noqa: E402
from services.client.mesh import MeshClient  # noqa: E402
from services.runtime.catalog import STAGES  # noqa: E402
from services.runtime.server import stage_spec, start_stage  # noqa: E402
from services.runtime.settings import Settings  # noqa: E402
from services.trainer import checkpoints  # noqa: E402


async def features_for(client: MeshClient, rows: int) -> features_pb2.BuildFeaturesResponse:
    loaded = await client.load(loader_pb2.LoadRequest(source=f"synthetic:classification?rows={rows}&features=32"))
    prepared = await client.preprocess(preprocess_pb2.PreprocessRequest(dataset=loaded.dataset, seed=1))
    return await client.build_features(features_pb2.BuildFeaturesRequest(train=prepared.train, test=prepared.test))


def forest(features: features_pb2.BuildFeaturesResponse, trees: int, force: bool) -> trainer_pb2.TrainRequest:
    return trainer_pb2.TrainRequest(
        x_train=features.x_train,
        y_train=features.y_train,
        model="random_forest",
        seed=3,
        force_recompute=force,
        hyperparameters={"n_estimators": str(trees), "max_depth": "12", "n_jobs": "1"},
    )


async def overhead(args: argparse.Namespace) -> None:
    saves: list[tuple[float, int]] = []
    real_save = checkpoints.Checkpoints.save

    def timed_save(self, estimator, step, total):
        started = time.perf_counter()
        real_save(self, estimator, step, total)
        size = len(self.store.read_blob((*self.folder, "state.skops")) or b"")
        saves.append((time.perf_counter() - started, size))

    checkpoints.Checkpoints.save = timed_save
    with tempfile.TemporaryDirectory() as root:
        base = Settings.from_env({"MLMESH_ARTIFACT_ROOT": root})
        stages = {n: await start_stage(stage_spec(n), base, port=0) for n in STAGES if n != "trainer"}
        addresses = {n: s.address for n, s in stages.items()}
        async with MeshClient(base, addresses=addresses) as client:
            features = await features_for(client, args.rows)
        times: dict[float, list[float]] = {0.0: [], 30.0: [], 5.0: []}
        counts: dict[float, list[tuple[float, int]]] = {k: [] for k in times}
        for _ in range(args.pairs):
            for interval in times:
                trainer = await start_stage(
                    stage_spec("trainer"), dataclasses.replace(base, checkpoint_seconds=interval), port=0
                )
                saves.clear()
                async with MeshClient(base, addresses={**addresses, "trainer": trainer.address}) as client:
                    result = await client.train(forest(features, args.trees, force=True))
                await trainer.stop(1)
                times[interval].append(result.stage.seconds)
                counts[interval] = list(saves)
                print(
                    f"  interval {interval:>4}s: fit {result.stage.seconds:7.2f}s, {len(saves)} checkpoints", flush=True
                )
        for stage in stages.values():
            await stage.stop(1)
    off = statistics.median(times[0.0])
    print(
        f"\nrandom forest, {args.trees} trees (max_depth 12), {args.rows} rows x 32 features; medians of {args.pairs}:"
    )
    for interval, values in times.items():
        label = "off" if interval == 0 else f"every {interval:g}s"
        saved = counts[interval]
        detail = (
            (
                f", {len(saved)} saves of {statistics.median(s for _, s in saved) / 1e6:.1f} MB "
                f"taking {statistics.median(t for t, _ in saved):.2f}s each"
            )
            if saved
            else ""
        )
        print(
            f"  checkpoints {label:<10} {statistics.median(values):8.2f}s  ratio {statistics.median(values) / off:5.3f}{detail}"
        )


async def kills(args: argparse.Namespace) -> None:
    from tests.test_mesh_processes import UpProcess, on_new_ports, stage_pid

    with tempfile.TemporaryDirectory() as root:
        env = on_new_ports(
            {
                **os.environ,
                "MLMESH_ARTIFACT_ROOT": root,
                "MLMESH_GRACE_SECONDS": "1",
                "MLMESH_CHECKPOINT_SECONDS": str(args.interval),
                "MLMESH_RESTART_LIMIT": "1000",
            }
        )
        up = UpProcess(env, {s: int(env[f"MLMESH_{s.upper()}_PORT"]) for s in STAGES})
        up.wait_for("mesh is up")
        rng = random.Random(args.seed)
        try:
            settings = Settings.from_env(env)
            async with MeshClient(settings) as client:
                features = await features_for(client, args.rows)
                started = time.perf_counter()
                reference = await client.train(forest(features, args.trees, force=True))
                fit_seconds = time.perf_counter() - started
                per_tree = fit_seconds / args.trees
                print(f"uninterrupted fit: {fit_seconds:.1f}s ({per_tree:.2f}s per tree)", flush=True)
                lost, recovery = [], []
                for k in range(args.kills):
                    events: list[tuple[float, trainer_pb2.TrainProgress]] = []
                    training = asyncio.ensure_future(
                        client.train(
                            forest(features, args.trees, force=True),
                            on_progress=lambda p, events=events: events.append((time.perf_counter(), p)),
                        )
                    )
                    await asyncio.sleep(rng.uniform(0.1, 0.9) * fit_seconds)
                    before = max((p.step for _, p in events), default=0)
                    os.kill(stage_pid(up, "trainer"), signal.SIGKILL)
                    killed = time.perf_counter()
                    result = await training
                    # The restarted trainer's first report is its starting point: step == resumed_from_step.
                    resumed = [(t, p) for t, p in events if t > killed and p.step == p.resumed_from_step]
                    resumed_from = resumed[0][1].resumed_from_step if resumed else 0
                    lost.append((before - resumed_from) * per_tree)
                    recovery.append(resumed[0][0] - killed if resumed else float("nan"))
                    same = result.model == reference.model
                    print(
                        f"  kill {k + 1}: at tree {before}, resumed from {resumed_from}, lost {lost[-1]:.1f}s of fit, "
                        f"back in {recovery[-1]:.1f}s, model identical: {same}",
                        flush=True,
                    )
                    assert same, "a resumed fit stored different bytes"
        finally:
            up.process.terminate()
            up.process.wait(timeout=30)
    print(
        f"\nwork lost per kill (checkpoint every {args.interval:g}s): median {statistics.median(lost):.1f}s, "
        f"max {max(lost):.1f}s of fit; recovery (kill to first resumed step) median {statistics.median(recovery):.1f}s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    cost = commands.add_parser("overhead")
    cost.add_argument("--rows", type=int, default=1_000_000)
    cost.add_argument("--trees", type=int, default=10)
    cost.add_argument("--pairs", type=int, default=2)
    lost = commands.add_parser("kills")
    lost.add_argument("--rows", type=int, default=200_000)
    lost.add_argument("--trees", type=int, default=40)
    lost.add_argument("--kills", type=int, default=5)
    lost.add_argument("--interval", type=float, default=30.0)
    lost.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    asyncio.run(overhead(args) if args.command == "overhead" else kills(args))


if __name__ == "__main__":
    main()
