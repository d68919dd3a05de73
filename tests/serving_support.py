"""What the serving tests share: the mixed table, the models they train, requests built from a
stored test split, the evaluator's own predictions to compare with, and the third-party clients.

The expected values are computed here the way the evaluator computed them, from the artifacts
the registry entry names in its lineage (x_test, the model, the feature schema); the values to
check come over gRPC, from requests built out of the stored test split (the loader's canonical
columns: float64 numbers and booleans, text levels with NaN for missing, naive-UTC datetimes).

tritonclient needs protobuf<7 and mlmesh protobuf 7, so tritonclient never runs in the pytest
process: tests/clients/*.py run in .venv-clients, and talk to the tests in JSON files.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlmesh.serving.v2 import open_inference_pb2 as pb
from services.runtime import formats
from services.runtime.store import ArtifactStore, ref_from_dict

REPO = Path(__file__).resolve().parents[1]
CLIENTS_PYTHON = REPO / ".venv-clients" / "bin" / "python"
CLIENTS = REPO / "tests" / "clients"
GRPCURL = Path(sys.executable).parent / "grpcurl"
MAX_DETAIL_BYTES = 1024  # every refusal's message, as tests/test_fuzz.py holds every stage to

# ---- the mixed table ------------------------------------------------------------------------
CITIES = [f"city{i:02d}" for i in range(40)]  # more levels than one-hot takes: a target-encoded column


def write_mixed_csv(path: Path, rows: int = 160, seed: int = 3) -> Path:
    """A small table with every kind of feature column, missing values, and an identifier:

    num    float, some missing          count  whole numbers 0-9 (INT64 in the metadata)
    cat    3 levels, some missing       city   40 levels (target-encoded)
    flag   true/false                   when   ISO 8601 datetimes with a zone
    label  yes/no (classification)      score  a number (regression target)
    row_id a key (an identifier: accepted in a request, never used)
    """
    rnd = random.Random(seed)
    lines = ["num,count,cat,city,flag,when,label,score,row_id"]
    for i in range(rows):
        num = rnd.gauss(0, 2)
        cat = rnd.choice(["red", "green", "blue"])
        city = rnd.choice(CITIES)
        flag = rnd.random() < 0.5
        count = rnd.randint(0, 9)
        signal = num + (1.5 if cat == "red" else 0) - (1 if flag else 0) + int(city[-2:]) / 40 + rnd.gauss(0, 0.8)
        score = 3 * num + count - 2 * flag + (cat == "blue") * 4 + rnd.gauss(0, 1)
        num_text = "" if i % 13 == 0 else f"{num:.4f}"
        cat_text = "" if i % 11 == 0 else cat
        when = f"2024-{1 + i % 12:02d}-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:00Z"
        lines.append(
            f"{num_text},{count},{cat_text},{city},{'true' if flag else 'false'},{when},"
            f"{'yes' if signal > 0.5 else 'no'},{score:.4f},{10_000 + i}"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- a registered model and its test split ---------------------------------------------------
@dataclass
class Trained:
    """One registered model version, the test split it was evaluated on, and what the evaluator predicted."""

    name: str
    version: int
    task: str  # classification or regression
    kind: str  # tree or linear: how exact a prediction in another batch must be (see assert_outputs_match)
    test: pd.DataFrame  # the stored test split: canonical feature columns and the target
    inputs: list[tuple[str, str]]  # (name, datatype) as ModelMetadata lists them
    predicted: np.ndarray  # class names (object) or values (float64), one per test row
    probabilities: np.ndarray | None  # [rows, classes], or None
    classes: list[str]
    model_sha256: str
    entry: dict[str, Any] = field(repr=False, default_factory=dict)
    # Test rows whose every level was seen in training: a request without unseen_levels=encode takes them.
    seen_rows: list[int] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.test)

    @property
    def has_levels(self) -> bool:
        """It takes a categorical column (BYTES that is not a datetime)."""
        return any(
            datatype == "BYTES" and not pd.api.types.is_datetime64_any_dtype(self.test[name])
            for name, datatype in self.inputs
        )


def registry_entry(root: Path, name: str, version: int) -> dict[str, Any]:
    document = json.loads((root / "registry" / f"{name}.json").read_text())
    return document["versions"][version - 1]


def _artifact(store: ArtifactStore, ref: dict[str, Any], what: str) -> bytes:
    return store.get(ref_from_dict(ref), what)


def evaluator_predictions(store: ArtifactStore, entry: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None, list]:
    """What the evaluator computed for this version's test split: services/evaluator/logic.py's
    evaluate(), `model.predict(pd.DataFrame(x_test, columns=model.feature_names_in_, copy=False))`
    (x_test as is when the model has no feature names), and predict_proba on the same x."""
    lineage = entry["lineage"]
    model = formats.skops_to_model(_artifact(store, entry["model"], "model"), "model")
    x_test = formats.npy_to_array(_artifact(store, lineage["x_test"], "x_test"), "x_test")
    names = getattr(model, "feature_names_in_", None)
    x: Any = x_test if names is None else pd.DataFrame(x_test, columns=[str(n) for n in names], copy=False)
    predicted = model.predict(x)
    schema = json.loads(_artifact(store, lineage["feature_schema"], "feature_schema"))
    if schema["task_kind"] != "classification":
        return np.asarray(predicted, dtype="float64"), None, []
    class_names = np.asarray(schema["class_names"], dtype=object)
    probabilities = np.asarray(model.predict_proba(x), dtype="float64") if hasattr(model, "predict_proba") else None
    classes = [str(class_names[int(code)]) for code in model.classes_]
    return class_names[np.asarray(predicted, dtype="int64")], probabilities, classes


def trained(store: ArtifactStore, root: Path, name: str, version: int, kind: str, metadata: Any) -> Trained:
    entry = registry_entry(root, name, version)
    test, meta = formats.read_table(_artifact(store, entry["lineage"]["test"], "test"), "test")
    predicted, probabilities, classes = evaluator_predictions(store, entry)
    train, _ = formats.read_table(_artifact(store, entry["lineage"]["train"], "train"), "train")
    seen = np.ones(len(test), dtype=bool)
    for tensor in metadata.inputs:
        column = test[tensor.name]
        if tensor.datatype == "BYTES" and not pd.api.types.is_datetime64_any_dtype(column):
            seen &= (column.isna() | column.isin(set(train[tensor.name].dropna()))).to_numpy()
    return Trained(
        name=name,
        version=version,
        task=meta["task_kind"],
        kind=kind,
        test=test,
        inputs=[(tensor.name, tensor.datatype) for tensor in metadata.inputs],
        predicted=predicted,
        probabilities=probabilities,
        classes=classes,
        model_sha256=entry["model"]["sha256"],
        entry=entry,
        seen_rows=[int(row) for row in np.flatnonzero(seen)],
    )


# ---- requests from a test split ----------------------------------------------------------------
def _is_missing(value: Any) -> bool:
    return value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and math.isnan(value))


def column_values(series: pd.Series, datatype: str) -> list[Any]:
    """A test-split column as the values of one tensor of `datatype`: numbers as they are (NaN
    for missing), BOOL as True/False, BYTES as UTF-8 text ("" for missing, ISO 8601 for datetimes)."""
    if datatype == "BYTES":
        if pd.api.types.is_datetime64_any_dtype(series):
            return [b"" if pd.isna(v) else pd.Timestamp(v).isoformat().encode() for v in series]
        return [b"" if _is_missing(v) else str(v).encode() for v in series.tolist()]
    if datatype == "BOOL":
        return [bool(v) for v in series.tolist()]
    if datatype in ("INT64", "INT32"):
        return [int(v) for v in series.tolist()]
    return [float(v) for v in series.astype("float64").tolist()]


def datatype_for(series: pd.Series, advertised: str, style: str = "advertised") -> str:
    """The datatype a request sends a column as. "advertised": ModelMetadata's, unless the column
    has missing values that type cannot carry (INT64, BOOL: then FP64 with NaN). "fp64": every
    number and boolean as FP64."""
    if advertised in ("INT64", "BOOL") and (style == "fp64" or series.isna().any()):
        return "FP64"
    return advertised


CONTENTS = {"FP64": "fp64_contents", "INT64": "int64_contents", "BOOL": "bool_contents", "BYTES": "bytes_contents"}
RAW_DTYPES = {"FP64": "<f8", "INT64": "<i8", "BOOL": "?"}


def raw_bytes(values: list[Any], datatype: str) -> bytes:
    """One input's raw_input_contents: little-endian numbers, or BYTES as a 4-byte length then the bytes."""
    if datatype == "BYTES":
        return b"".join(len(v).to_bytes(4, "little") + v for v in values)
    return np.asarray(values, dtype=RAW_DTYPES[datatype]).tobytes()


def request_for(
    model: Trained,
    rows: Any = None,
    *,
    raw: bool = False,
    style: str = "advertised",
    extra: dict[str, pd.Series] | None = None,
    version: str = "",
    encode: bool | None = None,
) -> pb.ModelInferRequest:
    """A ModelInfer request for `rows` (positions) of the model's test split, one tensor per input.

    A test split may hold levels training never saw (a rare city); the evaluator's transformer
    encoded them as its encoders do, which a request asks for with unseen_levels=encode: sent
    (unless `encode` says otherwise) whenever the model takes a categorical column."""
    frame = model.test if rows is None else model.test.iloc[list(rows)]
    request = pb.ModelInferRequest(model_name=model.name, model_version=version)
    if encode is None:
        encode = model.has_levels
    if encode:
        request.parameters["unseen_levels"].string_param = "encode"
    columns = [(name, frame[name], advertised) for name, advertised in model.inputs]
    for name, series in (extra or {}).items():
        columns.append((name, series, "BYTES" if series.dtype == object else "FP64"))
    for name, series, advertised in columns:
        datatype = datatype_for(series, advertised, style)
        values = column_values(series, datatype)
        tensor = request.inputs.add(name=name, datatype=datatype, shape=[len(values)])
        if raw:
            request.raw_input_contents.append(raw_bytes(values, datatype))
        else:
            getattr(tensor.contents, CONTENTS[datatype]).extend(values)
    return request


def decode_response(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Every output of a response, typed or raw, as numpy arrays in their shapes."""
    out: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(response.outputs):
        shape = list(tensor.shape)
        if response.raw_output_contents:
            data = response.raw_output_contents[index]
            if tensor.datatype == "BYTES":
                items, offset = [], 0
                while offset < len(data):
                    length = int.from_bytes(data[offset : offset + 4], "little")
                    items.append(data[offset + 4 : offset + 4 + length].decode())
                    offset += 4 + length
                array = np.asarray(items, dtype=object)
            else:
                array = np.frombuffer(data, dtype="<f8")
        elif tensor.datatype == "BYTES":
            array = np.asarray([v.decode() for v in tensor.contents.bytes_contents], dtype=object)
        else:
            array = np.asarray(tensor.contents.fp64_contents, dtype="float64")
        out[tensor.name] = array.reshape(shape)
    return out


# Linear models compute X @ coef with BLAS, whose kernels block and vectorise a product
# differently for different numbers of rows: a row predicted alone, in the whole split or in
# someone else's batch may differ from the evaluator's value in its last bits (a few ulps).
# Trees only compare and average in a fixed order, so theirs are the same bits in any batch.
LINEAR_RELATIVE = 1e-12
PROBABILITY_ABSOLUTE = 1e-12


def assert_outputs_match(model: Trained, outputs: dict[str, np.ndarray], rows: Any, where: str) -> None:
    """The outputs for `rows` of the test split are the evaluator's, value for value."""
    rows = list(rows)
    if model.task == "classification":
        got = outputs["predicted"]
        want = model.predicted[rows]
        assert list(got) == list(want), f"{where}: classes differ at rows {np.flatnonzero(got != want)[:10]}"
        if model.probabilities is not None:
            assert list(outputs["classes"]) == model.classes, where
            got_p, want_p = outputs["probabilities"], model.probabilities[rows]
            assert got_p.shape == want_p.shape, where
            if model.kind == "tree":
                assert np.array_equal(got_p, want_p), f"{where}: probabilities differ by {np.abs(got_p - want_p).max()}"
            else:
                np.testing.assert_allclose(got_p, want_p, rtol=0, atol=PROBABILITY_ABSOLUTE, err_msg=where)
        return
    got, want = outputs["predicted"], model.predicted[rows]
    assert got.dtype == np.float64 and got.shape == want.shape, where
    if model.kind == "tree":
        assert np.array_equal(got, want), f"{where}: values differ by {np.abs(got - want).max()}"
    else:
        np.testing.assert_allclose(got, want, rtol=LINEAR_RELATIVE, atol=0, err_msg=where)


# ---- messages ------------------------------------------------------------------------------
def assert_bounded(details: str, *long_inputs: str) -> None:
    """A refusal's message is short and quotes no long input whole."""
    assert len(details.encode()) <= MAX_DETAIL_BYTES, f"a message of {len(details.encode())} bytes: {details[:200]}"
    for text in long_inputs:
        assert text[:200] not in details, f"the message echoes a {len(text)}-character input"


# ---- subprocesses that must not block the event loop serving the stages ----------------------
async def run_async(*argv: str, timeout: float = 120, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """A subprocess awaited without blocking this loop (in-process stages answer from it meanwhile)."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else None,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return subprocess.CompletedProcess(list(argv), process.returncode or 0, out.decode(), err.decode())


async def grpcurl(
    address: str, *args: str, data: Any = None, headers: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """The real grpcurl over plaintext, with reflection (no .proto files); `data` is sent as JSON."""
    argv = [str(GRPCURL), "-plaintext", "-format-error"]
    for header in headers:
        argv += ["-H", header]
    if data is not None:
        argv += ["-d", json.dumps(data)]
    return await run_async(*argv, address, *args, timeout=60)


async def client_script(script: str, *args: str, timeout: float = 180) -> dict[str, Any]:
    """A tests/clients script run by .venv-clients' Python; it prints one JSON document."""
    result = await run_async(str(CLIENTS_PYTHON), str(CLIENTS / script), *args, timeout=timeout)
    assert result.returncode == 0, (
        f"{script} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return json.loads(result.stdout)


def columns_document(model: Trained, rows: Any = None, style: str = "advertised") -> list[dict[str, Any]]:
    """The columns of `rows` as a client script reads them: name, datatype and JSON values."""
    frame = model.test if rows is None else model.test.iloc[list(rows)]
    document = []
    for name, advertised in model.inputs:
        datatype = datatype_for(frame[name], advertised, style)
        values = column_values(frame[name], datatype)
        if datatype == "BYTES":
            values = [v.decode() for v in values]
        elif datatype == "FP64":
            values = [None if math.isnan(v) else v for v in values]
        document.append({"name": name, "datatype": datatype, "values": values})
    return document
