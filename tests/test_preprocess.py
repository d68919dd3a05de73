"""Preprocess stage: dropped rows counted by reason, label encoding and the split; then the real service.

Missing feature values are kept here: the features stage imputes them from train statistics."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlmesh.common.v1.common_pb2 import ArtifactRef, TaskKind
from mlmesh.preprocess.v1 import preprocess_pb2
from services.client.mesh import MeshClient
from services.preprocess import logic
from services.runtime.errors import FailedPrecondition
from services.runtime.formats import NPY, PARQUET, array_to_npy, json_bytes_to_doc, read_table
from services.runtime.settings import Settings
from services.runtime.store import ArtifactStore
from tests.helpers import FAILED, INVALID, NOT_FOUND, assert_serving, expect_error, load

# The service tests here load a table, then preprocess it: two stages.
pytestmark = pytest.mark.stages("loader", "preprocess")


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


def run(
    frame: pd.DataFrame,
    target: str,
    task: str,
    fraction: float = 0.2,
    seed: int = 0,
    drop_duplicates: bool = False,
    drop_incomplete: bool = False,
) -> logic.Prepared:
    return logic.preprocess(frame, target, task, fraction, seed, drop_duplicates, drop_incomplete)


def counts(prepared: logic.Prepared) -> dict[str, int]:
    return {
        "missing_target": prepared.missing_target_rows_removed,
        "invalid_target": prepared.invalid_target_rows_removed,
        "incomplete": prepared.incomplete_rows_removed,
        "duplicates_found": prepared.duplicate_rows_found,
        "duplicates_removed": prepared.duplicate_rows_removed,
        "rows_out": len(prepared.train) + len(prepared.test),
    }


# ---- counting and cleaning ----------------------------------------------------------------
def repeats_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "a": [1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, np.nan],
            "y": [0.5, 0.5, 1.0, 2.0, 2.0, 2.0, np.nan, np.nan, 3.0, 4.0, 5.0, 6.0],
        }
    )


def test_duplicates_are_counted_and_kept_unless_asked() -> None:
    kept = run(repeats_frame(), "y", "regression")
    assert kept.rows_in == 12
    # one copy of (1, .5) and two of (3, 2) repeat an earlier row
    assert counts(kept) == {
        "missing_target": 2,
        "invalid_target": 0,
        "incomplete": 0,
        "duplicates_found": 3,
        "duplicates_removed": 0,
        "rows_out": 10,
    }
    dropped = run(repeats_frame(), "y", "regression", drop_duplicates=True)
    assert counts(dropped) == {
        "missing_target": 2,
        "invalid_target": 0,
        "incomplete": 0,
        "duplicates_found": 3,
        "duplicates_removed": 3,
        "rows_out": 7,
    }
    # The missing feature value is kept for the features stage to impute.
    both = pd.concat([dropped.train, dropped.test])
    assert int(both["a"].isna().sum()) == 1 and dropped.class_names == []


def test_legitimately_repeated_rows_are_kept_by_default() -> None:
    """Survey answers: few distinct answer patterns, every row a real observation."""
    rng = np.random.RandomState(5)
    frame = pd.DataFrame(
        {"age_band": rng.randint(0, 3, 200).astype(float), "smoker": rng.randint(0, 2, 200).astype(float)}
    )
    frame["answer"] = np.where(frame["smoker"] == 1, "yes", "no")
    prepared = run(frame, "answer", "classification")
    assert counts(prepared)["rows_out"] == 200 and prepared.duplicate_rows_removed == 0
    assert prepared.duplicate_rows_found == 200 - len(frame.drop_duplicates())
    assert prepared.duplicate_rows_found > 190  # at most 6 distinct rows


def test_infinite_regression_targets_are_invalid_and_counted() -> None:
    frame = pd.DataFrame({"x": np.arange(20, dtype=float), "y": np.linspace(0, 1, 20)})
    frame.loc[[2, 7], "y"] = [np.inf, -np.inf]
    frame.loc[11, "y"] = np.nan
    prepared = run(frame, "y", "regression")
    assert counts(prepared) == {
        "missing_target": 1,
        "invalid_target": 2,
        "incomplete": 0,
        "duplicates_found": 0,
        "duplicates_removed": 0,
        "rows_out": 17,
    }
    kept = pd.concat([prepared.train, prepared.test])
    assert np.isfinite(kept["y"]).all() and set(kept["x"]).isdisjoint({2.0, 7.0, 11.0})


def test_drop_incomplete_removes_rows_with_a_missing_feature() -> None:
    frame = outlier_frame()
    prepared = run(frame, "y", "regression", drop_incomplete=True)
    assert prepared.incomplete_rows_removed == 9  # six gaps in a, three in b, no overlap
    kept = pd.concat([prepared.train, prepared.test])
    assert set(kept["id"]) == set(frame.dropna()["id"]) and not kept.isna().any().any()


def test_missing_feature_values_are_kept_for_the_features_stage() -> None:
    frame = outlier_frame()
    prepared = run(frame, "y", "regression", fraction=0.3, seed=3)
    assert prepared.incomplete_rows_removed == 0
    kept = pd.concat([prepared.train, prepared.test]).set_index("id").sort_index()
    pd.testing.assert_frame_equal(kept[["a", "b"]], frame.set_index("id")[["a", "b"]], check_names=False)
    assert int(kept[["a", "b"]].isna().sum().sum()) == 9


def test_same_row_with_different_targets_is_not_a_duplicate() -> None:
    frame = pd.DataFrame({"a": [1.0] * 4 + [2.0] * 4, "y": [1.0, 2.0, 1.0, 2.0] * 2})
    prepared = run(frame, "y", "regression", fraction=0.5, drop_duplicates=True)
    assert prepared.duplicate_rows_found == prepared.duplicate_rows_removed == 4
    assert sorted(zip(*[pd.concat([prepared.train, prepared.test])[c] for c in "ay"], strict=False)) == [
        (1.0, 1.0),
        (1.0, 2.0),
        (2.0, 1.0),
        (2.0, 2.0),
    ]


def test_split_report_counts_by_reason_and_class_balance() -> None:
    frame = labelled_frame({"a": 60, "b": 30, "c": 10})
    frame.loc[[0, 1], "label"] = None
    prepared = run(frame, "label", "classification", seed=7)
    report = prepared.report("label", 0.2, 7)
    assert report["rows_in"] == 100 and report["rows_out"] == 98
    assert report["rows_dropped"] == {"missing_target": 2, "invalid_target": 0, "incomplete": 0, "duplicate": 0}
    assert (report["train_rows"], report["test_rows"]) == (len(prepared.train), len(prepared.test))
    assert report["class_names"] == ["a", "b", "c"]
    assert report["class_balance"]["test"] == {"a": 12, "b": 6, "c": 2}
    assert report["class_balance"]["train"] == {"a": 46, "b": 24, "c": 8}


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
    repeated = pd.DataFrame({"x": [1.0, 1.0, 2.0], "y": [1.0, 1.0, np.nan]})
    assert counts(run(repeated, "y", "regression", fraction=0.5))["rows_out"] == 2  # repeats are kept by default
    with pytest.raises(FailedPrecondition) as caught:
        run(repeated, "y", "regression", drop_duplicates=True)
    assert str(caught.value) == (
        "only 1 usable rows remain of 3 (missing target: 1, invalid target: 0, incomplete: 0, "
        "duplicates dropped: 1); at least 2 are needed for a split"
    )
    with pytest.raises(
        FailedPrecondition, match="the dataset has no target column; pass a dataset written by the loader"
    ):
        run(pd.DataFrame({"x": [1.0, 2.0]}), "y", "regression")


# ---- the real service ---------------------------------------------------------------------
def request(dataset: ArtifactRef, **kwargs) -> preprocess_pb2.PreprocessRequest:
    return preprocess_pb2.PreprocessRequest(dataset=dataset, **kwargs)


@pytest.mark.asyncio
async def test_iris_is_split_and_encoded(client: MeshClient, settings: Settings) -> None:
    loaded = await load(client, "sklearn:iris")
    reply = await client.preprocess(request(loaded.dataset, seed=1))  # test_fraction 0 means 0.2
    # iris has one repeated row; repeats are kept unless drop_duplicate_rows is set
    assert (reply.rows_in, reply.rows_out) == (150, 150)
    assert (reply.duplicate_rows_found, reply.duplicate_rows_removed, reply.incomplete_rows_removed) == (1, 0, 0)
    assert (reply.missing_target_rows_removed, reply.invalid_target_rows_removed) == (0, 0)
    assert (reply.train_rows, reply.test_rows) == (120, 30)
    assert list(reply.class_names) == ["setosa", "versicolor", "virginica"]
    assert reply.task_kind == TaskKind.TASK_KIND_CLASSIFICATION
    store = ArtifactStore(settings.artifact_root)
    train, meta = read_table(store.get(reply.train), "train")
    test, test_meta = read_table(store.get(reply.test), "test")
    assert meta["class_names"] == ["setosa", "versicolor", "virginica"]
    assert (meta.pop("split"), test_meta.pop("split")) == ("train", "test") and meta == test_meta
    assert meta["target_column"] == "target" and meta["task_kind"] == "classification"
    assert (len(train), len(test)) == (120, 30)
    assert sorted(set(train["target"])) == [0, 1, 2] and train["target"].dtype == np.int64
    assert np.bincount(test["target"]).tolist() == [10, 10, 10]
    report = json_bytes_to_doc(store.get(reply.split_report), "split_report")
    assert report["class_balance"] == {
        "train": {"setosa": 40, "versicolor": 40, "virginica": 40},
        "test": {"setosa": 10, "versicolor": 10, "virginica": 10},
    }
    assert report["duplicate_rows_found"] == 1 and report["rows_dropped"]["duplicate"] == 0

    deduplicated = await client.preprocess(request(loaded.dataset, seed=1, drop_duplicate_rows=True))
    assert (deduplicated.rows_out, deduplicated.duplicate_rows_found, deduplicated.duplicate_rows_removed) == (
        149,
        1,
        1,
    )
    assert (deduplicated.train_rows, deduplicated.test_rows) == (119, 30)


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
        "1,10,1.5\n1,10,1.5\n1,10,1.5\n"  # two repeats
        "2,,2.5\n3,30,\n4,40,4.5\n,50,5.5\n6,60,6.5\n7,70,7.5\n8,80,8.5\n9,90,9.5\n10,100,10.5\n"
        "11,110,inf\n"  # an infinite target
    )
    loaded = await load(client, str(path), "y")
    assert loaded.task_kind == TaskKind.TASK_KIND_REGRESSION

    def reasons(reply: preprocess_pb2.PreprocessResponse) -> tuple[int, ...]:
        return (
            reply.rows_in,
            reply.missing_target_rows_removed,
            reply.invalid_target_rows_removed,
            reply.incomplete_rows_removed,
            reply.duplicate_rows_found,
            reply.duplicate_rows_removed,
            reply.rows_out,
        )

    kept = await client.preprocess(request(loaded.dataset))
    assert reasons(kept) == (13, 1, 1, 0, 2, 0, 11)
    assert kept.train_rows + kept.test_rows == 11 and kept.test_rows == 3
    assert list(kept.class_names) == []
    store = ArtifactStore(settings.artifact_root)
    splits = [read_table(store.get(ref), "split")[0] for ref in (kept.train, kept.test)]
    assert sum(int(part[["a", "b"]].isna().sum().sum()) for part in splits) == 2  # left for the features stage
    assert all(np.isfinite(part["y"]).all() for part in splits)

    cleaned = await client.preprocess(request(loaded.dataset, drop_duplicate_rows=True, drop_incomplete_rows=True))
    assert reasons(cleaned) == (13, 1, 1, 2, 2, 2, 7)
    report = json_bytes_to_doc(store.get(cleaned.split_report), "split_report")
    assert report["rows_dropped"] == {"missing_target": 1, "invalid_target": 1, "incomplete": 2, "duplicate": 2}
    assert (report["rows_in"], report["rows_out"], report["duplicate_rows_found"]) == (13, 7, 2)
    assert "class_balance" not in report


@pytest.mark.asyncio
@pytest.mark.parametrize("fraction", [1.0, 1.5, -0.1, math.nan, math.inf])
async def test_bad_test_fraction(client: MeshClient, mesh, fraction: float) -> None:
    loaded = await load(client, "sklearn:iris")
    await expect_error(
        client.preprocess(request(loaded.dataset, test_fraction=fraction)),
        INVALID,
        "test_fraction must be between 0 and 1",
    )
    await assert_serving(mesh["preprocess"])


@pytest.mark.asyncio
async def test_bad_requests(client: MeshClient, mesh) -> None:
    loaded = await load(client, "sklearn:iris")
    await expect_error(client.preprocess(preprocess_pb2.PreprocessRequest()), INVALID, "dataset is required")
    await assert_serving(mesh["preprocess"])
    await expect_error(client.preprocess(request(loaded.dataset, seed=-1)), INVALID, "seed", "-1")
    await assert_serving(mesh["preprocess"])
    await expect_error(client.preprocess(request(loaded.dataset, seed=2**40)), INVALID, "seed", str(2**40))
    await assert_serving(mesh["preprocess"])


@pytest.mark.asyncio
async def test_bad_dataset_refs(client: MeshClient, mesh, settings: Settings) -> None:
    loaded = await load(client, "sklearn:iris")
    absent = "ab" * 32
    missing = ArtifactRef(
        uri=f"file://{settings.artifact_root}/objects/ab/{absent}.parquet",
        sha256=absent,
        size_bytes=10,
        media_type=PARQUET,
    )
    await expect_error(client.preprocess(request(missing)), NOT_FOUND, "dataset", "not in the artifact store")
    await assert_serving(mesh["preprocess"])

    bad_digest = ArtifactRef()
    bad_digest.CopyFrom(loaded.dataset)
    bad_digest.sha256 = "xyz"
    await expect_error(client.preprocess(request(bad_digest)), INVALID, "dataset.sha256")
    await assert_serving(mesh["preprocess"])

    outside = ArtifactRef(uri="file:///etc/passwd", sha256=absent)
    await expect_error(client.preprocess(request(outside)), INVALID, "outside the store")
    await assert_serving(mesh["preprocess"])

    store = ArtifactStore(settings.artifact_root)
    npy = store.put(array_to_npy(np.arange(4.0)), NPY)
    await expect_error(client.preprocess(request(npy)), FAILED, "not a readable table (Arrow IPC or Parquet file)")
    await assert_serving(mesh["preprocess"])

    sink = io.BytesIO()
    pd.DataFrame({"a": [1.0, 2.0], "y": [0, 1]}).to_parquet(sink)
    foreign = store.put(sink.getvalue(), PARQUET)
    await expect_error(client.preprocess(request(foreign)), FAILED, "lacks mlmesh metadata")
    await assert_serving(mesh["preprocess"])


@pytest.mark.asyncio
async def test_unsplittable_datasets_over_the_service(client: MeshClient, mesh, tmp_path: Path) -> None:
    rare = tmp_path / "rare.csv"
    # x repeats its values, so it is a numeric feature, not a row key
    rare.write_text("x,y\n" + "".join(f"{i % 4},{'c' if i == 0 else 'ab'[i % 2]}\n" for i in range(21)))
    loaded = await load(client, str(rare), "y")
    await expect_error(client.preprocess(request(loaded.dataset)), FAILED, "['c']", "fewer than 2 rows")
    await assert_serving(mesh["preprocess"])

    loaded = await load(client, "sklearn:iris")
    await expect_error(
        client.preprocess(request(loaded.dataset, test_fraction=0.01)), FAILED, "cannot hold all 3 classes"
    )
    await assert_serving(mesh["preprocess"])

    sparse = tmp_path / "sparse.csv"
    sparse.write_text("a,y\n1,1.5\n2,\n3,\n")
    loaded = await load(client, str(sparse), "y")
    await expect_error(
        client.preprocess(request(loaded.dataset)),
        FAILED,
        "only 1 usable rows remain of 3 (missing target: 2, invalid target: 0, incomplete: 0, duplicates dropped: 0)",
    )
    await assert_serving(mesh["preprocess"])


def test_repeated_rows_by_hashing_match_pandas_exactly() -> None:
    """Linear de-duplication finds exactly what frame.duplicated() finds: NaN equal to NaN,
    -0.0 equal to 0.0, categoricals, text with None, dates, booleans, and no row when none repeat."""
    from services.preprocess.logic import repeated_rows

    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(0, 80))
        frame = pd.DataFrame(
            {
                "a": rng.choice([0.0, -0.0, 1.0, np.nan, np.inf], n),
                "b": rng.choice(["x", "y", None], n),
                "c": pd.Categorical(rng.choice(["p", "q"], n)),
                "d": rng.integers(0, 2, n),
                "e": pd.to_datetime(rng.choice(["2020-01-01", None], n)),
                "f": rng.choice([True, False], n),
            }
        )
        assert (repeated_rows(frame) == frame.duplicated().to_numpy()).all()
    unique = pd.DataFrame({"a": np.arange(1000.0), "b": np.arange(1000) % 7})
    assert not repeated_rows(unique).any()


def test_a_hash_collision_never_drops_a_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row hashing alike (a forced collision): only true repeats are marked."""
    from services.preprocess import logic

    frame = pd.DataFrame({"a": [1.0, 2.0, 1.0, 3.0], "b": ["x", "y", "x", "z"]})
    monkeypatch.setattr(
        logic.pd.util, "hash_pandas_object", lambda f, index=False: pd.Series(np.zeros(len(f), dtype="uint64"))
    )
    assert logic.repeated_rows(frame).tolist() == [False, False, True, False]
