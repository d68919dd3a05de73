"""OpenTelemetry traces: off unless configured, and then one trace per pipeline run.

Configuration is the standard OTel environment, nothing mlmesh-specific:

- tracing is on when `OTEL_TRACES_EXPORTER` names an exporter (`otlp`,
  `console`), or when an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT`,
  `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); `OTEL_SDK_DISABLED=true` or
  `OTEL_TRACES_EXPORTER=none` keeps it off;
- the OTLP exporter reads its endpoint, headers, TLS and timeout from the
  `OTEL_EXPORTER_OTLP_*` variables, the sampler comes from
  `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`, batching from `OTEL_BSP_*`.

Off means free: no OpenTelemetry module is imported, the stage interceptor
makes no spans, and `span()` is a null context.

A run's trace id is derived from its run id (the one `mlmesh lineage --run`
takes), so every process of a run, whether the CLI, each Flyte task in its own
pod, or the five stages, joins the same trace without passing anything but the
run id, and a run id in a log line leads straight to its trace.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

_provider: Any = None  # the SDK TracerProvider once configured; None while tracing is off
_forced_ids: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("forced_ids", default=None)
TRACER_NAME = "mlmesh"


def wanted(env: Mapping[str, str] | None = None) -> bool:
    """Whether the OTEL_* environment asks for traces."""
    env = os.environ if env is None else env
    if (env.get("OTEL_SDK_DISABLED") or "").strip().lower() == "true":
        return False
    exporter = (env.get("OTEL_TRACES_EXPORTER") or "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def enabled() -> bool:
    return _provider is not None


def configure(service: str, version: str = "", env: Mapping[str, str] | None = None) -> bool:
    """Set up tracing for this process if the environment asks for it; True if on.

    `service` becomes service.name (the stage, "cli" or "workflow"), under the
    service.namespace "mlmesh". Calling it again is harmless.
    """
    global _provider
    if _provider is not None or not wanted(env):
        return _provider is not None
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {"service.namespace": "mlmesh", "service.name": service}
    if version:
        attributes["service.version"] = version
    provider = TracerProvider(resource=Resource.create(attributes), id_generator=_run_id_generator())
    provider.add_span_processor(BatchSpanProcessor(_exporter(os.environ if env is None else env)))
    trace.set_tracer_provider(provider)
    _provider = trace.get_tracer_provider()
    return True


def _exporter(env: Mapping[str, str]) -> Any:
    name = (env.get("OTEL_TRACES_EXPORTER") or "otlp").split(",")[0].strip().lower()
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={name[:40]!r}: mlmesh supports otlp, console or none")
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    ).strip()
    if protocol != "grpc":
        raise ValueError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol[:40]!r}: mlmesh exports OTLP over grpc; "
            "point it at the collector's gRPC port (4317)"
        )
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def shutdown() -> None:
    """Send the spans still batched; a stage calls it before it exits."""
    global _provider, _tracer_instance
    if _provider is not None:
        _provider.shutdown()
        _provider = None
        _tracer_instance = None


_tracer_instance: Any = None


def _tracer() -> Any:
    # Asked for once: get_tracer builds a new tracer (and compares its scope) on every call.
    global _tracer_instance
    if _tracer_instance is None:
        from opentelemetry import trace

        _tracer_instance = trace.get_tracer(TRACER_NAME)
    return _tracer_instance


@contextlib.contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """A child span of the current one while tracing is on; yields None (and costs nothing) when off."""
    if _provider is None:
        yield None
        return
    with _tracer().start_as_current_span(name, attributes=attributes) as current:
        yield current


def current_ids() -> tuple[str, str]:
    """(trace id, span id) of the current span in hex, or ("", "") when not tracing."""
    if _provider is None:
        return "", ""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return "", ""
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


# ---- one trace per run ---------------------------------------------------------------------
def run_ids(run_id: str) -> tuple[int, int]:
    """The trace id of a run and the span id of its root span, both derived from the run id."""
    digest = hashlib.sha256(f"mlmesh-run:{run_id}".encode()).digest()
    return int.from_bytes(digest[:16], "big") or 1, int.from_bytes(digest[16:24], "big") or 1


def trace_id_of(run_id: str) -> str:
    return f"{run_ids(run_id)[0]:032x}"


def _run_id_generator() -> Any:
    """Random ids, except for a run's root span, whose ids come from the run id (see run_span).
    Defined here, not at module level, so that nothing of the SDK is imported while tracing is off."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class RunIdGenerator(RandomIdGenerator):
        def generate_trace_id(self) -> int:
            forced = _forced_ids.get()
            return forced[0] if forced is not None else super().generate_trace_id()

        def generate_span_id(self) -> int:
            forced = _forced_ids.get()
            if forced is not None:
                _forced_ids.set(None)  # only the root span; its children get random ids
                return forced[1]
            return super().generate_span_id()

        def is_trace_id_random(self) -> bool:
            # A run's trace id is derived, not random (the W3C trace-context level 2 flag).
            return _forced_ids.get() is None

    return RunIdGenerator()


@contextlib.contextmanager
def run_span(run_id: str, name: str, start_time_ns: int | None = None, **attributes: Any) -> Iterator[Any]:
    """The root span of a run: its trace id and span id are the run's (see `run_ids`).

    The CLI opens it around the whole run. A Flyte run has no process that lives
    as long as the run, so each task opens a `run_task_span`, a child of this
    root by id, and the last task writes the root itself with the run's start time.
    """
    if _provider is None:
        yield None
        return
    from opentelemetry import context as otel_context

    token = _forced_ids.set(run_ids(run_id))
    try:
        with _tracer().start_as_current_span(
            name,
            context=otel_context.Context(),
            start_time=start_time_ns,
            attributes={"mlmesh.run_id": run_id, **attributes},
        ) as root:
            _forced_ids.set(None)
            yield root
    finally:
        _forced_ids.reset(token)


@contextlib.contextmanager
def run_task_span(run_id: str, name: str, **attributes: Any) -> Iterator[Any]:
    """A span for one piece of a run (a Flyte task), parented on the run's root span by id."""
    if _provider is None:
        yield None
        return
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    trace_id, root_id = run_ids(run_id)
    sampled = _provider.sampler.should_sample(None, trace_id, name).decision.is_sampled()
    parent = NonRecordingSpan(
        SpanContext(
            trace_id,
            root_id,
            is_remote=True,
            trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else 0),
        )
    )
    with _tracer().start_as_current_span(
        name,
        context=trace.set_span_in_context(parent),
        attributes={"mlmesh.run_id": run_id, **attributes},
    ) as current:
        yield current


# ---- gRPC ---------------------------------------------------------------------------------
# Call spans are made here rather than by opentelemetry-instrumentation-grpc's interceptors:
# those put a second interceptor layer and a per-call method filter in front of every stage
# call, and move every client call onto grpc.aio's slower interceptor path, about 0.3 ms a
# call each side (bench/bench_observability.py). The stage interceptor already knows the
# method and skips health and reflection, and the client knows its calls, so each opens one
# span and passes W3C trace context in the metadata itself. Names and attributes follow the
# OpenTelemetry RPC conventions: span "<service>/<method>", rpc.system, rpc.service,
# rpc.method, rpc.grpc.status_code.
TRACEPARENT, TRACESTATE = "traceparent", "tracestate"
# Server-side codes that mark a span as failed (the RPC conventions); the others are the caller's doing.
_SERVER_ERRORS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})
_propagator: Any = None


def _w3c() -> Any:
    global _propagator
    if _propagator is None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        _propagator = TraceContextTextMapPropagator()
    return _propagator


def split_method(full_method: str) -> tuple[str, str]:
    """'/mlmesh.loader.v1.LoaderService/Load' -> ('mlmesh.loader.v1.LoaderService', 'Load')."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def _rpc_attributes(full_method: str) -> dict[str, str]:
    service, method = split_method(full_method)
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}


@contextlib.contextmanager
def server_span(full_method: str, metadata: Any) -> Iterator[Any]:
    """The span of one call a stage serves, a child of the caller's span when its metadata
    carries W3C trace context; None (and nothing done) while tracing is off."""
    if _provider is None:
        yield None
        return
    from opentelemetry.trace import SpanKind

    carrier = {key: value for key, value in metadata or () if key in (TRACEPARENT, TRACESTATE)}
    parent = _w3c().extract(carrier) if carrier else None
    with _tracer().start_as_current_span(
        full_method.lstrip("/"),
        context=parent,
        kind=SpanKind.SERVER,
        attributes=_rpc_attributes(full_method),
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        yield current


def end_server_span(span: Any, code: Any, message: str = "", **attributes: Any) -> None:
    """Record a served call's status (a grpc.StatusCode) and attributes on its span."""
    if span is None:
        return
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    for key, value in attributes.items():
        if value not in (None, ""):
            span.set_attribute(key, value)
    if code.name in _SERVER_ERRORS:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {message}"[:300]))


@contextlib.contextmanager
def client_span(full_method: str) -> Iterator[tuple[tuple[str, str], ...]]:
    """A span for one call a client makes; yields the metadata that carries it to the stage
    (nothing while tracing is off). A failed call ends the span with its status code."""
    if _provider is None:
        yield ()
        return
    import grpc
    from opentelemetry.trace import SpanKind, Status, StatusCode

    with _tracer().start_as_current_span(
        full_method.lstrip("/"),
        kind=SpanKind.CLIENT,
        attributes=_rpc_attributes(full_method),
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        carrier: dict[str, str] = {}
        _w3c().inject(carrier)
        try:
            yield tuple(carrier.items())
        except grpc.aio.AioRpcError as error:
            current.set_attribute("rpc.grpc.status_code", error.code().value[0])
            current.set_status(Status(StatusCode.ERROR, f"{error.code().name}: {error.details() or ''}"[:300]))
            raise
        current.set_attribute("rpc.grpc.status_code", 0)
