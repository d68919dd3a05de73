"""The one server skeleton every stage runs on.

`start_stage` builds a grpc.aio server for a stage: health (NOT_SERVING until
the stage can serve), reflection, the error/logging/metrics interceptor,
tracing when configured, explicit message limits, and the /metrics endpoint.
`serve` adds the process lifecycle: logging, uvloop, SIGTERM/SIGINT,
graceful shutdown. Tests call `start_stage` with port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mlmesh.common.v1 import progress_pb2_grpc
from services.runtime import tracing
from services.runtime.admission import AdmissionInterceptor
from services.runtime.catalog import BY_NAME
from services.runtime.errors import StageError
from services.runtime.interceptor import StageInterceptor
from services.runtime.logs import configure_logging
from services.runtime.operations import OPERATIONS_SERVICE, OperationsService, add_operations_service
from services.runtime.security import server_credentials, server_interceptor
from services.runtime.settings import LAUNCHER_PID, Settings, SettingsError, dialable_host
from services.runtime.stage import StageRuntime
from services.runtime.watch import SERVICE_NAME as PROGRESS_SERVICE
from services.runtime.watch import ProgressServicer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSpec:
    """Everything the skeleton needs to know about one stage."""

    name: str
    version: str
    service_name: str  # full proto name, e.g. mlmesh.loader.v1.LoaderService
    add_servicer: Callable[[Any, grpc.aio.Server], None]
    make_servicer: Callable[[StageRuntime], Any]
    # Serves google.longrunning.Operations too; the servicer then has
    # `recall_operation(name)`, which finds a finished operation in the memo.
    long_running: bool = False

    @classmethod
    def of(
        cls,
        name: str,
        version: str,
        make_servicer: Callable[[StageRuntime], Any],
        long_running: bool = False,
    ) -> StageSpec:
        """The spec of the stage `name` declares in the catalog, e.g. of("loader", "1.0.0", LoaderServicer)."""
        entry = BY_NAME[name]
        return cls(
            name=name,
            version=version,
            service_name=entry.full_service_name,
            add_servicer=getattr(entry.pb2_grpc(), f"add_{entry.service}Servicer_to_server"),
            make_servicer=make_servicer,
            long_running=long_running,
        )


@dataclass
class RunningStage:
    spec: StageSpec
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    runtime: StageRuntime
    metrics_port: int = 0  # 0: metrics are off (MLMESH_METRICS=off)

    @property
    def address(self) -> str:
        return f"{dialable_host(self.runtime.settings.bind_host)}:{self.port}"

    @property
    def metrics_url(self) -> str:
        host = dialable_host(self.runtime.settings.metrics_host)
        return f"http://{host}:{self.metrics_port}/metrics" if self.metrics_port else ""

    async def stop(self, grace: float | None) -> None:
        await self.health.enter_graceful_shutdown()
        # Long work checkpoints at its next step and stops; give it the grace period.
        started = asyncio.get_running_loop().time()
        self.runtime.stopping.set()
        for task in self.runtime.background:
            task.cancel()
        running = [op.task for op in self.runtime.operations.in_flight() if op.task is not None]
        if running:
            await asyncio.wait(running, timeout=grace)
        left = None if grace is None else max(0.0, grace - (asyncio.get_running_loop().time() - started))
        await self.server.stop(left)
        self.runtime.close()
        # Stopping the metrics HTTP server waits for its poll loop (up to half a second): off the loop.
        await asyncio.to_thread(self.runtime.metrics.close)


def _check_store_writable(runtime: StageRuntime) -> None:
    # Ready means able to serve: the store must accept a write before we say SERVING.
    runtime.store.write_doc(("health", f"{runtime.name}.json"), {"stage": runtime.name})
    # Temporary files of writers killed mid-write (an hour old) would otherwise stay forever.
    removed = runtime.store.remove_stale_temporaries()
    if removed:
        log.info("removed %d temporary files that killed writers left in the artifact store", removed)


async def start_stage(spec: StageSpec, settings: Settings, port: int | None = None) -> RunningStage:
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    # Every stage also serves ProgressService, to follow its unary calls (watch.py).
    ours = (spec.service_name, *((OPERATIONS_SERVICE,) if spec.long_running else ()), PROGRESS_SERVICE)
    try:
        credentials = server_credentials(settings)
        auth = server_interceptor(settings)
    except (SettingsError, OSError) as exc:
        raise OSError(f"cannot set up transport security: {exc}") from None
    runtime = StageRuntime(spec.name, spec.version, settings)
    metrics = runtime.metrics
    # Outermost first. Identity and admission inside the stage interceptor, so a refused call
    # is logged, counted and traced like any other; identity before admission, so strangers take no slot.
    interceptors = [
        StageInterceptor(metrics, *ours, watch=runtime.watch),
        *([auth] if auth else []),
        AdmissionInterceptor(settings.max_concurrent_rpcs, on_reject=metrics.rejected.inc),
    ]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    for service in ours:
        metrics.declare_service(service)
    servicer = spec.make_servicer(runtime)
    spec.add_servicer(servicer, server)
    if spec.long_running:
        add_operations_service(OperationsService(runtime.operations, servicer.recall_operation), server)
    # Every stage also lets a caller follow its unary calls (watch.py).
    progress_pb2_grpc.add_ProgressServiceServicer_to_server(ProgressServicer(runtime.watch), server)

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", spec.service_name):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    if settings.reflection != "off":
        reflection.enable_server_reflection((*ours, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    wanted = settings.ports[spec.name] if port is None else port
    address = f"{settings.bind_host}:{wanted}"
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # grpcio reports a failed bind this way
        bound = 0
    if bound == 0:
        runtime.close()
        raise OSError(
            f"cannot bind {settings.bind_host}:{wanted}; is the port in use? "
            f"Set MLMESH_{spec.name.upper()}_PORT or MLMESH_BIND_HOST"
        )
    metrics_port = 0
    if settings.metrics:
        # Tests start stages on port 0; their metrics take any free port too.
        try:
            metrics_port = metrics.serve(
                settings.metrics_host, settings.metrics_ports[spec.name] if port is None else 0
            )
        except OSError:
            runtime.close()
            raise
    await server.start()

    try:
        await runtime.to_thread(_check_store_writable, runtime)
    except Exception as exc:
        await server.stop(None)
        runtime.close()
        metrics.close()
        raise OSError(f"artifact store {settings.artifact_root} is not writable: {exc}") from exc
    for event in runtime.before_serving:
        await event.wait()
    for service in ("", spec.service_name):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return RunningStage(spec, server, bound, health_servicer, runtime, metrics_port)


def _security_summary(settings: Settings) -> str:
    transport = "mTLS" if settings.tls_client_ca else "TLS" if settings.tls_cert else "plaintext"
    identity = ", bearer tokens" if settings.auth_tokens_file else ""
    return f"{transport}{identity}, reflection {settings.reflection}"


async def _serve(spec: StageSpec, settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stage = await start_stage(spec, settings)
    metrics = f"http://{settings.metrics_host}:{stage.metrics_port}/metrics" if stage.metrics_port else "off"
    log.info(
        "%s %s serving %s on %s:%d (%s; artifacts: %s; metrics: %s; tracing: %s)",
        spec.name,
        spec.version,
        spec.service_name,
        settings.bind_host,
        stage.port,
        _security_summary(settings),
        settings.artifact_root,
        metrics,
        "on" if tracing.enabled() else "off",
    )
    await stop.wait()
    log.info("%s stopping: draining for up to %.1fs", spec.name, settings.grace_seconds)
    await stage.stop(settings.grace_seconds)
    log.info("%s stopped", spec.name)


def stop_with_launcher() -> None:
    """Under `mlmesh up`: get SIGTERM when the launcher dies, even by SIGKILL (Linux prctl),
    so a killed launcher never leaves its stages running as orphans."""
    launcher = os.environ.get(LAUNCHER_PID, "")
    if not launcher.isdigit() or sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != int(launcher):  # it died before we asked
        sys.exit("the mlmesh up that started this stage is gone; not serving")


def serve(spec: StageSpec) -> None:
    """Process entry point of a stage: `python -m services.<stage>`."""
    sys.modules.setdefault("pytest", None)  # type: ignore[arg-type] # see preload.py: never in a service
    stop_with_launcher()
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        sys.exit(f"{spec.name}: invalid configuration: {exc}")
    configure_logging(settings.log_level, settings.log_format, spec.name)
    try:
        tracing.configure(spec.name, spec.version)
    except (ValueError, ImportError) as exc:
        sys.exit(f"{spec.name}: invalid tracing configuration: {exc}")
    # A worker thread running Python code (a stepped fit, a model's serialisation) hands the
    # GIL over only every switch interval; at the default 5 ms, a health check waits behind
    # it for several of them in a row. 1 ms keeps the loop's answers in milliseconds.
    sys.setswitchinterval(float(os.environ.get("MLMESH_SWITCH_INTERVAL", "0.001")))
    try:
        import uvloop
    except ImportError:  # uvloop has no Windows build; the default loop works too
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(_serve(spec, settings))
    except (OSError, StageError) as exc:
        sys.exit(f"{spec.name}: cannot start: {exc}")
    with contextlib.suppress(Exception):
        tracing.shutdown()  # spans still batched go out before the exit below skips atexit
    with contextlib.suppress(Exception):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    # The server has drained and stopped. A worker thread may still be inside a fit or a
    # read that cannot be interrupted, and the interpreter would join it at exit, so a
    # SIGTERM could take as long as the fit. Every write is atomic (temporary file, then
    # rename), so leaving now loses only work in progress, which a retry recomputes.
    os._exit(0)


def stage_spec(name: str) -> StageSpec:
    """The StageSpec of a stage by name, e.g. stage_spec("loader")."""
    import importlib

    return importlib.import_module(f"services.{name}.service").SPEC
