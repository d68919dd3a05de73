"""The few lines a run ends with, the same for `mlmesh run` and `pyflyte run`.

Both entry points build a plain dict (`RunOutcome`) and print `render(...)`: the
decision and why, the metrics, the model and where it was registered, where the
report is, and how long each stage took and whether it came from the stage's
memo. The full result is available as JSON (`mlmesh run --json`, or
`MLMESH_OUTPUT=json pyflyte run ...`).
"""

from __future__ import annotations

from typing import Any, TypedDict

from services.runtime.vocabulary import TaskKind


class StageTime(TypedDict):
    stage: str
    cache_hit: bool
    seconds: float


class RunOutcome(TypedDict, total=False):
    run_id: str
    source: str
    task_kind: str
    decision: str
    reasons: list[str]
    metrics: dict[str, float]
    model_name: str
    model_uri: str
    model_sha256: str
    registered_as: str  # "name vN", or "" when the model was not registered
    served: str  # which version serving answered with after the rollout, or why not; "" when not asked
    report_path: str
    deck_path: str
    stages: list[StageTime]
    seconds: float
    trace_id: str


# The metrics shown first, by task kind; the rest follow alphabetically.
_LEADING: dict[str, tuple[str, ...]] = {
    TaskKind.CLASSIFICATION: ("accuracy", "roc_auc", "f1_macro"),
    TaskKind.REGRESSION: ("r2", "rmse", "mae"),
}
_WIDTH = 10


def local_path(uri: str) -> str:
    """A file:// artifact as a path a person can open; other URIs as they are."""
    return uri.removeprefix("file://") if uri.startswith("file://") else uri


def _metrics(metrics: dict[str, float], task_kind: str) -> list[str]:
    leading = [m for m in _LEADING.get(task_kind, ()) if m in metrics]
    ordered = leading + sorted(m for m in metrics if m not in leading)
    cells = [f"{name} {metrics[name]:.4f}" for name in ordered]
    # Three to a line, aligned in columns.
    width = max((len(c) for c in cells), default=0) + 3
    return ["".join(c.ljust(width) for c in cells[i : i + 3]).rstrip() for i in range(0, len(cells), 3)]


def _stages(stages: list[StageTime]) -> list[str]:
    parts = []
    for stage in stages:
        how = "cache hit" if stage["cache_hit"] else "computed"
        seconds = stage["seconds"]
        took = f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.2f}s"
        parts.append(f"{stage['stage']:<11}{took:>9}  {how}")
    return parts


def _field(name: str, lines: list[str]) -> list[str]:
    if not lines:
        return []
    return [f"{name:<{_WIDTH}}{lines[0]}", *(f"{'':<{_WIDTH}}{line}" for line in lines[1:])]


def render(outcome: RunOutcome) -> str:
    """The run's summary as aligned plain text (no colour: it may be a log)."""
    decision = outcome.get("decision", "")
    what = " · ".join(
        p for p in (outcome.get("source", ""), outcome.get("model_name", ""), outcome.get("task_kind", "")) if p
    )
    lines = _field("decision", [f"{decision}  ({what})" if what else decision, *outcome.get("reasons", [])])
    lines += _field("metrics", _metrics(outcome.get("metrics", {}), outcome.get("task_kind", "")))
    model = outcome.get("model_sha256", "")[:12]
    registered = outcome.get("registered_as", "")
    if model:
        where = f"registered as {registered}" if registered else "not registered (only PROMOTE is)"
        lines += _field("model", [f"{model}  {where}", local_path(outcome.get("model_uri", ""))])
    if outcome.get("served"):
        lines += _field("served", [outcome["served"]])
    if outcome.get("report_path"):
        lines += _field("report", [outcome["report_path"]])
    if outcome.get("deck_path"):
        lines += _field("deck", [outcome["deck_path"]])
    stages = outcome.get("stages", [])
    if stages:
        hits = sum(s["cache_hit"] for s in stages)
        lines += _field("stages", [*_stages(stages), f"{hits} of {len(stages)} answered from the stages' memos"])
    if outcome.get("run_id"):
        lines += _field("run", [f"{outcome['run_id']}  (mlmesh lineage --run {outcome['run_id']})"])
    if outcome.get("trace_id"):
        lines += _field("trace", [outcome["trace_id"]])
    if "seconds" in outcome:
        lines += _field("total", [f"{outcome['seconds']:.1f}s"])
    return "\n".join(lines)


def stage_time(info: Any) -> StageTime:
    """A StageInfo (proto or dataclass) as the summary's row."""
    return {"stage": str(info.stage), "cache_hit": bool(info.cache_hit), "seconds": float(info.seconds)}
