"""What the stages' server interceptors share: the shape of grpc.aio's `intercept_service`,
and wrapping a method handler's one behaviour.

A grpc.aio method handler is a namedtuple with exactly one behaviour set (unary_unary,
unary_stream, stream_unary or stream_stream). types-grpcio describes the sync server's
handler, so it declares neither the namedtuple's `_replace` nor that under grpc.aio a
streaming-response behaviour is an async generator: those two gaps are bridged here, once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:  # generic only in the stubs
    MethodHandler = grpc.RpcMethodHandler[Any, Any]
else:
    MethodHandler = grpc.RpcMethodHandler
# What an interceptor's `intercept_service` is given to reach the next interceptor or the servicer.
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[MethodHandler | None]]
UnaryBehaviour = Callable[..., Awaitable[Any]]
StreamingBehaviour = Callable[..., AsyncIterator[Any]]


def wrap_behaviour(
    handler: MethodHandler,
    unary: Callable[[UnaryBehaviour], UnaryBehaviour],
    streaming: Callable[[StreamingBehaviour], StreamingBehaviour],
) -> MethodHandler:
    """`handler` with its behaviour wrapped: by `unary` when it answers once, by `streaming`
    when it answers with a stream. Serializers and the rest stay as they were."""
    if handler.unary_unary is not None:
        return handler._replace(unary_unary=unary(handler.unary_unary))  # type: ignore[attr-defined]
    if handler.stream_unary is not None:
        return handler._replace(stream_unary=unary(handler.stream_unary))  # type: ignore[attr-defined]
    if handler.unary_stream is not None:
        return handler._replace(unary_stream=streaming(handler.unary_stream))  # type: ignore[attr-defined,arg-type]
    return handler._replace(stream_stream=streaming(handler.stream_stream))  # type: ignore[attr-defined,arg-type]
