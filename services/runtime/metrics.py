"""Prometheus metrics of one stage, served over HTTP at /metrics.

Names follow what operators already have dashboards and alerts for:

- `grpc_server_started_total`, `grpc_server_handled_total` and the
  `grpc_server_handling_seconds` histogram, with the labels of
  go-grpc-prometheus (grpc_type, grpc_service, grpc_method, grpc_code);
- `mlmesh_*` for what only a stage knows: calls in flight against the
  admission limit, rejections, cache hits and misses, artifact store traffic
  and verification failures, worker queue depth, computation (fit) time,
  running long-running operations, and build info.

Each stage has its own registry, so several stages in one process (the
tests) never mix their numbers. The HTTP server is prometheus-client's own,
on a daemon thread: a scrape never waits for the event loop.
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Callable, Iterator
from importlib.metadata import version as package_version
from typing import Any, Protocol

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

from services.runtime import tracing
from services.runtime.errors import Cancelled

# The *_created series double every counter and histogram; Prometheus does not need them.
disable_created_metrics()

# Calls last from a cache hit (a millisecond) to a fit (hours).
RPC_SECONDS_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
    1800,
    3600,
    14400,
)
STORE_SECONDS_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 120)


def _grpc_type(unary_response: bool) -> str:
    # Stages take one request each; the trainer's Train streams progress back.
    return "unary" if unary_response else "server_stream"


class StoreOperation:
    """One timed read or write; the store sets `nbytes` once it knows the size."""

    __slots__ = ("nbytes",)

    def __init__(self) -> None:
        self.nbytes = 0


@contextlib.contextmanager
def _traced(operation: str, uri: str) -> Iterator[StoreOperation]:
    """One artifact read or write as a span (while tracing is on), with its size once known."""
    measured = StoreOperation()
    with tracing.span(f"store.{operation}", {"mlmesh.artifact.uri": uri} if uri else None) as span:
        yield measured
        if span is not None:
            span.set_attribute("mlmesh.artifact.bytes", measured.nbytes)


class StoreMetrics(Protocol):
    """What the artifact store reports to (see ArtifactStore.metrics)."""

    def store_operation(self, operation: str, uri: str = "") -> contextlib.AbstractContextManager[StoreOperation]: ...

    def verification_failed(self) -> None: ...


class StageMetrics:
    """Every metric a stage exports, and the HTTP server that exports them."""

    def __init__(self, stage: str, stage_version: str, max_concurrent_rpcs: int):
        self.stage = stage
        self.registry = registry = CollectorRegistry()
        # process_start_time_seconds (uptime), CPU, memory, open files; python_info.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        rpc = ("grpc_type", "grpc_service", "grpc_method")
        self._started = Counter("grpc_server_started_total", "RPCs started on the server.", rpc, registry=registry)
        self._handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, whatever their status.",
            (*rpc, "grpc_code"),
            registry=registry,
        )
        self._handling = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its status.",
            rpc,
            buckets=RPC_SECONDS_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "mlmesh_rpcs_in_flight",
            "Stage RPCs being handled now (health and reflection excluded).",
            registry=registry,
        )
        Gauge(
            "mlmesh_max_concurrent_rpcs",
            "MLMESH_MAX_CONCURRENT_RPCS: calls admitted at once before RESOURCE_EXHAUSTED.",
            registry=registry,
        ).set(max_concurrent_rpcs)
        self.rejected = Counter(
            "mlmesh_rpcs_rejected_total",
            "Calls refused with RESOURCE_EXHAUSTED because the stage was at its limit.",
            registry=registry,
        )
        cache = Counter(
            "mlmesh_cache_requests_total",
            "Stage requests answered from the memo (hit) or computed (miss).",
            ("stage", "result"),
            registry=registry,
        )
        self._cache = {True: cache.labels(stage, "hit"), False: cache.labels(stage, "miss")}
        store_bytes = Counter(
            "mlmesh_store_bytes_total",
            "Artifact bytes read (digest-verified) and written.",
            ("stage", "direction"),
            registry=registry,
        )
        self._store_bytes = {"read": store_bytes.labels(stage, "read"), "write": store_bytes.labels(stage, "write")}
        store_seconds = Histogram(
            "mlmesh_store_operation_seconds",
            "Time to read and verify, or to write and sync, one artifact.",
            ("stage", "operation"),
            buckets=STORE_SECONDS_BUCKETS,
            registry=registry,
        )
        self._store_seconds = {
            "read": store_seconds.labels(stage, "read"),
            "write": store_seconds.labels(stage, "write"),
        }
        self.verification_failures = Counter(
            "mlmesh_store_verification_failures_total",
            "Artifacts whose bytes did not match their sha256 (answered DATA_LOSS).",
            ("stage",),
            registry=registry,
        ).labels(stage)
        computation = Histogram(
            "mlmesh_computation_seconds",
            "Time a stage's work ran on its worker thread (cache misses only; fits for the trainer).",
            ("stage", "outcome"),
            buckets=RPC_SECONDS_BUCKETS,
            registry=registry,
        )
        self._computation = {o: computation.labels(stage, o) for o in ("ok", "error", "cancelled")}
        self.computations_running = Gauge(
            "mlmesh_computations_running",
            "Computations running on worker threads now.",
            ("stage",),
            registry=registry,
        ).labels(stage)
        self._queue_depth = Gauge(
            "mlmesh_worker_queue_depth",
            "Computations waiting for a free worker thread (MLMESH_WORKER_THREADS).",
            ("stage",),
            registry=registry,
        ).labels(stage)
        self._operations = Gauge(
            "mlmesh_operations_active",
            "Long-running operations (the trainer's fits) not finished yet.",
            ("stage",),
            registry=registry,
        ).labels(stage)
        Gauge(
            "mlmesh_build_info",
            "Always 1; the labels say what is running.",
            ("stage", "stage_version", "mlmesh", "grpcio", "scikit_learn", "numpy", "python", "machine"),
            registry=registry,
        ).labels(
            stage,
            stage_version,
            _version("mlmesh"),
            _version("grpcio"),
            _version("scikit-learn"),
            _version("numpy"),
            platform.python_version(),
            platform.machine(),
        ).set(1)
        # Per method, the label children resolved once: a call then costs a few dict lookups.
        self._children: dict[tuple[str, bool], tuple[Any, Any, dict[grpc.StatusCode, Any]]] = {}
        self._http: Any = None
        self.port = 0

    # ---- sources read at scrape time ------------------------------------------------------
    def watch_queue(self, depth: Callable[[], float]) -> None:
        self._queue_depth.set_function(depth)

    def watch_operations(self, active: Callable[[], float]) -> None:
        self._operations.set_function(active)

    # ---- per call -------------------------------------------------------------------------
    def _rpc(self, method: str, unary: bool) -> tuple[Any, Any, dict[grpc.StatusCode, Any]]:
        children = self._children.get((method, unary))
        if children is None:
            labels = (_grpc_type(unary), *tracing.split_method(method))
            children = (self._started.labels(*labels), self._handling.labels(*labels), {})
            self._children[(method, unary)] = children
            for code in grpc.StatusCode:  # every code present from the start: rate() sees a 0 -> 1 change
                children[2][code] = self._handled.labels(*labels, code.name)
        return children

    def declare_service(self, service_name: str) -> None:
        """Every method of a service at zero from the start, as go-grpc-prometheus does, so a
        dashboard and rate() see a method before its first call."""
        from google.protobuf import descriptor_pool

        service = descriptor_pool.Default().FindServiceByName(service_name)
        for method in service.methods:
            self._rpc(f"/{service_name}/{method.name}", unary=not method.server_streaming)

    def rpc_started(self, method: str, unary: bool) -> None:
        self._rpc(method, unary)[0].inc()
        self.in_flight.inc()

    def rpc_handled(self, method: str, unary: bool, code: grpc.StatusCode, seconds: float) -> None:
        _, handling, handled = self._rpc(method, unary)
        handled[code].inc()
        handling.observe(seconds)
        self.in_flight.dec()

    def cache(self, hit: bool) -> None:
        self._cache[hit].inc()

    @contextlib.contextmanager
    def computation(self) -> Iterator[None]:
        started = time.perf_counter()
        outcome = "error"
        self.computations_running.inc()
        try:
            yield
            outcome = "ok"
        except BaseException as exc:
            if isinstance(exc, Cancelled):  # every caller left; the work stopped at a checkpoint
                outcome = "cancelled"
            raise
        finally:
            self.computations_running.dec()
            self._computation[outcome].observe(time.perf_counter() - started)

    @contextlib.contextmanager
    def store_operation(self, operation: str, uri: str = "") -> Iterator[StoreOperation]:
        """Times one artifact read or write, counts its bytes, and traces it when tracing is on."""
        started = time.perf_counter()
        with _traced(operation, uri) as measured:
            yield measured
        self._store_seconds[operation].observe(time.perf_counter() - started)
        self._store_bytes[operation].inc(measured.nbytes)

    def verification_failed(self) -> None:
        self.verification_failures.inc()

    # ---- HTTP -----------------------------------------------------------------------------
    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0: any free port); returns the port bound."""
        try:
            self._http, _thread = start_http_server(port, addr=host.strip("[]"), registry=self.registry)
        except OSError as exc:
            raise OSError(
                f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}); is the port in use? "
                f"Set MLMESH_{self.stage.upper()}_METRICS_PORT, or MLMESH_METRICS=off"
            ) from None
        self.port = self._http.server_port
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def _version(package: str) -> str:
    try:
        return package_version(package)
    except Exception:  # noqa: BLE001 - a label, never a reason not to start
        return "unknown"


class _NoStoreMetrics:
    """What a store reports to when it belongs to no stage (the CLI, tests)."""

    @contextlib.contextmanager
    def store_operation(self, operation: str, uri: str = "") -> Iterator[StoreOperation]:
        with _traced(operation, uri) as measured:
            yield measured

    def verification_failed(self) -> None:
        pass


NO_STORE_METRICS = _NoStoreMetrics()


# ---- reading a stage's metrics back (mlmesh status) ---------------------------------------
def metrics_url(host: str, port: int) -> str:
    from services.runtime.settings import dialable_host

    return f"http://{dialable_host(host)}:{port}/metrics"


def read_vitals(url: str, timeout: float) -> dict[str, float]:
    """The few numbers `mlmesh status` shows, from a stage's /metrics:
    uptime_seconds, rpcs_in_flight, operations_active, cache_hits, cache_misses, and for the
    serving stage models_served (the models with a live version)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read(8 * 1024 * 1024).decode("utf-8", "replace")
    vitals = {"cache_hits": 0.0, "cache_misses": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "process_start_time_seconds":
                vitals["uptime_seconds"] = max(0.0, time.time() - sample.value)
            elif sample.name == "mlmesh_rpcs_in_flight":
                vitals["rpcs_in_flight"] = sample.value
            elif sample.name == "mlmesh_operations_active":
                vitals["operations_active"] = sample.value
            elif sample.name == "mlmesh_cache_requests_total":
                vitals["cache_hits" if sample.labels.get("result") == "hit" else "cache_misses"] += sample.value
            elif sample.name == "mlmesh_serving_live_version":
                vitals["models_served"] = vitals.get("models_served", 0.0) + (sample.value > 0)
    return vitals
