"""Preprocess stage: cleaning, train-only imputation and the split; then the real service."""

from __future__ import annotations

import io
import math
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
from tests.conftest import expect_error

from mlmesh.common.v1.common_pb2 import ArtifactRef, TaskKind
from mlmesh.loader.v1 import loader_pb2
from mlmesh.preprocess.v1 import preprocess_pb2
from services.preprocess import logic
from services.runtime.client import MeshClient, check_health
from services.runtime.errors import FailedPrecondition
from services.runtime.formats import NPY, PARQUET, array_to_npy, parquet_to_frame
from services.runtime.settings import Settings
from services.runtime.store import ArtifactStore

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
FAILED, DATA_LOSS = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DATA_LOSS


async def assert_serving(mesh) -> None:
    assert await check_health(mesh["preprocess"].address) == "SERVING"


def outlier_frame() -> pd.DataFrame:
    """60 rows whose column `a` has big outliers and gaps, keyed by an `id` feature."""
    n = 60
    ids = np.arange(n, dtype=float)
    a = ids.copy()
    a[::7] = 1000.0 + ids[::7] * 10  # outliers spread over the rows
    a[[3, 11, 20, 34, 47, 58]] = np.nan
    b = (ids % 4).astype(float)  # repeats, for most_frequent
    b[[5, 26, 41]] = np.nan
    return pd.DataFrame({"id": ids, "a": a, "b": b, "y": ids * 0.5 + 1})


def labelled_frame(counts: dict[str, int]) -> pd.DataFrame:
    labels = [label for label, count in counts.items() for _ in range(count)]
    n = len(labels)
    return pd.DataFrame({"id": np.arange(n, dtype=float), "x": np.sin(np.arange(n)), "label": labels})


def run(frame: pd.DataFrame, target: str, task: str, strategy: str = "median", fraction: float = 0.2, seed: int = 0):
    return logic.preprocess(frame, target, task, strategy, fraction, seed)


# ---- counting and cleaning ----------------------------------------------------------------
def test_duplicates_and_rows_without_target_are_counted() -> None:
    frame = pd.DataFrame(
        {
            "a": [1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, np.nan],
            "y": [0.5, 0.5, 1.0, 2.0, 2.0, 2.0, np.nan, np.nan, 3.0, 4.0, 5.0, 6.0],
        }
    )
    prepared = run(frame, "y", "regression")
    assert prepared.rows_in == 12
    assert prepared.incomplete_rows_removed == 2  # the rows with no target
    assert prepared.duplicate_rows_removed == 3  # one copy of (1, .5), two of (3, 2)
    assert len(prepared.train) + len(prepared.test) == 7
    assert prepared.missing_values_imputed == 1
    assert not prepared.train.isna().any().any() and not prepared.test.isna().any().any()
    assert prepared.class_names == []


def test_drop_rows_removes_incomplete_rows_instead_of_imputing() -> None:
    frame = outlier_frame()
    prepared = run(frame, "y", "regression", strategy="drop_rows")
    assert prepared.incomplete_rows_removed == 9  # six gaps in a, three in b, no overlap
    assert prepared.missing_values_imputed == 0
    kept = set(pd.concat([prepared.train, prepared.test])["id"])
    assert kept == set(frame.dropna()["id"])


def test_same_row_with_different_targets_is_not_a_duplicate() -> None:
    frame = pd.DataFrame({"a": [1.0] * 4 + [2.0] * 4, "y": [1.0, 2.0, 1.0, 2.0] * 2})
    prepared = run(frame, "y", "regression", fraction=0.5)
    assert prepared.duplicate_rows_removed == 4
    assert sorted(zip(*[pd.concat([prepared.train, prepared.test])[c] for c in "ay"])) == [
        (1.0, 1.0), (1.0, 2.0), (2.0, 1.0), (2.0, 2.0)
    ]


# ---- imputation is fitted on train only ---------------------------------------------------
@pytest.mark.parametrize("strategy", ["mean", "median"])
def test_imputation_statistics_come_from_train_only(strategy: str) -> None:
    frame = outlier_frame()
    prepared = run(frame, "y", "regression", strategy=strategy, fraction=0.3, seed=3)
    stat = getattr(np, f"nan{strategy}")
    original = frame.set_index("id")
    train_ids, test_ids = prepared.train["id"].to_numpy(), prepared.test["id"].to_numpy()
    train_only = stat(original.loc[train_ids, "a"])
    everything = stat(original["a"])
    assert abs(train_only - everything) > 1.0, "data must make train-only and global statistics differ"

    assert prepared.missing_values_imputed == 9
    for part, ids in ((prepared.train, train_ids), (prepared.test, test_ids)):
        gaps = original.loc[ids, "a"].isna().to_numpy()
        assert gaps.any(), "both splits should hold a gap for this check to mean something"
        np.testing.assert_allclose(part["a"].to_numpy()[gaps], train_only)
        np.testing.assert_allclose(part["a"].to_numpy()[~gaps], original.loc[ids, "a"].to_numpy()[~gaps])


def test_most_frequent_uses_the_train_mode() -> None:
    frame = outlier_frame()
    prepared = run(frame, "y", "regression", strategy="most_frequent", fraction=0.3, seed=4)
    original = frame.set_index("id")

    def mode(values: pd.Series) -> float:
        counts = values.dropna().value_counts()
        return min(counts[counts == counts.max()].index)  # SimpleImputer breaks ties low

    train_mode = mode(original.loc[prepared.train["id"], "b"])
    assert train_mode != mode(original["b"]), "data must make train-only and global modes differ"
    gaps = [5.0, 26.0, 41.0]
    assert set(gaps) & set(prepared.test["id"]), "a test row must have a gap for this check to mean something"
    filled = pd.concat([prepared.train, prepared.test]).set_index("id").loc[gaps, "b"]
    assert (filled == train_mode).all()
    assert prepared.missing_values_imputed == 9


# ---- the split ----------------------------------------------------------------------------
def test_split_is_stratified_and_deterministic() -> None:
    frame = labelled_frame({"a": 60, "b": 30, "c": 10})
    first = run(frame, "label", "classification", seed=7)
    again = run(frame, "label", "classification", seed=7)
    other = run(frame, "label", "classification", seed=8)
    pd.testing.assert_frame_equal(first.train, again.train)
    pd.testing.assert_frame_equal(first.test, again.test)
    assert set(first.test["id"]) != set(other.test["id"])
    assert np.bincount(first.test["label"]).tolist() == [12, 6, 2]
    assert np.bincount(first.train["label"]).tolist() == [48, 24, 8]
    assert np.bincount(other.test["label"]).tolist() == [12, 6, 2]
    assert set(first.train["id"]).isdisjoint(first.test["id"])


def test_regression_split_sizes_follow_test_fraction() -> None:
    prepared = run(outlier_frame(), "y", "regression", fraction=0.25)
    assert (len(prepared.train), len(prepared.test)) == (45, 15)
    assert prepared.train["y"].dtype == np.float64


def test_labels_are_encoded_in_sorted_order() -> None:
    frame = labelled_frame({"dog": 10, "cat": 10, "ant": 10})
    prepared = run(frame, "label", "classification")
    assert prepared.class_names == ["ant", "cat", "dog"]
    original = frame.set_index("id")["label"]
    for part in (prepared.train, prepared.test):
        assert part["label"].dtype == np.int64
        decoded = [prepared.class_names[code] for code in part["label"]]
        assert decoded == original.loc[part["id"]].tolist()


def test_numeric_labels_sort_by_value_not_text() -> None:
    frame = pd.DataFrame({"x": np.arange(30, dtype=float), "y": [10, 2, 33] * 10})
    prepared = run(frame, "y", "classification")
    assert prepared.class_names == ["2", "10", "33"]


def test_unsplittable_data_is_refused() -> None:
    with pytest.raises(FailedPrecondition, match=r"classes \['c'\] have fewer than 2 rows"):
        run(labelled_frame({"a": 10, "b": 10, "c": 1}), "label", "classification")
    with pytest.raises(FailedPrecondition, match="cannot hold all 3 classes"):
        run(labelled_frame({"a": 10, "b": 10, "c": 10}), "label", "classification", fraction=0.05)
    with pytest.raises(FailedPrecondition, match="only 1 usable rows"):
        run(pd.DataFrame({"x": [1.0, 1.0, 2.0], "y": [1.0, 1.0, np.nan]}), "y", "regression")
    with pytest.raises(FailedPrecondition, match="no target column 'y'"):
        run(pd.DataFrame({"x": [1.0, 2.0]}), "y", "regression")


# ---- the real service ---------------------------------------------------------------------
async def load(client: MeshClient, source: str, target: str = "") -> loader_pb2.LoadResponse:
    return await client.load(loader_pb2.LoadRequest(source=source, target_column=target))


def request(dataset: ArtifactRef, **kwargs) -> preprocess_pb2.PreprocessRequest:
    return preprocess_pb2.PreprocessRequest(dataset=dataset, **kwargs)


@pytest.mark.asyncio
async def test_iris_is_split_and_encoded(client: MeshClient, settings: Settings) -> None:
    loaded = await load(client, "sklearn:iris")
    reply = await client.preprocess(request(loaded.dataset, seed=1))  # test_fraction 0 means 0.2
    assert (reply.rows_in, reply.rows_out) == (150, 149)  # iris has one duplicated row
    assert reply.duplicate_rows_removed == 1 and reply.incomplete_rows_removed == 0
    assert (reply.train_rows, reply.test_rows) == (119, 30)
    assert list(reply.class_names) == ["setosa", "versicolor", "virginica"]
    assert reply.task_kind == TaskKind.TASK_KIND_CLASSIFICATION
    store = ArtifactStore(settings.artifact_root)
    train, meta = parquet_to_frame(store.get(reply.train), "train")
    test, test_meta = parquet_to_frame(store.get(reply.test), "test")
    assert meta["class_names"] == ["setosa", "versicolor", "virginica"] and meta == test_meta
    assert meta["target_column"] == "target" and meta["task_kind"] == "classification"
    assert (len(train), len(test)) == (119, 30)
    assert sorted(set(train["target"])) == [0, 1, 2] and train["target"].dtype == np.int64
    assert np.bincount(test["target"]).tolist() == [10, 10, 10]


@pytest.mark.asyncio
async def test_split_is_deterministic_over_the_service(client: MeshClient) -> None:
    loaded = await load(client, "synthetic:classification?rows=300&features=5&classes=3&seed=4")
    first = await client.preprocess(request(loaded.dataset, seed=11, force_recompute=True))
    again = await client.preprocess(request(loaded.dataset, seed=11, force_recompute=True))
    assert not again.stage.cache_hit
    assert (first.train.sha256, first.test.sha256) == (again.train.sha256, again.test.sha256)
    other = await client.preprocess(request(loaded.dataset, seed=12))
    assert other.train.sha256 != first.train.sha256 and other.test.sha256 != first.test.sha256
    cached = await client.preprocess(request(loaded.dataset, seed=11))
    assert cached.stage.cache_hit and cached.train == first.train


@pytest.mark.asyncio
async def test_cleaning_counts_over_the_service(client: MeshClient, settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "gaps.csv"
    path.write_text(
        "a,b,y\n"
        "1,10,1.5\n1,10,1.5\n1,10,1.5\n"  # two duplicates
        "2,,2.5\n3,30,\n4,40,4.5\n,50,5.5\n6,60,6.5\n7,70,7.5\n8,80,8.5\n9,90,9.5\n10,100,10.5\n"
    )
    loaded = await load(client, str(path), "y")
    assert loaded.task_kind == TaskKind.TASK_KIND_REGRESSION
    imputed = await client.preprocess(request(loaded.dataset, impute_strategy=preprocess_pb2.IMPUTE_STRATEGY_MEAN))
    assert (imputed.rows_in, imputed.duplicate_rows_removed, imputed.incomplete_rows_removed) == (12, 2, 1)
    assert imputed.missing_values_imputed == 2 and imputed.rows_out == 9
    assert imputed.train_rows + imputed.test_rows == 9 and imputed.test_rows == 2
    assert list(imputed.class_names) == []
    store = ArtifactStore(settings.artifact_root)
    for ref in (imputed.train, imputed.test):
        assert not parquet_to_frame(store.get(ref), "split")[0].isna().any().any()

    dropped = await client.preprocess(
        request(loaded.dataset, impute_strategy=preprocess_pb2.IMPUTE_STRATEGY_DROP_ROWS)
    )
    assert (dropped.incomplete_rows_removed, dropped.missing_values_imputed, dropped.rows_out) == (3, 0, 7)


@pytest.mark.asyncio
@pytest.mark.parametrize("fraction", [1.0, 1.5, -0.1, math.nan, math.inf])
async def test_bad_test_fraction(client: MeshClient, mesh, fraction: float) -> None:
    loaded = await load(client, "sklearn:iris")
    await expect_error(
        client.preprocess(request(loaded.dataset, test_fraction=fraction)),
        INVALID, "test_fraction must be between 0 and 1",
    )
    await assert_serving(mesh)


@pytest.mark.asyncio
async def test_bad_requests(client: MeshClient, mesh) -> None:
    loaded = await load(client, "sklearn:iris")
    await expect_error(client.preprocess(preprocess_pb2.PreprocessRequest()), INVALID, "dataset is required")
    await assert_serving(mesh)
    await expect_error(client.preprocess(request(loaded.dataset, seed=-1)), INVALID, "seed", "-1")
    await assert_serving(mesh)
    await expect_error(client.preprocess(request(loaded.dataset, seed=2**40)), INVALID, "seed", str(2**40))
    await assert_serving(mesh)
    await expect_error(client.preprocess(request(loaded.dataset, impute_strategy=42)), INVALID, "impute_strategy=42")
    await assert_serving(mesh)


@pytest.mark.asyncio
async def test_bad_dataset_refs(client: MeshClient, mesh, settings: Settings) -> None:
    loaded = await load(client, "sklearn:iris")
    absent = "ab" * 32
    missing = ArtifactRef(
        uri=f"file://{settings.artifact_root}/objects/ab/{absent}.parquet", sha256=absent,
        size_bytes=10, media_type=PARQUET,
    )
    await expect_error(client.preprocess(request(missing)), NOT_FOUND, "dataset", "not in the artifact store")
    await assert_serving(mesh)

    bad_digest = ArtifactRef()
    bad_digest.CopyFrom(loaded.dataset)
    bad_digest.sha256 = "xyz"
    await expect_error(client.preprocess(request(bad_digest)), INVALID, "dataset.sha256")
    await assert_serving(mesh)

    outside = ArtifactRef(uri="file:///etc/passwd", sha256=absent)
    await expect_error(client.preprocess(request(outside)), INVALID, "outside the store")
    await assert_serving(mesh)

    store = ArtifactStore(settings.artifact_root)
    npy = store.put(array_to_npy(np.arange(4.0)), NPY)
    await expect_error(client.preprocess(request(npy)), DATA_LOSS, "not a readable Parquet file")
    await assert_serving(mesh)

    sink = io.BytesIO()
    pd.DataFrame({"a": [1.0, 2.0], "y": [0, 1]}).to_parquet(sink)
    foreign = store.put(sink.getvalue(), PARQUET)
    await expect_error(client.preprocess(request(foreign)), FAILED, "lacks mlmesh metadata")
    await assert_serving(mesh)


@pytest.mark.asyncio
async def test_unsplittable_datasets_over_the_service(client: MeshClient, mesh, tmp_path: Path) -> None:
    rare = tmp_path / "rare.csv"
    rare.write_text("x,y\n" + "".join(f"{i},{'c' if i == 0 else 'ab'[i % 2]}\n" for i in range(21)))
    loaded = await load(client, str(rare), "y")
    await expect_error(client.preprocess(request(loaded.dataset)), FAILED, "['c']", "fewer than 2 rows")
    await assert_serving(mesh)

    loaded = await load(client, "sklearn:iris")
    await expect_error(
        client.preprocess(request(loaded.dataset, test_fraction=0.01)), FAILED, "cannot hold all 3 classes"
    )
    await assert_serving(mesh)

    sparse = tmp_path / "sparse.csv"
    sparse.write_text("a,y\n1,1.5\n2,\n3,\n")
    loaded = await load(client, str(sparse), "y")
    await expect_error(client.preprocess(request(loaded.dataset)), FAILED, "only 1 usable rows")
    await assert_serving(mesh)
