"""Loader stage: source parsing and validation (pure logic), then the real service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytest_asyncio

from mlmesh.common.v1.common_pb2 import ColumnRole, TaskKind
from mlmesh.loader.v1 import loader_pb2
from services.client.mesh import MeshClient
from services.loader import logic
from services.runtime import vocabulary
from services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from services.runtime.formats import json_bytes_to_doc, read_table
from services.runtime.server import RunningStage, stage_spec, start_stage
from services.runtime.settings import Settings
from services.runtime.store import ArtifactStore
from tests.helpers import EXHAUSTED, FAILED, INVALID, NOT_FOUND, StartedStagesClient, assert_serving, expect_error

BIG = 2 * 1024**3
SYNTH = "synthetic:classification?rows=500&features=8&classes=3&seed=1"
# Every test here calls the loader alone.
pytestmark = pytest.mark.stages("loader")


def example_frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "height": rng.normal(170, 10, 40).round(2),
            "weight": rng.normal(70, 5, 40).round(2),
            "flag": [True, False] * 20,
            "species": ["cat", "dog", "eel", "dog"] * 10,
        }
    )


def write_csv(path: Path, frame: pd.DataFrame) -> Path:
    frame.to_csv(path, index=False)
    return path


def load(source: str, target: str = "", task: int = 0, force: bool = False) -> loader_pb2.LoadRequest:
    return loader_pb2.LoadRequest(source=source, target_column=target, task_kind=task, force_recompute=force)


# ---- parse_source -------------------------------------------------------------------------
def test_parse_source_sklearn_names() -> None:
    for name in ("iris", "wine", "breast_cancer", "digits", "diabetes"):
        assert logic.parse_source(f"sklearn:{name}") == logic.Source("sklearn", name)
    assert logic.parse_source("  sklearn:iris \n") == logic.Source("sklearn", "iris")


def test_parse_source_synthetic_defaults_and_typed_options() -> None:
    source = logic.parse_source("synthetic:classification")
    assert (source.kind, source.name) == ("synthetic", "classification")
    assert source.options == {"rows": 1000, "features": 20, "classes": 2, "seed": 0}

    source = logic.parse_source("synthetic:classification?rows=50&features=4&classes=3&seed=9")
    assert source.options == {"rows": 50, "features": 4, "classes": 3, "seed": 9}
    assert all(isinstance(v, int) for v in source.options.values())

    source = logic.parse_source("synthetic:regression?noise=2.5&rows=10")
    assert source.options == {"rows": 10, "features": 20, "noise": 2.5, "seed": 0}
    assert isinstance(source.options["noise"], float)


@pytest.mark.parametrize(
    ("text", "fmt"),
    [
        ("data/train.csv", "csv"),
        ("/abs/DATA.CSV", "csv"),
        ("data/train.csv.gz", "csv"),
        ("file:///tmp/x.parquet", "parquet"),
        ("s3://bucket/key/table.pq", "parquet"),
    ],
)
def test_parse_source_files_by_suffix(text: str, fmt: str) -> None:
    source = logic.parse_source(text)
    assert source == logic.Source("file", text, file_format=fmt)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("", ["source is required", "sklearn:breast_cancer"]),
        ("   ", ["source is required"]),
        ("sklearn:mnist", ["unknown sklearn dataset 'mnist'", "breast_cancer, diabetes, digits, iris, wine"]),
        ("synthetic:clustering", ["unknown synthetic task 'clustering'"]),
        ("synthetic:classification?colour=red", ["unknown option 'colour'", "rows, features, classes, seed"]),
        ("synthetic:regression?classes=3", ["unknown option 'classes' for synthetic:regression"]),
        ("synthetic:classification?rows=many", ["rows='many' is not a number"]),
        ("data/train.txt", ["cannot tell the format of 'data/train.txt'"]),
    ],
)
def test_parse_source_rejects(text: str, fragments: list[str]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        logic.parse_source(text)
    for fragment in fragments:
        assert fragment in str(caught.value)


# ---- task inference -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("values", "task", "reason"),
    [
        (
            ["a", "b", "a"],
            vocabulary.TaskKind.CLASSIFICATION,
            "target 'y' holds text labels; pass task_kind (--task regression)",
        ),
        ([True, False, True], vocabulary.TaskKind.CLASSIFICATION, "target 'y' holds labels"),
        (
            [0, 1, 1, 0],
            vocabulary.TaskKind.CLASSIFICATION,
            "target 'y' holds two distinct values; pass task_kind (--task regression)",
        ),
        ([0.0, 1.0, np.nan, 1.0], vocabulary.TaskKind.CLASSIFICATION, "target 'y' holds two distinct values"),
        ([0.5, 1.25, 3.0], vocabulary.TaskKind.REGRESSION, "target 'y' holds fractional numbers"),
        # more distinct whole numbers than MAX_INFERRED_CLASSES
        (
            list(range(21)) * 10,
            vocabulary.TaskKind.REGRESSION,
            "21 distinct whole numbers, more than 20 classes; pass task_kind (--task classification)",
        ),
        # few distinct values, but some held by fewer than 10 rows: a count, not labels
        (
            list(range(20)),
            vocabulary.TaskKind.REGRESSION,
            "20 distinct whole numbers and some have fewer than 10 rows, like a count",
        ),
        ([0, 1, 2] * 10, vocabulary.TaskKind.CLASSIFICATION, "3 distinct whole numbers, each with at least 10 rows"),
    ],
)
def test_decide_task(values: list, task: str, reason: str) -> None:
    decision = logic.decide_task(pd.Series(values), "y")
    assert (decision.kind, decision.overridden) == (task, False)
    assert reason in decision.reason


# ---- load_dataset -------------------------------------------------------------------------
def test_load_csv_plain_path_and_file_url_with_named_target(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "animals.csv", example_frame())
    for text in (str(path), path.as_uri()):
        loaded = logic.load_dataset(logic.parse_source(text), "species", None, BIG)
        frame, target, task = loaded.frame, loaded.target_column, loaded.task.kind
        assert (target, task) == ("species", vocabulary.TaskKind.CLASSIFICATION)
        assert [(c.name, c.role) for c in loaded.columns] == [
            ("height", "numeric"),
            ("weight", "numeric"),
            ("flag", "boolean"),
        ]
        assert loaded.feature_names == ["height", "weight", "flag"] and loaded.warnings == []
        assert list(frame.columns) == ["height", "weight", "flag", "species"]
        assert len(frame) == 40
        assert all(frame[c].dtype == np.float64 for c in ("height", "weight", "flag"))
        assert frame["flag"].tolist()[:2] == [1.0, 0.0]
        assert sorted(set(frame["species"])) == ["cat", "dog", "eel"]
        np.testing.assert_allclose(frame["height"], example_frame()["height"])


def test_load_parquet_with_regression_target(tmp_path: Path) -> None:
    source = example_frame().drop(columns=["species"])
    source["price"] = np.linspace(0.5, 99.5, 40)
    path = tmp_path / "prices.parquet"
    source.to_parquet(path)
    loaded = logic.load_dataset(logic.parse_source(path.as_uri()), "price", None, BIG)
    frame = loaded.frame
    assert (loaded.target_column, loaded.task.kind) == ("price", vocabulary.TaskKind.REGRESSION)
    assert loaded.task.reason == "target 'price' holds fractional numbers"
    assert frame["price"].dtype == np.float64
    np.testing.assert_allclose(frame["price"], source["price"])


def test_numbers_are_numeric_and_words_are_categorical(tmp_path: Path) -> None:
    path = tmp_path / "mixed.csv"
    path.write_text("a,b,c,y\n1,x,1.5,0\n2,y,,1\n3,x,2.5,0\n4,z,3.5,1\n")
    loaded = logic.load_dataset(logic.parse_source(str(path)), "y", None, BIG)
    assert {c.name: c.role for c in loaded.columns} == {"a": "numeric", "b": "categorical", "c": "numeric"}
    assert loaded.frame["b"].tolist() == ["x", "y", "x", "z"]
    assert np.isnan(loaded.frame["c"][1]) and loaded.frame["c"][2] == 2.5
    by_words = logic.load_dataset(logic.parse_source(str(path)), "b", None, BIG)
    assert by_words.task.kind == vocabulary.TaskKind.CLASSIFICATION and by_words.feature_names == ["a", "c", "y"]


def test_requested_regression_needs_a_numeric_target(tmp_path: Path) -> None:
    frame = example_frame()
    frame["legs"] = np.arange(40) % 3
    path = write_csv(tmp_path / "animals.csv", frame)
    for target in ("species", "flag"):  # text and booleans are not regression targets
        with pytest.raises(FailedPrecondition, match=f"regression needs a numeric target, but '{target}'"):
            logic.load_dataset(logic.parse_source(str(path)), target, vocabulary.TaskKind.REGRESSION, BIG)
    # Three whole numbers, each on 13 or more rows, are inferred as classes but can be forced to regression.
    inferred = logic.load_dataset(logic.parse_source(str(path)), "legs", None, BIG)
    forced = logic.load_dataset(logic.parse_source(str(path)), "legs", vocabulary.TaskKind.REGRESSION, BIG)
    assert (inferred.task.kind, forced.task.kind) == (
        vocabulary.TaskKind.CLASSIFICATION,
        vocabulary.TaskKind.REGRESSION,
    )
    assert forced.task == logic.TaskDecision(vocabulary.TaskKind.REGRESSION, "regression, as requested", True)
    assert pd.api.types.is_integer_dtype(inferred.frame["legs"]) and forced.frame["legs"].dtype == np.float64
    assert "species" in inferred.feature_names  # a text feature is categorical, not refused


def test_sklearn_sources_use_readable_labels() -> None:
    iris = logic.load_dataset(logic.parse_source("sklearn:iris"), "", None, BIG)
    assert (iris.target_column, iris.task.kind, len(iris.frame)) == ("target", vocabulary.TaskKind.CLASSIFICATION, 150)
    assert iris.task.reason == "classification, as defined by sklearn:iris"
    assert sorted(iris.frame["target"].unique()) == ["setosa", "versicolor", "virginica"]
    diabetes = logic.load_dataset(logic.parse_source("sklearn:diabetes"), "", None, BIG)
    assert (diabetes.task.kind, len(diabetes.frame), diabetes.frame.shape[1]) == (
        vocabulary.TaskKind.REGRESSION,
        442,
        11,
    )
    assert {c.role for c in diabetes.columns} == {"numeric"}


def test_synthetic_is_seeded() -> None:
    source = logic.parse_source(SYNTH)
    loaded = logic.load_dataset(source, "", None, BIG)
    first, task = loaded.frame, loaded.task.kind
    again = logic.load_dataset(source, "", None, BIG).frame
    other = logic.load_dataset(logic.parse_source(SYNTH.replace("seed=1", "seed=2")), "", None, BIG).frame
    assert task == vocabulary.TaskKind.CLASSIFICATION and first.shape == (500, 9)
    assert sorted(first["target"].unique()) == [0, 1, 2]
    pd.testing.assert_frame_equal(first, again)
    assert not np.allclose(first.drop(columns="target"), other.drop(columns="target"))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("synthetic:classification?classes=1", "classes=1"),
        ("synthetic:classification?rows=0", "at least 1"),
        ("synthetic:classification?features=1", "needs at least 2 features"),
        ("synthetic:classification?features=2&classes=8", "cannot make that synthetic classification"),
    ],
)
def test_synthetic_rejects_impossible_options(text: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment):
        logic.load_dataset(logic.parse_source(text), "", None, BIG)


def test_size_limit() -> None:
    with pytest.raises(ResourceExhausted, match="MLMESH_MAX_DATASET_BYTES"):
        logic.load_dataset(logic.parse_source("synthetic:regression?rows=100&features=10"), "", None, 8000)
    logic._check_size(100, 9, 8000)  # exactly at the limit is allowed


def test_missing_file_and_missing_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(NotFound) as caught:
        logic.load_dataset(logic.parse_source(str(tmp_path / "nope.csv")), "y", None, BIG)
    assert str(caught.value) == f"source file {str(tmp_path / 'nope.csv')!r} does not exist"
    # A relative path is named as the absolute path the loader looked at.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NotFound) as caught:
        logic.load_dataset(logic.parse_source("data/nope.csv"), "y", None, BIG)
    assert str(caught.value) == f"source file {str(tmp_path / 'data' / 'nope.csv')!r} does not exist"
    path = write_csv(tmp_path / "animals.csv", example_frame())
    with pytest.raises(InvalidArgument, match="'label' is not in the dataset") as caught:
        logic.load_dataset(logic.parse_source(str(path)), "label", None, BIG)
    assert "its columns are: 'height', 'weight', 'flag', 'species'" in str(caught.value)
    with pytest.raises(InvalidArgument, match="target_column is required"):
        logic.load_dataset(logic.parse_source(str(path)), "", None, BIG)


# ---- the real service ---------------------------------------------------------------------
@pytest.mark.asyncio
async def test_load_sklearn_iris_writes_a_labelled_arrow_table(client: MeshClient, settings: Settings) -> None:
    reply = await client.load(load("sklearn:iris"))
    assert reply.rows == 150 and len(reply.feature_names) == 4
    assert reply.target_column == "target" and reply.task_kind == TaskKind.TASK_KIND_CLASSIFICATION
    assert reply.dataset.media_type == "application/vnd.apache.arrow.file" and reply.dataset.uri.endswith(".arrow")
    store = ArtifactStore(settings.artifact_root)
    frame, meta = read_table(store.get(reply.dataset), "dataset")
    assert meta == {
        "target_column": "target",
        "task_kind": "classification",
        "source": "sklearn:iris",
        "roles": {name: "numeric" for name in reply.feature_names},
        "schema_sha256": reply.schema.sha256,
    }
    assert list(frame.columns) == [*reply.feature_names, "target"]
    assert frame["target"].value_counts().to_dict() == {"setosa": 50, "versicolor": 50, "virginica": 50}
    assert reply.task_kind_reason == "classification, as defined by sklearn:iris"
    assert [(c.name, c.role, c.overridden) for c in reply.columns] == [
        (name, ColumnRole.COLUMN_ROLE_NUMERIC, False) for name in reply.feature_names
    ]
    schema = json_bytes_to_doc(store.get(reply.schema), "schema")
    assert (schema["rows"], schema["features"], schema["task_kind"]) == (
        150,
        list(reply.feature_names),
        "classification",
    )
    profile = json_bytes_to_doc(store.get(reply.profile), "profile")
    assert profile["rows"] == 150 and [c["name"] for c in profile["columns"]] == list(reply.feature_names)
    assert profile["target"]["top"] == [["setosa", 50], ["versicolor", 50], ["virginica", 50]]
    sepal = profile["columns"][0]
    assert sepal["min"] == 4.3 and sepal["max"] == 7.9 and sum(sepal["histogram"]["counts"]) == 150


@pytest.mark.asyncio
async def test_load_sklearn_diabetes_is_regression(client: MeshClient) -> None:
    reply = await client.load(load("sklearn:diabetes"))
    assert (reply.rows, len(reply.feature_names)) == (442, 10)
    assert reply.task_kind == TaskKind.TASK_KIND_REGRESSION


@pytest.mark.asyncio
async def test_load_csv_by_path_and_file_url(client: MeshClient, settings: Settings, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "animals.csv", example_frame())
    store = ArtifactStore(settings.artifact_root)
    frames = []
    for text in (str(path), path.as_uri()):
        reply = await client.load(load(text, "species"))
        assert reply.rows == 40 and list(reply.feature_names) == ["height", "weight", "flag"]
        assert reply.target_column == "species" and reply.task_kind == TaskKind.TASK_KIND_CLASSIFICATION
        frames.append(read_table(store.get(reply.dataset), "dataset")[0])
    pd.testing.assert_frame_equal(frames[0], frames[1])


@pytest.mark.asyncio
async def test_load_parquet_and_explicit_task_kind(client: MeshClient, tmp_path: Path) -> None:
    frame = example_frame().drop(columns=["species"])
    frame["grade"] = np.arange(40) % 5  # five whole numbers, 8 rows each: too thin to be taken as classes
    path = tmp_path / "grades.parquet"
    frame.to_parquet(path)
    inferred = await client.load(load(str(path), "grade"))
    assert inferred.task_kind == TaskKind.TASK_KIND_REGRESSION
    assert inferred.task_kind_reason == (
        "target 'grade' holds 5 distinct whole numbers and some have fewer than 10 rows, like a count; "
        "pass task_kind (--task classification) if they are class labels"
    )
    forced = await client.load(load(str(path), "grade", TaskKind.TASK_KIND_CLASSIFICATION))
    assert forced.task_kind == TaskKind.TASK_KIND_CLASSIFICATION
    assert forced.task_kind_reason == "classification, as requested"
    assert forced.dataset.sha256 != inferred.dataset.sha256


@pytest.mark.asyncio
async def test_load_gzipped_csv_with_missing_labels(client: MeshClient, settings: Settings, tmp_path: Path) -> None:
    frame = example_frame()
    frame.loc[[4, 9], "species"] = None
    path = tmp_path / "animals.csv.gz"
    frame.to_csv(path, index=False, compression="gzip")
    reply = await client.load(load(str(path), "species"))
    assert reply.rows == 40 and reply.task_kind == TaskKind.TASK_KIND_CLASSIFICATION
    stored, _ = read_table(ArtifactStore(settings.artifact_root).get(reply.dataset), "dataset")
    assert stored["species"].isna().sum() == 2
    assert sorted(stored["species"].dropna().unique()) == ["cat", "dog", "eel"]


@pytest.mark.asyncio
async def test_load_directory_is_an_invalid_argument(client: MeshClient, mesh, tmp_path: Path) -> None:
    folder = tmp_path / "table.parquet"  # the shape Spark and Dask write
    folder.mkdir()
    pd.DataFrame({"a": [1.0, 2.0], "y": [0, 1]}).to_parquet(folder / "part-0.parquet")
    await expect_error(client.load(load(str(folder), "y")), INVALID, "is a directory", "single CSV or Parquet file")
    await assert_serving(mesh["loader"])


@pytest.mark.asyncio
async def test_changed_file_is_not_served_from_cache(client: MeshClient, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "animals.csv", example_frame())
    first = await client.load(load(str(path), "species"))
    again = await client.load(load(str(path), "species"))
    assert not first.stage.cache_hit and again.stage.cache_hit
    assert again.dataset == first.dataset
    write_csv(path, example_frame().iloc[:30])
    changed = await client.load(load(str(path), "species"))
    assert not changed.stage.cache_hit and changed.rows == 30
    assert changed.dataset.sha256 != first.dataset.sha256


@pytest.mark.asyncio
async def test_synthetic_load_is_deterministic(client: MeshClient) -> None:
    first = await client.load(load(SYNTH, force=True))
    second = await client.load(load(SYNTH, force=True))
    assert not first.stage.cache_hit and not second.stage.cache_hit
    assert first.dataset.sha256 == second.dataset.sha256
    assert first.rows == 500 and len(first.feature_names) == 8
    other = await client.load(load(SYNTH.replace("seed=1", "seed=2"), force=True))
    assert other.dataset.sha256 != first.dataset.sha256


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("source", "code", "fragments"),
    [
        ("", INVALID, ["source is required"]),
        ("sklearn:mnist", INVALID, ["unknown sklearn dataset 'mnist'", "breast_cancer"]),
        ("synthetic:classification?colour=red", INVALID, ["unknown option 'colour'"]),
        ("synthetic:clustering", INVALID, ["unknown synthetic task 'clustering'"]),
        ("synthetic:classification?classes=1", INVALID, ["classes=1"]),
        ("data/table.xlsx", INVALID, ["cannot tell the format"]),
        (
            "synthetic:regression?rows=100000000&features=10",
            EXHAUSTED,
            ["100000000 rows x 10 features", "MLMESH_MAX_DATASET_BYTES"],
        ),
    ],
)
async def test_load_rejects_bad_sources(client: MeshClient, mesh, source, code, fragments) -> None:
    await expect_error(client.load(load(source)), code, *fragments)
    await assert_serving(mesh["loader"])


@pytest.mark.asyncio
async def test_load_missing_file_is_not_found(client: MeshClient, mesh, tmp_path: Path) -> None:
    missing = tmp_path / "absent.csv"
    await expect_error(client.load(load(str(missing), "y")), NOT_FOUND, f"source file {str(missing)!r} does not exist")
    await assert_serving(mesh["loader"])
    await expect_error(
        client.load(load(missing.as_uri(), "y")), NOT_FOUND, f"source file {str(missing)!r} does not exist"
    )
    await assert_serving(mesh["loader"])


@pytest.mark.asyncio
async def test_load_file_errors(client: MeshClient, mesh, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "animals.csv", example_frame())
    await expect_error(client.load(load(str(path), "label")), INVALID, "'label'", "not in the dataset")
    await assert_serving(mesh["loader"])
    await expect_error(client.load(load(str(path))), INVALID, "target_column is required")
    await assert_serving(mesh["loader"])
    # A column of words declared numeric is refused; the message names the column, not its values.
    declared = loader_pb2.LoadRequest(
        source=str(path), target_column="height", column_roles={"species": ColumnRole.COLUMN_ROLE_NUMERIC}
    )
    details = await expect_error(
        client.load(declared),
        FAILED,
        "column 'species' was declared numeric, but 40 of its values are not numbers; "
        "declare it categorical or fix the values",
    )
    assert not any(word in details for word in ("'cat'", "dog", "eel"))
    await assert_serving(mesh["loader"])
    await expect_error(client.load(load(str(path), "species", 9)), INVALID, "task_kind=9")
    await assert_serving(mesh["loader"])


@pytest.mark.asyncio
async def test_load_unusable_data(client: MeshClient, mesh, tmp_path: Path) -> None:
    header_only = tmp_path / "empty.csv"
    header_only.write_text("a,b,y\n")
    await expect_error(client.load(load(str(header_only), "y")), FAILED, "has no rows")
    await assert_serving(mesh["loader"])

    single = tmp_path / "single.csv"
    single.write_text("a,b,y\n1,2,yes\n3,4,yes\n5,6,yes\n")
    await expect_error(
        client.load(load(str(single), "y")), FAILED, "classification needs at least two classes, but target 'y' has 1"
    )
    await assert_serving(mesh["loader"])

    only_target = tmp_path / "only_target.csv"
    only_target.write_text("y\n1\n2\n")
    await expect_error(client.load(load(str(only_target), "y")), FAILED, "no feature columns")
    await assert_serving(mesh["loader"])

    blank = tmp_path / "blank.csv"
    blank.write_bytes(b"")
    await expect_error(client.load(load(str(blank), "y")), FAILED, "cannot parse")
    await assert_serving(mesh["loader"])

    # Short columns of words are categorical features now, not refused.
    words = tmp_path / "words.parquet"
    pd.DataFrame({"colour": ["red", "blue"], "size": ["S", "M"], "y": [0, 1]}).to_parquet(words)
    reply = await client.load(load(str(words), "y"))
    assert list(reply.feature_names) == ["colour", "size"]
    assert [c.role for c in reply.columns] == [ColumnRole.COLUMN_ROLE_CATEGORICAL] * 2

    # A table whose every other column is a key or a constant has nothing to learn from.
    nothing = tmp_path / "nothing.parquet"
    pd.DataFrame({"name": [f"n{i}" for i in range(30)], "unit": ["kg"] * 30, "y": [0, 1] * 15}).to_parquet(nothing)
    await expect_error(
        client.load(load(str(nothing), "y")),
        FAILED,
        "no column is usable as a feature: 'name' (identifier), 'unit' (constant); "
        "set roles with column_roles (--column NAME=ROLE)",
    )
    await assert_serving(mesh["loader"])


# ---- a loader with a small MLMESH_MAX_DATASET_BYTES ---------------------------------------
@pytest_asyncio.fixture
async def small_loader(artifact_root: Path, data_roots: str) -> AsyncIterator[tuple[MeshClient, RunningStage]]:
    settings = Settings.from_env(
        {
            "MLMESH_ARTIFACT_ROOT": str(artifact_root),
            "MLMESH_MAX_DATASET_BYTES": "20000",
            "MLMESH_DATA_ROOTS": data_roots,
            "MLMESH_METRICS": "off",  # unserved, as in conftest.py's settings
        }
    )
    stage = await start_stage(stage_spec("loader"), settings, port=0)
    try:
        async with StartedStagesClient(settings, {"loader": stage}) as mesh_client:
            yield mesh_client, stage
    finally:
        await stage.stop(0.5)


@pytest.mark.asyncio
async def test_small_limit_refuses_large_datasets(small_loader, tmp_path: Path) -> None:
    client, stage = small_loader
    assert (await client.load(load("sklearn:iris"))).rows == 150  # 150 x 5 x 8 bytes fits
    await assert_serving(stage)

    await expect_error(client.load(load(SYNTH)), EXHAUSTED, "500 rows x 8 features", "MLMESH_MAX_DATASET_BYTES")
    await assert_serving(stage)
    await expect_error(client.load(load("sklearn:breast_cancer")), EXHAUSTED, "569 rows x 30 features")
    await assert_serving(stage)

    big = tmp_path / "big.csv"
    pd.DataFrame(np.random.default_rng(0).normal(size=(600, 5)), columns=list("abcde")).to_csv(big, index=False)
    assert big.stat().st_size > 20000
    await expect_error(client.load(load(str(big), "e")), EXHAUSTED, "source file is", "MLMESH_MAX_DATASET_BYTES")
    await assert_serving(stage)


def test_distinct_counts_by_sorting_equal_pandas_nunique() -> None:
    """The loader counts distinct numbers by sorting (linear in practice at 10M rows);
    it must agree with nunique exactly: -0.0 is 0.0, NaN is no value, infinities count."""
    from services.loader.schema import _distinct_count

    rng = np.random.default_rng(7)
    for case in range(300):
        size = int(rng.integers(0, 60))
        if case % 2:
            values = rng.choice([0.0, -0.0, 1.0, 2.5, np.nan, np.inf, -np.inf, 3.0], size=size)
        else:
            values = rng.standard_normal(size).round(int(rng.integers(0, 3)))
        column = pd.Series(values, dtype="float64")
        assert _distinct_count(column) == column.nunique(dropna=True), values
    assert _distinct_count(pd.Series(["a", "b", "a", None])) == 2  # text keeps nunique
