"""A plain flytekit pipeline: the comparison point for the mesh's `pyflyte run`.

    .venv/bin/pyflyte run bench/flyte_plain.py plain_pipeline --rows 100000

The usual way to write the same pipeline without services: five tasks that
hand the data itself to each other, so Flyte serialises every DataFrame
(StructuredDataset, Parquet), every matrix (its numpy transformer, .npy) and
the model (its scikit-learn transformer, joblib) between tasks. Each task
calls the same stage logic the mesh's services and bench_scale.py's
in-process baseline call (services/<stage>/logic.py). Flyte's cache is off
(the default), so every run computes.

The dataset is `synthetic:classification?rows=N&features=F&classes=2&seed=S`,
the model is the classification default (logistic_regression) and the split
and model seed is S, as in bench_scale.py. The loader accepts datasets up to
MLMESH_MAX_DATASET_BYTES, like the mesh's loader.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
from flytekit import task, workflow
from sklearn.base import BaseEstimator

from services.evaluator import logic as evaluator_logic
from services.features import logic as features_logic
from services.loader import logic as loader_logic
from services.preprocess import logic as preprocess_logic
from services.runtime.settings import Settings
from services.runtime.stage import Run
from services.trainer import logic as trainer_logic

TEST_FRACTION = 0.2  # the mesh's default (PipelineConfig.test_fraction)


def synthetic_source(rows: int, features: int, seed: int) -> str:
    return f"synthetic:classification?rows={rows}&features={features}&classes=2&seed={seed}"


class Loaded(NamedTuple):
    frame: pd.DataFrame
    target_column: str
    task_kind: str
    roles: dict[str, str]


class Splits(NamedTuple):
    train: pd.DataFrame
    test: pd.DataFrame
    class_names: list[str]


class Matrices(NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@task(cache=False)
def load(rows: int, features: int, seed: int) -> Loaded:
    source = loader_logic.parse_source(synthetic_source(rows, features, seed))
    loaded = loader_logic.load_dataset(source, "", None, Settings.from_env().max_dataset_bytes)
    roles = {c.name: str(c.role) for c in loaded.columns}
    # Flyte checks a str output's exact type: the TaskKind member becomes its plain value.
    return Loaded(loaded.frame, loaded.target_column, loaded.task.kind.value, roles)


@task(cache=False)
def preprocess(frame: pd.DataFrame, target_column: str, task_kind: str, seed: int) -> Splits:
    prepared = preprocess_logic.preprocess(frame, target_column, task_kind, TEST_FRACTION, seed)
    return Splits(prepared.train, prepared.test, prepared.class_names)


@task(cache=False)
def build_features(
    train: pd.DataFrame,
    test: pd.DataFrame,
    target_column: str,
    task_kind: str,
    roles: dict[str, str],
    class_names: list[str],
    seed: int,
) -> Matrices:
    engineered = features_logic.engineer(
        train,
        test,
        target_column,
        task_kind,
        roles,
        class_names,
        features_logic.FeatureOptions(seed=seed),
        Settings.from_env().max_dataset_bytes,
    )
    return Matrices(engineered.x_train, engineered.y_train, engineered.x_test, engineered.y_test)


@task(cache=False)
def train(x_train: np.ndarray, y_train: np.ndarray, task_kind: str, seed: int) -> BaseEstimator:
    model_name = trainer_logic.DEFAULT_MODELS[task_kind]
    estimator = trainer_logic.build_estimator(task_kind, model_name, {}, seed)
    estimator, _ = trainer_logic.fit(estimator, x_train, y_train, Run.detached())
    return estimator


@task(cache=False)
def evaluate(model: BaseEstimator, x_test: np.ndarray, y_test: np.ndarray) -> dict[str, float]:
    return {name: float(value) for name, value in evaluator_logic.evaluate(model, x_test, y_test).metrics.items()}


@workflow
def plain_pipeline(rows: int = 100_000, features: int = 32, seed: int = 1) -> dict[str, float]:
    loaded = load(rows=rows, features=features, seed=seed)
    splits = preprocess(frame=loaded.frame, target_column=loaded.target_column, task_kind=loaded.task_kind, seed=seed)
    matrices = build_features(
        train=splits.train,
        test=splits.test,
        target_column=loaded.target_column,
        task_kind=loaded.task_kind,
        roles=loaded.roles,
        class_names=splits.class_names,
        seed=seed,
    )
    model = train(x_train=matrices.x_train, y_train=matrices.y_train, task_kind=loaded.task_kind, seed=seed)
    return evaluate(model=model, x_test=matrices.x_test, y_test=matrices.y_test)


if __name__ == "__main__":
    print(plain_pipeline())
