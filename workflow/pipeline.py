"""The thin Flyte workflow: two workflows over one sub-workflow and ten tasks, passing
artifact references.

    pyflyte run workflow/pipeline.py training_pipeline
    pyflyte run workflow/pipeline.py sweep_pipeline
    pyflyte run --remote workflow/pipeline.py training_pipeline   # on a Flyte cluster
    pyflyte run workflow/pipeline.py training_pipeline --help     # every input, explained

Five tasks make one stage call each: load, preprocess, build_features, train and
evaluate (workflow/tasks.py). promote registers a PROMOTE and assembles the result,
and serve has the serving stage load the registered version and answer a smoke request;
the sweep trains and evaluates every candidate in one task, picks the best, and
compares them on one page:

    prepare:           load -> preprocess -> build_features
    training_pipeline: prepare -> train -> evaluate -> promote -> serve
    sweep_pipeline:    prepare -> train_candidates -> pick_best -> promote -> serve -> compare

Nothing heavier than a reference, a metric or a reason ever passes through
Flyte: datasets, matrices and models stay in the artifact store. The services
are found through the same MLMESH_*_ADDRESS variables as the `mlmesh` CLI.
"""

from __future__ import annotations

import warnings

from flytekit import CronSchedule, LaunchPlan, workflow

from services.runtime.vocabulary import CategoricalEncoding, NumericImputation, Scaling, TaskKindChoice
from workflow.inputs import explained, headline_only
from workflow.tasks import (
    build_features,
    compare,
    evaluate,
    load,
    pick_best,
    preprocess,
    promote,
    serve,
    train,
    train_candidates,
)
from workflow.values import HyperparameterValue, ModelCandidate, PipelineResult, Prepared, SweepResult, Threshold

# pyflyte declares every bool input twice (--x/--no_x and --x/--no-x), and click
# warns about the repeated --x on every run. The flags work; the warning is noise.
warnings.filterwarnings("ignore", message=r"The parameter --\w+ is used more than once", category=UserWarning)


# ---- workflows -----------------------------------------------------------------------------
@workflow
@explained(
    "Load the source, split it, and build the model inputs: the chain both pipelines train on.",
    model=(
        'The model the features are built for ("" for any): hist_gradient_boosting gets native categories under '
        "categorical_encoding auto."
    ),
)
def prepare(
    source: str,
    target_column: str,
    task_kind: TaskKindChoice,
    column_roles: dict[str, str],
    test_fraction: float,
    seed: int,
    drop_duplicates: bool,
    drop_incomplete_rows: bool,
    model: str,
    numeric_imputation: NumericImputation,
    missing_indicators: bool,
    categorical_encoding: CategoricalEncoding,
    scaling: Scaling,
    polynomial_degree: int,
    select_k_best: int,
    recompute: bool,
) -> Prepared:
    dataset = load(
        source=source, target_column=target_column, task_kind=task_kind, column_roles=column_roles, recompute=recompute
    )
    splits = preprocess(
        dataset=dataset,
        test_fraction=test_fraction,
        seed=seed,
        drop_duplicates=drop_duplicates,
        drop_incomplete_rows=drop_incomplete_rows,
        recompute=recompute,
    )
    features = build_features(
        splits=splits,
        model=model,
        seed=seed,
        numeric_imputation=numeric_imputation,
        missing_indicators=missing_indicators,
        categorical_encoding=categorical_encoding,
        scaling=scaling,
        polynomial_degree=polynomial_degree,
        select_k_best=select_k_best,
        recompute=recompute,
    )
    return Prepared(dataset=dataset, splits=splits, features=features)


@workflow
@explained(
    "Train one model on the source, evaluate it against thresholds, and register it if it passes.",
)
def training_pipeline(
    source: str = "sklearn:breast_cancer",
    target_column: str = "",
    task_kind: TaskKindChoice = TaskKindChoice.INFERRED,
    column_roles: dict[str, str] = {},  # noqa: B006 - Flyte defaults are literals
    model: str = "",
    hyperparameters: dict[str, HyperparameterValue] = {},  # noqa: B006
    test_fraction: float = 0.2,
    seed: int = 42,
    drop_duplicates: bool = False,
    drop_incomplete_rows: bool = False,
    numeric_imputation: NumericImputation = NumericImputation.MEDIAN,
    missing_indicators: bool = False,
    categorical_encoding: CategoricalEncoding = CategoricalEncoding.AUTO,
    scaling: Scaling = Scaling.STANDARD,
    polynomial_degree: int = 0,
    select_k_best: int = 0,
    minimums: dict[str, Threshold] = {},  # noqa: B006
    maximums: dict[str, Threshold] = {},  # noqa: B006
    registry_name: str = "",
    recompute: bool = False,
) -> PipelineResult:
    prepared = prepare(
        source=source,
        target_column=target_column,
        task_kind=task_kind,
        column_roles=column_roles,
        test_fraction=test_fraction,
        seed=seed,
        drop_duplicates=drop_duplicates,
        drop_incomplete_rows=drop_incomplete_rows,
        model=model,
        numeric_imputation=numeric_imputation,
        missing_indicators=missing_indicators,
        categorical_encoding=categorical_encoding,
        scaling=scaling,
        polynomial_degree=polynomial_degree,
        select_k_best=select_k_best,
        recompute=recompute,
    )
    trained = train(
        features=prepared.features, model=model, hyperparameters=hyperparameters, seed=seed, recompute=recompute
    )
    evaluation = evaluate(
        trained=trained,
        features=prepared.features,
        splits=prepared.splits,
        dataset=prepared.dataset,
        minimums=minimums,
        maximums=maximums,
        recompute=recompute,
    )
    result = promote(
        registry_name=registry_name,
        source=source,
        trained=trained,
        evaluation=evaluation,
        dataset=prepared.dataset,
        splits=prepared.splits,
        features=prepared.features,
    )
    return serve(result=result)


@workflow
@explained(
    (
        "Train several candidate models on one feature build, pick the best by a metric, and register the "
        "winner if it passes its thresholds."
    ),
    seed="Seed of the split, of target encoding's cross-fitting and of the models.",
)
def sweep_pipeline(
    source: str = "sklearn:breast_cancer",
    target_column: str = "",
    task_kind: TaskKindChoice = TaskKindChoice.INFERRED,
    column_roles: dict[str, str] = {},  # noqa: B006
    candidates: list[ModelCandidate] = [],  # noqa: B006
    metric: str = "",
    test_fraction: float = 0.2,
    seed: int = 42,
    drop_duplicates: bool = False,
    minimums: dict[str, Threshold] = {},  # noqa: B006
    maximums: dict[str, Threshold] = {},  # noqa: B006
) -> SweepResult:
    # One feature build serves every candidate, so categorical columns get the general
    # encoding (model=""), and the feature options are their defaults.
    prepared = prepare(
        source=source,
        target_column=target_column,
        task_kind=task_kind,
        column_roles=column_roles,
        test_fraction=test_fraction,
        seed=seed,
        drop_duplicates=drop_duplicates,
        drop_incomplete_rows=False,
        model="",
        numeric_imputation=NumericImputation.MEDIAN,
        missing_indicators=False,
        categorical_encoding=CategoricalEncoding.AUTO,
        scaling=Scaling.STANDARD,
        polynomial_degree=0,
        select_k_best=0,
        recompute=False,
    )
    outcomes = train_candidates(
        candidates=candidates,
        dataset=prepared.dataset,
        splits=prepared.splits,
        features=prepared.features,
        seed=seed,
        minimums=minimums,
        maximums=maximums,
    )
    choice = pick_best(metric=metric, dataset=prepared.dataset, outcomes=outcomes)
    # Only the winner is registered (if it passes its thresholds).
    best = serve(
        result=promote(
            registry_name="",
            source=source,
            trained=choice.trained,
            evaluation=choice.evaluation,
            dataset=prepared.dataset,
            splits=prepared.splits,
            features=prepared.features,
        )
    )
    return compare(metric=metric, dataset=prepared.dataset, outcomes=outcomes, choice=choice, best=best)


headline_only((prepare, training_pipeline, sweep_pipeline))


# ---- launch plans ----------------------------------------------------------------------------
demo_launch_plan = LaunchPlan.get_or_create(training_pipeline, name="training_pipeline_demo")

# Fires only on a Flyte cluster: retrain every night at 03:00 UTC and promote if it still passes.
nightly_retrain = LaunchPlan.get_or_create(
    training_pipeline,
    name="training_pipeline_nightly",
    schedule=CronSchedule(schedule="0 3 * * *"),
    default_inputs={"recompute": False},
)


if __name__ == "__main__":
    print(training_pipeline())
