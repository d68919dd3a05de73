"""Column roles and task inference in the loader: inferred from values, so CSV and Parquet
agree; overridable per column; refused with a code and a message that names the column."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest

from mlmesh.common.v1.common_pb2 import ColumnRole, TaskKind
from mlmesh.loader.v1 import loader_pb2
from services.client.mesh import MeshClient, PipelineConfig
from services.loader import logic
from services.runtime.errors import FailedPrecondition, InvalidArgument
from services.runtime.formats import json_bytes_to_doc, read_table
from services.runtime.roles import FEATURE_ROLES, ROLES, role_value
from services.runtime.settings import Settings
from services.runtime.store import ArtifactStore
from tests.helpers import expect_error

BIG = 2 * 1024**3
INVALID, FAILED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
ROWS = 60


def people(rows: int = ROWS, seed: int = 0) -> pd.DataFrame:
    """One column per inferable role (but ignore, which CSV cannot hold), and a text target."""
    rng = np.random.RandomState(seed)
    joined = pd.Series(pd.date_range("2023-01-01", periods=rows, freq="37h")).astype("datetime64[us]")
    joined[::9] = pd.NaT  # dates with gaps
    return pd.DataFrame(
        {
            "row_id": np.arange(rows),  # identifier: a consecutive run of whole numbers
            "height": rng.normal(170, 9, rows).round(1),  # numeric
            "member": rng.rand(rows) > 0.5,  # boolean
            "colour": rng.choice(["red", "green", "blue"], rows),  # categorical
            "joined": joined,  # datetime
            "email": [f"user{i}@example.org" for i in range(rows)],  # identifier: text, every value distinct
            "remark": [f"remark number {i % 40}" for i in range(rows)],  # text: mostly distinct
            "unit": ["cm"] * rows,  # constant
            "label": rng.choice(["no", "yes"], rows),
        }
    )


EXPECTED_ROLES = {
    "row_id": "identifier",
    "height": "numeric",
    "member": "boolean",
    "colour": "categorical",
    "joined": "datetime",
    "email": "identifier",
    "remark": "text",
    "unit": "constant",
}


def write(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return path


def load_file(
    path: Path, target: str = "label", task: str | None = None, roles: dict | None = None
) -> logic.LoadedDataset:
    return logic.load_dataset(logic.parse_source(str(path)), target, task, BIG, roles)


def comparable(decisions: list[logic.ColumnDecision]) -> list[dict]:
    """A decision without the source dtype, which names the file format's type (str vs datetime64)."""
    return [{k: v for k, v in dataclasses.asdict(d).items() if k != "source_dtype"} for d in decisions]


# ---- inference ----------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_every_role_is_inferred_from_values(tmp_path: Path, suffix: str) -> None:
    loaded = load_file(write(people(), tmp_path / f"people{suffix}"))
    assert {c.name: c.role for c in loaded.columns} == EXPECTED_ROLES
    reasons = {c.name: c.reason for c in loaded.columns}
    assert reasons["row_id"] == "whole numbers, every one distinct, that look like a row key"
    assert reasons["email"] == "every one of its 60 values is distinct"
    assert reasons["remark"] == ("free text: 40 distinct values in 60 rows; declare it categorical to encode it anyway")
    assert reasons["unit"] == "it holds a single value"
    assert not any(c.overridden for c in loaded.columns)
    # Only feature roles reach the dataset, in canonical types, followed by the target.
    assert loaded.feature_names == ["height", "member", "colour", "joined"]
    assert list(loaded.frame.columns) == ["height", "member", "colour", "joined", "label"]
    assert loaded.frame["height"].dtype == np.float64 and loaded.frame["member"].dtype == np.float64
    assert loaded.frame["joined"].dtype == "datetime64[us]"
    assert set(loaded.frame["colour"]) == {"red", "green", "blue"}
    assert loaded.schema()["roles"] == EXPECTED_ROLES


def test_csv_and_parquet_of_one_table_get_identical_decisions_and_values(tmp_path: Path) -> None:
    from_csv = load_file(write(people(), tmp_path / "people.csv"))
    from_parquet = load_file(write(people(), tmp_path / "people.parquet"))
    assert comparable(from_csv.columns) == comparable(from_parquet.columns)
    assert [c.source_dtype for c in from_csv.columns if c.name == "joined"] == ["str"]
    assert [c.source_dtype for c in from_parquet.columns if c.name == "joined"] == ["datetime64[us]"]
    pd.testing.assert_frame_equal(from_csv.frame, from_parquet.frame)
    assert from_csv.task == from_parquet.task
    assert from_csv.profile == from_parquet.profile


def test_iso_date_text_and_typed_datetimes_give_the_same_values_with_gaps(tmp_path: Path) -> None:
    stamps = pd.Series(pd.to_datetime(["2024-02-29T10:30:00Z", "2024-03-01T00:00:00+02:00", None] * 10, utc=True))
    typed = pd.DataFrame({"when": stamps, "x": np.arange(30) % 4, "y": [0.5, 1.5, 2.5] * 10})
    as_text = typed.assign(when=["2024-02-29T10:30:00Z", "2024-03-01T00:00:00+02:00", ""] * 10)
    from_csv = load_file(write(as_text, tmp_path / "dates.csv"), "y")
    from_parquet = load_file(write(typed, tmp_path / "dates.parquet"), "y")
    for loaded in (from_csv, from_parquet):
        when = next(c for c in loaded.columns if c.name == "when")
        assert (when.role, when.missing_ratio, when.distinct_values) == ("datetime", pytest.approx(1 / 3, abs=1e-6), 2)
        assert loaded.frame["when"].dtype == "datetime64[us]"
    # Converted to UTC and stored without a zone; the gaps stay missing.
    assert from_csv.frame["when"].iloc[:3].tolist()[:2] == [
        pd.Timestamp("2024-02-29 10:30:00"),
        pd.Timestamp("2024-02-29 22:00:00"),
    ]
    assert from_csv.frame["when"].isna().sum() == 10
    pd.testing.assert_series_equal(from_csv.frame["when"], from_parquet.frame["when"])


def test_a_pandas_category_is_categorical_even_with_numbers(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "grade": pd.Categorical([1, 2, 3, 2] * 10),
            "tier": pd.Categorical(["gold", "silver", None, "gold"] * 10),
            "y": np.linspace(0, 1, 40),
        }
    )
    features, decisions, _ = logic.decide_columns(frame, "y", {})
    assert [(c.name, c.role, c.reason, c.source_dtype) for c in decisions] == [
        ("grade", "categorical", "a categorical column with 3 levels", "category"),
        ("tier", "categorical", "a categorical column with 2 levels", "category"),
    ]
    assert sorted(set(features["grade"])) == ["1", "2", "3"]
    assert features["tier"].isna().sum() == 10
    # Parquet keeps a category of text as a category.
    loaded = load_file(write(frame[["tier", "y"]], tmp_path / "tiers.parquet"), "y")
    assert [(c.role, c.source_dtype) for c in loaded.columns] == [("categorical", "category")]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_an_integer_zip_code_declared_categorical_keeps_its_levels(tmp_path: Path, suffix: str) -> None:
    zips = pd.Series([2134, 10001, 94105, None] * 10, dtype="Int64")  # a gap makes CSV read it as float
    frame = pd.DataFrame({"zip": zips, "rooms": np.arange(40) % 5, "price": np.linspace(100, 500, 40)})
    path = write(frame, tmp_path / f"homes{suffix}")
    assert {c.name: c.role for c in load_file(path, "price").columns}["zip"] == "numeric"
    loaded = load_file(path, "price", roles={"zip": "categorical"})
    zip_column = next(c for c in loaded.columns if c.name == "zip")
    assert (zip_column.role, zip_column.overridden, zip_column.reason) == ("categorical", True, "set by the caller")
    # "2134", not "2134.0"; the gap stays missing rather than becoming the text "nan".
    assert sorted(loaded.frame["zip"].dropna().unique()) == ["10001", "2134", "94105"]
    assert loaded.frame["zip"].isna().sum() == 10


def test_a_zip_code_with_leading_zeros_keeps_its_spelling_from_csv_and_parquet(tmp_path: Path) -> None:
    text = "zip,price\n" + "".join(f"{z},{100 + i}\n" for i, z in enumerate(["02134", "00501", "10001"] * 10))
    (tmp_path / "homes.csv").write_text(text)
    pd.read_csv(tmp_path / "homes.csv", dtype={"zip": "str"}).to_parquet(tmp_path / "homes.parquet")
    levels = []
    for name in ("homes.csv", "homes.parquet"):
        loaded = load_file(tmp_path / name, "price", roles={"zip": "categorical"})
        levels.append(sorted(loaded.frame["zip"].unique()))
    assert levels[0] == levels[1] == ["00501", "02134", "10001"]


def test_whole_floats_declared_categorical_give_the_same_levels_from_csv_and_parquet(tmp_path: Path) -> None:
    frame = pd.DataFrame({"mode": [1.0, 2.0, 3.0, None] * 10, "y": np.linspace(0, 1, 40)})
    levels = []
    for name in ("modes.csv", "modes.parquet"):  # the CSV holds the text "1.0"
        loaded = load_file(write(frame, tmp_path / name), "y", roles={"mode": "categorical"})
        levels.append(sorted(loaded.frame["mode"].dropna().unique()))
    assert levels[0] == levels[1] == ["1", "2", "3"]


def test_whole_numbers_are_identifiers_only_when_they_look_like_a_key() -> None:
    rng = np.random.RandomState(3)
    frame = pd.DataFrame(
        {
            "row_id": np.arange(50),  # named like a key, consecutive
            "customer_id": rng.permutation(np.arange(1000, 1100))[:50],  # named like a key, gaps
            "step": np.arange(50) + 7,  # a consecutive run, whatever its name
            "income": rng.choice(np.arange(20_000, 90_000), 50, replace=False),  # distinct, no key
            "visits": rng.poisson(3, 50),  # repeats
            "y": rng.normal(size=50),
        }
    )
    _, decisions, _ = logic.decide_columns(frame, "y", {})
    assert {c.name: c.role for c in decisions} == {
        "row_id": "identifier",
        "customer_id": "identifier",
        "step": "identifier",
        "income": "numeric",
        "visits": "numeric",
    }


def test_constant_and_empty_columns_are_left_out() -> None:
    frame = pd.DataFrame({"unit": ["kg"] * 30, "empty": [np.nan] * 30, "x": np.arange(30) % 3, "y": np.arange(30) % 2})
    features, decisions, _ = logic.decide_columns(frame, "y", {})
    assert [(c.name, c.role, c.reason) for c in decisions] == [
        ("unit", "constant", "it holds a single value"),
        ("empty", "constant", "it has no values"),
        ("x", "numeric", "it holds numbers"),
    ]
    assert list(features.columns) == ["x"]


def test_values_of_no_usable_type_are_ignored_with_the_reason(tmp_path: Path) -> None:
    frame = pd.DataFrame({"tags": [[1, 2], [3]] * 15, "x": np.arange(30) % 4, "y": [0, 1, 1] * 10})
    loaded = load_file(write(frame, tmp_path / "tags.parquet"), "y")
    tags = loaded.columns[0]
    assert (tags.name, tags.role, tags.reason) == ("tags", "ignore", "its values are not numbers, text or dates")
    assert loaded.feature_names == ["x"]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_infinite_values_become_missing_with_a_warning(tmp_path: Path, suffix: str) -> None:
    frame = pd.DataFrame({"ratio": np.linspace(0, 1, 30), "x": np.arange(30) % 5, "y": np.linspace(1, 2, 30)})
    frame.loc[[4, 17], "ratio"] = [np.inf, -np.inf]
    loaded = load_file(write(frame, tmp_path / f"ratios{suffix}"), "y")
    ratio = loaded.columns[0]
    assert (ratio.role, ratio.infinite_values, ratio.missing_ratio) == ("numeric", 2, pytest.approx(2 / 30, abs=1e-6))
    assert loaded.warnings == ["column 'ratio': 2 infinite value(s) treated as missing"]
    assert loaded.frame["ratio"].isna().tolist() == [i in (4, 17) for i in range(30)]
    profile = loaded.profile["columns"][0]
    assert (profile["missing"], profile["infinite"], profile["max"]) == (2, 2, 1.0)


def test_infinite_values_in_a_column_declared_categorical_are_missing_too(tmp_path: Path) -> None:
    frame = pd.DataFrame({"code": [1.0, 2.0, np.inf] * 10, "y": np.linspace(0, 1, 30)})
    loaded = load_file(write(frame, tmp_path / "codes.parquet"), "y", roles={"code": "categorical"})
    assert loaded.warnings == ["column 'code': 10 infinite value(s) treated as missing"]
    assert loaded.frame["code"].isna().sum() == 10 and sorted(loaded.frame["code"].dropna().unique()) == ["1", "2"]


def test_the_text_inf_kept_as_a_level_gives_no_warning(tmp_path: Path) -> None:
    frame = pd.DataFrame({"code": ["1", "2", "inf"] * 10, "y": np.linspace(0, 1, 30)})
    loaded = load_file(write(frame, tmp_path / "codes.parquet"), "y", roles={"code": "categorical"})
    assert loaded.warnings == [] and sorted(loaded.frame["code"].unique()) == ["1", "2", "inf"]


def test_numbers_beyond_the_float_range_span_are_profiled_without_a_histogram(tmp_path: Path) -> None:
    frame = pd.DataFrame({"huge": [-1.5e308, 0.0, 1.5e308] * 10, "y": np.linspace(0, 1, 30)})
    loaded = load_file(write(frame, tmp_path / "huge.parquet"), "y")
    profile = loaded.profile["columns"][0]
    assert (profile["min"], profile["max"]) == (-1.5e308, 1.5e308) and "histogram" not in profile


# ---- overrides ----------------------------------------------------------------------------
@pytest.mark.parametrize("role", ROLES)
def test_every_role_can_be_set(tmp_path: Path, role: str) -> None:
    column = {"boolean": "member", "datetime": "joined"}.get(role, "height")
    loaded = load_file(write(people(), tmp_path / "people.parquet"), roles={column: role})
    decision = next(c for c in loaded.columns if c.name == column)
    assert (decision.role, decision.overridden, decision.reason) == (role, True, "set by the caller")
    assert (column in loaded.feature_names) == (role in FEATURE_ROLES)
    # The other columns keep their inferred roles.
    assert {c.name: c.role for c in loaded.columns if c.name != column} == {
        name: expected for name, expected in EXPECTED_ROLES.items() if name != column
    }


def test_overrides_convert_values_to_the_declared_role(tmp_path: Path) -> None:
    frame = people().assign(answer=["yes", "no", "No", "YES"] * 15)
    loaded = load_file(
        write(frame, tmp_path / "people.csv"),
        roles={"answer": "boolean", "row_id": "numeric", "email": "categorical", "colour": "ignore"},
    )
    assert loaded.feature_names == ["row_id", "height", "member", "joined", "email", "answer"]
    assert loaded.frame["answer"].tolist()[:4] == [1.0, 0.0, 0.0, 1.0]
    assert loaded.frame["row_id"].dtype == np.float64 and loaded.frame["email"].iloc[0] == "user0@example.org"


@pytest.mark.parametrize(
    ("roles", "error", "message"),
    [
        (
            {"colour_typo": "numeric"},
            InvalidArgument,
            "column_roles names 1 column(s) the dataset does not have, e.g. 'colour_typo'; its columns are: 'row_id', ",
        ),
        (
            {"label": "categorical"},
            InvalidArgument,
            "column_roles sets a role for the target column 'label'; the target is chosen with target_column "
            "and its kind with task_kind",
        ),
        (
            {"colour": "numeric"},
            FailedPrecondition,
            "column 'colour' was declared numeric, but 60 of its values are not numbers; "
            "declare it categorical or fix the values",
        ),
        (
            {"colour": "boolean"},
            FailedPrecondition,
            "column 'colour' was declared boolean, but its values are not all true/false, yes/no or 0/1; "
            "declare it categorical instead",
        ),
        (
            {"height": "datetime"},
            FailedPrecondition,
            "column 'height' was declared datetime, but its values are not all ISO 8601 dates or times",
        ),
    ],
)
def test_impossible_overrides_are_refused(tmp_path: Path, roles: dict, error: type, message: str) -> None:
    with pytest.raises(error) as caught:
        load_file(write(people(), tmp_path / "people.csv"), roles=roles)
    assert message in str(caught.value)
    assert not any(word in str(caught.value) for word in ("'red'", "green", "blue"))


# ---- task inference -----------------------------------------------------------------------
TEXTBOOK = np.random.RandomState(11)


@pytest.mark.parametrize(
    ("target", "kind", "reason"),
    [
        # A Poisson count: few distinct values, but a long thin tail.
        (pd.Series(TEXTBOOK.poisson(3, 1000)), "regression", "some have fewer than 10 rows, like a count"),
        # A sum of integers: many distinct values.
        (pd.Series(TEXTBOOK.randint(0, 50, (1000, 4)).sum(axis=1)), "regression", "more than 20 classes"),
        (
            pd.Series(TEXTBOOK.choice([1, 2, 3], 300)),
            "classification",
            "3 distinct whole numbers, each with at least 10 rows",
        ),
        (pd.Series(TEXTBOOK.choice([1.0, 2.0, 3.0, np.nan], 300)), "classification", "3 distinct whole numbers"),
        (pd.Series(TEXTBOOK.choice(["cat", "dog", "eel"], 30)), "classification", "holds text labels"),
        (pd.Series(TEXTBOOK.choice(["1", "2"], 30)), "classification", "holds two distinct values"),
        (pd.Series(TEXTBOOK.rand(30) > 0.5), "classification", "holds labels"),
        (pd.Series(TEXTBOOK.normal(size=30)), "regression", "holds fractional numbers"),
    ],
)
def test_task_is_inferred_from_the_target_values(target: pd.Series, kind: str, reason: str) -> None:
    decision = logic.decide_task(target, "y")
    assert (decision.kind, decision.overridden) == (kind, False)
    assert reason in decision.reason


def test_a_target_without_finite_values_is_refused() -> None:
    with pytest.raises(FailedPrecondition, match=r"^target column 'y' has no finite values$"):
        logic.decide_task(pd.Series([np.inf, -np.inf, np.nan]), "y")


@pytest.mark.parametrize(("requested", "dtype"), [("regression", np.float64), ("classification", np.int64)])
def test_a_requested_task_overrides_the_inference(tmp_path: Path, requested: str, dtype) -> None:
    rng = np.random.RandomState(2)
    frame = pd.DataFrame({"x": rng.normal(size=200), "count": rng.poisson(2, 200)})
    path = write(frame, tmp_path / "counts.parquet")
    assert load_file(path, "count").task.kind == "regression"
    loaded = load_file(path, "count", task=requested)
    assert loaded.task == logic.TaskDecision(requested, f"{requested}, as requested", True)
    assert loaded.frame["count"].dtype == dtype


# ---- the real service ---------------------------------------------------------------------
def load_request(path: Path, target: str = "label", **roles: int) -> loader_pb2.LoadRequest:
    return loader_pb2.LoadRequest(source=str(path), target_column=target, column_roles=roles)


@pytest.mark.asyncio
@pytest.mark.stages("loader")
async def test_every_role_can_be_set_over_the_service(client: MeshClient, settings: Settings, tmp_path: Path) -> None:
    frame = people().assign(answer=["yes", "no"] * 30)
    path = write(frame, tmp_path / "people.csv")
    overrides = {
        "row_id": "numeric",
        "answer": "boolean",
        "email": "categorical",
        "joined": "datetime",
        "height": "identifier",
        "colour": "text",
        "member": "constant",
        "remark": "ignore",
    }
    assert set(overrides.values()) == set(ROLES)
    reply = await client.load(load_request(path, **{name: role_value(role) for name, role in overrides.items()}))
    summary = {c.name: (c.role, c.overridden) for c in reply.columns}
    assert summary == {
        **{name: (role_value(role), True) for name, role in overrides.items()},
        "unit": (ColumnRole.COLUMN_ROLE_CONSTANT, False),
    }
    assert list(reply.feature_names) == ["row_id", "joined", "email", "answer"]
    store = ArtifactStore(settings.artifact_root)
    stored, meta = read_table(store.get(reply.dataset), "dataset")
    assert meta["roles"] == {"row_id": "numeric", "joined": "datetime", "email": "categorical", "answer": "boolean"}
    assert stored["answer"].tolist()[:2] == [1.0, 0.0]
    schema = json_bytes_to_doc(store.get(reply.schema), "schema")
    assert schema["roles"] == {**EXPECTED_ROLES, **overrides}
    assert [c["overridden"] for c in schema["columns"]] == [c.name in overrides for c in reply.columns]


@pytest.mark.asyncio
@pytest.mark.stages("loader")
async def test_bad_overrides_over_the_service(client: MeshClient, tmp_path: Path) -> None:
    path = write(people(), tmp_path / "people.parquet")
    await expect_error(
        client.load(load_request(path, colour_typo=ColumnRole.COLUMN_ROLE_NUMERIC)),
        INVALID,
        "column_roles names 1 column(s) the dataset does not have, e.g. 'colour_typo'",
    )
    await expect_error(
        client.load(load_request(path, label=ColumnRole.COLUMN_ROLE_CATEGORICAL)),
        INVALID,
        "column_roles sets a role for the target column 'label'",
    )
    details = await expect_error(
        client.load(load_request(path, colour=ColumnRole.COLUMN_ROLE_NUMERIC)),
        FAILED,
        "column 'colour' was declared numeric, but 60 of its values are not numbers",
    )
    assert not any(word in details for word in ("'red'", "green", "blue"))
    for number in (0, 99):  # UNSPECIFIED, and a number the enum does not have
        await expect_error(
            client.load(load_request(path, colour=number)),
            INVALID,
            f"column_roles['colour'] has role number {number}; use one of COLUMN_ROLE_NUMERIC, COLUMN_ROLE_BOOLEAN",
        )


@pytest.mark.asyncio
async def test_csv_and_parquet_train_the_same_model(client: MeshClient, tmp_path: Path) -> None:
    table = people(rows=120, seed=4)
    # A label that depends on the features, so the model has something to learn.
    table["label"] = np.where((table["height"] > 170) | (table["colour"] == "red"), "yes", "no")
    runs = []
    for suffix in (".csv", ".parquet"):
        path = write(table, tmp_path / f"people{suffix}")
        runs.append(
            await client.run_pipeline(
                PipelineConfig(source=str(path), target_column="label", minimums={"accuracy": 0.5})
            )
        )
    from_csv, from_parquet = runs
    assert [(c.name, c.role, c.reason, c.missing_ratio, c.distinct_values) for c in from_csv.load.columns] == [
        (c.name, c.role, c.reason, c.missing_ratio, c.distinct_values) for c in from_parquet.load.columns
    ]
    assert from_csv.load.task_kind == from_parquet.load.task_kind == TaskKind.TASK_KIND_CLASSIFICATION
    assert from_csv.load.dataset.sha256 != from_parquet.load.dataset.sha256  # the metadata names the source
    # ... but the splits, the encoded matrices and the model are the same bytes.
    assert from_csv.features.x_train.sha256 == from_parquet.features.x_train.sha256
    assert from_csv.train.model.sha256 == from_parquet.train.model.sha256
    assert dict(from_csv.evaluate.metrics) == dict(from_parquet.evaluate.metrics)
    assert from_csv.evaluate.metrics["accuracy"] > 0.7
