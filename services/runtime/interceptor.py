"""The one place where stage errors become gRPC statuses, plus one log line and the metrics of each RPC."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from services.runtime import tracing
from services.runtime.errors import InvalidArgument, StageError, bounded, status_message
from services.runtime.handlers import Continuation, MethodHandler
from services.runtime.metrics import StageMetrics
from services.runtime.runs import RUN_ID_METADATA, check_run_id
from services.runtime.stage import RpcRecord, current_rpc
from services.runtime.watch import CallWatch, call_id_of

log = logging.getLogger("mlmesh.rpc")


class _Outcome:
    def __init__(self) -> None:
        self.code = grpc.StatusCode.OK
        self.error = ""  # the status message the caller got, for the log
        self.incident = ""


async def _map_error(
    exc: BaseException, method: str, context: grpc.aio.ServicerContext[Any, Any], outcome: _Outcome
) -> None:
    if isinstance(exc, StageError):
        outcome.code = exc.code
        # Messages quote caller input, bounded where they do; this is the backstop for all of them.
        outcome.error = status_message(str(exc))
        await context.abort(exc.code, outcome.error)
    # Not a domain error: a bug or an unexpected environment problem. The caller
    # gets an incident id to quote; the traceback stays in our log.
    incident = secrets.token_hex(4)
    outcome.code, outcome.incident = grpc.StatusCode.INTERNAL, incident
    outcome.error = f"internal error while handling {method} (incident {incident}); the service log has details"
    log.error(
        "incident=%s unhandled error in %s",
        incident,
        method,
        exc_info=exc,
        extra={"method": method, "code": "INTERNAL", "incident": incident},
    )
    await context.abort(grpc.StatusCode.INTERNAL, outcome.error)


# Calls that only follow another call (WatchCall) are logged at DEBUG when they succeed: at INFO,
# every watched call would appear twice.
_FOLLOWING = ("/mlmesh.common.v1.ProgressService/",)


def _log(method: str, outcome: _Outcome, seconds: float, record: RpcRecord) -> None:
    """One line per call: text for people, the same fields as JSON for log pipelines (logs.py)."""
    cache = "-" if record.cache_hit is None else str(record.cache_hit).lower()
    error = f" error={outcome.error!r}" if outcome.error else ""
    quiet = method.startswith(_FOLLOWING) and outcome.code == grpc.StatusCode.OK
    log.log(
        logging.DEBUG if quiet else logging.INFO,
        "rpc method=%s status=%s duration_ms=%.1f cache_hit=%s run_id=%s caller=%s%s",
        method,
        outcome.code.name,
        seconds * 1000,
        cache,
        record.run_id or "-",
        (record.caller or "-").replace(" ", "_"),
        error,
        extra={
            "method": method,
            "code": outcome.code.name,
            "duration_ms": round(seconds * 1000, 3),
            "cache_hit": record.cache_hit,
            "run_id": record.run_id or None,
            "caller": record.caller or None,
            **({"error": outcome.error} if outcome.error else {}),
            **({"incident": outcome.incident} if outcome.incident else {}),
        },
    )


def _details(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    try:
        return bounded(context.details() or "", 500)
    except Exception:  # noqa: BLE001 - a log detail must never fail the call
        return ""


@contextlib.asynccontextmanager
async def _rpc_scope(
    method: str, context: grpc.aio.ServicerContext[Any, Any], metrics: StageMetrics, unary: bool, watch: CallWatch
) -> AsyncIterator[None]:
    """Around one RPC: expose its record to the handler, map errors, count, trace and log it."""
    started, outcome, record = time.perf_counter(), _Outcome(), RpcRecord()
    # Each RPC runs in its own task and context, so this never leaks between calls.
    current_rpc.set(record)
    metrics.rpc_started(method, unary)
    metadata = context.invocation_metadata() or ()
    with tracing.server_span(method, metadata) as span:
        try:
            record.run_id = _run_id_of(metadata)
            # A caller following this call (WatchCall) sees it from here until it ends, below.
            record.call_id = call_id_of(metadata)
            if record.call_id:
                watch.begin(record.call_id)
            yield
        except grpc.aio.AbortError:
            outcome.code = context.code() or grpc.StatusCode.UNKNOWN
            outcome.error = outcome.error or _details(context)
            raise
        except asyncio.CancelledError:
            # The caller went away or its deadline passed; grpc cancels the handler either way.
            outcome.code = _cancellation_code(context)
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status just below
            await _map_error(exc, method, context, outcome)
        finally:
            if record.call_id:
                watch.finish(record.call_id)
            if outcome.code == grpc.StatusCode.OK and _is_cancelled(context):
                # The handler finished, but too late: the caller saw CANCELLED or DEADLINE_EXCEEDED.
                outcome.code = _cancellation_code(context)
            seconds = time.perf_counter() - started
            metrics.rpc_handled(method, unary, outcome.code, seconds)
            tracing.end_server_span(
                span,
                outcome.code,
                outcome.error,
                **{
                    "mlmesh.run_id": record.run_id,
                    "mlmesh.cache_hit": record.cache_hit,
                    "mlmesh.caller": record.caller,
                },
            )
            _log(method, outcome, seconds, record)


def _run_id_of(metadata: Any) -> str:
    """The caller's run id from the metadata, checked; empty when it sent none."""
    for key, value in metadata:
        if key == RUN_ID_METADATA:
            return check_run_id(value if isinstance(value, str) else value.decode("utf-8", "replace"))
    return ""


def _is_cancelled(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    try:
        return bool(context.cancelled())
    except Exception:  # noqa: BLE001 - a log detail must never fail the call
        return False


def _cancellation_code(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    try:
        remaining = context.time_remaining()
    except Exception:  # noqa: BLE001
        remaining = None
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


class _Undecodable:
    """Stands in for a request whose bytes did not decode, so the handler can refuse it."""

    def __init__(self, error: Exception):
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """grpc.aio deserialises before the handler runs and answers a failure with UNKNOWN;
    this hands the failure to the handler instead, which answers INVALID_ARGUMENT."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError and friends, reported below
            return _Undecodable(exc)

    return deserialize


async def _refuse_undecodable(request: _Undecodable, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    raise InvalidArgument(
        f"the request body for {method} is not a valid protobuf message "
        f"({bounded(request.error, 120)}); send the message the service's proto defines"
    )


def _wrap_unary(
    behavior: Callable[..., Awaitable[Any]], method: str, metrics: StageMetrics, watch: CallWatch
) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async with _rpc_scope(method, context, metrics, unary=True, watch=watch):
            if isinstance(request, _Undecodable):
                await _refuse_undecodable(request, method, context)
            return await behavior(request, context)

    return handler


def _wrap_stream(
    behavior: Callable[..., AsyncIterator[Any]], method: str, metrics: StageMetrics, watch: CallWatch
) -> Callable[..., AsyncIterator[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        async with _rpc_scope(method, context, metrics, unary=False, watch=watch):
            if isinstance(request, _Undecodable):
                await _refuse_undecodable(request, method, context)
            async for response in behavior(request, context):
                yield response

    return handler


class StageInterceptor(grpc.aio.ServerInterceptor):
    """Applies error mapping, metrics and logging to the stage's own methods (and its Operations service).

    Health and reflection pass through untouched: they are not ours to log,
    and probes would drown the log and the metrics.
    """

    def __init__(self, metrics: StageMetrics, *service_names: str, watch: CallWatch | None = None):
        self._metrics = metrics
        self._prefixes = tuple(f"/{name}/" for name in service_names)
        self._watch = watch or CallWatch()

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> MethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self._prefixes):
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method, self._metrics, self._watch),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                # types-grpcio types the sync server's behaviour; under grpc.aio it is an async generator.
                _wrap_stream(handler.unary_stream, method, self._metrics, self._watch),  # type: ignore[arg-type]
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler
