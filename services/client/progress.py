"""What a person watching a run sees while it runs: one line per stage, live on a terminal.

`mlmesh run` and the Flyte tasks (under `pyflyte run`) both report through
`PipelineProgress`. On a terminal it is a rich live display on stderr: a spinner
and the elapsed time while a stage works, a bar with the trainer's own ETA for a
fit that reports steps, and, when a stage answers, its time, whether it came from
the stage's memo, and its throughput. Anywhere else (a pipe, CI, a Flyte pod's
log) it writes plain lines instead, a few per fit, so logs stay readable.

Progress goes to stderr, so stdout carries only the result (`--json` included).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any

from mlmesh.common.v1 import progress_pb2
from mlmesh.trainer.v1 import trainer_pb2

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

# How each stage's answer is described when it arrives: its own count of work done.
_NOUNS = {"loader": "rows", "preprocess": "rows"}


def _rate(count: float, seconds: float, noun: str) -> str:
    if seconds <= 0 or count <= 0:
        return ""
    per_second = count / seconds
    shown = (
        f"{per_second / 1e6:.1f}M"
        if per_second >= 1e6
        else f"{per_second / 1e3:.1f}k"
        if per_second >= 1e3
        else f"{per_second:.0f}"
    )
    return f"{shown} {noun}/s"


def stage_outcome(stage: str, info: Any, count: int = 0) -> str:
    """'computed in 1.23s, 569 rows (463 rows/s)' or 'cache hit in 4ms': what one stage call did."""
    if info.cache_hit:
        return f"cache hit in {info.seconds * 1000:.0f}ms" if info.seconds < 1 else f"cache hit in {info.seconds:.2f}s"
    text = f"computed in {info.seconds:.2f}s"
    noun = _NOUNS.get(stage)
    if noun and count:
        rate = _rate(count, info.seconds, noun)
        text += f", {count:,} {noun}" + (f" ({rate})" if rate else "")
    return text


def _eta(seconds: float) -> str:
    if seconds < 1:
        return ""
    seconds = int(seconds)
    return (
        f"ETA {seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"ETA {seconds // 60}:{seconds % 60:02d}"
    )


class FitLines:
    """A fit's progress as a few plain lines: every 10%, every 15 s at the latest, warnings,
    and a resume from a checkpoint (for logs, where a live bar would be noise)."""

    def __init__(self, write: Callable[[str], None], prefix: str = "trainer: "):
        self.write, self.prefix = write, prefix
        self.last_decile, self.last_time = -1, 0.0

    def __call__(self, event: trainer_pb2.TrainProgress | progress_pb2.WatchCallResponse) -> None:
        decile = int(event.fraction_done * 10 + 1e-9)
        now = time.monotonic()
        resumed = getattr(event, "resumed_from_step", 0)
        notable = event.message.startswith("warning: ") or (resumed and event.step == resumed)
        if decile == self.last_decile and now - self.last_time < 15 and not notable:
            return
        self.last_decile, self.last_time = decile, now
        eta_seconds = getattr(event, "eta_seconds", 0.0)
        eta = f", about {eta_seconds:.0f}s left" if eta_seconds >= 1 and event.fraction_done < 1 else ""
        self.write(f"{self.prefix}{event.fraction_done:4.0%} {event.message}{eta}")


class StageTracker:
    """One stage call on the display: `fit(event)` for the trainer's progress, `done(...)` at the end."""

    def __init__(self, display: PipelineProgress, stage: str, label: str):
        self.display, self.stage, self.label = display, stage, label
        self.started = time.monotonic()
        # The live display and this stage's line on it; None in plain lines.
        self.bar: tuple[Progress, TaskID] | None = None
        self.fraction = 0.0  # the last fraction shown, kept when the call fails or is interrupted
        self._lines = FitLines(display.line, prefix=f"{label}: ")
        if display.live is not None:
            self.bar = display.live, display.live.add_task(label, total=None, eta="", detail="")

    def fit(self, event: trainer_pb2.TrainProgress) -> None:
        """A trainer progress event: a bar with steps, or a message while the fit has none."""
        if self.bar is None:
            self._lines(event)
            return
        live, task = self.bar
        stepped = event.total_steps > 0 or 0 < event.fraction_done < 1
        self.fraction = event.fraction_done if stepped else self.fraction
        live.update(
            task,
            total=1.0 if stepped else None,
            completed=event.fraction_done if stepped else 0,
            eta=_eta(event.eta_seconds) if event.fraction_done < 1 else "",
            detail=event.message[:60],
        )

    def step(self, update: progress_pb2.WatchCallResponse) -> None:
        """A unary stage's progress report (ProgressService): its phase, and a bar when it counts.

        In plain lines, only a call that has run for a second or more says what it is doing,
        so that the usual quick calls stay one line each.
        """
        if self.bar is None:
            if update.elapsed_seconds >= 1:
                self._lines(update)
            return
        live, task = self.bar
        counted = update.total_steps > 0 or update.fraction_done > 0
        self.fraction = update.fraction_done if counted else self.fraction
        live.update(
            task,
            total=1.0 if counted else None,
            completed=update.fraction_done if counted else 0,
            detail=update.message[:60],
        )

    def done(self, outcome: str) -> None:
        if self.bar is None:
            self.display.line(f"{self.label}: {outcome}")
            return
        live, task = self.bar
        live.update(task, total=1.0, completed=1.0, eta="", detail=outcome)
        live.stop_task(task)

    def failed(self, why: str) -> None:
        if self.bar is None:
            return  # in plain lines, the error (or the interrupt's line) that follows says it all
        live, task = self.bar
        live.update(task, total=1.0, completed=self.fraction, eta="", detail=f"[red]{why}[/red]")
        live.stop_task(task)


def _live_display(stream: IO[str]) -> Progress | None:
    """rich's live display on `stream`, or None where rich is not installed.

    rich comes with the workflow's dependencies (flytekit); the service image has the
    `mlmesh` CLI without it, and there a terminal gets the plain lines instead.
    """
    try:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn
    except ImportError:
        return None
    return Progress(
        SpinnerColumn(finished_text="[green]✓[/green]"),
        TextColumn("{task.description:<11}"),
        BarColumn(bar_width=24),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[eta]:>9}"),
        TextColumn("{task.fields[detail]}"),
        console=Console(file=stream, stderr=stream is sys.stderr),
        transient=False,
    )


class PipelineProgress:
    """The run's progress display; a context manager (the live display ends with it).

    `live=None` decides by the stream: a live display on a terminal, plain lines elsewhere.
    """

    def __init__(self, stream: IO[str] | None = None, live: bool | None = None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        use_live = (self.stream.isatty() if live is None else live) and not quiet
        self.live: Progress | None = _live_display(self.stream) if use_live else None

    def __enter__(self) -> PipelineProgress:
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()

    def line(self, text: str) -> None:
        if self.quiet:
            return
        if self.live is not None:
            self.live.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    @contextmanager
    def stage(self, stage: str, label: str = "") -> Iterator[StageTracker]:
        """Track one stage call; a failure marks its line before the error goes on."""
        tracker = StageTracker(self, stage, label or stage)
        try:
            yield tracker
        except BaseException as error:
            tracker.failed(
                "interrupted" if isinstance(error, (KeyboardInterrupt, asyncio.CancelledError)) else "failed"
            )
            raise
