"""How a task calls the mesh: one fresh client, a progress display, the run's id and trace,
and the stage's failure mapped to what Flyte (or a person at a terminal) should see."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Protocol, TypeVar

import flytekit
from flytekit.exceptions.user import FlyteRecoverableException

from mlmesh.common.v1 import common_pb2
from services.client.mesh import ConfigError, MeshClient, OnCallProgress, StageCallError
from services.client.progress import PipelineProgress, stage_outcome
from services.runtime import tracing
from services.runtime.runs import new_run_id
from services.runtime.settings import Settings
from services.runtime.store import ArtifactStore
from workflow.values import ArtifactRef

T = TypeVar("T")


class _StageReply(Protocol):
    """What every stage's response has: how the call went (StageInfo)."""

    stage: common_pb2.StageInfo


Reply = TypeVar("Reply", bound=_StageReply)


class StageFailed(Exception):
    """A stage refused the request; retrying would not help."""


# `pyflyte run` without --remote runs every task in this process, and its execution is named "local".
_LOCAL_RUN_ID = new_run_id("local")
_LOCAL_RUN_STARTED = datetime.now(UTC)


def run_id() -> str:
    """The pipeline run's id: the Flyte execution's name on a cluster, one per process locally."""
    name = flytekit.current_context().execution_id.name
    return _LOCAL_RUN_ID if name in ("", "local") else f"flyte-{name}"


def run_started() -> datetime:
    """When the pipeline run began: the Flyte execution's date on a cluster, this process's start locally."""
    name = flytekit.current_context().execution_id.name
    started = getattr(flytekit.current_context(), "execution_date", None)
    return _LOCAL_RUN_STARTED if name in ("", "local") or not isinstance(started, datetime) else started


def close_run_trace(**attributes: str) -> None:
    """Write the root span of the run's trace, from the run's start to now (promote, the last
    task of a training run; a sweep's compare after it only writes its page).

    No process lives as long as a Flyte run, so the root is written at the end; the
    task spans before it already named it as their parent (tracing.run_task_span).
    """
    if not tracing.enabled():
        return
    started = int(run_started().timestamp() * 1e9)
    with tracing.run_span(
        run_id(), "flyte run", start_time_ns=started, **{f"mlmesh.{k}": v for k, v in attributes.items()}
    ):
        pass


def local() -> bool:
    """True under `pyflyte run` without --remote: every task in this process, a person watching."""
    return flytekit.current_context().execution_id.name in ("", "local")


def call(stage_call: Callable[[MeshClient, PipelineProgress], Awaitable[T]], task_name: str) -> T:
    """Run one task's RPCs with a fresh client and a progress display; map failures to Flyte's.

    With OTEL_* set, the task is a span in the run's trace (see services/runtime/tracing.py),
    and each RPC a child of it.

    On a cluster a failure raises, so that Flyte retries what may heal and records the
    stage's message. Under a local `pyflyte run` there is no retry, and a person reads the
    terminal: the stage's message is printed as one paragraph, and the run exits without
    a traceback of this file (1, or 130 after Ctrl-C, which also stops a fit in progress).
    """

    async def run() -> T:
        async with MeshClient(Settings.from_env(), recompute_flag="--recompute", run_id=run_id()) as client:
            try:
                with PipelineProgress() as progress:
                    return await stage_call(client, progress)
            except asyncio.CancelledError:
                if await client.cancel_fits():
                    print("mlmesh: asked the trainer to stop the fit", file=sys.stderr)
                raise

    try:
        tracing.configure("workflow")
    except (ValueError, ImportError) as exc:
        raise StageFailed(f"invalid tracing configuration: {exc}") from None
    try:
        with tracing.run_task_span(run_id(), f"flyte.task {task_name}"), _ctrl_c_cancels():
            return asyncio.run(run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"\nmlmesh: interrupted during the {task_name} task", file=sys.stderr)
        raise SystemExit(130) from None
    except (StageCallError, ConfigError) as error:
        if local():
            print(f"\nmlmesh: the {task_name} task failed.\n{error}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        if isinstance(error, StageCallError) and error.recoverable:
            raise FlyteRecoverableException(str(error)) from None
        raise StageFailed(str(error)) from None


@contextlib.contextmanager
def _ctrl_c_cancels() -> Iterator[None]:
    """During a task's calls, Ctrl-C cancels them (asyncio's own handling of SIGINT).

    flytekit's SIGINT handler exits with status 1 wherever the process is; asyncio.run
    installs its graceful handler only over Python's default one. So the default is put
    back for the call, and flytekit's restored after it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


async def unary(
    progress: PipelineProgress,
    stage: str,
    rpc: Callable[[OnCallProgress], Awaitable[Reply]],
    count: Callable[[Reply], int] = lambda _: 0,
) -> Reply:
    """One unary stage call, shown on the progress display with the stage's own reports."""
    with progress.stage(stage) as shown:
        reply = await rpc(shown.step)
        shown.done(stage_outcome(stage, reply.stage, count(reply)))
    return reply


def stored_page(ref: ArtifactRef, what: str) -> bytes:
    """An artifact's bytes from the store, digest-checked (for decks)."""
    with tracing.run_task_span(run_id(), f"flyte.deck {what}"):
        return ArtifactStore(Settings.from_env().artifact_root).get(ref.proto(), what)
