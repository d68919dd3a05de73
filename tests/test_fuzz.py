"""Fuzz every RPC with seeded, generated requests against real in-process servers.

One real pipeline run (sklearn:iris) supplies valid refs; the generators mix them with
mutated refs, random enum numbers, boundary integers, random maps and hostile strings,
and each method also gets raw bytes that are not (or only by chance are) its message.

Every reply must be a status docs/grpcurl.md's Errors table allows for what was sent:
never INTERNAL, UNKNOWN or UNAVAILABLE (nothing here is transient), DATA_LOSS only when
a ref pairs an existing object's URI with a digest those bytes do not have, and every
message at most 1 KiB without echoing a long input. A summary of codes per RPC is
printed at the end (pytest -s shows it).
"""

from __future__ import annotations

import asyncio
import collections
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.longrunning import operations_proto_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlmesh.common.v1 import progress_pb2
from mlmesh.common.v1.common_pb2 import ArtifactRef
from mlmesh.evaluator.v1 import evaluator_pb2
from mlmesh.features.v1 import features_pb2
from mlmesh.loader.v1 import loader_pb2
from mlmesh.preprocess.v1 import preprocess_pb2
from mlmesh.trainer.v1 import trainer_pb2
from services.client.mesh import MeshClient, PipelineConfig
from services.evaluator.logic import ALL_METRICS, CLASSIFICATION_METRICS
from services.runtime.catalog import STAGES
from services.runtime.server import RunningStage

SEED = 20260509
PER_RPC = 500
RAW_PER_METHOD = 60
CONCURRENCY = 8
CALL_TIMEOUT = 30  # seconds; no fuzzed request needs more than a fraction of this
MAX_DETAIL_BYTES = 1024
LONG = 500  # inputs at least this long must never come back verbatim

FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE}

METHODS = {
    "Load": ("loader", "/mlmesh.loader.v1.LoaderService/Load", False),
    "Preprocess": ("preprocess", "/mlmesh.preprocess.v1.PreprocessService/Preprocess", False),
    "BuildFeatures": ("features", "/mlmesh.features.v1.FeaturesService/BuildFeatures", False),
    "Train": ("trainer", "/mlmesh.trainer.v1.TrainerService/Train", True),
    "Evaluate": ("evaluator", "/mlmesh.evaluator.v1.EvaluatorService/Evaluate", False),
    "RegisterModel": ("evaluator", "/mlmesh.evaluator.v1.EvaluatorService/RegisterModel", False),
    "StartTraining": ("trainer", "/mlmesh.trainer.v1.TrainerService/StartTraining", False),
    "GetOperation": ("trainer", "/google.longrunning.Operations/GetOperation", False),
    "WaitOperation": ("trainer", "/google.longrunning.Operations/WaitOperation", False),
    "ListOperations": ("trainer", "/google.longrunning.Operations/ListOperations", False),
    "CancelOperation": ("trainer", "/google.longrunning.Operations/CancelOperation", False),
    "DeleteOperation": ("trainer", "/google.longrunning.Operations/DeleteOperation", False),
    "WatchCall": ("features", "/mlmesh.common.v1.ProgressService/WatchCall", True),
}

INT32 = (0, 1, -1, 2, 3, 4, 5, 2**31 - 1, -(2**31), 2**15, 255, 256, 1000)
INT64 = (0, 1, -1, 42, 2**63 - 1, -(2**63), 2**32, 2**31 - 1, -(2**31))
FLOATS = (
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    0.2,
    0.999999,
    1e-308,
    5e-324,
    1e308,
    -1e308,
    math.inf,
    -math.inf,
    math.nan,
    2.0,
    0.9,
    100.0,
)


@dataclass
class Case:
    request: Any  # a message, or bytes for a raw body
    data_loss_ok: bool = False  # some ref pairs an existing URI with a digest its bytes lack
    long_inputs: tuple[str, ...] = ()


class Gen:
    """Seeded generator of hostile values; remembers long strings it handed out."""

    def __init__(self, seed: int, refs: dict[str, ArtifactRef], root: Path, csv_path: Path):
        self.r = random.Random(seed)
        self.refs = refs
        self.root = root
        self.csv_path = csv_path
        self.longs: list[str] = []
        self.data_loss_ok = False

    def start(self) -> None:
        self.longs, self.data_loss_ok = [], False

    def case(self, request: Any) -> Case:
        return Case(request, self.data_loss_ok, tuple(self.longs))

    def chance(self, p: float) -> bool:
        return self.r.random() < p

    # ---- strings --------------------------------------------------------------------
    def long_text(self) -> str:
        alphabet = self.r.choice(["a", "xyz", "é中🙂", "../", "%00", "\u202e\u200b"])
        text = (alphabet * (10_000 // len(alphabet) + 1))[: 10_000 + self.r.randint(0, 50)]
        text = f"{self.r.randint(0, 10**9)}{text}"
        self.longs.append(text)
        return text

    def text(self) -> str:
        kind = self.r.randrange(11)
        if kind == 0:
            return ""
        if kind == 1:
            return self.long_text()
        if kind == 2:
            return "a\x00b"
        if kind == 3:
            return "".join(chr(self.r.randint(1, 0xD7FF)) for _ in range(self.r.randint(1, 40)))
        if kind == 4:
            return self.r.choice(["sepal length (cm)", "target", "petal width (cm)", "num", "cat", "flag"])
        if kind == 5:
            return "\t\n\r\x1b[31m"
        if kind == 6:
            return "../../etc/passwd"
        if kind == 7:
            return " " * self.r.randint(1, 5)
        if kind == 8:
            return "🙂" * self.r.randint(1, 300)
        if kind == 9:
            return "".join(
                self.r.choice("abcdefghijklmnopqrstuvwxyz_.-0123456789") for _ in range(self.r.randint(1, 30))
            )
        return "\u202e\ufeff\U0010ffff"

    # ---- numbers ----------------------------------------------------------------------
    def pick(self, usual: list, odd: list, p_usual: float = 0.85) -> Any:
        """Mostly a value the service accepts, so that later checks are reached too."""
        return self.r.choice(usual if self.chance(p_usual) else odd)

    def enum(self, maximum: int) -> int:
        return self.pick(list(range(maximum + 1)), [maximum + 1, -1, 2**31 - 1, -(2**31), 99])

    def int32(self) -> int:
        return self.r.choice([*INT32, self.r.randint(-(2**31), 2**31 - 1)])

    def int64(self) -> int:
        return self.r.choice([*INT64, self.r.randint(-(2**63), 2**63 - 1)])

    def seed(self) -> int:
        return self.pick([0, 1, 42, 2**32 - 1, self.r.randint(0, 2**32 - 1)], [self.int64()])

    def double(self) -> float:
        return self.r.choice([*FLOATS, self.r.uniform(-2, 2)])

    # ---- refs ---------------------------------------------------------------------------
    def hex64(self) -> str:
        return "".join(self.r.choice("0123456789abcdef") for _ in range(64))

    def ref(self, kind: str) -> ArtifactRef | None:
        """The right ref for `kind` most of the time, otherwise one of many mutations."""
        good = self.refs[kind]
        if self.chance(0.75):
            return good
        choice = self.r.randrange(8, 20)
        ref = ArtifactRef()
        ref.CopyFrom(good)
        if choice == 8:
            return None  # unset field
        if choice == 9:  # wrong digest for bytes that exist
            ref.sha256 = self.hex64()
            self.data_loss_ok = True
        elif choice == 10:  # a whole ref of another kind
            ref.CopyFrom(self.refs[self.r.choice(sorted(self.refs))])
        elif choice == 11:  # URI of one artifact, digest of another
            other = self.refs[self.r.choice(sorted(self.refs))]
            ref.sha256 = other.sha256
            self.data_loss_ok = self.data_loss_ok or other.uri != ref.uri
        elif choice == 12:
            ref.sha256 = self.r.choice(
                [
                    "",
                    "ABC",
                    good.sha256.upper(),
                    good.sha256[:-1],
                    good.sha256 + "0",
                    self.long_text(),
                    "g" * 64,
                    "\x00" * 64,
                ]
            )
        elif choice == 13:
            ref.uri = good.uri + self.r.choice(["\x00", "\n", "\x7f", "\x1b"]) + "x"
        elif choice == 14:
            objects = f"file://{self.root}/objects"
            ref.uri = self.r.choice(
                [
                    f"{objects}/../../../etc/passwd",
                    f"{objects}/..",
                    f"{objects}/ab/../../secret",
                    f"{objects}/",
                    f"{objects}",
                    f"file://{self.root}",
                    "file:///etc/passwd",
                    f"{objects}/{self.long_text()}",
                    f"{objects}/zz/{'a' * 300}/{'b' * 300}.npy",
                    good.uri.replace("file://", ""),
                    "file://" + good.uri,
                ]
            )
        elif choice == 15:
            ref.uri = self.r.choice(
                [
                    "s3://bucket/mlmesh/objects/ab/x.npy",
                    "gs://b/objects/x",
                    "http://127.0.0.1:9/x",
                    "memory://objects/x",
                    "data:,hello",
                    "nosuchproto://x",
                    "ftp://h/x",
                    "zip://x::file:///etc",
                ]
            ) + self.r.choice(["", self.text()])
        elif choice == 16:
            ref.uri = self.text()
        elif choice == 17:
            ref.size_bytes = self.int64()
            ref.media_type = self.text()
        elif choice == 18:
            ref.uri = self.r.choice(
                [f"{self.refs[k].uri}.bak" for k in self.refs] + [f"file://{self.root}/objects/00/{'0' * 64}.npy"]
            )
        else:
            ref.Clear()
        return ref

    def str_map(self, names: list[str], value) -> dict:
        out = {}
        for _ in range(self.r.choice([0, 0, 0, 1, 1, 2, 3, 8, 40])):
            key = self.r.choice(names) if self.chance(0.9) else self.text()
            out[key] = value()
        return out


# ---- per-RPC generators ------------------------------------------------------------------
IRIS_COLUMNS = ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)", "target"]
CSV_COLUMNS = ["num", "cat", "flag", "when", "label", "row_id"]


def gen_load(g: Gen) -> loader_pb2.LoadRequest:
    r = g.r
    source = (
        r.choice(["sklearn:iris", str(g.csv_path), f"file://{g.csv_path}"])
        if g.chance(0.5)
        else r.choice(
            [
                "sklearn:iris",
                "sklearn:iris",
                str(g.csv_path),
                str(g.csv_path),
                f"file://{g.csv_path}",
                f"sklearn:{g.text()}",
                "sklearn:",
                "sklearn:IRIS",
                "synthetic:classification?rows=60&features=4&seed=1",
                f"synthetic:classification?rows={r.choice([0, -1, 1, 2, 50, 10**12, 2**63])}&features={r.choice([0, 1, 3, 10**9])}&classes={r.choice([0, 1, 2, 3, 100])}",
                f"synthetic:regression?rows={r.choice([1, 30, 10**15])}&features={r.choice([1, 2, 10**6])}&noise={r.choice(['nan', 'inf', '-1', '0.5', 'x'])}",
                f"synthetic:{g.text()}",
                f"synthetic:classification?{g.text()}",
                "synthetic:classification?rows=nan",
                f"{g.csv_path.parent}/../{g.csv_path.parent.name}/{g.csv_path.name}",
                str(g.csv_path.parent),
                str(g.csv_path.parent / "missing.csv"),
                f"{g.csv_path}\x00.csv",
                str(g.csv_path.parent / "data.parquet"),
                "relative/missing.csv",
                "nosuchproto://x.csv",
                "memory://nothing.csv",
                g.text(),
                g.long_text(),
                f"/{g.long_text()}.csv",
                "",
                "   ",
            ]
        )
    )
    if "csv" in source:
        target = g.pick(["label", "label", "num", "cat", "flag"], ["", "when", "row_id", "nope", g.text()])
    else:
        target = g.pick(["", "target"], ["sepal length (cm)", "label", g.text()])
    roles = g.str_map(IRIS_COLUMNS + CSV_COLUMNS, lambda: g.enum(8)) if g.chance(0.6) else {}
    return loader_pb2.LoadRequest(
        source=source, target_column=target, task_kind=g.enum(2), force_recompute=g.chance(0.1), column_roles=roles
    )


def gen_preprocess(g: Gen) -> preprocess_pb2.PreprocessRequest:
    return preprocess_pb2.PreprocessRequest(
        dataset=g.ref(g.r.choice(["dataset", "dataset", "dataset", "csv_dataset"])),
        test_fraction=g.pick([0.0, 0.2, 0.3, 0.5, 0.1, 0.9, 0.05, 0.95, 0.999, 0.001], list(FLOATS)),
        seed=g.seed(),
        force_recompute=g.chance(0.05),
        drop_duplicate_rows=g.chance(0.5),
        drop_incomplete_rows=g.chance(0.5),
    )


def gen_features(g: Gen) -> features_pb2.BuildFeaturesRequest:
    csv = g.chance(0.3)
    return features_pb2.BuildFeaturesRequest(
        train=g.ref("csv_train" if csv else "train"),
        test=g.ref("csv_test" if csv else "test"),
        scaling=g.enum(4),
        polynomial_degree=g.pick([0, 0, 1, 2, 3, 4], [5, -1, 2**31 - 1, -(2**31)]),
        select_k_best=g.pick([0, 0, 1, 2, 3, 100, 10**6], [-1, 2**31 - 1, -(2**31)]),
        force_recompute=g.chance(0.05),
        numeric_imputation=g.enum(3),
        missing_indicators=g.chance(0.5),
        categorical_encoding=g.enum(3),
        max_one_hot_levels=g.pick([0, 0, 1, 2, 3, 30], [g.int32()]),
        min_level_count=g.pick([0, 0, 1, 2, 5, 100], [g.int32()]),
        seed=g.seed(),
    )


# Hyperparameters that count fitting work: only small positive values, so nothing trains for long.
_WORK = {"n_estimators", "max_iter", "n_iter_no_change", "n_jobs", "max_fun"}
_HP_NAMES = [
    "C",
    "alpha",
    "max_depth",
    "min_samples_leaf",
    "penalty",
    "solver",
    "learning_rate",
    "loss",
    "max_bins",
    "l2_regularization",
    "tol",
    "fit_intercept",
    "class_weight",
    "criterion",
    "max_features",
    "bootstrap",
    "max_samples",
    "l1_ratio",
    "early_stopping",
    "verbose",
    "max_leaf_nodes",
    "min_samples_split",
    "warm_start",
    "random_state",
    "categorical_features",
    "interaction_cst",
    "monotonic_cst",
    "eta0",
    "average",
    "epsilon",
    *sorted(_WORK),
]


def hp_value(g: Gen, name: str) -> str:
    r = g.r
    if name in _WORK and g.chance(0.8):
        return r.choice(["1", "2", "3", "0", "-1", "1.5", '"2"', "null", "true"])
    return r.choice(
        [
            "0",
            "1",
            "-1",
            "2",
            "0.5",
            "1e308",
            "-1e308",
            "NaN",
            "Infinity",
            "-Infinity",
            "9223372036854775807",
            "18446744073709551616",
            "1e400",
            "true",
            "false",
            "null",
            '"sqrt"',
            "sqrt",
            '"l1"',
            "l2",
            "elasticnet",
            "[]",
            "{}",
            "[1, 2]",
            '{"a": 1}',
            '"balanced"',
            "balanced",
            "saga",
            '"log_loss"',
            "hinge",
            "[[0, 1]]",
            '""',
            g.text(),
        ]
    )


def gen_train(g: Gen) -> trainer_pb2.TrainRequest:
    r = g.r
    model = g.pick(
        ["", "logistic_regression", "logistic_regression", "sgd", "random_forest", "hist_gradient_boosting"],
        ["ridge", g.text(), "LOGISTIC_REGRESSION", "logistic_regression "],
    )
    names = _HP_NAMES
    hyper = {}
    for _ in range(r.choice([0, 0, 1, 1, 2, 3, 6]) if model else r.choice([0, 0, 0, 1])):
        name = r.choice(names) if g.chance(0.9) else g.text()
        hyper[name] = hp_value(g, name)
    # Keep real fits small: forests and boosting get few steps unless fuzzed otherwise above.
    if model == "random_forest" and "n_estimators" not in hyper:
        hyper["n_estimators"] = str(r.randint(1, 5))
    if model == "hist_gradient_boosting" and "max_iter" not in hyper:
        hyper["max_iter"] = str(r.randint(1, 5))
    if model in ("", "logistic_regression", "sgd") and "max_iter" not in hyper and g.chance(0.5):
        hyper["max_iter"] = str(r.randint(1, 200))
    csv = g.chance(0.25)
    prefix = "csv_" if csv else ""
    return trainer_pb2.TrainRequest(
        x_train=g.ref(prefix + "x_train"),
        y_train=g.ref(prefix + "y_train"),
        model=model,
        hyperparameters=hyper,
        seed=g.seed(),
        force_recompute=g.chance(0.02),
        feature_schema=g.ref(prefix + "feature_schema") if g.chance(0.8) else None,
        task_kind=g.enum(2),
    )


METRIC_NAMES = [*CLASSIFICATION_METRICS, *CLASSIFICATION_METRICS, *ALL_METRICS]


def gen_evaluate(g: Gen) -> evaluator_pb2.EvaluateRequest:
    r = g.r

    def threshold() -> float:
        return g.pick([0.0, 0.5, 0.9, 1.0, 0.1, 100.0, -5.0, 1e308], list(FLOATS), 0.8)

    class_names = []
    if g.chance(0.8):
        class_names = ["setosa", "versicolor", "virginica"]
    if g.chance(0.3):
        class_names = [g.text() for _ in range(r.choice([0, 1, 2, 3, 4, 50]))]
    return evaluator_pb2.EvaluateRequest(
        model=g.ref("model"),
        x_test=g.ref("x_test"),
        y_test=g.ref("y_test"),
        minimums=g.str_map(METRIC_NAMES, threshold),
        maximums=g.str_map(METRIC_NAMES, threshold),
        class_names=class_names,
        force_recompute=g.chance(0.02),
        profile=g.ref("profile") if g.chance(0.5) else None,
        split_report=g.ref("split_report") if g.chance(0.5) else None,
        feature_schema=g.ref("feature_schema") if g.chance(0.5) else None,
    )


def gen_register(g: Gen) -> evaluator_pb2.RegisterModelRequest:
    r = g.r
    name = g.pick(
        [f"iris-fuzz-{r.randint(0, 20)}", "iris.model_v1", "a" * 128, "Z"],
        [g.text(), "a/b", "..", ".", "-x", "a" * 129, "a" * 300, "名前", "x\x00y", ""],
        0.7,
    )
    lineage = {}
    for _ in range(r.choice([0, 0, 1, 3, 10])):
        key = r.choice(["dataset", "train", "model", "x_train"]) if g.chance(0.6) else g.text()
        ref = g.ref(r.choice(sorted(g.refs)))
        lineage[key] = ref if ref is not None else ArtifactRef()
    return evaluator_pb2.RegisterModelRequest(
        name=name,
        model=g.ref(r.choice(["model", "model", "model", "csv_model"])),
        metrics_report=g.ref(r.choice(["metrics_report", "metrics_report", "metrics_report", "csv_metrics_report"])),
        lineage=lineage,
    )


def operation_name(g: Gen) -> str:
    return g.pick(
        [f"operations/train-{g.hex64()}", f"operations/train-{'0' * 64}"],
        [
            g.text(),
            "",
            "operations/",
            f"operations/load-{g.hex64()}",
            f"operations/train-{g.hex64().upper()}",
            f"operations/train-{g.hex64()}/x",
            f"../operations/train-{g.hex64()}",
        ],
        p_usual=0.5,
    )


def gen_get(g: Gen) -> operations_proto_pb2.GetOperationRequest:
    return operations_proto_pb2.GetOperationRequest(name=operation_name(g))


def gen_wait(g: Gen) -> operations_proto_pb2.WaitOperationRequest:
    request = operations_proto_pb2.WaitOperationRequest(name=operation_name(g))
    if g.chance(0.7):
        request.timeout.seconds = g.pick([0, 1, 5], [-1, -(2**40), 2**40, 315_576_000_000])
        request.timeout.nanos = g.pick([0, 500_000_000], [-1, 999_999_999, 2**31 - 1, -(2**31)])
    return request


def gen_list(g: Gen) -> operations_proto_pb2.ListOperationsRequest:
    return operations_proto_pb2.ListOperationsRequest(
        name=g.pick(["", "operations"], [g.text()]),
        filter=g.pick(["", "done=false", "done=true"], [g.text(), "done=maybe"]),
        page_size=g.pick([0, 1, 10, 100], [g.int32()]),
        page_token=g.pick(["", "0", "1"], [g.text(), "-1", "99999999999999999999"]),
    )


def gen_watch(g: Gen) -> progress_pb2.WatchCallRequest:
    # A well-formed id of no call waits a few seconds for it (then NOT_FOUND): keep those rare.
    well_formed = "".join(g.r.choice("abcdef0123456789-_") for _ in range(g.r.randint(8, 64)))
    return progress_pb2.WatchCallRequest(call_id=g.pick([well_formed], [g.text(), "", "a" * 65, "short"], p_usual=0.03))


def gen_cancel(g: Gen) -> operations_proto_pb2.CancelOperationRequest:
    return operations_proto_pb2.CancelOperationRequest(name=operation_name(g))


def gen_delete(g: Gen) -> operations_proto_pb2.DeleteOperationRequest:
    return operations_proto_pb2.DeleteOperationRequest(name=operation_name(g))


GENERATORS = {
    "Load": gen_load,
    "Preprocess": gen_preprocess,
    "BuildFeatures": gen_features,
    "Train": gen_train,
    "Evaluate": gen_evaluate,
    "RegisterModel": gen_register,
    "StartTraining": gen_train,
    "GetOperation": gen_get,
    "WaitOperation": gen_wait,
    "ListOperations": gen_list,
    "CancelOperation": gen_cancel,
    "DeleteOperation": gen_delete,
    "WatchCall": gen_watch,
}


def raw_bodies(r: random.Random, valid: bytes) -> list[bytes]:
    bodies = [
        b"\xff",
        b"\x0a",
        b"\x0a\xff\xff\xff\xff\x0f",
        b"\x08" + b"\xff" * 11,
        b"\x0a\x05ab",
        b"\x12\x80\x80\x80\x80\x10",
        b"\x07",
        b"\x00" * 8,
        b"\xfa\xff\xff\xff\x0f\x00",
    ]
    while len(bodies) < RAW_PER_METHOD:
        kind = r.randrange(4)
        if kind == 0:
            bodies.append(bytes(r.getrandbits(8) for _ in range(r.randint(1, 64))))
        elif kind == 1 and valid:  # a valid request with bytes flipped or cut
            data = bytearray(valid)
            for _ in range(r.randint(1, 4)):
                data[r.randrange(len(data))] = r.getrandbits(8)
            bodies.append(bytes(data[: r.randint(1, len(data))]))
        elif kind == 2:
            bodies.append(bytes(r.getrandbits(8) for _ in range(r.randint(1000, 20_000))))
        else:  # a length-delimited field that claims more bytes than follow
            bodies.append(bytes([r.choice([0x0A, 0x12, 0x1A, 0x22, 0x2A])]) + b"\xff\xff\x03" + b"x" * r.randint(0, 10))
    return bodies


# ---- the run ---------------------------------------------------------------------------------
def _small_csv(path: Path) -> None:
    rows = ["num,cat,flag,when,label,row_id"]
    rnd = random.Random(7)
    for i in range(60):
        num = "" if i % 11 == 0 else f"{rnd.uniform(-5, 5):.3f}"
        rows.append(
            f"{num},{rnd.choice('abc')},{rnd.choice(['yes', 'no'])},2024-01-{1 + i % 28:02d},"
            f"{rnd.choice(['x', 'y'])},{i}"
        )
    path.write_text("\n".join(rows) + "\n")


async def _pipeline(client: MeshClient, source: str, target: str, prefix: str) -> dict[str, ArtifactRef]:
    run = await client.run_pipeline(PipelineConfig(source=source, target_column=target, minimums={"accuracy": 0.0}))
    refs = {
        "dataset": run.load.dataset,
        "schema": run.load.schema,
        "profile": run.load.profile,
        "train": run.preprocess.train,
        "test": run.preprocess.test,
        "split_report": run.preprocess.split_report,
        "x_train": run.features.x_train,
        "y_train": run.features.y_train,
        "x_test": run.features.x_test,
        "y_test": run.features.y_test,
        "transformer": run.features.transformer,
        "feature_schema": run.features.feature_schema,
        "model": run.train.model,
        "metrics_report": run.evaluate.metrics_report,
        "html_report": run.evaluate.html_report,
    }
    return {prefix + k: v for k, v in refs.items()}


def _check(rpc: str, case: Case, code: grpc.StatusCode, details: str, problems: list[str]) -> None:
    shown = repr(case.request)[:300] if isinstance(case.request, bytes) else str(case.request)[:300]
    if code in FORBIDDEN:
        problems.append(f"{rpc}: {code.name}: {details[:300]!r} for {shown!r}")
    if code == grpc.StatusCode.DATA_LOSS and not case.data_loss_ok:
        problems.append(f"{rpc}: DATA_LOSS without a digest mismatch: {details[:300]!r} for {shown!r}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        problems.append(f"{rpc}: DEADLINE_EXCEEDED for {shown!r}")
    if len(details.encode()) > MAX_DETAIL_BYTES:
        problems.append(f"{rpc}: {code.name} message of {len(details.encode())} bytes: {details[:200]!r}...")
    for text in case.long_inputs:
        if len(text) >= LONG and text[:LONG] in details:
            problems.append(f"{rpc}: {code.name} message echoes a {len(text)}-char input")


async def _call(channel: grpc.aio.Channel, path: str, streaming: bool, body: Any) -> tuple[grpc.StatusCode, str]:
    """Send one request (a message, or raw bytes) and return its final status and message."""
    serializer = None if isinstance(body, bytes) else type(body).SerializeToString
    try:
        if streaming:
            call = channel.unary_stream(path, request_serializer=serializer, response_deserializer=None)
            async for _ in call(body, timeout=CALL_TIMEOUT):
                pass
        else:
            call = channel.unary_unary(path, request_serializer=serializer, response_deserializer=None)
            await call(body, timeout=CALL_TIMEOUT)
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.asyncio
@pytest.mark.timeout(240)
@pytest.mark.slow  # thousands of generated requests to every RPC
async def test_fuzz_every_rpc(settings, mesh: dict[str, RunningStage], client: MeshClient, tmp_path: Path) -> None:
    csv_path = tmp_path / "small.csv"
    _small_csv(csv_path)
    refs = await _pipeline(client, "sklearn:iris", "", "")
    refs |= await _pipeline(client, str(csv_path), "label", "csv_")
    (tmp_path / "data.parquet").write_bytes(b"PAR1 not really")  # a file the loader cannot parse

    root = Path(settings.artifact_root)
    cases: dict[str, list[Case]] = {}
    for index, (rpc, generate) in enumerate(GENERATORS.items()):
        g = Gen(SEED + index, refs, root, csv_path)
        batch = []
        for _ in range(PER_RPC):
            g.start()
            batch.append(g.case(generate(g)))
        valid = batch[0].request.SerializeToString()
        batch += [Case(body) for body in raw_bodies(random.Random(SEED - index), valid)]
        cases[rpc] = batch

    counts: dict[str, collections.Counter] = {rpc: collections.Counter() for rpc in METHODS}
    problems: list[str] = []
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(rpc: str, case: Case) -> None:
        stage, path, streaming = METHODS[rpc]
        async with gate:
            code, details = await _call(client.channel(stage), path, streaming, case.request)
        kind = "raw" if isinstance(case.request, bytes) else "msg"
        counts[rpc][f"{kind}:{code.name}"] += 1
        _check(rpc, case, code, details, problems)

    await asyncio.gather(*(one(rpc, case) for rpc, batch in cases.items() for case in batch))

    print("\nfuzz status codes per RPC (msg = generated request, raw = raw body):")
    for rpc, counter in counts.items():
        print(f"  {rpc:14s} " + ", ".join(f"{code}={n}" for code, n in sorted(counter.items())))

    # StartTraining answers at once; a fit's own failure is its operation's error. None may be a bug.
    trainer = mesh["trainer"].runtime.operations
    for operation in trainer.in_flight():
        await trainer.wait_done(operation, CALL_TIMEOUT)
    failed = [op.to_proto() for op in trainer.listed()]
    for operation in failed:
        code = next((c for c in grpc.StatusCode if c.value[0] == operation.error.code), grpc.StatusCode.UNKNOWN)
        if operation.HasField("error") and (
            code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
            or len(operation.error.message.encode()) > MAX_DETAIL_BYTES
        ):
            problems.append(
                f"StartTraining: operation {operation.name} ended {code.name}: {operation.error.message[:300]!r}"
            )
    assert len(failed) >= 20, "StartTraining started too few fits to judge their outcomes"

    for name in STAGES:
        async with grpc.aio.insecure_channel(mesh[name].address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, f"{name} is not SERVING after the fuzz"

    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:40])
    assert all(sum(c.values()) >= PER_RPC for c in counts.values())
