"""Admission control: at most MLMESH_MAX_CONCURRENT_RPCS stage calls at once, health always answered.

grpc's own `maximum_concurrent_rpcs` counts every call, health checks included,
so a stage at its limit would answer its liveness probe with RESOURCE_EXHAUSTED
and an orchestrator would restart a pod that is merely busy. This interceptor
counts only the stage's own methods; health and reflection always pass.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from services.runtime.handlers import Continuation, MethodHandler, wrap_behaviour

# Services that must answer however busy the stage is.
# Watching a call's progress takes no slot: it would otherwise compete with the very call it
# follows. Watches are bounded on their own (watch.py).
ALWAYS_ADMITTED = ("/grpc.health.v1.Health/", "/grpc.reflection.", "/mlmesh.common.v1.ProgressService/")


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, limit: int, on_reject: Callable[[], None] = lambda: None):
        self.limit = limit
        self.in_flight = 0
        self._on_reject = on_reject  # counts the rejection (mlmesh_rpcs_rejected_total)

    async def _admit(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if self.in_flight >= self.limit:
            self._on_reject()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this stage is already handling {self.in_flight} calls, its limit "
                "(MLMESH_MAX_CONCURRENT_RPCS); retry later",
            )
        self.in_flight += 1

    def _unary(self, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await self._admit(context)
            try:
                return await behavior(request, context)
            finally:
                self.in_flight -= 1

        return handler

    def _stream(self, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            await self._admit(context)
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                self.in_flight -= 1

        return handler

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> MethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(ALWAYS_ADMITTED):
            return handler
        return wrap_behaviour(handler, self._unary, self._stream)
