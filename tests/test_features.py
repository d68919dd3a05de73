"""Features stage: transformations fitted on train only; then the real service."""

from __future__ import annotations

from math import comb

import numpy as np
import pandas as pd
import pytest

from mlmesh.common.v1.common_pb2 import TaskKind
from mlmesh.features.v1 import features_pb2
from mlmesh.preprocess.v1 import preprocess_pb2
from services.client.mesh import MeshClient
from services.features import logic
from services.runtime.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.runtime.formats import json_bytes_to_doc, npy_to_array, read_table, skops_to_model
from services.runtime.settings import Settings
from services.runtime.store import ArtifactStore
from tests.helpers import EXHAUSTED, FAILED, INVALID, assert_serving, expect_error, prepare

BIG = 2 * 1024**3
SYNTH = "synthetic:classification?rows=400&features=8&classes=3&seed=1"
# The service tests here load and preprocess a table, then build its features: three stages.
pytestmark = pytest.mark.stages("loader", "preprocess", "features")


def splits(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and test whose distributions differ, so leaked statistics would show."""
    rng = np.random.default_rng(seed)
    train = pd.DataFrame(rng.normal(0, 1, (80, 3)), columns=["a", "b", "c"])
    test = pd.DataFrame(rng.normal(50, 10, (20, 3)), columns=["a", "b", "c"])
    train["y"] = np.arange(80) % 2
    test["y"] = np.arange(20) % 2
    return train, test


NUMERIC = {"a": "numeric", "b": "numeric", "c": "numeric"}


def options(scaling: str = "standard", degree: int = 1, k: int = 0, **more) -> logic.FeatureOptions:
    return logic.FeatureOptions(scaling=scaling, polynomial_degree=degree, select_k_best=k, **more)


def engineer(scaling: str = "standard", degree: int = 1, k: int = 0, max_bytes: int = BIG, task="classification"):
    train, test = splits()
    return logic.engineer(train, test, "y", task, NUMERIC, ["0", "1"], options(scaling, degree, k), max_bytes)


def numeric_step(transformer, step: str):
    """A step of the numeric branch (impute -> scale) of a fitted features transformer."""
    return transformer.named_steps["columns"].named_transformers_["numeric"].named_steps[step]


# ---- pure logic ---------------------------------------------------------------------------
def test_standard_scaler_sees_only_the_train_split() -> None:
    train, test = splits()
    result = engineer("standard")
    scaler = numeric_step(result.transformer, "scale")
    x_train = train[["a", "b", "c"]].to_numpy()
    both = np.vstack([x_train, test[["a", "b", "c"]].to_numpy()])
    np.testing.assert_allclose(scaler.mean_, x_train.mean(axis=0))
    np.testing.assert_allclose(scaler.scale_, x_train.std(axis=0))
    assert not np.allclose(scaler.mean_, both.mean(axis=0))
    np.testing.assert_allclose(result.x_train.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(result.x_train.std(axis=0), 1)
    # The test split is transformed with train statistics, so it is far from centred.
    np.testing.assert_allclose(result.x_test, (test[["a", "b", "c"]].to_numpy() - scaler.mean_) / scaler.scale_)
    assert result.x_test.mean() > 10
    assert result.y_train.dtype == np.int64 and result.y_train.tolist() == train["y"].tolist()


def test_minmax_and_robust_scalers_use_train_statistics() -> None:
    train, _test = splits()
    x_train = train[["a", "b", "c"]].to_numpy()
    minmax = engineer("minmax")
    scaler = numeric_step(minmax.transformer, "scale")
    np.testing.assert_allclose(scaler.data_min_, x_train.min(axis=0))
    np.testing.assert_allclose(scaler.data_max_, x_train.max(axis=0))
    np.testing.assert_allclose(minmax.x_train.min(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(minmax.x_train.max(axis=0), 1)
    assert minmax.x_test.min() > 1  # test values lie far beyond the train range

    robust = engineer("robust")
    scaler = numeric_step(robust.transformer, "scale")
    np.testing.assert_allclose(scaler.center_, np.median(x_train, axis=0))
    q75, q25 = np.percentile(x_train, [75, 25], axis=0)
    np.testing.assert_allclose(scaler.scale_, q75 - q25)
    np.testing.assert_allclose(np.median(robust.x_train, axis=0), 0, atol=1e-12)


def test_no_scaling_passes_values_through() -> None:
    train, test = splits()
    result = engineer("none")
    np.testing.assert_array_equal(result.x_train, train[["a", "b", "c"]].to_numpy())
    np.testing.assert_array_equal(result.x_test, test[["a", "b", "c"]].to_numpy())
    assert result.feature_names == ["a", "b", "c"]


@pytest.mark.parametrize(("degree", "width"), [(1, 3), (2, 9), (3, 19), (4, 34)])
def test_polynomial_width(degree: int, width: int) -> None:
    result = engineer("none", degree=degree)
    assert result.x_train.shape == (80, width) and result.x_test.shape == (20, width)
    assert len(result.feature_names) == width
    if degree > 1:
        assert logic.expanded_width(3, degree) == width
        assert "a b" in result.feature_names and "a^2" in result.feature_names
        train, _ = splits()
        column = result.feature_names.index("a b")
        np.testing.assert_allclose(result.x_train[:, column], train["a"] * train["b"])


def test_expanded_width_matches_the_formula() -> None:
    for n in (1, 2, 5, 30):
        for degree in (2, 3, 4):
            assert logic.expanded_width(n, degree) == comb(n + degree, degree) - 1


def test_select_k_best_keeps_k_informative_columns() -> None:
    rng = np.random.default_rng(1)
    y = np.arange(200) % 2
    train = pd.DataFrame(rng.normal(size=(200, 6)), columns=[f"n{i}" for i in range(6)])
    train["signal"] = y * 3.0 + rng.normal(0, 0.1, 200)
    train["y"] = y
    test = train.iloc[:40].copy()
    roles = {name: "numeric" for name in train.columns if name != "y"}
    result = logic.engineer(train, test, "y", "classification", roles, ["0", "1"], options("standard", 1, 2), BIG)
    assert result.x_train.shape == (200, 2) and result.x_test.shape == (40, 2)
    assert len(result.feature_names) == 2 and "signal" in result.feature_names

    after_poly = logic.engineer(train, test, "y", "classification", roles, ["0", "1"], options("none", 2, 5), BIG)
    assert after_poly.x_train.shape[1] == 5
    assert any("signal" in name for name in after_poly.feature_names)
    assert after_poly.categorical_indices == [] and after_poly.schema["categorical_feature_indices"] == []

    regression = train.assign(y=train["signal"] * 2 + rng.normal(0, 0.5, 200))
    result = logic.engineer(regression, regression.iloc[:10], "y", "regression", roles, [], options("none", 1, 1), BIG)
    assert result.feature_names == ["signal"] and result.y_train.dtype == np.float64


def test_logic_errors() -> None:
    with pytest.raises(InvalidArgument, match=r"select_k_best=4 exceeds the 3 features available$"):
        engineer(k=4)
    with pytest.raises(
        InvalidArgument, match=r"select_k_best=10 exceeds the 9 features available after polynomial expansion$"
    ):
        engineer(degree=2, k=10)
    assert engineer(degree=2, k=9).x_train.shape == (80, 9)  # all nine products and powers
    with pytest.raises(ResourceExhausted, match="polynomial_degree=4 on 3 features makes 34 columns"):
        engineer(degree=4, max_bytes=34 * 80 * 8 - 1)
    engineer(degree=4, max_bytes=34 * 80 * 8)  # exactly at the limit is allowed

    train, test = splits()
    with pytest.raises(FailedPrecondition, match="different feature columns"):
        logic.engineer(
            train, test.rename(columns={"c": "d"}), "y", "classification", NUMERIC, ["0", "1"], options(), BIG
        )
    with pytest.raises(FailedPrecondition, match="test has no target column 'y'"):
        logic.engineer(train, test.drop(columns="y"), "y", "classification", NUMERIC, ["0", "1"], options(), BIG)
    with pytest.raises(FailedPrecondition, match="train has columns without a role; pass splits written by preprocess"):
        logic.engineer(train, test, "y", "classification", {"a": "numeric", "b": "numeric"}, ["0", "1"], options(), BIG)


def test_missing_numbers_are_imputed_inside_the_transformer() -> None:
    """Gaps no longer stop the features stage: the fitted imputer fills them, in train and test alike."""
    train, test = splits()
    train.loc[3, "b"] = np.nan
    test.loc[[0, 5], "b"] = np.nan
    result = logic.engineer(train, test, "y", "classification", NUMERIC, ["0", "1"], options("none"), BIG)
    train_median = float(np.nanmedian(train["b"]))
    assert numeric_step(result.transformer, "impute").statistics_[1] == pytest.approx(train_median)
    assert result.x_train[3, 1] == pytest.approx(train_median)
    np.testing.assert_allclose(result.x_test[[0, 5], 1], train_median)
    assert result.missing_values_imputed == 3
    assert np.isfinite(result.x_train).all() and np.isfinite(result.x_test).all()


# ---- the real service ---------------------------------------------------------------------
def build(prepared: preprocess_pb2.PreprocessResponse, **kwargs) -> features_pb2.BuildFeaturesRequest:
    return features_pb2.BuildFeaturesRequest(train=prepared.train, test=prepared.test, **kwargs)


@pytest.mark.asyncio
async def test_service_fits_scaler_on_train_split_only(client: MeshClient, settings: Settings) -> None:
    prepared = await prepare(client, SYNTH, seed=3)
    reply = await client.build_features(build(prepared))
    assert reply.task_kind == TaskKind.TASK_KIND_CLASSIFICATION
    assert list(reply.feature_names) == [f"x{i}" for i in range(8)]
    store = ArtifactStore(settings.artifact_root)
    train = read_table(store.get(prepared.train), "train")[0]
    test = read_table(store.get(prepared.test), "test")[0]
    raw_train = train.drop(columns="target").to_numpy()
    raw_test = test.drop(columns="target").to_numpy()

    transformer = skops_to_model(store.get(reply.transformer), "transformer")
    scaler = numeric_step(transformer, "scale")
    np.testing.assert_allclose(scaler.mean_, raw_train.mean(axis=0))
    np.testing.assert_allclose(scaler.scale_, raw_train.std(axis=0))
    assert not np.allclose(scaler.mean_, np.vstack([raw_train, raw_test]).mean(axis=0))

    x_train = npy_to_array(store.get(reply.x_train), "x_train")
    x_test = npy_to_array(store.get(reply.x_test), "x_test")
    y_train = npy_to_array(store.get(reply.y_train), "y_train")
    y_test = npy_to_array(store.get(reply.y_test), "y_test")
    assert x_train.shape == (320, 8) and x_test.shape == (80, 8)
    np.testing.assert_allclose(x_test, (raw_test - raw_train.mean(axis=0)) / raw_train.std(axis=0))
    assert y_train.dtype == np.int64 and y_train.tolist() == train["target"].tolist()
    assert y_test.tolist() == test["target"].tolist()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "scaling",
    [
        features_pb2.SCALING_UNSPECIFIED,
        features_pb2.SCALING_STANDARD,
        features_pb2.SCALING_MINMAX,
        features_pb2.SCALING_ROBUST,
        features_pb2.SCALING_NONE,
    ],
)
async def test_each_scaling_option(client: MeshClient, settings: Settings, scaling: int) -> None:
    prepared = await prepare(client, SYNTH, seed=3)
    reply = await client.build_features(build(prepared, scaling=scaling))
    store = ArtifactStore(settings.artifact_root)
    x_train = npy_to_array(store.get(reply.x_train), "x_train")
    raw = read_table(store.get(prepared.train), "train")[0].drop(columns="target").to_numpy()
    if scaling in (features_pb2.SCALING_UNSPECIFIED, features_pb2.SCALING_STANDARD):
        np.testing.assert_allclose(x_train.mean(axis=0), 0, atol=1e-9)
        np.testing.assert_allclose(x_train.std(axis=0), 1)
    elif scaling == features_pb2.SCALING_MINMAX:
        np.testing.assert_allclose(x_train.min(axis=0), 0, atol=1e-12)
        np.testing.assert_allclose(x_train.max(axis=0), 1)
    elif scaling == features_pb2.SCALING_ROBUST:
        np.testing.assert_allclose(np.median(x_train, axis=0), 0, atol=1e-9)
        q75, q25 = np.percentile(x_train, [75, 25], axis=0)
        np.testing.assert_allclose(q75 - q25, 1)
    else:
        np.testing.assert_array_equal(x_train, raw)


@pytest.mark.asyncio
async def test_unspecified_scaling_is_standard(client: MeshClient) -> None:
    prepared = await prepare(client, SYNTH, seed=3)
    standard = await client.build_features(build(prepared, scaling=features_pb2.SCALING_STANDARD))
    unspecified = await client.build_features(build(prepared))
    assert unspecified.stage.cache_hit and unspecified.stage.cache_key == standard.stage.cache_key
    assert unspecified.x_train == standard.x_train


@pytest.mark.asyncio
async def test_polynomial_degree_and_k_best_widths(client: MeshClient, settings: Settings) -> None:
    prepared = await prepare(client, SYNTH, seed=3)
    store = ArtifactStore(settings.artifact_root)
    for degree, width in ((0, 8), (1, 8), (2, comb(10, 2) - 1), (3, comb(11, 3) - 1)):
        reply = await client.build_features(build(prepared, polynomial_degree=degree))
        assert len(reply.feature_names) == width
        assert npy_to_array(store.get(reply.x_train), "x_train").shape == (320, width)
        assert npy_to_array(store.get(reply.x_test), "x_test").shape == (80, width)
    one = await client.build_features(build(prepared, polynomial_degree=1))
    assert one.stage.cache_hit  # degree 1 is the same request as degree 0

    picked = await client.build_features(build(prepared, select_k_best=3))
    assert len(picked.feature_names) == 3 and set(picked.feature_names) <= {f"x{i}" for i in range(8)}
    assert npy_to_array(store.get(picked.x_test), "x_test").shape == (80, 3)
    # k counts the columns after the expansion: 44 are available from 8 features at degree 2
    both = await client.build_features(build(prepared, polynomial_degree=2, select_k_best=12))
    assert len(both.feature_names) == 12
    schema = json_bytes_to_doc(store.get(both.feature_schema), "feature_schema")
    assert schema["feature_names"] == list(both.feature_names) and schema["categorical_feature_indices"] == []


@pytest.mark.asyncio
async def test_regression_targets_stay_float(client: MeshClient, settings: Settings) -> None:
    prepared = await prepare(client, "synthetic:regression?rows=200&features=4&seed=2", seed=3)
    reply = await client.build_features(build(prepared, select_k_best=2))
    assert reply.task_kind == TaskKind.TASK_KIND_REGRESSION and len(reply.feature_names) == 2
    y_train = npy_to_array(ArtifactStore(settings.artifact_root).get(reply.y_train), "y_train")
    assert y_train.dtype == np.float64 and len(y_train) == 160


@pytest.mark.asyncio
async def test_features_are_deterministic(client: MeshClient) -> None:
    prepared = await prepare(client, SYNTH, seed=3)
    first = await client.build_features(build(prepared, polynomial_degree=2, select_k_best=5, force_recompute=True))
    again = await client.build_features(build(prepared, polynomial_degree=2, select_k_best=5, force_recompute=True))
    assert not again.stage.cache_hit
    for name in ("x_train", "y_train", "x_test", "y_test", "transformer", "feature_schema"):
        assert getattr(first, name).sha256 == getattr(again, name).sha256, name
    assert len(first.feature_names) == 5


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"polynomial_degree": 5}, ["polynomial_degree must be between 0 and 4, got 5"]),
        ({"polynomial_degree": -1}, ["polynomial_degree must be between 0 and 4, got -1"]),
        ({"select_k_best": 9}, ["select_k_best=9 exceeds the 8 features available"]),
        (
            {"polynomial_degree": 2, "select_k_best": 45},
            ["select_k_best=45 exceeds the 44 features available after polynomial expansion"],
        ),
        ({"select_k_best": -2}, ["select_k_best must be 0 (keep all) or positive, got -2"]),
        ({"scaling": 42}, ["scaling=42 is not a known Scaling"]),
        ({"numeric_imputation": 42}, ["numeric_imputation=42 is not a known NumericImputation"]),
        ({"categorical_encoding": 42}, ["categorical_encoding=42 is not a known CategoricalEncoding"]),
        ({"max_one_hot_levels": 1001}, ["max_one_hot_levels must be between 1 and 1000 (0 for the default), got 1001"]),
        ({"min_level_count": -1}, ["min_level_count must be between 1 and 1000000 (0 for the default), got -1"]),
        ({"seed": 2**32}, [f"seed must be in [0, 2^32), got {2**32}"]),
    ],
)
async def test_bad_feature_options(client: MeshClient, mesh, kwargs: dict, fragments: list[str]) -> None:
    prepared = await prepare(client, SYNTH, seed=3)
    await expect_error(client.build_features(build(prepared, **kwargs)), INVALID, *fragments)
    await assert_serving(mesh["features"])


@pytest.mark.asyncio
async def test_bad_inputs(client: MeshClient, mesh) -> None:
    prepared = await prepare(client, SYNTH, seed=3)
    await expect_error(
        client.build_features(features_pb2.BuildFeaturesRequest(test=prepared.test)), INVALID, "train is required"
    )
    await assert_serving(mesh["features"])
    await expect_error(
        client.build_features(features_pb2.BuildFeaturesRequest(train=prepared.train)), INVALID, "test is required"
    )
    await assert_serving(mesh["features"])

    other = await prepare(client, "synthetic:classification?rows=100&features=5&seed=2", seed=3)
    mixed = features_pb2.BuildFeaturesRequest(train=prepared.train, test=other.test)
    await expect_error(client.build_features(mixed), FAILED, "must both come from the same preprocess run")
    await assert_serving(mesh["features"])
    swapped = features_pb2.BuildFeaturesRequest(train=prepared.test, test=prepared.train)
    await expect_error(
        client.build_features(swapped), FAILED, "the train and test refs preprocess returned, in that order"
    )
    await assert_serving(mesh["features"])

    wide = await prepare(client, "synthetic:classification?rows=1000&features=60&seed=2", seed=3)
    await expect_error(
        client.build_features(build(wide, polynomial_degree=4)),
        EXHAUSTED,
        "polynomial_degree=4 on 60 features",
        "lower the degree",
    )
    await assert_serving(mesh["features"])
