"""What each workflow input means, written once.

The workflows' docstrings are built from this table (`explained`), in the Flyte style
(`:param name: ...`), and `pyflyte run workflow/pipeline.py <workflow> --help` shows each
line beside its option; tests/test_workflow_interface.py checks that every input has one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., object])

INPUT_HELP: dict[str, str] = {
    "source": (
        "What to train on: sklearn:NAME (breast_cancer, diabetes, digits, iris, wine), "
        "synthetic:classification?rows=1000 (or synthetic:regression?...), or a CSV or Parquet file's path or "
        "URL."
    ),
    "target_column": 'The column to predict; required for files ("" takes a sklearn: or synthetic: source\'s own target).',
    "task_kind": 'classification or regression; "" (the default) lets the loader infer it from the target.',
    "column_roles": (
        'Roles that override the inferred ones, e.g. {"zip": "categorical", "row_id": "ignore"}; roles: '
        "numeric, boolean, categorical, datetime, identifier, text, constant, ignore."
    ),
    "model": (
        "The model to train: logistic_regression, random_forest, hist_gradient_boosting or sgd for "
        'classification; ridge, random_forest or hist_gradient_boosting for regression. "" trains '
        "logistic_regression or ridge."
    ),
    "hyperparameters": (
        'The model\'s hyperparameters, e.g. {"n_estimators": 300, "max_depth": 8}; numbers may be written as '
        "numbers or as text."
    ),
    "candidates": (
        'The models to try, each with its hyperparameters, e.g. [{"model": "ridge"}, {"model": "random_forest", '
        '"hyperparameters": {"max_depth": "8"}}]. Empty: the task kind\'s defaults (DEFAULT_CANDIDATES in '
        "workflow/tasks.py)."
    ),
    "metric": (
        'The metric that picks the winner; "" for f1_macro (classification) or r2 (regression). log_loss, mae '
        "and rmse are minimised, the others maximised."
    ),
    "test_fraction": "The share of rows held out for the evaluation.",
    "seed": "Seed of the split, of target encoding's cross-fitting and of the model.",
    "drop_duplicates": "Drop rows that repeat an earlier row exactly.",
    "drop_incomplete_rows": "Drop rows with a missing feature instead of imputing it.",
    "numeric_imputation": "How missing numbers are filled in, from the train split's statistics.",
    "missing_indicators": "Add a 0/1 column per numeric column with gaps.",
    "categorical_encoding": "auto: one-hot for few levels, target encoding for many, native categories for hist_gradient_boosting.",
    "scaling": "How numeric model inputs are rescaled (none leaves them as they are).",
    "polynomial_degree": "Add polynomial features up to this degree (at most 4); 0 or 1 adds none.",
    "select_k_best": "Keep the k best model inputs by a univariate score; 0 keeps all.",
    "minimums": (
        'The lowest acceptable metrics, e.g. {"accuracy": 0.95}. With neither minimums nor maximums the task '
        "kind's default applies: accuracy >= 0.9, or r2 >= 0.3."
    ),
    "maximums": 'The highest acceptable metrics, e.g. {"rmse": 5000}.',
    "registry_name": 'The name a PROMOTE is registered under; "" for <dataset>-<model>.',
    "recompute": "Every stage computes again instead of answering from its memo.",
}


def explained(summary: str, **specific: str) -> Callable[[F], F]:
    """Give a workflow a Flyte-style docstring: `summary`, then a `:param` line for each of its
    inputs, worded by INPUT_HELP unless `specific` words it for this workflow. Goes under
    `@workflow`, which reads the docstring; an input with no words fails at import."""

    def decorate(function: F) -> F:
        names = list(inspect.signature(function).parameters)
        missing = [name for name in names if name not in specific and name not in INPUT_HELP]
        if missing:
            raise TypeError(f"{function.__name__}: no help for the input(s) {', '.join(missing)}; add it to INPUT_HELP")
        lines = [summary, "", *(f":param {name}: {specific.get(name) or INPUT_HELP[name]}" for name in names)]
        function.__doc__ = "\n".join(lines)
        return function

    return decorate


def headline_only(workflows: Iterable[Any]) -> None:
    """Keep only the summary in each workflow's __doc__. `@workflow` has already read the `:param`
    lines into the inputs' descriptions, which `pyflyte run ... --help` shows beside each option;
    pyflyte also prints __doc__ above the options, where the lines would only repeat."""
    for entity in workflows:
        entity.__doc__ = (entity.__doc__ or "").split("\n\n:param", 1)[0]
