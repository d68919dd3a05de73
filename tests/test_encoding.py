"""The features stage's encoders: every kind of column, fitted on train only; the stored
transformer works on raw loader columns; the trainer uses the feature schema."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier

from services.client.mesh import MeshClient, PipelineConfig
from services.features import logic
from services.runtime.errors import FailedPrecondition
from services.runtime.formats import json_bytes_to_doc, npy_to_array, read_table, skops_to_model
from services.runtime.settings import Settings
from services.runtime.store import ArtifactStore

BIG = 2 * 1024**3


def engineer(
    train: pd.DataFrame,
    test: pd.DataFrame,
    roles: dict[str, str],
    task: str = "classification",
    class_names: list[str] | None = None,
    **options,
) -> logic.Engineered:
    names = ["0", "1"] if class_names is None and task == "classification" else (class_names or [])
    return logic.engineer(train, test, "y", task, roles, names, logic.FeatureOptions(**options), BIG)


def column(result: logic.Engineered, name: str, part: str = "train") -> np.ndarray:
    matrix = result.x_train if part == "train" else result.x_test
    return matrix[:, result.feature_names.index(name)]


def entry(result: logic.Engineered, name: str) -> dict:
    return next(c for c in result.schema["columns"] if c["name"] == name)


def colours(rows: int, seed: int = 0) -> pd.DataFrame:
    """Three common colours and one rare one (2 rows), a number, and a binary target."""
    rng = np.random.RandomState(seed)
    values = ["red", "green", "blue"] * (rows // 3)
    values[:2] = ["violet", "violet"]
    return pd.DataFrame(
        {
            "colour": pd.Series(values, dtype="str"),
            "size": rng.normal(size=len(values)),
            "y": np.arange(len(values)) % 2,
        }
    )


ROLES = {"colour": "categorical", "size": "numeric"}


# ---- categorical --------------------------------------------------------------------------
def test_one_hot_groups_rare_levels_and_sends_unseen_test_levels_there() -> None:
    train = colours(60)
    test = pd.DataFrame(
        {"colour": pd.Series(["red", "teal", "violet", "blue"], dtype="str"), "size": [0.0] * 4, "y": [0, 1, 0, 1]}
    )
    result = engineer(train, test, ROLES, scaling="none")
    assert entry(result, "colour")["encoder"] == "one_hot"
    assert result.feature_names == ["size", "colour_blue", "colour_green", "colour_red", "colour_infrequent_sklearn"]
    one_hot = result.x_test[:, 1:]
    # red is red; teal (never seen) and violet (rare in train) both land in the infrequent column.
    np.testing.assert_array_equal(one_hot, [[0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 1], [1, 0, 0, 0]])


def test_unseen_levels_without_an_infrequent_group_encode_as_all_zeros() -> None:
    train = colours(60).assign(colour=lambda f: f["colour"].replace({"violet": "red"}))
    test = pd.DataFrame({"colour": pd.Series(["teal", "green"], dtype="str"), "size": [0.0, 0.0], "y": [0, 1]})
    result = engineer(train, test, ROLES, scaling="none")
    assert result.feature_names == ["size", "colour_blue", "colour_green", "colour_red"]
    np.testing.assert_array_equal(result.x_test[:, 1:], [[0, 0, 0], [0, 1, 0]])


def test_missing_categories_are_their_own_level() -> None:
    train = colours(60)
    train.loc[[5, 8, 11, 14, 17, 20], "colour"] = None
    test = pd.DataFrame({"colour": pd.Series([None, "red"], dtype="str"), "size": [0.0, 0.0], "y": [0, 1]})
    result = engineer(train, test, ROLES, scaling="none")
    assert "colour_(missing)" in result.feature_names
    np.testing.assert_array_equal(column(result, "colour_(missing)"), train["colour"].isna().astype(float))
    np.testing.assert_array_equal(column(result, "colour_(missing)", "test"), [1.0, 0.0])
    assert ["(missing)", 6] in entry(result, "colour")["levels"]
    assert entry(result, "colour")["missing_in_train"] == 6 and result.missing_values_imputed == 7


def test_a_categorical_column_without_values_in_train_is_one_missing_level() -> None:
    train = colours(30).assign(colour=pd.Series([None] * 30, dtype="str"))
    test = colours(9)
    result = engineer(train, test, ROLES, scaling="none")
    assert result.feature_names == ["size", "colour_(missing)"]
    np.testing.assert_array_equal(column(result, "colour_(missing)"), 1.0)


def test_many_levels_use_target_encoding_and_stay_narrow() -> None:
    rng = np.random.RandomState(7)
    rows, levels = 12_000, 5_000
    city = rng.randint(0, levels, rows)
    rate = rng.rand(levels)  # each city has its own rate of positives
    frame = pd.DataFrame(
        {
            "city": pd.Series([f"city-{c}" for c in city], dtype="str"),
            "size": rng.normal(size=rows),
            "y": (rng.rand(rows) < rate[city]).astype(np.int64),
        }
    )
    train, test = frame.iloc[:10_000].reset_index(drop=True), frame.iloc[10_000:].reset_index(drop=True)
    result = engineer(train, test, {"city": "categorical", "size": "numeric"})
    city_entry = entry(result, "city")
    assert city_entry["encoder"] == "target" and city_entry["levels_in_train"] > 4_000
    assert len(city_entry["levels"]) == logic.LISTED_LEVELS  # the schema lists a sample, counts them all
    assert result.feature_names == ["size", "city"] and result.x_train.shape == (10_000, 2)
    # The encoding carries signal: it correlates with the target in the held-out rows.
    assert np.corrcoef(column(result, "city", "test"), result.y_test)[0, 1] > 0.2


def test_target_encoding_sends_unseen_levels_to_the_train_mean() -> None:
    train = colours(90)
    test = pd.DataFrame({"colour": pd.Series(["teal", "red"], dtype="str"), "size": [0.0, 0.0], "y": [0, 1]})
    result = engineer(train, test, ROLES, scaling="none", categorical_encoding="target")
    target = result.transformer.named_steps["columns"].named_transformers_["target"].named_steps["encode"]
    assert column(result, "colour", "test")[0] == pytest.approx(target.target_mean_)
    assert target.target_mean_ == pytest.approx(train["y"].mean())


def test_target_encoding_needs_enough_rows_to_cross_fit() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        engineer(colours(6), colours(6), ROLES, categorical_encoding="target")
    assert str(caught.value) == (
        "target encoding of 'colour' cross-fits over 5 folds and needs at least 5 train rows in some class; "
        "use one_hot or ordinal encoding, or more data"
    )


def test_auto_falls_back_to_grouped_one_hot_when_target_encoding_cannot_cross_fit() -> None:
    train = colours(6)
    train["colour"] = pd.Series([f"shade-{i}" for i in range(6)], dtype="str")  # more levels than allowed
    result = engineer(train, colours(6), ROLES, max_one_hot_levels=2, min_level_count=1)
    assert entry(result, "colour")["encoder"] == "one_hot"
    assert len([n for n in result.feature_names if n.startswith("colour_")]) <= 3  # two levels and the rest


def test_ordinal_codes_are_marked_as_categorical_features() -> None:
    train = colours(60)
    test = pd.DataFrame({"colour": pd.Series(["teal", "blue"], dtype="str"), "size": [0.0, 0.0], "y": [0, 1]})
    result = engineer(train, test, ROLES, categorical_encoding="ordinal")
    assert result.feature_names == ["size", "colour"]
    assert result.categorical_indices == [1] and result.schema["categorical_feature_indices"] == [1]
    codes = column(result, "colour")
    assert set(codes) == {0.0, 1.0, 2.0, 3.0}  # blue, green, red, and the rare violet grouped
    assert column(result, "colour", "test").tolist() == [-1.0, 0.0]  # unseen is -1: missing to the trees
    # After selection the index follows the column to its new place.
    picked = engineer(train, test, ROLES, categorical_encoding="ordinal", select_k_best=1)
    assert picked.feature_names == ["colour"] and picked.categorical_indices == [0]


# ---- numbers ------------------------------------------------------------------------------
def gappy_splits() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train with gaps and a skewed column; test on another scale, so global statistics would differ."""
    rng = np.random.RandomState(1)
    train = pd.DataFrame(
        {"a": rng.exponential(1, 80), "b": rng.randint(0, 4, 80).astype(float), "y": np.arange(80) % 2}
    )
    train.loc[[3, 10, 40], "a"] = np.nan
    train.loc[[5, 6], "b"] = np.nan
    test = pd.DataFrame({"a": rng.normal(100, 5, 20), "b": np.full(20, 3.0), "y": np.arange(20) % 2})
    test.loc[[0, 7], "a"] = np.nan
    return train, test


@pytest.mark.parametrize("strategy", ["median", "mean", "most_frequent"])
def test_imputation_statistics_come_from_train_only(strategy: str) -> None:
    train, test = gappy_splits()
    result = engineer(train, test, {"a": "numeric", "b": "numeric"}, scaling="none", imputation=strategy)

    def statistic(values: pd.Series) -> float:
        if strategy == "most_frequent":
            counts = values.dropna().value_counts()
            return float(min(counts[counts == counts.max()].index))
        return float(getattr(values.dropna(), strategy)())

    for name in ("a", "b"):
        expected = statistic(train[name])
        if strategy != "most_frequent" or name == "b":
            assert expected != pytest.approx(statistic(pd.concat([train[name], test[name]])))
        np.testing.assert_allclose(column(result, name)[train[name].isna().to_numpy()], expected)
    np.testing.assert_allclose(column(result, "a", "test")[[0, 7]], statistic(train["a"]))
    np.testing.assert_allclose(column(result, "a", "test")[1], test["a"][1])
    assert result.missing_values_imputed == 7


def test_missing_indicators_add_a_column_per_gappy_train_column() -> None:
    train, test = gappy_splits()
    train["c"] = np.linspace(0, 1, 80)  # no gaps in train: no indicator
    test["c"] = 0.5
    test.loc[3, "c"] = np.nan
    roles = {"a": "numeric", "b": "numeric", "c": "numeric"}
    plain = engineer(train, test, roles, scaling="none")
    flagged = engineer(train, test, roles, scaling="none", missing_indicators=True)
    assert plain.feature_names == ["a", "b", "c"]
    assert flagged.feature_names == ["a", "b", "c", "missingindicator_a", "missingindicator_b"]
    np.testing.assert_array_equal(column(flagged, "missingindicator_a"), train["a"].isna().astype(float))
    np.testing.assert_array_equal(column(flagged, "missingindicator_a", "test"), test["a"].isna().astype(float))


def test_huge_numbers_that_overflow_when_scaled_are_a_failed_precondition() -> None:
    train, test = gappy_splits()
    train["a"] = train["a"] * 1e307
    with pytest.raises(FailedPrecondition, match=r"^encoding the features overflowed: some numbers are too large"):
        engineer(train, test, {"a": "numeric", "b": "numeric"})
    # Min-max scaling divides by the range and stays finite.
    assert np.isfinite(engineer(train, test, {"a": "numeric", "b": "numeric"}, scaling="minmax").x_train).all()


# ---- dates --------------------------------------------------------------------------------
def test_datetimes_become_calendar_parts_with_a_missing_flag() -> None:
    when = pd.Series(pd.date_range("2024-02-26 10:30", periods=40, freq="25h")).astype("datetime64[us]")
    when[[4, 9]] = pd.NaT
    train = pd.DataFrame({"when": when, "y": np.arange(40) % 2})
    test = pd.DataFrame(
        {"when": pd.Series(pd.to_datetime(["2024-02-29 10:30", None])).astype("datetime64[us]"), "y": [0, 1]}
    )
    result = engineer(train, test, {"when": "datetime"}, scaling="none")
    assert result.feature_names == [
        "when_year",
        "when_month",
        "when_day",
        "when_dayofweek",
        "when_hour",
        "when_days_elapsed",
        "when_missing",
    ]
    # 2024-02-29 is a Thursday (3), 3 days and 3 hours after the first train value.
    np.testing.assert_allclose(result.x_test[0], [2024, 2, 29, 3, 10, 3.0, 0])
    median = train["when"].dropna().median()
    filled = result.x_test[1]
    assert filled[-1] == 1.0 and filled[:3].tolist() == [median.year, median.month, median.day]
    np.testing.assert_array_equal(column(result, "when_missing"), train["when"].isna().astype(float))
    assert entry(result, "when")["encoder"] == "datetime_parts"


def test_dates_without_gaps_or_times_get_fewer_parts() -> None:
    when = pd.Series(pd.date_range("2024-01-01", periods=30, freq="D")).astype("datetime64[us]")
    train = pd.DataFrame({"when": when, "y": np.arange(30) % 2})
    result = engineer(train, train.iloc[:5], {"when": "datetime"})
    assert result.feature_names == ["when_year", "when_month", "when_day", "when_dayofweek", "when_days_elapsed"]


# ---- over the mesh ------------------------------------------------------------------------
def shop(rows: int = 240, seed: int = 3) -> pd.DataFrame:
    rng = np.random.RandomState(seed)
    when = pd.Series(pd.date_range("2024-01-01", periods=rows, freq="7h")).astype("datetime64[us]")
    when[::17] = pd.NaT
    frame = pd.DataFrame(
        {
            "basket": rng.gamma(2, 20, rows).round(2),
            "store": rng.choice(["north", "south", "east", "west"], rows),
            "member": rng.rand(rows) > 0.4,
            "visited": when,
        }
    )
    frame.loc[rng.choice(rows, 12, replace=False), "basket"] = np.nan
    frame.loc[rng.choice(rows, 9, replace=False), "store"] = None
    frame["returned"] = np.where((frame["basket"].fillna(40) > 45) | (frame["store"] == "north"), "yes", "no")
    return frame


@pytest.mark.asyncio
async def test_the_stored_transformer_encodes_raw_loader_columns(
    client: MeshClient, settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "shop.parquet"
    shop().to_parquet(path)
    run = await client.run_pipeline(
        PipelineConfig(source=str(path), target_column="returned", minimums={"accuracy": 0.6})
    )
    assert list(run.load.feature_names) == ["basket", "store", "member", "visited"]
    assert run.features.missing_values_imputed == 12 + 9 + 15  # basket, store, visited
    store = ArtifactStore(settings.artifact_root)
    transformer = skops_to_model(store.get(run.features.transformer), "transformer")
    test, _ = read_table(store.get(run.preprocess.test), "test")
    x_test = npy_to_array(store.get(run.features.x_test), "x_test")
    np.testing.assert_allclose(transformer.transform(test.drop(columns="returned")), x_test)
    # The loader's whole dataset, as it is stored, goes through the same transformer.
    dataset, _ = read_table(store.get(run.load.dataset), "dataset")
    encoded = transformer.transform(dataset.drop(columns="returned"))
    assert encoded.shape == (240, len(run.features.feature_names)) and np.isfinite(encoded).all()
    schema = json_bytes_to_doc(store.get(run.features.feature_schema), "feature_schema")
    assert [(c["name"], c["encoder"]) for c in schema["columns"]] == [
        ("basket", "numeric"),
        ("store", "one_hot"),
        ("member", "numeric"),
        ("visited", "datetime_parts"),
    ]
    assert schema["feature_names"] == list(run.features.feature_names)
    assert "store_(missing)" in schema["feature_names"] and "visited_missing" in schema["feature_names"]
    assert run.evaluate.metrics["accuracy"] > 0.8


@pytest.mark.asyncio
async def test_hist_gradient_boosting_gets_native_categorical_features(
    client: MeshClient, settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "shop.csv"
    shop().to_csv(path, index=False)
    run = await client.run_pipeline(
        PipelineConfig(
            source=str(path),
            target_column="returned",
            model="hist_gradient_boosting",
            hyperparameters={"max_iter": "20"},
            minimums={"accuracy": 0.6},
        )
    )
    store = ArtifactStore(settings.artifact_root)
    schema = json_bytes_to_doc(store.get(run.features.feature_schema), "feature_schema")
    assert [c["encoder"] for c in schema["columns"]] == ["numeric", "ordinal", "numeric", "datetime_parts"]
    store_index = list(run.features.feature_names).index("store")
    assert schema["categorical_feature_indices"] == [store_index]
    model = skops_to_model(store.get(run.train.model), "model")
    assert isinstance(model, HistGradientBoostingClassifier)
    assert list(model.feature_names_in_) == list(run.features.feature_names)
    assert model.is_categorical_.tolist() == [i == store_index for i in range(len(run.features.feature_names))]
    assert run.evaluate.metrics["accuracy"] > 0.8
