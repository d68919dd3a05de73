"""The `mlmesh` command: run the mesh locally, check it, run the pipeline, walk lineage."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from mlmesh.evaluator.v1 import evaluator_pb2
from services.cli import serving as serving_commands
from services.cli.launcher import LocalMesh, MeshStartError
from services.client.mesh import (
    CHOICES,
    ConfigError,
    MeshClient,
    PipelineConfig,
    PipelineRun,
    StageCallError,
    check_health,
    default_registry_name,
    register_request,
    rows_dropped,
    running_operations,
)
from services.client.progress import PipelineProgress
from services.client.summary import RunOutcome, local_path, render, stage_time
from services.runtime import runs as run_records
from services.runtime import tracing
from services.runtime.catalog import STAGES
from services.runtime.errors import StageError, bounded
from services.runtime.metrics import metrics_url, read_vitals
from services.runtime.roles import FEATURE_ROLES, ROLES, parse_role, role_name
from services.runtime.settings import Settings, SettingsError
from services.runtime.store import ArtifactStore
from services.runtime.vocabulary import Decision, TaskKind


def _key_values(pairs: list[str], convert: Any, flag: str) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"{flag} expects NAME=VALUE, got {pair!r}")
        try:
            out[name] = convert(value)
        except ValueError:
            raise SystemExit(f"{flag} {name}: {value!r} is not valid") from None
    return out


# ---- up -------------------------------------------------------------------------------
def _state_file(settings: Settings) -> Path | None:
    """Where `mlmesh up` records pids and restarts for `mlmesh status` (local stores only)."""
    if "://" in settings.artifact_root:
        return None
    # Named by the loader's port: two meshes may share one store on different ports.
    return Path(settings.artifact_root) / "mesh" / f"up-{settings.ports['loader']}.json"


async def _up(settings: Settings, args: argparse.Namespace) -> int:
    mesh = LocalMesh(settings, log_dir=args.log_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await mesh.start()
    except MeshStartError as exc:
        print(f"mlmesh up: {exc}", file=sys.stderr)
        return 1
    state_file = _state_file(settings)
    metrics = mesh.metrics_urls
    for stage in STAGES:
        print(f"{stage:<11} {mesh.addresses[stage]:<22} SERVING  metrics {metrics.get(stage, 'off')}")
    print(f"artifacts   {settings.artifact_root}")
    print(
        f"mesh is up; a stage that dies is restarted (at most {settings.restart_limit} times in 10 min); "
        "Ctrl-C or SIGTERM stops it",
        flush=True,
    )
    exit_code = 0
    while not stop.is_set():
        if state_file is not None:
            mesh.write_state(state_file)
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.5)
        except TimeoutError:
            messages, exhausted = mesh.supervise()
            for message in messages:
                print(f"mlmesh up: {message}", flush=True)
            if exhausted:
                print(
                    f"mlmesh up: stage(s) exited unexpectedly and are over the restart limit: {exhausted}; "
                    "stopping the mesh (see the stage logs)",
                    file=sys.stderr,
                )
                exit_code = 1
                break
    codes = mesh.stop()
    if state_file is not None:
        state_file.unlink(missing_ok=True)
    print(f"mesh stopped ({', '.join(f'{s}={c}' for s, c in codes.items())})", flush=True)
    return exit_code


# ---- status ---------------------------------------------------------------------------
def _launcher_state(settings: Settings) -> dict[str, Any]:
    """The running `mlmesh up`'s record of its stages, if one is running for this store."""
    state_file = _state_file(settings)
    try:
        state = json.loads(state_file.read_text()) if state_file is not None else {}
        os.kill(int(state["launcher_pid"]), 0)  # still alive?
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return state.get("stages", {}) if isinstance(state.get("stages"), dict) else {}


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return (
        f"{seconds // 86400}d{seconds % 86400 // 3600}h"
        if seconds >= 86400
        else f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    )


async def _vitals(settings: Settings, stage: str, timeout: float) -> str:
    """Uptime, work in flight and cache hit ratio, from the stage's /metrics (or why not)."""
    if not settings.metrics:
        return ""
    url = metrics_url(settings.metrics_host, settings.metrics_ports[stage])
    try:
        vitals = await asyncio.to_thread(read_vitals, url, timeout)
    except (OSError, ValueError) as exc:
        return f"metrics unreachable at {url} ({bounded(exc, 80)})"
    looked_up = vitals["cache_hits"] + vitals["cache_misses"]
    cache = (
        f"cache {vitals['cache_hits']:.0f}/{looked_up:.0f} hits ({vitals['cache_hits'] / looked_up:.0%})"
        if looked_up
        else "cache unused"
    )
    if stage == "serving":  # it has no memo: what it serves says more
        served = int(vitals.get("models_served", 0))
        cache = f"{served} model{'' if served == 1 else 's'} served (mlmesh serving status)"
    parts = [
        f"up {_duration(vitals['uptime_seconds'])}" if "uptime_seconds" in vitals else "",
        f"{vitals.get('rpcs_in_flight', 0):.0f} calls in flight",
        f"{vitals.get('operations_active', 0):.0f} operations" if stage == "trainer" else "",
        cache,
    ]
    return ", ".join(part for part in parts if part)


async def _status(settings: Settings, args: argparse.Namespace) -> int:
    results = await asyncio.gather(
        *(check_health(settings.addresses[s], timeout=args.timeout, settings=settings) for s in STAGES)
    )
    vitals = await asyncio.gather(*(_vitals(settings, s, args.timeout) for s in STAGES))
    launched = _launcher_state(settings)
    for stage, status, stage_vitals in zip(STAGES, results, vitals, strict=True):
        line = f"{stage:<11} {settings.addresses[stage]:<22} {status}"
        details = []
        if isinstance(launched.get(stage), dict):
            info = launched[stage]
            details.append(f"pid {info.get('pid')}, restarts {info.get('restarts', 0)}")
        if stage_vitals:
            details.append(stage_vitals)
        print(f"{line}  {', '.join(details)}" if details else line)
        if stage == "trainer" and status == "SERVING":
            for fit in await running_operations(settings.addresses[stage], timeout=args.timeout, settings=settings):
                eta = f", about {fit.eta_seconds:.0f}s left" if fit.eta_seconds else ""
                resumed = f", resumed at step {fit.resumed_from_step}" if fit.resumed_from_step else ""
                print(f"{'':<11} running {fit.operation_name}: {fit.fraction_done:.0%} {fit.message}{eta}{resumed}")
    return 0 if all(r == "SERVING" for r in results) else 1


# ---- lineage --------------------------------------------------------------------------
def _short(ref: dict[str, Any]) -> str:
    return str(ref.get("sha256", ""))[:12]


def _lineage(settings: Settings, args: argparse.Namespace) -> int:
    store = ArtifactStore(settings.artifact_root)
    if (args.run is None) == (args.artifact is None):
        print("mlmesh lineage: name an artifact, or a run with --run ID (mlmesh runs lists them)", file=sys.stderr)
        return 2
    if args.run is not None:
        return _run_graph(store, args)
    try:
        digest = store.find_digest(args.artifact)
        chain = store.lineage(digest)
    except StageError as exc:
        print(f"mlmesh lineage: {exc}", file=sys.stderr)
        return 1
    touching = run_records.runs_touching(store, digest)
    if args.json:
        print(json.dumps({"chain": chain, "runs": touching}, indent=2, sort_keys=True))
        return 0
    _print_chain(chain)
    if touching:
        print(f"runs that produced or used {digest[:12]}:")
    for execution in touching:
        how = ", ".join(
            [*(f"produced as {n}" for n in execution["produced_as"]), *(f"used as {n}" for n in execution["used_as"])]
        )
        hit = " (cache hit)" if execution.get("cache_hit") else ""
        print(f"  {execution['run_id']}  {execution['stage']}{hit}: {how}  at {execution['started_at']}")
    return 0


def _run_graph(store: ArtifactStore, args: argparse.Namespace) -> int:
    try:
        steps = run_records.executions(store, args.run)
    except StageError as exc:
        print(f"mlmesh lineage: {exc}", file=sys.stderr)
        return 2
    if not steps:
        print(
            f"mlmesh lineage: no run {args.run[:80]!r} in {store.root_url}; `mlmesh runs` lists the runs",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(steps, indent=2, sort_keys=True))
        return 0
    print(f"run {args.run}: {len(steps)} stage calls, {steps[0]['started_at']} to {steps[-1]['ended_at']}")
    for step in steps:
        hit = "cache hit" if step.get("cache_hit") else "computed"
        print(f"  {step['stage']} {step['stage_version']} ({hit}, host {step.get('host', '?')})")
        for name, ref in sorted(step.get("inputs", {}).items()):
            print(f"    in   {name:<15} {_short(ref)}")
        for name, ref in sorted(step.get("outputs", {}).items()):
            print(f"    out  {name:<15} {_short(ref)}  {ref.get('uri', '')}")
    return 0


def _runs(settings: Settings, args: argparse.Namespace) -> int:
    found = run_records.runs(ArtifactStore(settings.artifact_root), max(1, args.limit))
    if args.json:
        print(json.dumps(found, indent=2, sort_keys=True))
        return 0
    if not found:
        print(f"no runs recorded in {settings.artifact_root} yet")
    for run in found:
        metrics = run["metrics"]
        key = next((m for m in ("accuracy", "r2") if m in metrics), next(iter(sorted(metrics)), ""))
        shown = f"{key} {metrics[key]:.4f}" if key else ""
        print(
            f"{run['run_id']:<32} {str(run['started_at'])[:19]}  {run['decision'] or '-':<8} {shown:<16} "
            f"{len(run['stages'])} stage calls, {run['cache_hits']} cache hits"
        )
    return 0


def _print_chain(chain: list[dict[str, Any]]) -> None:
    for manifest in chain:
        artifact = manifest["artifact"]
        print(
            f"{artifact['sha256'][:12]}  {manifest['output']:<15} from {manifest['stage']} {manifest['stage_version']}"
            f"  at {manifest['created_at']} ({manifest['duration_seconds']:.3f}s)"
        )
        print(f"    uri     {artifact['uri']}")
        if manifest["params"]:
            print(f"    params  {json.dumps(manifest['params'], sort_keys=True)}")
        for name, ref in sorted(manifest["inputs"].items()):
            print(f"    input   {name} <- {ref['sha256'][:12]}")


# ---- models ---------------------------------------------------------------------------
def _models(settings: Settings, args: argparse.Namespace) -> int:
    from services.runtime.registry import list_models

    documents = list_models(ArtifactStore(settings.artifact_root))
    if args.json:
        print(json.dumps(documents, indent=2, sort_keys=True))
        return 0
    if not documents:
        print(f"no registered models in {settings.artifact_root}")
    for document in documents:
        print(document["name"])
        if document.get("damaged"):
            print(f"  DAMAGED: {document['damaged']}")
        for version in document["versions"]:
            metrics = ", ".join(f"{k}={v:.4f}" for k, v in sorted(version["metrics"].items()))
            print(
                f"  v{version['version']:<3} {version['registered_at']}  {version['model']['sha256'][:12]}  {metrics}"
            )
    return 0


# ---- with-mesh ------------------------------------------------------------------------
async def _with_mesh(settings: Settings, args: argparse.Namespace) -> int:
    command = [c for c in args.cmd if c != "--"]
    if not command:
        print("mlmesh with-mesh: give a command after --", file=sys.stderr)
        return 2
    mesh = LocalMesh(settings, log_dir=args.log_dir)
    started = await mesh.start_or_reuse()
    if not started:
        print("mlmesh with-mesh: using the mesh already serving on these ports", file=sys.stderr)
    # Ctrl-C goes to the command too (one process group): let it finish on its own terms,
    # then stop the mesh, and exit as it did (130 for an interrupt).
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    try:
        process = await asyncio.create_subprocess_exec(*command)
        code = await process.wait()
        return 128 - code if code < 0 else code
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        if started:
            mesh.stop()


# ---- run ------------------------------------------------------------------------------
def _as_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _outcome(run: PipelineRun, source: str, registered_as: str) -> RunOutcome:
    """What the run ends with on the terminal (services/client/summary.py)."""
    outcome: RunOutcome = {
        "run_id": run.run_id,
        "source": source,
        "task_kind": TaskKind.text_of(run.load.task_kind),
        "decision": Decision.text_of(run.evaluate.decision),
        "reasons": list(run.evaluate.reasons),
        "metrics": dict(run.evaluate.metrics),
        "model_name": run.train.model_name,
        "model_uri": run.train.model.uri,
        "model_sha256": run.train.model.sha256,
        "registered_as": registered_as,
        "report_path": local_path(run.evaluate.html_report.uri),
        "stages": [stage_time(info) for info in run.stages],
        "seconds": run.seconds,
    }
    if tracing.enabled():
        outcome["trace_id"] = tracing.trace_id_of(run.run_id)
    return outcome


def _summary(run: PipelineRun, registered_as: str) -> dict[str, Any]:
    evaluation, loaded, prepared = run.evaluate, run.load, run.preprocess
    return {
        "run_id": run.run_id,
        "decision": Decision.text_of(evaluation.decision),
        "reasons": list(evaluation.reasons),
        "metrics": dict(sorted(evaluation.metrics.items())),
        "task_kind": TaskKind.text_of(loaded.task_kind),
        "task_kind_reason": loaded.task_kind_reason,
        "target_column": loaded.target_column,
        "columns": [{**_as_dict(c), "role": role_name(c.role, c.name)} for c in loaded.columns],
        "warnings": list(loaded.warnings),
        "rows": {
            "in": prepared.rows_in,
            "train": prepared.train_rows,
            "test": prepared.test_rows,
            "dropped": rows_dropped(prepared),
            "duplicates_found": prepared.duplicate_rows_found,
        },
        "class_names": list(prepared.class_names),
        "feature_names": list(run.features.feature_names),
        "model": _as_dict(run.train.model),
        "model_name": run.train.model_name,
        "effective_hyperparameters": dict(run.train.effective_hyperparameters),
        # "name vN" when the model passed and was registered; "" otherwise.
        "registered_as": registered_as,
        "metrics_report": _as_dict(evaluation.metrics_report),
        "html_report": _as_dict(evaluation.html_report),
        "artifacts": {
            name: _as_dict(ref)
            for name, ref in (
                ("dataset", loaded.dataset),
                ("schema", loaded.schema),
                ("profile", loaded.profile),
                ("split_report", prepared.split_report),
                ("feature_schema", run.features.feature_schema),
                ("transformer", run.features.transformer),
            )
        },
        "stages": [_as_dict(info) for info in run.stages],
        "seconds": run.seconds,
        # The run's trace, when OTEL_* turned tracing on (its id is derived from the run id).
        **({"trace_id": tracing.trace_id_of(run.run_id)} if tracing.enabled() else {}),
    }


def _print_run(run: PipelineRun, outcome: RunOutcome) -> None:
    """What the data turned out to be (columns, rows, classes), then the run's summary."""
    summary = _summary(run, outcome.get("registered_as", ""))
    loaded, prepared = run.load, run.preprocess
    print(f"target:  {loaded.target_column} -> {summary['task_kind']} ({loaded.task_kind_reason})")
    used = [c for c in summary["columns"] if c["role"] in FEATURE_ROLES]
    left_out = [c for c in summary["columns"] if c["role"] not in FEATURE_ROLES]
    print(f"columns: {len(used)} used, {len(left_out)} left out")
    for column in used + left_out:
        mark = "*" if column.get("overridden") else " "
        print(f"  {column['name'][:28]:<28} {column['role']:<11}{mark} {column['reason']}")
    for warning in summary["warnings"]:
        print(f"  warning: {warning}")
    dropped = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in summary["rows"]["dropped"].items())
    print(
        f"rows:    {prepared.rows_in} in; dropped: {dropped}; {prepared.train_rows} train, {prepared.test_rows} test"
        f" (exact repeats found: {prepared.duplicate_rows_found})"
    )
    if prepared.class_names:
        shown = ", ".join(prepared.class_names[:20]) + (" ..." if len(prepared.class_names) > 20 else "")
        print(f"classes: {shown}")
    print(f"inputs:  {len(run.features.feature_names)} model inputs from {len(used)} columns")
    print()
    print(render(outcome))


def pipeline_config(args: argparse.Namespace) -> PipelineConfig:
    return PipelineConfig(
        source=args.source,
        target_column=args.target,
        task_kind=args.task,
        column_roles=_key_values(args.column, str, "--column"),
        model=args.model,
        hyperparameters=_key_values(args.hp, str, "--hp"),
        test_fraction=args.test_fraction,
        seed=args.seed,
        drop_duplicates=args.drop_duplicates,
        drop_incomplete_rows=args.drop_incomplete_rows,
        numeric_imputation=args.impute,
        missing_indicators=args.missing_indicators,
        categorical_encoding=args.categorical_encoding,
        scaling=args.scaling,
        polynomial_degree=args.polynomial_degree,
        select_k_best=args.select_k_best,
        # With neither, the evaluator applies the task kind's default thresholds.
        minimums=_key_values(args.min, float, "--min"),
        maximums=_key_values(args.max, float, "--max"),
        force_recompute=args.force,
    )


async def _run(settings: Settings, args: argparse.Namespace) -> int:
    try:
        config = pipeline_config(args)
        for name in config.column_roles.values():
            parse_role(name, "--column")
    except StageError as exc:
        print(f"mlmesh run: {exc}", file=sys.stderr)
        return 2
    mesh = None
    if args.start_mesh:
        # Stage logs go beside a local store; with an object store they stay on the terminal.
        local_store = "://" not in settings.artifact_root
        mesh = LocalMesh(settings, log_dir=Path(settings.artifact_root) / "logs" if local_store else None)
        if not await mesh.start_or_reuse():
            mesh = None  # someone else's mesh: use it, leave it running
    try:
        async with MeshClient(settings, recompute_flag="--force") as client:
            try:
                run, registered_as, served = await _run_pipeline(client, config, args)
            except asyncio.CancelledError:
                # Ctrl-C: the stage calls in flight are cancelled with this task; a fit
                # outlives its caller on purpose, so ask the trainer to stop it too.
                stopped = await client.cancel_fits()
                _INTERRUPTED.append("the trainer was asked to stop its fit" if stopped else "")
                raise
    except (StageCallError, ConfigError) as exc:
        print(f"mlmesh run: {exc}", file=sys.stderr)
        return 2
    finally:
        if mesh is not None:
            mesh.stop()
    outcome = _outcome(run, config.source, registered_as)
    outcome["served"] = served
    if args.json:
        print(json.dumps({**_summary(run, registered_as), "served": served}, indent=2, sort_keys=True))
    else:
        _print_run(run, outcome)
    return 0


# Set by a run that was interrupted, for the one line `main` prints.
_INTERRUPTED: list[str] = []


async def _run_pipeline(
    client: MeshClient, config: PipelineConfig, args: argparse.Namespace
) -> tuple[PipelineRun, str, str]:
    """The five stages with progress on stderr, then the registry when the decision is PROMOTE, then
    serving. Returns the run, "name vN" when registered, and what serving answered ("" when not asked)."""
    # With OTEL_* set, the root of the run's trace: every stage call below is its child.
    with (
        tracing.run_span(
            client.run_id, "mlmesh run", None, **{"mlmesh.source": config.source, "mlmesh.model": config.model}
        ),
        PipelineProgress(quiet=args.quiet) as progress,
    ):
        run = await client.run_pipeline(config, progress)
        if run.evaluate.decision != evaluator_pb2.DECISION_PROMOTE or not args.register:
            return run, "", ""
        name = args.registry_name or default_registry_name(config.source, run.train.model_name)
        with progress.stage("registry") as shown:
            try:
                reply = await client.register_model(register_request(run, name))
            except StageCallError as refused:
                if refused.code != grpc.StatusCode.PERMISSION_DENIED:
                    raise
                raise StageCallError(
                    refused.stage,
                    refused.address,
                    refused.code,
                    refused.details + "; or run with --no-register to keep the model out of the registry",
                ) from None
            version = reply.model_version
            shown.done(
                f"{version.name} v{version.version}" + (" (already registered)" if reply.already_registered else "")
            )
        served = await client.serve_promoted(version.name, progress) if args.serve else ""
    return run, f"{version.name} v{version.version}", served


# Listed in `mlmesh run --help` without importing scikit-learn (which takes seconds);
# tests/test_cli.py checks them against the loader's and the trainer's catalogues.
HELP_SOURCES = ("breast_cancer", "diabetes", "digits", "iris", "wine")
HELP_MODELS = {
    TaskKind.CLASSIFICATION: ("logistic_regression", "random_forest", "hist_gradient_boosting", "sgd"),
    TaskKind.REGRESSION: ("ridge", "random_forest", "hist_gradient_boosting"),
}
_RUN_EPILOG = f"""\
sources:
  sklearn:NAME            NAME is one of {", ".join(HELP_SOURCES)}
  synthetic:KIND?OPTIONS  e.g. synthetic:classification?rows=1000&features=20&classes=2&seed=0
  PATH or URL             a CSV or Parquet table (give --target)
models:
  classification          {", ".join(HELP_MODELS[TaskKind.CLASSIFICATION])} (default: logistic_regression)
  regression              {", ".join(HELP_MODELS[TaskKind.REGRESSION])} (default: ridge)
examples:
  mlmesh run --start-mesh
  mlmesh run --source data.csv --target price --model random_forest --hp n_estimators=300
  mlmesh run --source sklearn:wine --min f1_macro=0.95 --registry-name wine-prod
Ctrl-C stops the run and the fit in progress; progress goes to stderr, the result to stdout.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlmesh", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start the five services locally until Ctrl-C or SIGTERM")
    up.add_argument("--log-dir", type=Path, help="write each stage's log to DIR/<stage>.log")

    status = commands.add_parser(
        "status",
        help="gRPC health of each service, with uptime, calls in flight, cache hit ratio and restarts",
    )
    status.add_argument("--timeout", type=float, default=2.0)

    lineage = commands.add_parser(
        "lineage", help="an artifact's chain back to its source and the runs that made or used it; or one run's graph"
    )
    lineage.add_argument("artifact", nargs="?", help="sha256, a 6+ digit prefix of one, or an artifact URI")
    lineage.add_argument("--run", metavar="ID", help="show one run's stages, inputs and outputs instead")
    lineage.add_argument("--json", action="store_true")

    runs = commands.add_parser("runs", help="recent pipeline runs with their decision and metrics")
    runs.add_argument("--limit", type=int, default=20)
    runs.add_argument("--json", action="store_true")

    models = commands.add_parser("models", help="the model registry: names, versions, metrics")
    models.add_argument("--json", action="store_true")

    with_mesh = commands.add_parser("with-mesh", help="start the mesh, run a command, stop the mesh")
    with_mesh.add_argument("--log-dir", type=Path, help="write each stage's log to DIR/<stage>.log")
    with_mesh.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")

    run = commands.add_parser(
        "run",
        help="run the pipeline against the mesh",
        epilog=_RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--start-mesh", action="store_true", help="start the mesh for this run and stop it after")
    run.add_argument(
        "--source",
        default="sklearn:breast_cancer",
        help="sklearn:NAME, synthetic:..., or a CSV/Parquet path or URL, listed below (default: %(default)s)",
    )
    run.add_argument("--target", default="", help="target column (required for files)")
    run.add_argument(
        "--task",
        default="",
        choices=CHOICES["task_kind"][1:],
        help="classification or regression (default: inferred from the target)",
    )
    run.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="NAME=ROLE",
        help=f"set a column's role, repeatable; roles: {', '.join(ROLES)}",
    )
    run.add_argument(
        "--model",
        default="",
        metavar="MODEL",
        help="the model to train, listed below (default: logistic_regression for classification, ridge for regression)",
    )
    run.add_argument("--hp", action="append", default=[], metavar="NAME=VALUE", help="hyperparameter, repeatable")
    run.add_argument(
        "--min",
        action="append",
        default=[],
        metavar="METRIC=VALUE",
        help="lowest acceptable value, repeatable (default: accuracy=0.9 or r2=0.3 by task kind)",
    )
    run.add_argument("--max", action="append", default=[], metavar="METRIC=VALUE", help="highest acceptable value")
    run.add_argument("--test-fraction", type=float, default=0.2, help="default: %(default)s")
    run.add_argument("--seed", type=int, default=42, help="default: %(default)s")
    run.add_argument("--drop-duplicates", action="store_true", help="drop rows that repeat an earlier row exactly")
    run.add_argument(
        "--drop-incomplete-rows", action="store_true", help="drop rows with a missing feature instead of imputing it"
    )
    run.add_argument(
        "--impute",
        default="median",
        choices=CHOICES["numeric_imputation"],
        help="how missing numbers are filled in (default: %(default)s)",
    )
    run.add_argument("--missing-indicators", action="store_true", help="add a 0/1 column per numeric column with gaps")
    run.add_argument(
        "--categorical-encoding",
        default="auto",
        choices=CHOICES["categorical_encoding"],
        help="auto: one-hot for few levels, target encoding for many, native categories for "
        "hist_gradient_boosting (default: %(default)s)",
    )
    run.add_argument("--scaling", default="standard", choices=CHOICES["scaling"], help="default: %(default)s")
    run.add_argument("--polynomial-degree", type=int, default=0, help="default: %(default)s (none)")
    run.add_argument("--select-k-best", type=int, default=0, help="default: %(default)s (keep all)")
    run.add_argument(
        "--registry-name",
        default="",
        metavar="NAME",
        help="register a PROMOTE under this name (default: <source>-<model>, as the workflow does)",
    )
    run.add_argument(
        "--no-register",
        dest="register",
        action="store_false",
        help="do not register the model even when the decision is PROMOTE",
    )
    run.add_argument(
        "--no-serve",
        dest="serve",
        action="store_false",
        help="do not ask the serving stage to serve a newly registered version now (it still will at its next poll)",
    )
    run.add_argument("--force", action="store_true", help="recompute every stage")
    run.add_argument("--json", action="store_true", help="print the whole result as JSON on stdout")
    run.add_argument("--quiet", action="store_true", help="no progress on stderr")
    serving_commands.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C: one line, not a traceback, and the shell's code for SIGINT.
        why = next((w for w in _INTERRUPTED if w), "")
        print(f"\nmlmesh: interrupted{'; ' + why if why else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `mlmesh lineage ... | head`: the reader has what it wanted. Point stdout at
        # /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"mlmesh: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.command == "lineage":
        return _lineage(settings, args)
    if args.command == "runs":
        return _runs(settings, args)
    if args.command == "models":
        return _models(settings, args)
    handler = {
        "up": _up,
        "status": _status,
        "run": _run,
        "with-mesh": _with_mesh,
        "predict": serving_commands.predict,
        "serving": serving_commands.serving_command,
    }[args.command]
    if args.command == "run":
        try:
            tracing.configure("cli")
        except (ValueError, ImportError) as exc:
            print(f"mlmesh: invalid tracing configuration: {exc}", file=sys.stderr)
            return 2
    try:
        return asyncio.run(handler(settings, args))
    except MeshStartError as exc:
        print(f"mlmesh: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
