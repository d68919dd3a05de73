"""Artifact encodings: deterministic bytes, safe model loading, metadata that survives."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import skops.io as sio
from sklearn.datasets import load_diabetes, load_iris
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier, RandomForestRegressor
from sklearn.feature_selection import SelectKBest, f_classif, f_regression
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, PolynomialFeatures, StandardScaler

from services.features.logic import FeatureOptions, engineer
from services.runtime.errors import DataLoss, FailedPrecondition
from services.runtime.formats import (
    array_to_npy,
    frame_to_parquet,
    json_bytes_to_doc,
    model_to_skops,
    npy_to_array,
    read_table,
    skops_to_model,
    to_json_bytes,
    write_npy,
    write_table,
)

REPO = Path(__file__).resolve().parents[1]

# Fits a small forest and a pipeline and prints the digest of their skops encodings.
_DIGEST_SCRIPT = """
import hashlib
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.feature_selection import SelectKBest, f_classif
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from services.runtime.formats import model_to_skops

x, y = load_iris(return_X_y=True)
forest = RandomForestClassifier(n_estimators=5, random_state=0).fit(x, y)
pipeline = Pipeline([("scale", StandardScaler()), ("select", SelectKBest(f_classif, k=2))]).fit(x, y)
print(hashlib.sha256(model_to_skops(forest)).hexdigest(), hashlib.sha256(model_to_skops(pipeline)).hexdigest())
"""


def _iris() -> tuple[np.ndarray, np.ndarray]:
    return load_iris(return_X_y=True)


def _forest() -> RandomForestClassifier:
    x, y = _iris()
    return RandomForestClassifier(n_estimators=5, random_state=0).fit(x, y)


def _pipeline() -> Pipeline:
    x, y = _iris()
    return Pipeline([("scale", StandardScaler()), ("select", SelectKBest(f_classif, k=2))]).fit(x, y)


def custom_double(x):
    return x * 2


class Custom:
    def __init__(self) -> None:
        self.weights = np.arange(3.0)


# ---- skops: determinism ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        _forest,
        _pipeline,
        lambda: LogisticRegression(max_iter=500).fit(*_iris()),
        lambda: HistGradientBoostingClassifier(max_iter=5, random_state=0).fit(*_iris()),
    ],
    ids=["forest", "pipeline", "logistic", "hist_gradient_boosting"],
)
def test_equal_models_give_identical_bytes(make) -> None:
    first, second = make(), make()
    assert first is not second
    assert model_to_skops(first) == model_to_skops(second)


def test_different_models_give_different_bytes() -> None:
    x, y = _iris()
    a = RandomForestClassifier(n_estimators=5, random_state=0).fit(x, y)
    b = RandomForestClassifier(n_estimators=5, random_state=1).fit(x, y)
    assert model_to_skops(a) != model_to_skops(b)


def test_skops_zip_has_no_timestamps_or_object_ids() -> None:
    data = model_to_skops(_forest())
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
        names = [info.filename for info in infos]
        assert names == sorted(names) and "schema.json" in names
        assert all(info.date_time == (1980, 1, 1, 0, 0, 0) for info in infos)
        ids = sorted(int(n.removesuffix(".npy")) for n in names if n.endswith(".npy"))
        assert ids and max(ids) < 10_000, "array entries still carry id()-based names"


@pytest.mark.slow  # two Python processes that import scikit-learn
def test_skops_bytes_match_across_processes() -> None:
    in_process = " ".join(hashlib.sha256(model_to_skops(m)).hexdigest() for m in (_forest(), _pipeline()))
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _DIGEST_SCRIPT],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        for seed in ("1", "2")
    ]
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        outputs.append(out.strip())
    assert outputs[0] == outputs[1] == in_process


# ---- skops: safe loading ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        _forest,
        _pipeline,
        lambda: HistGradientBoostingClassifier(max_iter=5, random_state=0).fit(*_iris()),
        lambda: RandomForestRegressor(n_estimators=3, random_state=0).fit(*load_diabetes(return_X_y=True)),
        lambda: Pipeline([("poly", PolynomialFeatures(2)), ("select", SelectKBest(f_regression, k=3))]).fit(
            *load_diabetes(return_X_y=True)
        ),
    ],
    ids=["forest", "pipeline", "hist_gradient_boosting", "forest_regressor", "f_regression"],
)
def test_stage_models_round_trip(make) -> None:
    model = make()
    loaded = skops_to_model(model_to_skops(model), "model")
    assert type(loaded) is type(model)
    x = load_diabetes(return_X_y=True)[0] if "regress" in repr(model).lower() else _iris()[0]
    if hasattr(model, "predict"):
        np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    else:
        np.testing.assert_array_equal(loaded.transform(x), model.transform(x))


def _features_frames(task: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.RandomState(0)
    rows = 120
    when = pd.Series(pd.date_range("2024-01-01 06:00", periods=rows, freq="11h")).astype("datetime64[us]")
    when[::13] = pd.NaT
    frame = pd.DataFrame(
        {
            "size": rng.normal(size=rows),
            "colour": pd.Series(rng.choice(["red", "green", "blue"], rows), dtype="str"),
            "city": pd.Series([f"c{i}" for i in rng.randint(0, 40, rows)], dtype="str"),
            "when": when,
            "y": rng.randint(0, 3, rows) if task == "classification" else rng.normal(size=rows),
        }
    )
    return frame.iloc[:90].reset_index(drop=True), frame.iloc[90:].reset_index(drop=True)


@pytest.mark.parametrize(
    ("task", "options"),
    [
        ("classification", {"max_one_hot_levels": 10}),  # one-hot colour, target-encoded city (stratified folds)
        ("regression", {"max_one_hot_levels": 10, "polynomial_degree": 2, "select_k_best": 6}),  # KFold
        ("classification", {"categorical_encoding": "ordinal", "missing_indicators": True}),
    ],
    ids=["one_hot_and_target", "regression_polynomial_select", "ordinal"],
)
def test_features_transformers_round_trip_deterministically(task: str, options: dict) -> None:
    train, test = _features_frames(task)
    roles = {"size": "numeric", "colour": "categorical", "city": "categorical", "when": "datetime"}
    classes = ["0", "1", "2"] if task == "classification" else []
    result = engineer(train, test, "y", task, roles, classes, FeatureOptions(**options), 2**31)
    data = model_to_skops(result.transformer)
    assert data == model_to_skops(
        engineer(train, test, "y", task, roles, classes, FeatureOptions(**options), 2**31).transformer
    )
    loaded = skops_to_model(data, "transformer")
    np.testing.assert_array_equal(loaded.transform(test.drop(columns="y")), result.x_test)
    assert list(loaded.get_feature_names_out()) == result.feature_names


def test_hist_gradient_boosting_with_categorical_features_round_trips() -> None:
    x, y = _iris()
    codes = np.column_stack([x, (x[:, 0] * 2).astype(int) % 5])
    model = HistGradientBoostingClassifier(max_iter=5, random_state=0, categorical_features=[False] * 4 + [True])
    model.fit(pd.DataFrame(codes, columns=["a", "b", "c", "d", "code"]), y)
    loaded = skops_to_model(model_to_skops(model), "model")
    frame = pd.DataFrame(codes, columns=["a", "b", "c", "d", "code"])
    np.testing.assert_array_equal(loaded.predict(frame), model.predict(frame))
    assert loaded.is_categorical_.tolist() == [False] * 4 + [True]


@pytest.mark.parametrize(
    ("make", "type_name"),
    [
        (lambda: FunctionTransformer(func=custom_double).fit(np.ones((3, 2))), "custom_double"),
        (Custom, "Custom"),
        (lambda: {"payload": Custom()}, "Custom"),
    ],
    ids=["function_transformer", "custom_class", "nested_custom_class"],
)
def test_untrusted_types_are_refused(make, type_name: str) -> None:
    data = sio.dumps(make())
    untrusted = sio.get_untrusted_types(data=data)
    assert any(name.endswith(f".{type_name}") for name in untrusted), untrusted
    with pytest.raises(DataLoss) as caught:
        skops_to_model(data, "model")
    message = str(caught.value)
    assert "model" in message and "allow-list" in message and "not loaded" in message
    for name in untrusted:
        assert name in message


def test_a_tampered_model_file_is_refused_before_any_code_runs() -> None:
    """Swap a trusted estimator's type for a custom one inside a valid skops file."""
    original = model_to_skops(LogisticRegression(max_iter=1000).fit(*_iris()))
    with zipfile.ZipFile(io.BytesIO(original)) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    schema = json.loads(entries["schema.json"])
    schema["__module__"], schema["__class__"] = "os", "system"
    entries["schema.json"] = json.dumps(schema).encode()
    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w") as archive:
        for name, body in entries.items():
            archive.writestr(name, body)
    with pytest.raises(DataLoss, match=r"os\.system"):
        skops_to_model(sink.getvalue(), "model")


@pytest.mark.parametrize("data", [b"", b"not a zip at all", b"PK\x03\x04broken"])
def test_unreadable_skops_is_the_wrong_artifact(data: bytes) -> None:
    with pytest.raises(FailedPrecondition, match=r"transformer is not a readable .skops file"):
        skops_to_model(data, "transformer")


# ---- tables ----------------------------------------------------------------------------------
def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "sepal length": [5.1, 4.9, np.nan],
            "count": np.array([1, 2, 3], dtype="int64"),
            "label": ["setosa", "versicolor", "virginica"],
            "flag": [True, False, True],
        }
    )


def _arrow(frame: pd.DataFrame, metadata: dict, compress: bool = False) -> bytes:
    sink = io.BytesIO()
    write_table(sink, frame, metadata, compress)
    return sink.getvalue()


@pytest.mark.parametrize("compress", [False, True], ids=["local", "object-store"])
def test_arrow_round_trip_keeps_frame_and_metadata(compress: bool) -> None:
    metadata = {"target_column": "label", "task_kind": "classification", "class_names": ["a", "b"], "nested": {"x": 1}}
    data = _arrow(_frame(), metadata, compress)
    assert data.startswith(b"ARROW1")
    frame, meta = read_table(data, "dataset")
    pd.testing.assert_frame_equal(frame, _frame())
    assert meta == metadata


@pytest.mark.slow  # 300,000 rows written and read three times
def test_arrow_tables_span_batches_with_stable_types_and_bytes() -> None:
    """More rows than one record batch: a column whose first batch is all missing keeps the
    type the whole column has, categories survive, and equal frames give equal bytes."""
    rows = 300_000
    frame = pd.DataFrame(
        {
            "x": np.arange(rows, dtype="float64"),
            "late_text": [None] * 200_000 + ["a"] * 100_000,
            "level": pd.Categorical(np.where(np.arange(rows) % 3 == 0, "red", "blue")),
        }
    )
    data = _arrow(frame, {"k": 1})
    back, _ = read_table(data, "train")
    pd.testing.assert_frame_equal(back, frame)
    assert data == _arrow(frame.copy(), {"k": 1})
    compressed = _arrow(frame, {"k": 1}, compress=True)
    assert len(compressed) < len(data) / 2
    pd.testing.assert_frame_equal(read_table(compressed, "train")[0], frame)


def test_arrow_bytes_are_deterministic_and_metadata_canonical() -> None:
    metadata = {"b": 1, "a": 2}
    assert _arrow(_frame(), metadata) == _arrow(_frame().copy(), dict(reversed(metadata.items())))


def test_an_empty_frame_round_trips() -> None:
    frame, _ = read_table(_arrow(_frame().iloc[:0], {}), "test")
    assert list(frame.columns) == list(_frame().columns) and len(frame) == 0


def test_parquet_of_earlier_versions_still_reads() -> None:
    metadata = {"target_column": "label"}
    frame, meta = read_table(frame_to_parquet(_frame(), metadata), "dataset")
    pd.testing.assert_frame_equal(frame, _frame())
    assert meta == metadata
    sink = io.BytesIO()
    _frame().to_parquet(sink, index=False)  # a table without our metadata
    frame, meta = read_table(sink.getvalue(), "dataset")
    assert meta == {} and list(frame.columns) == list(_frame().columns)


@pytest.mark.parametrize(
    "data",
    [b"", b"PAR1 definitely not parquet PAR1", b"ARROW1\x00\x00 cut short", b"{}"],
    ids=["empty", "bad-parquet", "bad-arrow", "json"],
)
def test_unreadable_table_is_the_wrong_artifact(data: bytes) -> None:
    with pytest.raises(FailedPrecondition, match="dataset is not a readable table"):
        read_table(data, "dataset")


def test_table_metadata_that_is_not_an_object_is_the_wrong_artifact() -> None:
    import pyarrow as pa

    table = pa.table({"a": [1.0]}).replace_schema_metadata({b"mlmesh": b"[1, 2]"})
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(FailedPrecondition, match="readable metadata"):
        read_table(sink.getvalue(), "train")


# ---- NumPy and JSON ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float64).reshape(3, 4),
        np.array([0, 1, 2], dtype=np.int64),
        np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        np.arange(10.0)[::2],
    ],
    ids=["matrix", "labels", "fortran", "strided"],
)
def test_npy_round_trip_and_determinism(array: np.ndarray) -> None:
    data = array_to_npy(array)
    assert data == array_to_npy(array.copy())
    back = npy_to_array(data, "x_train")
    np.testing.assert_array_equal(back, array)
    assert back.dtype == array.dtype and back.flags.c_contiguous
    # Read in place: the array is a read-only view of the (mapped) bytes, not a copy.
    assert not back.flags.writeable and not back.flags.owndata


def test_npy_streamed_in_chunks_is_the_same_file() -> None:
    """write_npy writes a large array in numpy's chunks into any sink; the bytes equal np.save's."""
    array = np.random.default_rng(0).standard_normal((3_000, 1_000))  # 24 MB: two chunks
    pieces: list[bytes] = []

    class Sink:
        def write(self, chunk: bytes) -> int:
            pieces.append(bytes(chunk))
            return len(chunk)

    write_npy(Sink(), array)
    reference = io.BytesIO()
    np.save(reference, array, allow_pickle=False)
    assert len(pieces) > 2 and b"".join(pieces) == reference.getvalue()


@pytest.mark.parametrize(
    "cut",
    [lambda d: d[:-8], lambda d: d + b"\x00" * 8, lambda d: d[:40]],
    ids=["short-body", "long-body", "header-only"],
)
def test_npy_whose_body_does_not_fit_its_header_is_refused(cut) -> None:
    data = array_to_npy(np.arange(12.0).reshape(3, 4))
    with pytest.raises(FailedPrecondition, match=r"x_train is not a readable .npy array"):
        npy_to_array(cut(data), "x_train")


def test_npy_with_pickled_objects_is_refused() -> None:
    sink = io.BytesIO()
    np.save(sink, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(FailedPrecondition, match=r"x_test is not a readable .npy array"):
        npy_to_array(sink.getvalue(), "x_test")
    with pytest.raises(FailedPrecondition, match="pass the x_test ref its stage returned"):
        npy_to_array(b"garbage", "x_test")


def test_json_bytes_are_canonical_and_checked() -> None:
    assert to_json_bytes({"b": 1, "a": [1, 2]}) == to_json_bytes({"a": [1, 2], "b": 1})
    assert to_json_bytes({"b": 1}).endswith(b"\n")
    assert json_bytes_to_doc(to_json_bytes({"a": 1}), "report") == {"a": 1}
    with pytest.raises(FailedPrecondition, match="metrics_report is not a readable JSON document"):
        json_bytes_to_doc(b"{nope", "metrics_report")
