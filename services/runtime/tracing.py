"""OpenTelemetry traces: off unless configured, and then one trace per pipeline run.

Configuration is the standard OTel environment, nothing mlmesh-specific:

- tracing is on when `OTEL_TRACES_EXPORTER` names an exporter (`otlp`,
  `console`), or when an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT`,
  `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); `OTEL_SDK_DISABLED=true` or
  `OTEL_TRACES_EXPORTER=none` keeps it off;
- the OTLP exporter reads its endpoint, headers, TLS and timeout from the
  `OTEL_EXPORTER_OTLP_*` variables, the sampler comes from
  `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`, batching from `OTEL_BSP_*`.

Off means free: no OpenTelemetry module is imported, no interceptor is
installed, and `span()` is a null context.

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
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip()
    if protocol != "grpc":
        raise ValueError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol[:40]!r}: mlmesh exports OTLP over grpc; "
            "point it at the collector's gRPC port (4317)"
        )
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def shutdown() -> None:
    """Send the spans still batched; a stage calls it before it exits."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def _tracer() -> Any:
    from opentelemetry import trace

    return trace.get_tracer(TRACER_NAME)


@contextlib.contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """A child span of the current one while tracing is on; yields None (and costs nothing) when off."""
    if _provider is None:
        yield None
        return
    with _tracer().start_as_current_span(name, attributes=attributes) as current:
        yield current


def annotate(**attributes: Any) -> None:
    """Set attributes on the current span (the RPC's server span, in a handler), if tracing."""
    if _provider is None:
        return
    from opentelemetry import trace

    current = trace.get_current_span()
    for key, value in attributes.items():
        if value not in (None, ""):
            current.set_attribute(key, value)


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
            name, context=otel_context.Context(), start_time=start_time_ns,
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
    parent = NonRecordingSpan(SpanContext(
        trace_id, root_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else 0),
    ))
    with _tracer().start_as_current_span(
        name, context=trace.set_span_in_context(parent), attributes={"mlmesh.run_id": run_id, **attributes},
    ) as current:
        yield current


# ---- gRPC ---------------------------------------------------------------------------------
def server_interceptors(*service_names: str) -> list[Any]:
    """The OTel server interceptor for our own services (health probes and reflection are not traced)."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    return [aio_server_interceptor(filter_=filters.any_of(*(filters.service_name(s) for s in service_names)))]


def client_interceptors() -> list[Any]:
    """The OTel client interceptors: a client span per call, and W3C trace context in the metadata."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())
