"""mlmesh's serving stage against MLServer (mlserver-sklearn), side by side on this machine, one fitted pipeline.

    .venv/bin/python bench/bench_serving.py --runs 1 --seconds 1 --warmup 0.5 --profile 3   # a quick look, about a minute
    .venv/bin/python bench/bench_serving.py --profile 20   # docs/performance.md's table (3 runs of 10 s per case) and profile

What it does, in order:
  1. MLServer and mlserver-sklearn 1.7.1 from PyPI in a venv of their own, kept in a cache folder
     (~/.cache/mlmesh/bench-mlserver, or --mlserver-venv): MLServer needs protobuf<7, mlmesh protobuf 7.
     It gets the scikit-learn, numpy, scipy, pandas and joblib versions of .venv, so both servers
     compute with the same code; and uvloop 0.21, since uvloop 0.22+ stops MLServer 1.7.1's
     inference workers at start ("There is no current event loop"). .venv-clients (tritonclient) is
     made with `make .venv-clients/.installed` when missing.
  2. `mlmesh up` on free ports with its own artifact store, and `mlmesh run` on a table of numeric
     columns (--source, default sklearn:breast_cancer: 30 columns, 569 rows; logistic_regression),
     registered under --registry-name; the serving stage picks it up from the registry.
  3. The same fitted transformer and model, as one scikit-learn Pipeline saved with joblib, in two
     MLServer model folders (implementation mlserver_sklearn.SKLearnModel): one with MLServer's
     defaults, one with its adaptive batching (max_batch_size, max_batch_time). Two changes make the
     pickle loadable and quiet outside mlmesh, neither changes a number: the imputer's strategy
     median_or_zero (an mlmesh function, which MLServer's venv cannot import) becomes "median",
     which transform never reads (it fills from the fitted statistics_); and the model's copy
     forgets feature_names_in_, since a Pipeline hands it a bare array (without this, scikit-learn
     warns on every MLServer call).
  4. bench/serving_client.py, in .venv-clients, drives the three servers with tritonclient's asyncio
     gRPC client and identical requests: one FP64 tensor of shape [rows] per column, as
     raw_input_contents, with the request parameter content_type "pd" (MLServer's pandas codec
     builds one DataFrame from the columns; mlmesh ignores the parameter). Cases: batch 1 at
     concurrency 1, 16 and 64, and requests of 1,024 rows one at a time; each closed-loop for
     --seconds after --warmup, --runs times, the servers interleaved. Every answer is checked
     against the class each server gives for that row in one request of the whole table, and the
     servers must agree on the whole table (MLServer's class code mapped to its name).
  5. A markdown table of medians (throughput, p50, p99, server CPU) and a JSON file (--json); the
     goal: mlmesh at least 2x the faster MLServer at batch 1, concurrency 16, with a p99 no worse.
  6. With --profile N: py-spy samples mlmesh's serving process for N s of batch 1, concurrency 16,
     and prints where its CPU goes.

Everything runs on this machine: on 2 cores, the client and the servers share them, so the table
also says how many cores each used, and how many went to other processes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from mlmesh.serving.v2 import open_inference_pb2 as pb  # noqa: E402
from mlmesh.serving.v2 import open_inference_pb2_grpc as pb_grpc  # noqa: E402
from tests.helpers import free_ports, use_free_ports  # noqa: E402
from tests.test_mesh_processes import UpProcess, stage_pid  # noqa: E402

MLSERVER_VERSION = "1.7.1"
# uvloop 0.22 made asyncio.get_event_loop() raise outside a running loop, which MLServer 1.7.1's
# inference workers call at start: with a newer uvloop, no model loads.
MLSERVER_PINS = ("uvloop==0.21.0",)
# The packages that compute a prediction, pinned in MLServer's venv to what .venv has.
SHARED_PACKAGES = ("scikit-learn", "numpy", "scipy", "pandas", "joblib")
PY_SPY = "py-spy==0.4.3"
CLIENTS = ROOT / ".venv-clients"
GOAL_RATIO = 2.0
GOAL_CASE = "batch 1, concurrency 16"
MLMESH = "mlmesh"
MLSERVER_DEFAULTS = "MLServer (defaults)"
MLSERVER_BATCHING = "MLServer (adaptive batching)"


def default_venv() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "mlmesh" / "bench-mlserver"


def say(text: str) -> None:
    print(text, flush=True)


# ---- the venvs -----------------------------------------------------------------------------------
def requirements() -> list[str]:
    shared = [f"{name}=={importlib.metadata.version(name)}" for name in SHARED_PACKAGES]
    return [f"mlserver=={MLSERVER_VERSION}", f"mlserver-sklearn=={MLSERVER_VERSION}", *shared, *MLSERVER_PINS]


def ensure_venv(venv: Path, wanted: list[str], stamp_name: str) -> None:
    """A venv at `venv` holding `wanted`, installed once: the stamp lists what was installed."""
    stamp = venv / stamp_name
    if stamp.exists() and stamp.read_text().split() == wanted:
        return
    if not (venv / "bin" / "python").exists():
        say(f"making {venv} (once; about a minute)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--upgrade", "pip"], check=True)
    say(f"installing into {venv}: {' '.join(wanted)}")
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", *wanted], check=True)
    stamp.write_text("\n".join(wanted) + "\n")


def ensure_clients() -> None:
    if not (CLIENTS / ".installed").exists():
        say("making .venv-clients (tritonclient) with make")
        subprocess.run(["make", ".venv-clients/.installed"], cwd=ROOT, check=True)


# ---- the model -----------------------------------------------------------------------------------
def train(env: dict[str, str], source: str, model: str, registry_name: str) -> None:
    command = [str(ROOT / ".venv" / "bin" / "mlmesh"), "run", "--source", source, "--model", model]
    done = subprocess.run(
        [*command, "--registry-name", registry_name, "--json", "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise SystemExit(f"mlmesh run failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout)
    if not result.get("registered_as"):
        raise SystemExit(f"mlmesh run did not register the model (decision {result.get('decision')}): {result}")
    say(f"trained and registered {result['registered_as']} ({result['decision']}, {source}, {model})")


def _estimators(obj: Any, seen: set[int]) -> Iterator[Any]:
    """Every estimator reachable from `obj`: fitted steps, fitted and unfitted ColumnTransformer branches."""
    from sklearn.base import BaseEstimator

    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _estimators(item, seen)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _estimators(item, seen)
    elif isinstance(obj, BaseEstimator):
        yield obj
        for item in vars(obj).values():
            yield from _estimators(item, seen)


def export(root: Path, name: str, folders: list[Path], rows_file: Path) -> dict[str, Any]:
    """The registered version's transformer and model as one Pipeline in each MLServer model folder,
    and the table's feature columns as rows_file; returns what the client needs to know."""
    import joblib
    import numpy as np
    import pyarrow as pa
    import pyarrow.ipc as ipc
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline

    from services.runtime import formats
    from services.runtime.store import ArtifactStore, ref_from_dict

    store = ArtifactStore(str(root))
    entry = json.loads((root / "registry" / f"{name}.json").read_text())["versions"][-1]
    lineage = entry["lineage"]
    transformer = formats.skops_to_model(store.get(ref_from_dict(lineage["transformer"])), "transformer")
    model = formats.skops_to_model(store.get(ref_from_dict(entry["model"])), "model")
    features = json.loads(store.get(ref_from_dict(lineage["feature_schema"])))
    table = ipc.open_file(pa.BufferReader(store.get(ref_from_dict(lineage["dataset"])))).read_all()
    columns = [str(c) for c in transformer.feature_names_in_]
    frame = table.select(columns).to_pandas()
    not_numbers = [c for c in columns if frame[c].dtype != "float64"]
    if not_numbers:
        raise SystemExit(
            f"this benchmark sends every column as FP64: {not_numbers[:3]} are not numbers; choose a table of numbers"
        )
    np.save(rows_file, frame.to_numpy(dtype="float64"))

    exported = copy.deepcopy(transformer)
    for estimator in _estimators(exported, set()):
        if isinstance(estimator, SimpleImputer) and callable(estimator.strategy):
            # median_or_zero gives exactly strategy="median" with keep_empty_features=True (its docstring);
            # transform reads statistics_, never the strategy.
            if estimator.strategy.__name__ != "median_or_zero":
                raise SystemExit(f"the imputer's strategy {estimator.strategy.__name__} has no scikit-learn name")
            estimator.strategy = "median"
    predictor = copy.deepcopy(model)
    if hasattr(predictor, "feature_names_in_"):
        del predictor.feature_names_in_
    pipeline = Pipeline([("transformer", exported), ("model", predictor)])
    # The same predictions as mlmesh's own computation (models.py), on every row, before any server runs.
    matrix = np.ascontiguousarray(transformer.transform(frame), dtype="float64")
    import pandas as pd

    names = getattr(model, "feature_names_in_", None)
    x: Any = matrix if names is None else pd.DataFrame(matrix, columns=[str(n) for n in names])
    if not np.array_equal(pipeline.predict(frame), model.predict(x)):
        raise SystemExit("the exported pipeline predicts differently from the registered transformer and model")
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        joblib.dump(pipeline, folder / "model.joblib")
        if b"services." in (folder / "model.joblib").read_bytes():
            raise SystemExit("the exported pipeline still refers to mlmesh code, which MLServer cannot import")
    return {
        "columns": columns,
        "class_names": [str(c) for c in features["class_names"]],
        "model_codes": [int(c) for c in model.classes_],
        "rows": len(frame),
    }


# ---- the servers -------------------------------------------------------------------------------
def mlserver_folder(base: Path, model_name: str, batching: tuple[int, float] | None) -> tuple[Path, int]:
    """An MLServer repository folder (settings.json, one model folder); returns it and its gRPC port."""
    http, grpc_port, metrics = free_ports(3)
    base.mkdir(parents=True, exist_ok=True)
    # Its defaults, except where it listens: loopback only, on free ports (its metrics stay on).
    settings = {"host": "127.0.0.1", "http_port": http, "grpc_port": grpc_port, "metrics_port": metrics}
    (base / "settings.json").write_text(json.dumps(settings, indent=1))
    model_settings: dict[str, Any] = {
        "name": model_name,
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": "1"},
    }
    if batching is not None:
        model_settings["max_batch_size"], model_settings["max_batch_time"] = batching
    (base / model_name / "model-settings.json").write_text(json.dumps(model_settings, indent=1))
    return base, grpc_port


def wait_ready(address: str, model: str, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with grpc.insecure_channel(address) as channel:
                reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelReady(
                    pb.ModelReadyRequest(name=model), timeout=2
                )
            if reply.ready:
                return
            last = "not ready"
        except grpc.RpcError as exc:
            last = f"{exc.code().name}"
        time.sleep(0.2)
    raise SystemExit(f"{what} never had {model} ready at {address} ({last})")


@contextlib.contextmanager
def mlserver(venv: Path, folder: Path) -> Iterator[subprocess.Popen]:
    log = (folder / "mlserver.log").open("w")
    process = subprocess.Popen(
        [str(venv / "bin" / "mlserver"), "start", str(folder)],
        cwd=folder,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


# ---- the report ----------------------------------------------------------------------------------
def medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    return {key: statistics.median(run[key] for run in runs) for key in keys}


def table(summary: dict[str, dict[str, dict[str, float]]], cases: list[dict[str, Any]]) -> str:
    lines = [
        "| case | server | requests/s | rows/s | p50 ms | p99 ms | server CPU ms/request | server cores | other cores |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        for label, by_case in summary.items():
            m = by_case[case["name"]]
            lines.append(
                f"| {case['name']} | {label} | {m['requests_per_second']:,.0f} | {m['rows_per_second']:,.0f} "
                f"| {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {m['server_cpu_ms_per_request']:.2f} "
                f"| {m['server_cores']:.2f} | {m['other_cores']:.2f} |"
            )
    return "\n".join(lines)


def goal(summary: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    ours = summary[MLMESH][GOAL_CASE]
    rivals = {label: by_case[GOAL_CASE] for label, by_case in summary.items() if label != MLMESH}
    best_label = max(rivals, key=lambda label: rivals[label]["requests_per_second"])
    best = rivals[best_label]
    ratio = ours["requests_per_second"] / best["requests_per_second"]
    met = ratio >= GOAL_RATIO and ours["p99_ms"] <= best["p99_ms"]
    return {
        "case": GOAL_CASE,
        "against": best_label,
        "ratio": ratio,
        "p99_ms": ours["p99_ms"],
        "their_p99_ms": best["p99_ms"],
        "met": met,
        "line": (
            f"goal: mlmesh >= {GOAL_RATIO:g}x the faster MLServer ({best_label}) at {GOAL_CASE}, p99 no worse: "
            f"{ratio:.2f}x ({ours['requests_per_second']:,.0f} vs {best['requests_per_second']:,.0f} req/s), "
            f"p99 {ours['p99_ms']:.1f} vs {best['p99_ms']:.1f} ms -> {'MET' if met else 'MISSED'}"
        ),
    }


# ---- the profile ---------------------------------------------------------------------------------
def profile_bucket(frames: list[str]) -> str:
    """What one py-spy sample of mlmesh's serving process was doing. py-spy sees Python frames only:
    time in C under a frame (numpy, pandas' internals, gRPC's Cython and C core, uvloop) counts for it."""
    thread = frames[0] if frames and frames[0].startswith("thread (") else ""
    names = [frame.split(" (")[0] for frame in (frames[1:] if thread else frames)]
    has = set(names).__contains__
    if any(has(f"ServedVersion.{method}") for method in ("predict", "predict_rows", "predict_matrix")):
        if any(name.endswith(".transform") and not name.startswith("ServedVersion") for name in names):
            return "predict: the transformer (impute, scale)"
        if any(name.endswith("predict_proba") for name in names):
            return "predict: model.predict_proba"
        if any(name.endswith(".predict") and not name.startswith("ServedVersion") for name in names):
            return "predict: model.predict"
        return "predict: the rest (joining the requests' rows, class names)"
    if any(has(name) for name in ("rows_frame", "rows_columns", "read_rows", "check_magnitudes")):
        if has("DataFrame.__init__"):
            return "parsing: one DataFrame per request (columns.py)"
        return "parsing: the values (columns.py)"
    if has("decode_inputs"):
        return "decoding tensors (tensors.py decode_inputs)"
    if has("encode_output") or has("_respond"):
        return "encoding the response (service.py _respond, tensors.py encode_output)"
    if any(name.startswith(("Batcher.", "Repository.")) for name in names):
        return "batching and the executor hand-off (batching.py, to_thread)"
    if any(name.startswith("Logger.") for name in names):
        return "the per-call log line (interceptor.py _log)"
    if has("ServingServicer.ModelInfer"):
        return "ModelInfer itself (checks, prometheus counters)"
    if any(
        name.startswith(("_rpc_scope", "AdmissionInterceptor", "StageInterceptor", "_wrap_unary")) for name in names
    ):
        return "interceptors (admission, rpc scope: metrics, tracing hook)"
    if "_poll_wrapper" in thread:
        return "gRPC's poller thread (C core)"
    if "work" in thread:
        return "executor threads outside predict (queue, GIL hand-off)"
    if "MainThread" in thread:
        return "event loop: uvloop and gRPC's Cython/C core under it"
    return "other"


def summarize_profile(folded: Path) -> list[tuple[str, float]]:
    counts: dict[str, int] = {}
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        bucket = profile_bucket(stack.split(";"))
        counts[bucket] = counts.get(bucket, 0) + count
    return sorted(((label, count / total) for label, count in counts.items()), key=lambda kv: -kv[1])


# ---- main ----------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(
        description="mlmesh's serving stage against MLServer (defaults, and adaptive batching), "
        "with tritonclient's asyncio gRPC client, on one fitted scikit-learn pipeline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of every case and server; medians are reported")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of one run of one case")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of the same load before each run")
    parser.add_argument("--concurrency", default="1,16,64", help="callers at batch 1, comma-separated")
    parser.add_argument("--batch-rows", type=int, default=1024, help="rows in the large-batch case (0: none)")
    parser.add_argument("--source", default="sklearn:breast_cancer", help="a table of numeric columns to train on")
    parser.add_argument("--model", default="logistic_regression", help="the model mlmesh run trains")
    parser.add_argument("--registry-name", default="bench-serving", help="the name the model is registered under")
    parser.add_argument("--mlserver-batch-size", type=int, default=32, help="MLServer's max_batch_size when batching")
    parser.add_argument(
        "--mlserver-batch-time", type=float, default=0.01, help="MLServer's max_batch_time (seconds) when batching"
    )
    parser.add_argument(
        "--mlserver-venv", type=Path, default=default_venv(), help="MLServer's venv, made on first use and kept"
    )
    parser.add_argument(
        "--work", type=Path, help="keep the artifacts, logs and model folders here (default: a temp dir)"
    )
    parser.add_argument("--json", type=Path, help="write every measurement and the medians here")
    parser.add_argument(
        "--profile", type=float, default=0.0, help="seconds of py-spy on mlmesh's serving at batch 1, concurrency 16"
    )
    args = parser.parse_args()

    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    cases = [{"name": f"batch 1, concurrency {c}", "rows": 1, "concurrency": c} for c in concurrencies]
    if args.batch_rows:
        cases.append({"name": f"batch {args.batch_rows:,}, concurrency 1", "rows": args.batch_rows, "concurrency": 1})

    ensure_clients()
    ensure_venv(args.mlserver_venv, requirements(), ".installed")
    if args.profile:
        ensure_venv(args.mlserver_venv, [PY_SPY], ".installed-py-spy")

    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-serving-")))
        work.mkdir(parents=True, exist_ok=True)
        artifacts = work / "artifacts"
        env = {
            **os.environ,
            "MLMESH_ARTIFACT_ROOT": str(artifacts),
            "MLMESH_GRACE_SECONDS": "1",
            "MLMESH_SERVING_POLL_SECONDS": "0.2",
        }
        use_free_ports(env)
        address = f"127.0.0.1:{env['MLMESH_SERVING_PORT']}"
        up = UpProcess(env, {}, cwd=work, args=("--log-dir", str(work / "logs")))
        stack.callback(up.stop)
        up.wait_for("mesh is up")
        train(env, args.source, args.model, args.registry_name)
        wait_ready(address, args.registry_name, "mlmesh's serving stage")

        defaults_root = work / "mlserver-defaults"
        batching_root = work / "mlserver-batching"
        model_folder = args.registry_name
        known = export(
            artifacts,
            args.registry_name,
            [defaults_root / model_folder, batching_root / model_folder],
            work / "rows.npy",
        )
        _, defaults_port = mlserver_folder(defaults_root, args.registry_name, None)
        _, batching_port = mlserver_folder(
            batching_root, args.registry_name, (args.mlserver_batch_size, args.mlserver_batch_time)
        )
        servers = {
            MLSERVER_DEFAULTS: (stack.enter_context(mlserver(args.mlserver_venv, defaults_root)), defaults_port),
            MLSERVER_BATCHING: (stack.enter_context(mlserver(args.mlserver_venv, batching_root)), batching_port),
        }
        for label, (_, port) in servers.items():
            wait_ready(f"127.0.0.1:{port}", args.registry_name, label)
        serving_pid = stage_pid(up, "serving")
        targets = [
            {
                "label": MLMESH,
                "address": address,
                "model": args.registry_name,
                "output": "predicted",
                "codes": False,
                "pid": serving_pid,
            }
        ] + [
            {
                "label": label,
                "address": f"127.0.0.1:{port}",
                "model": args.registry_name,
                "output": "predict",
                "codes": True,
                "pid": process.pid,
            }
            for label, (process, port) in servers.items()
        ]
        if known["model_codes"] != list(range(len(known["class_names"]))):
            raise SystemExit(f"the model's classes {known['model_codes']} are not codes of {known['class_names']}")
        spec = {
            "rows_file": str(work / "rows.npy"),
            "columns": known["columns"],
            "class_names": known["class_names"],
            "parameters": {"content_type": "pd"},
            "targets": targets,
            "cases": cases,
            "runs": args.runs,
            "seconds": args.seconds,
            "warmup_seconds": args.warmup,
        }
        (work / "spec.json").write_text(json.dumps(spec, indent=1))
        say(
            f"{len(targets)} servers x {len(cases)} cases x {args.runs} runs of {args.seconds:g} s "
            f"(+{args.warmup:g} s warm-up), {known['rows']} rows of {len(known['columns'])} columns; "
            f"load average before: {os.getloadavg()[0]:.2f}"
        )
        client = [str(CLIENTS / "bin" / "python"), str(ROOT / "bench" / "serving_client.py")]
        measuring = subprocess.run([*client, str(work / "spec.json"), str(work / "measured.json")])
        mesh_died = up.process.poll()
        if mesh_died is not None:
            # Not ours to hide: something stopped `mlmesh up` (a signal from outside) during the runs.
            up.output.append(up.process.stdout.read() if up.process.stdout else "")
            raise SystemExit(
                f"mlmesh up exited ({mesh_died}) during the runs, so its figures are void; its output:\n"
                + "".join(up.output)[-2000:]
            )
        if measuring.returncode != 0:
            raise SystemExit(f"the client failed (exit {measuring.returncode}); see its output above")
        measured = json.loads((work / "measured.json").read_text())

        profile: list[tuple[str, float]] = []
        profile_error = ""
        if args.profile:
            seconds = max(1, round(args.profile))
            profile_spec = {
                **spec,
                "targets": targets[:1],
                "cases": [{"name": GOAL_CASE, "rows": 1, "concurrency": 16}],
                "runs": 1,
                "seconds": seconds + 4,
                "warmup_seconds": 1.0,
            }
            (work / "profile-spec.json").write_text(json.dumps(profile_spec))
            load = subprocess.Popen([*client, str(work / "profile-spec.json"), str(work / "profile-measured.json")])
            time.sleep(3)  # the client's start and warm-up
            folded = work / "serving-profile.txt"
            py_spy = [str(args.mlserver_venv / "bin" / "py-spy"), "record", "--pid", str(serving_pid)]
            options = ["--duration", str(seconds), "--rate", "200", "--nonblocking", "--threads"]
            sampled = subprocess.run(
                [*py_spy, *options, "--format", "raw", "--output", str(folded)], capture_output=True, text=True
            )
            load.wait()
            if sampled.returncode == 0 and folded.exists():
                profile = summarize_profile(folded)
            else:  # py-spy needs ptrace: a container may not allow it
                profile_error = (sampled.stderr or sampled.stdout).strip()[-300:]

    summary = {
        label: {name: medians(runs) for name, runs in by_case.items()} for label, by_case in measured["runs"].items()
    }
    disagreements = measured["reference_disagreements"]
    wrong = {
        label: sum(run["wrong_answers"] for runs in by_case.values() for run in runs)
        for label, by_case in measured["runs"].items()
    }
    failed = {
        label: sum(run["errors"] for runs in by_case.values() for run in runs)
        for label, by_case in measured["runs"].items()
    }
    verdict = goal(summary) if GOAL_CASE in summary[MLMESH] and len(summary) > 1 else None
    versions = {name: importlib.metadata.version(name) for name in ("grpcio", *SHARED_PACKAGES)}
    say("")
    say(
        f"## {args.source} ({known['rows']} rows x {len(known['columns'])} FP64 columns), {args.model}: "
        f"medians of {args.runs} runs of {args.seconds:g} s"
    )
    say("")
    say(table(summary, cases))
    say("")
    say(
        f"On this machine ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), the client and the "
        "servers share the cores: 'server cores' is the CPU the server's processes used (MLServer: with its inference "
        "worker), 'other cores' what the rest of the machine used beside the client and that server."
    )
    say(
        "MLServer's adaptive batching: "
        f"max_batch_size {args.mlserver_batch_size}, max_batch_time {args.mlserver_batch_time:g} s. "
        f"Versions: mlserver {MLSERVER_VERSION}, " + ", ".join(f"{k} {v}" for k, v in versions.items())
    )
    agree = all(count == 0 for count in disagreements.values()) and all(count == 0 for count in wrong.values())
    say(
        f"predictions: the servers {'agree' if agree else 'DISAGREE'} on all {known['rows']} rows "
        f"(whole-table differences {disagreements}; answers unlike the whole table's during the runs {wrong})"
    )
    if any(failed.values()):
        say(f"FAILED requests during the runs: {failed}")
    if verdict:
        say(verdict["line"])
    if profile_error:
        say(f"profile: py-spy failed: {profile_error}")
    if profile:
        say("")
        say(
            f"where mlmesh's serving process spends its CPU at {GOAL_CASE} (py-spy, {args.profile:g} s, on-CPU samples):"
        )
        for label, share in profile:
            say(f"  {share:6.1%}  {label}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "source": args.source,
                    "model": args.model,
                    "cases": cases,
                    "runs": args.runs,
                    "seconds": args.seconds,
                    "cores": os.cpu_count(),
                    "mlserver_batching": {
                        "max_batch_size": args.mlserver_batch_size,
                        "max_batch_time": args.mlserver_batch_time,
                    },
                    "versions": {"mlserver": MLSERVER_VERSION, **versions},
                    "summary": summary,
                    "goal": verdict,
                    "predictions_agree": agree,
                    "reference_disagreements": disagreements,
                    "wrong_answers": wrong,
                    "failed_requests": failed,
                    "profile": dict(profile),
                    "profile_error": profile_error,
                    "measured": measured["runs"],
                },
                indent=1,
            )
        )
    return 0 if agree and not any(failed.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
