"""Long-running operations (google.longrunning, AIP-151) for work that outlives a call.

A stage whose work can take hours (the trainer's fit) starts it as an
`Operation` owned by the stage, not by the RPC that asked for it:

- the operation's name is derived from the request's cache key, so the same
  request joins the operation that already runs instead of starting another;
- callers follow it with GetOperation / WaitOperation (or the stage's own
  progress stream); leaving, or a passed deadline, does not stop it;
- it stops on CancelOperation, or when nobody has asked about it for
  MLMESH_OPERATION_IDLE_SECONDS;
- finished operations stay listed for a while, and a finished fit is found
  again through the stage's memo even after a restart.

The registry is in-memory: the durable state is the memo (results) and the
trainer's checkpoints (partial fits), so a restarted stage answers a re-sent
request by resuming, and GetOperation by consulting the memo.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.longrunning import operations_proto_pb2 as operations_pb2
from google.longrunning.operations_grpc_pb2 import OperationsServicer, add_OperationsServicer_to_server
from google.protobuf import empty_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2

from services.runtime.errors import (
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StageError,
    bounded,
    status_message,
)

log = logging.getLogger(__name__)

OPERATIONS_SERVICE = operations_pb2.DESCRIPTOR.services_by_name["Operations"].full_name

# Finished operations stay listed this long (and at most this many), so a caller
# that polls after the end still sees the result, and memory stays bounded.
FINISHED_RETENTION_SECONDS = 3600.0
MAX_FINISHED = 200
# WaitOperation never holds a call longer than this, whatever timeout it asks for.
MAX_WAIT_SECONDS = 60.0
MAX_HISTORY = 1_000  # a stepped fit reports about 100 steps, plus warnings
_NAME = re.compile(r"^operations/(?P<kind>[a-z]+)-(?P<key>[0-9a-f]{64})$")


def operation_name(kind: str, cache_key: str) -> str:
    return f"operations/{kind}-{cache_key}"


def parse_operation_name(name: str) -> tuple[str, str]:
    """(kind, cache key) of a well-formed name; INVALID_ARGUMENT otherwise."""
    match = _NAME.match(name)
    if match is None:
        raise InvalidArgument(
            f"operation name {bounded(repr(name), 100)} is malformed; names look like operations/train-<64 hex digits>, "
            "as StartTraining returns them"
        )
    return match["kind"], match["key"]


@dataclass
class Operation:
    """One piece of long work and what its followers may ask about it."""

    name: str
    # A Task while it runs here; a result adopted from the memo is a plain done Future.
    task: asyncio.Future[Message] | None = None
    metadata: Message | None = None
    # Every metadata update, so a progress stream misses none (warnings come last).
    history: list[Message] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    finished_at: float | None = None
    # How many requests joined this operation after the one that started it.
    followers: int = 0
    # Why it was cancelled, for its error: CancelOperation, or the idle time.
    cancel_reason: str = ""
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def done(self) -> bool:
        return self.task is None or self.task.done()

    def touch(self) -> None:
        self.last_seen = time.monotonic()

    def update(self, metadata: Message) -> None:
        self.metadata = metadata
        if len(self.history) < MAX_HISTORY:
            self.history.append(metadata)
        self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def result(self) -> Message:
        """The response of a done operation; raises its error as a StageError."""
        assert self.task is not None and self.task.done()
        if self.task.cancelled():
            raise Cancelled(f"the operation was cancelled: {self.cancel_reason or 'the service is stopping'}")
        return self.task.result()

    def to_proto(self) -> operations_pb2.Operation:
        proto = operations_pb2.Operation(name=self.name, done=self.done)
        if self.metadata is not None:
            proto.metadata.Pack(self.metadata)
        if self.task is not None and self.task.done():
            error = _error_of(self.task, self.cancel_reason)
            if error is None:
                proto.response.Pack(self.task.result())
            else:
                proto.error.CopyFrom(error)
        return proto


def _error_of(task: asyncio.Future[Message], cancel_reason: str) -> status_pb2.Status | None:
    if task.cancelled():
        return status_pb2.Status(
            code=grpc.StatusCode.CANCELLED.value[0],
            message=f"the operation was cancelled: {cancel_reason or 'the service is stopping'}; "
            "send the same request again to resume it from its last checkpoint",
        )
    exc = task.exception()
    if exc is None:
        return None
    if isinstance(exc, StageError):
        return status_pb2.Status(code=exc.code.value[0], message=status_message(str(exc)))
    return status_pb2.Status(code=grpc.StatusCode.INTERNAL.value[0], message="internal error; see the service log")


class OperationRegistry:
    """The operations of one stage process."""

    def __init__(self, idle_seconds: float):
        self.idle_seconds = idle_seconds
        self._operations: dict[str, Operation] = {}
        self._reaper: asyncio.Task[None] | None = None

    def get(self, name: str) -> Operation | None:
        operation = self._operations.get(name)
        if operation is not None:
            operation.touch()
        return operation

    def start(self, name: str, run: Callable[[Operation], Awaitable[Message]]) -> Operation:
        """The running operation called `name`, or a new one running `run`.

        A finished one is replaced: a retry after a failure or a cancellation must
        run again, and one after a success is answered from the memo at once.
        """
        existing = self.get(name)
        if existing is not None and not existing.done:
            existing.followers += 1
            return existing
        operation = Operation(name=name)
        operation.task = asyncio.ensure_future(run(operation))
        operation.task.add_done_callback(lambda _task: self._finished(operation))
        self._operations[name] = operation
        self._ensure_reaper()
        return operation

    def adopt_finished(self, name: str, response: Message, metadata: Message | None) -> Operation:
        """A done operation for a result that came from elsewhere (the memo)."""
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        future.set_result(response)
        operation = Operation(name=name, task=future, metadata=metadata, finished_at=time.monotonic())
        self._operations[name] = operation
        self._forget_old()
        return operation

    def cancel(self, operation: Operation, why: str) -> None:
        if operation.task is not None and not operation.task.done():
            log.info("cancelling %s: %s", operation.name, why)
            operation.cancel_reason = why
            operation.task.cancel()

    def in_flight(self) -> list[Operation]:
        return [op for op in self._operations.values() if not op.done]

    def listed(self) -> list[Operation]:
        self._forget_old()
        return sorted(self._operations.values(), key=lambda op: op.started)

    def delete(self, name: str) -> None:
        self._operations.pop(name, None)

    async def wait(self, operation: Operation, timeout: float) -> None:
        """Until the operation finishes or its metadata changes, at most `timeout` seconds."""
        if operation.done:
            return
        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(operation.changed.wait())]
        if operation.task is not None:
            waiters.append(asyncio.ensure_future(asyncio.shield(operation.task)))
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            operation.touch()

    async def wait_done(self, operation: Operation, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not operation.done and (left := deadline - time.monotonic()) > 0:
            await self.wait(operation, left)

    def _finished(self, operation: Operation) -> None:
        operation.finished_at = time.monotonic()
        task = operation.task
        if task is not None and not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, StageError):
                log.info("%s ended with %s: %s", operation.name, exc.code.name, bounded(exc, 300))
            else:  # a bug: its followers see INTERNAL, the traceback is here
                log.error("%s failed", operation.name, exc_info=exc)
        operation._notify()
        self._forget_old()

    def _forget_old(self) -> None:
        now = time.monotonic()
        finished = [op for op in self._operations.values() if op.done and op.finished_at is not None]
        finished.sort(key=lambda op: op.finished_at or 0.0)
        for index, op in enumerate(finished):
            if len(finished) - index > MAX_FINISHED or now - (op.finished_at or now) > FINISHED_RETENTION_SECONDS:
                self._operations.pop(op.name, None)

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.ensure_future(self._reap_idle())

    async def _reap_idle(self) -> None:
        # Stops operations nobody follows any more: a client that died for good
        # must not keep a fit burning CPU forever. Its checkpoints stay, so a later
        # identical request resumes it.
        while self.in_flight():
            await asyncio.sleep(min(5.0, max(0.05, self.idle_seconds / 4)))
            now = time.monotonic()
            for operation in self.in_flight():
                if now - operation.last_seen > self.idle_seconds:
                    self.cancel(
                        operation, f"nobody asked about it for {self.idle_seconds:g}s (MLMESH_OPERATION_IDLE_SECONDS)"
                    )


class OperationsService(OperationsServicer):
    """google.longrunning.Operations over one registry.

    `recall(name)` answers for operations this process no longer (or never)
    held: the stage looks the name's cache key up in its memo.
    """

    def __init__(self, registry: OperationRegistry, recall: Callable[[str], Awaitable[Operation | None]]):
        self.registry = registry
        self.recall = recall

    async def _find(self, name: str) -> Operation:
        parse_operation_name(name)
        operation = self.registry.get(name)
        if operation is None:
            operation = await self.recall(name)
        if operation is None:
            raise NotFound(
                f"no operation {name[:100]} on this service and no finished result for it; it may have run on a "
                "process that restarted: send the same request again (StartTraining) to resume it from its checkpoint"
            )
        return operation

    async def GetOperation(self, request: operations_pb2.GetOperationRequest, context: Any) -> operations_pb2.Operation:
        return (await self._find(request.name)).to_proto()

    async def WaitOperation(
        self, request: operations_pb2.WaitOperationRequest, context: Any
    ) -> operations_pb2.Operation:
        operation = await self._find(request.name)
        timeout = MAX_WAIT_SECONDS
        if request.HasField("timeout"):
            asked = request.timeout.ToTimedelta().total_seconds()
            if asked < 0:
                raise InvalidArgument("timeout must not be negative")
            timeout = min(asked, MAX_WAIT_SECONDS)
        remaining = context.time_remaining() if context is not None else None
        if remaining is not None:
            # Answer before the caller's own deadline, with the state as it is then.
            timeout = max(0.0, min(timeout, remaining - 0.5))
        await self.registry.wait_done(operation, timeout)
        return operation.to_proto()

    async def ListOperations(
        self, request: operations_pb2.ListOperationsRequest, context: Any
    ) -> operations_pb2.ListOperationsResponse:
        if request.filter not in ("", "done=false", "done=true"):
            raise InvalidArgument("filter must be empty, 'done=false' or 'done=true'")
        if request.page_size < 0:
            raise InvalidArgument("page_size must not be negative")
        operations = self.registry.listed()
        if request.filter:
            wanted = request.filter == "done=true"
            operations = [op for op in operations if op.done == wanted]
        try:
            start = int(request.page_token or 0)
        except ValueError:
            raise InvalidArgument("page_token is not one this service returned") from None
        if not 0 <= start <= len(operations):
            raise InvalidArgument("page_token is not one this service returned")
        size = min(request.page_size or 100, 100)
        page = operations[start : start + size]
        next_token = str(start + size) if start + size < len(operations) else ""
        return operations_pb2.ListOperationsResponse(
            operations=[op.to_proto() for op in page], next_page_token=next_token
        )

    async def CancelOperation(self, request: operations_pb2.CancelOperationRequest, context: Any) -> empty_pb2.Empty:
        operation = await self._find(request.name)
        self.registry.cancel(operation, "CancelOperation")
        return empty_pb2.Empty()

    async def DeleteOperation(self, request: operations_pb2.DeleteOperationRequest, context: Any) -> empty_pb2.Empty:
        operation = await self._find(request.name)
        if not operation.done:
            raise FailedPrecondition(f"{request.name[:100]} is still running; cancel it (CancelOperation) first")
        self.registry.delete(request.name)
        return empty_pb2.Empty()


def add_operations_service(service: OperationsService, server: grpc.aio.Server) -> None:
    add_OperationsServicer_to_server(service, server)
