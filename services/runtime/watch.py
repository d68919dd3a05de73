"""Progress of a unary stage call, for the caller to follow while it waits (ProgressService).

A Load or a BuildFeatures call answers once, at the end. A caller that wants to
see it move tags the call with the metadata `mlmesh-call-id` and opens
`WatchCall` with the same id; the stage's work reports its phases through
`run.progress(...)` (stage.py), and each report reaches the watchers. The id is
the caller's own: it names nothing in the store and grants nothing, and a watch
sees only fractions and phase messages, never data.

Everything is bounded: ids by their syntax, a finished call is kept for a few
seconds (for a watch that arrives late), and watches waiting for a call that
has not arrived yet are capped and time out with NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from mlmesh.common.v1 import progress_pb2, progress_pb2_grpc
from services.runtime.errors import InvalidArgument, NotFound, ResourceExhausted, bounded

CALL_ID_METADATA = "mlmesh-call-id"
_CALL_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
# How long a watch waits for its call to start (the two are sent together, so a few
# milliseconds apart), and how long a finished call stays visible.
WAIT_FOR_CALL_SECONDS = 5.0
KEEP_FINISHED_SECONDS = 10.0
# Watches open at once, and of those, waiting for a call that has not started: each holds a stream.
MAX_WATCHES = 1024
MAX_WAITING_WATCHES = 256
MAX_MESSAGE_CHARS = 200


def check_call_id(text: str) -> str:
    if not _CALL_ID.match(text):
        raise InvalidArgument(
            f"call id {bounded(repr(text), 80)} is not valid: 8 to 64 letters, digits, '-' or '_' "
            f"(the value the caller sent as metadata {CALL_ID_METADATA})"
        )
    return text


def call_id_of(metadata: Any) -> str:
    """The caller's call id from the metadata, checked; empty when it sent none."""
    for key, value in metadata:
        if key == CALL_ID_METADATA:
            return check_call_id(value if isinstance(value, str) else value.decode("utf-8", "replace"))
    return ""


@dataclass
class _Call:
    started: float = field(default_factory=time.monotonic)
    latest: progress_pb2.WatchCallResponse = field(default_factory=progress_pb2.WatchCallResponse)
    # Bumped on every update; each update also replaces `changed` after setting it, so every
    # watch (there may be several) wakes for it.
    version: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    finished_at: float | None = None

    def publish(self, latest: progress_pb2.WatchCallResponse) -> None:
        self.latest, self.version = latest, self.version + 1
        woken, self.changed = self.changed, asyncio.Event()
        woken.set()


class CallWatch:
    """The calls in flight at one stage that carry a call id, and their latest progress (event loop only)."""

    def __init__(self) -> None:
        self._calls: dict[str, _Call] = {}
        self._arrived: dict[str, asyncio.Event] = {}
        self._waiting = 0
        self._open = 0

    def begin(self, call_id: str) -> None:
        self._forget_finished()
        self._calls[call_id] = _Call(latest=progress_pb2.WatchCallResponse(message="started"))
        if call_id in self._arrived:
            self._arrived.pop(call_id).set()

    def update(self, call_id: str, fraction: float, message: str, step: int = 0, total_steps: int = 0) -> None:
        call = self._calls.get(call_id)
        if call is None or call.finished_at is not None:
            return
        call.publish(
            progress_pb2.WatchCallResponse(
                fraction_done=min(max(fraction, 0.0), 1.0),
                message=message[:MAX_MESSAGE_CHARS],
                step=step,
                total_steps=total_steps,
                elapsed_seconds=time.monotonic() - call.started,
            )
        )

    def finish(self, call_id: str) -> None:
        call = self._calls.get(call_id)
        if call is None:
            return
        call.finished_at = time.monotonic()
        call.publish(
            progress_pb2.WatchCallResponse(
                fraction_done=1.0, message="done", done=True, elapsed_seconds=time.monotonic() - call.started
            )
        )

    def _forget_finished(self) -> None:
        now = time.monotonic()
        for call_id in [
            c for c, call in self._calls.items() if call.finished_at and now - call.finished_at > KEEP_FINISHED_SECONDS
        ]:
            del self._calls[call_id]

    async def _arrival(self, call_id: str, timeout: float) -> _Call:
        if call_id in self._calls:
            return self._calls[call_id]
        if self._waiting >= MAX_WAITING_WATCHES:
            raise ResourceExhausted(
                f"{MAX_WAITING_WATCHES} watches are already waiting for calls that have not started; "
                "open the watch together with the call it follows"
            )
        self._waiting += 1
        try:
            arrived = self._arrived.setdefault(call_id, asyncio.Event())
            await asyncio.wait_for(arrived.wait(), timeout)
        except TimeoutError:
            raise NotFound(
                f"no call with id {call_id!r} reached this stage within {timeout:.0f}s; send the call with metadata "
                f"{CALL_ID_METADATA}: {call_id} to this same stage"
            ) from None
        finally:
            self._waiting -= 1
            if call_id in self._arrived and not self._arrived[call_id].is_set() and self._waiting == 0:
                self._arrived.pop(call_id, None)
        return self._calls[call_id]

    async def follow(
        self, call_id: str, timeout: float = WAIT_FOR_CALL_SECONDS
    ) -> AsyncIterator[progress_pb2.WatchCallResponse]:
        check_call_id(call_id)
        if self._open >= MAX_WATCHES:
            raise ResourceExhausted(f"{MAX_WATCHES} watches are open at this stage; try again when some have ended")
        self._open += 1
        try:
            async for update in self._follow(call_id, timeout):
                yield update
        finally:
            self._open -= 1

    async def _follow(self, call_id: str, timeout: float) -> AsyncIterator[progress_pb2.WatchCallResponse]:
        call = await self._arrival(call_id, timeout)
        seen = -1
        while True:
            changed = call.changed
            if call.version != seen:
                seen = call.version
                yield call.latest
                if call.latest.done:
                    return
                continue
            await changed.wait()


class ProgressServicer(progress_pb2_grpc.ProgressServiceServicer):
    def __init__(self, watch: CallWatch):
        self.watch = watch

    async def WatchCall(
        self, request: progress_pb2.WatchCallRequest, context: Any
    ) -> AsyncIterator[progress_pb2.WatchCallResponse]:
        async for update in self.watch.follow(request.call_id):
            yield update


SERVICE_NAME = progress_pb2.DESCRIPTOR.services_by_name["ProgressService"].full_name
