"""What every stage shares: the store, the memo, the worker threads, lineage.

Every handler has one shape: validate the request into a `Job` (inputs and
canonical parameters), write the work as a function of a `Run`, and hand both
to the runtime: `execute` for a unary answer, or a `LongRunning`'s `stream`
(and `start`) for work that outlives its call, such as a fit. The runtime
then:

- derives the cache key from stage name and version, library versions,
  input digests and parameters;
- serves a stored response when the key was seen and its outputs still exist
  (the memo, memo.py);
- makes identical concurrent requests share one computation;
- runs the work on a worker thread, so the event loop keeps answering
  health checks;
- writes a manifest for each output, which is what `mlmesh lineage` walks.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import platform
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from typing import Any, TypeVar, cast

import numpy as np
import pandas as pd
from google.protobuf.message import Message

from mlmesh.common.v1.common_pb2 import ArtifactRef, StageInfo
from services.runtime import formats, openlineage, tracing
from services.runtime.errors import Cancelled, InvalidArgument, bounded
from services.runtime.memo import Memo
from services.runtime.metrics import StageMetrics
from services.runtime.operations import Operation, OperationRegistry, operation_name, parse_operation_name
from services.runtime.runs import execution_doc, new_run_id, record_execution, refs_in, summary_of
from services.runtime.settings import Settings
from services.runtime.store import ArtifactStore, canonical_json, ref_to_dict, sha256_hex
from services.runtime.watch import CallWatch

log = logging.getLogger(__name__)

ResultT = TypeVar("ResultT", bound=Message)

# Outputs depend on these libraries' numerics and file formats, so their
# versions are part of every cache key: upgrading one never serves stale results.
_FINGERPRINT_PACKAGES = ("numpy", "scikit-learn", "pandas", "pyarrow", "skops")


def machine_architecture() -> str:
    """The instruction set, under one name whatever the OS calls it (macOS says arm64, Windows AMD64)."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


# The instruction set is in every cache key too. numpy, OpenBLAS and scikit-learn's compiled code
# take different SIMD paths on x86-64 and on Arm, so fits and statistics can differ in their last
# bits (docs/deploy.md, "Axion", has the measured comparison). A store shared by x86 CI and Axion
# machines then never answers one with what only the other would have computed; objects that do come
# out byte-identical are still stored once, being content-addressed.
ENVIRONMENT_FINGERPRINT = {
    **{name: package_version(name) for name in _FINGERPRINT_PACKAGES},
    "machine": machine_architecture(),
}


@dataclass
class RpcRecord:
    """Filled in by the handler, read by the interceptor for the per-RPC log line."""

    cache_hit: bool | None = None
    # The pipeline run this call belongs to (gRPC metadata mlmesh-run-id), or one made up for a lone call.
    run_id: str = ""
    # Who called: "token:<name>" and/or "cert:<subject>" when the mesh checks identity.
    caller: str = ""
    # The caller's id for following this call's progress (metadata mlmesh-call-id; watch.py).
    call_id: str = ""


current_rpc: contextvars.ContextVar[RpcRecord | None] = contextvars.ContextVar("current_rpc", default=None)


@dataclass(frozen=True)
class Job:
    """One validated request: what goes into the cache key and the manifests."""

    inputs: dict[str, ArtifactRef]
    params: dict[str, Any]
    force_recompute: bool = False


@dataclass(frozen=True)
class Progress:
    """How far a computation is; steps are the work's own units (trees, for a forest)."""

    fraction: float
    message: str
    step: int = 0
    total_steps: int = 0
    resumed_from_step: int = 0


@dataclass
class Run:
    """Handed to the work function on its worker thread."""

    store: ArtifactStore
    settings: Settings
    cancelled: threading.Event
    report: Callable[[Progress], None]
    cache_key: str = ""
    # Set when the stage is shutting down: long work checkpoints and stops.
    stopping: threading.Event = field(default_factory=threading.Event)
    outputs: dict[str, ArtifactRef] = field(default_factory=dict)

    @classmethod
    def detached(cls, report: Callable[[Progress], None] | None = None) -> Run:
        """A Run for calling stage logic directly (benchmarks, unit tests): no store, never cancelled."""
        return cls(store=None, settings=None, cancelled=threading.Event(), report=report or (lambda _: None))  # type: ignore[arg-type]

    def progress(
        self, fraction: float, message: str, step: int = 0, total_steps: int = 0, resumed_from_step: int = 0
    ) -> None:
        self.report(Progress(fraction, message, step, total_steps, resumed_from_step))

    def put(self, name: str, data: bytes, media_type: str) -> ArtifactRef:
        return self._output(name, self.store.put(data, media_type))

    def put_frame(self, name: str, frame: pd.DataFrame, metadata: dict[str, Any]) -> ArtifactRef:
        """A table output, streamed to the store as Arrow IPC (compressed on an object store)."""
        compress = not self.store.is_local
        return self._output(
            name,
            self.store.put_streamed(formats.ARROW, lambda sink: formats.write_table(sink, frame, metadata, compress)),
        )

    def put_array(self, name: str, array: np.ndarray) -> ArtifactRef:
        """A matrix or vector output, streamed to the store as .npy."""
        return self._output(name, self.store.put_streamed(formats.NPY, lambda sink: formats.write_npy(sink, array)))

    def put_doc(self, name: str, doc: Any) -> ArtifactRef:
        """A JSON document output (schemas, profiles, reports), in canonical form."""
        return self._output(name, self.store.put(formats.to_json_bytes(doc), formats.JSON))

    def put_model(self, name: str, model: Any) -> ArtifactRef:
        """A fitted scikit-learn object output, as .skops (equal models give equal bytes)."""
        return self._output(name, self.store.put(formats.model_to_skops(model), formats.SKOPS))

    def _output(self, name: str, ref: ArtifactRef) -> ArtifactRef:
        self.outputs[name] = ref
        return ref

    def read(self, ref: ArtifactRef, field_name: str) -> bytes:
        return self.store.get(ref, field_name)

    def read_frame(self, ref: ArtifactRef, field_name: str) -> tuple[pd.DataFrame, dict[str, Any]]:
        """A table input and its metadata, decoded from its verified buffer."""
        return formats.read_table(self.store.get_buffer(ref, field_name), field_name)

    def read_array(self, ref: ArtifactRef, field_name: str) -> np.ndarray:
        """An .npy input as a read-only array over its verified buffer: no second copy."""
        return formats.npy_to_array(self.store.get_buffer(ref, field_name), field_name)

    def read_doc(self, ref: ArtifactRef, field_name: str) -> Any:
        """A JSON document input, parsed; a file that is not JSON is the caller's FAILED_PRECONDITION."""
        return formats.json_bytes_to_doc(self.read(ref, field_name), field_name)

    def read_model(self, ref: ArtifactRef, field_name: str) -> Any:
        """A .skops input, loaded with only the types skops trusts for our models."""
        return formats.skops_to_model(self.read(ref, field_name), field_name)

    def check_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled("every caller cancelled this request; the computation stopped")


class _Flight:
    """One in-progress computation and the callers waiting on it."""

    def __init__(self, task: asyncio.Task[Any], cancelled: threading.Event):
        self.task = task
        self.cancelled = cancelled
        self.waiters = 0
        self.listeners: list[Callable[[Progress], None]] = []


class StageRuntime:
    def __init__(self, name: str, version: str, settings: Settings, store: ArtifactStore | None = None):
        self.name = name
        self.version = version
        self.settings = settings
        self.store = store or ArtifactStore(settings.artifact_root)
        self.executor = ThreadPoolExecutor(max_workers=settings.worker_threads, thread_name_prefix=f"{name}-work")
        self.metrics = StageMetrics(name, version, settings.max_concurrent_rpcs)
        self.store.metrics = self.metrics
        # Work handed to the executor that no worker thread has started yet.
        self._waiting = 0
        self._waiting_lock = threading.Lock()
        self.metrics.watch_queue(lambda: self._waiting)
        self._flights: dict[str, _Flight] = {}
        self.memo = Memo(name, self.store)
        self.stopping = threading.Event()
        # Loops a stage runs beside its RPCs (serving's registry poll), cancelled when it stops.
        self.background: list[asyncio.Task[None]] = []
        # What must have happened before health says SERVING (serving's first look at the registry,
        # so that an orchestrator routes no request to a replica still loading its models).
        self.before_serving: list[asyncio.Event] = []
        self.operations = OperationRegistry(settings.operation_idle_seconds)
        # Unary calls a caller is following (ProgressService.WatchCall).
        self.watch = CallWatch()
        self.metrics.watch_operations(self._operations_running)

    def _operations_running(self) -> int:
        try:
            return len(self.operations.in_flight())
        except RuntimeError:  # the loop changed the registry while this scrape thread read it
            return len(self.operations.in_flight())

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def to_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run blocking work on this stage's workers, keeping the loop free."""
        with self._waiting_lock:
            self._waiting += 1
        started = False

        def run() -> Any:
            nonlocal started
            with self._waiting_lock:
                if not started:
                    self._waiting -= 1
                    started = True
            return fn(*args)

        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, contextvars.copy_context().run, run)
        finally:
            with self._waiting_lock:
                if not started:  # cancelled before a worker took it (shutdown)
                    self._waiting -= 1
                    started = True

    def cache_key(self, job: Job) -> str:
        body = {
            "stage": self.name,
            "version": self.version,
            "environment": ENVIRONMENT_FINGERPRINT,
            "inputs": {name: ref.sha256 for name, ref in job.inputs.items()},
            "params": job.params,
        }
        return sha256_hex(canonical_json(body))

    def check_inputs(self, job: Job) -> None:
        for name, ref in job.inputs.items():
            self.store.check_ref(ref, name)
            self.store.resolve(ref.uri)

    async def execute(
        self,
        job: Job,
        work: Callable[[Run], ResultT],
        result_type: type[ResultT],
        on_progress: Callable[[Progress], None] | None = None,
    ) -> ResultT:
        """Serve `job` from the memo or compute it once; fills in `result.stage`.

        When the caller tagged the call with a call id, its progress reports also go
        to whoever watches that id (watch.py).
        """
        record = current_rpc.get()
        call_id = record.call_id if record is not None else ""
        if not call_id:
            return await self._execute(job, work, result_type, on_progress)

        def report(progress: Progress) -> None:
            self.watch.update(call_id, progress.fraction, progress.message, progress.step, progress.total_steps)
            if on_progress is not None:
                on_progress(progress)

        return await self._execute(job, work, result_type, report)

    def tell(self, fraction: float, message: str) -> None:
        """Progress of the current call from the handler itself, before or around `execute`
        (on the event loop; work on a worker thread reports through `run.progress`)."""
        record = current_rpc.get()
        if record is not None and record.call_id:
            self.watch.update(record.call_id, fraction, message)

    async def _execute(
        self,
        job: Job,
        work: Callable[[Run], ResultT],
        result_type: type[ResultT],
        on_progress: Callable[[Progress], None] | None,
    ) -> ResultT:
        started = time.perf_counter()
        started_at = datetime.now(UTC)
        self.check_inputs(job)
        key = self.cache_key(job)
        record = current_rpc.get()

        result, cache_hit = None, False
        if not job.force_recompute:
            result = await self.memo.recall(key, result_type)
            cache_hit = result is not None
        if result is None:
            result, cache_hit = await self._compute_once(key, job, work, result_type, on_progress)

        self.metrics.cache(cache_hit)
        stage_info(result).CopyFrom(
            StageInfo(
                stage=self.name,
                version=self.version,
                cache_hit=cache_hit,
                cache_key=key,
                seconds=time.perf_counter() - started,
            )
        )
        if record is not None:
            record.cache_hit = cache_hit
        await self.record_execution(job, key, result, cache_hit, started_at)
        return result

    async def record_execution(
        self, job: Job, key: str, result: Message, cache_hit: bool, started_at: datetime
    ) -> None:
        """One line of the run's log (see runs.py); never fails the call it describes."""
        record = current_rpc.get()
        run_id = record.run_id if record is not None and record.run_id else new_run_id("call")
        execution = execution_doc(
            run_id,
            self.name,
            self.version,
            key,
            cache_hit,
            job.inputs,
            refs_in(result),
            job.params,
            started_at,
            datetime.now(UTC),
            summary_of(result),
            caller=record.caller if record is not None else "",
        )

        def write_and_export() -> None:
            record_execution(self.store, execution)
            openlineage.emit(execution, self.store.root_url)  # only when OpenLineage is configured

        try:
            await asyncio.to_thread(write_and_export)
        except Exception as exc:  # noqa: BLE001 - the result stands; only its record is lost
            log.warning("could not record the execution of %s in run %s: %s", self.name, run_id, bounded(exc, 200))

    async def settle(self, key: str) -> None:
        """Until the computation for `key` (if any) has really stopped, whatever its outcome.

        A cancelled caller returns at once, while the worker thread stops at its
        next step (and may write a checkpoint first); an operation waits for that.
        """
        flight = self._flights.get(key)
        if flight is not None:
            await asyncio.wait([flight.task])

    async def recall(self, key: str, result_type: type[ResultT]) -> ResultT | None:
        """The memoized result for a cache key, marked as a hit, or None."""
        result = await self.memo.recall(key, result_type)
        if result is not None:
            stage_info(result).CopyFrom(StageInfo(stage=self.name, version=self.version, cache_hit=True, cache_key=key))
        return result

    async def _compute_once(
        self,
        key: str,
        job: Job,
        work: Callable[[Run], ResultT],
        result_type: type[ResultT],
        on_progress: Callable[[Progress], None] | None,
    ) -> tuple[ResultT, bool]:
        flight = self._flights.get(key)
        if flight is not None and flight.cancelled.is_set():
            # Every caller left that computation and it is stopping: a new caller
            # must not inherit its cancellation, so start afresh.
            flight = None
        joined = flight is not None
        if flight is None:
            cancelled = threading.Event()
            loop = asyncio.get_running_loop()
            task = asyncio.ensure_future(self._compute(key, job, work, cancelled, loop))
            flight = self._flights[key] = _Flight(task, cancelled)
            task.add_done_callback(functools.partial(self._landed, key, flight))
        if on_progress is not None:
            flight.listeners.append(on_progress)
        flight.waiters += 1
        try:
            payload = await asyncio.shield(flight.task)
        except asyncio.CancelledError:
            # When the last caller leaves, tell the worker to stop at its next checkpoint.
            flight.waiters -= 1
            if flight.waiters == 0:
                flight.cancelled.set()
            raise
        flight.waiters -= 1
        result = result_type()
        result.ParseFromString(payload)
        # A caller that joined someone else's computation did not compute: a hit.
        return result, joined

    def _landed(self, key: str, flight: _Flight, task: asyncio.Task[Any]) -> None:
        if self._flights.get(key) is flight:  # not a newer flight for the same key
            del self._flights[key]
        if not task.cancelled() and flight.waiters == 0:
            task.exception()  # nobody awaits an abandoned computation; its error is expected

    async def _compute(
        self,
        key: str,
        job: Job,
        work: Callable[[Run], Message],
        cancelled: threading.Event,
        loop: asyncio.AbstractEventLoop,
    ) -> bytes:
        def report(progress: Progress) -> None:
            flight = self._flights.get(key)
            if flight is None or flight.cancelled is not cancelled:
                return  # abandoned; the listeners belong to a newer computation
            for listener in list(flight.listeners):
                loop.call_soon_threadsafe(listener, progress)

        run = Run(
            store=self.store,
            settings=self.settings,
            cancelled=cancelled,
            report=report,
            cache_key=key,
            stopping=self.stopping,
        )
        created = datetime.now(UTC)
        started = time.perf_counter()
        result = await self.to_thread(self._measured, work, run)
        seconds = time.perf_counter() - started
        result.ClearField("stage")
        # The run of the caller that started this computation (a task copies its creator's
        # context): its outputs' manifests name it, so lineage and the report can say which run made them.
        record = current_rpc.get()
        run_id = record.run_id if record is not None else ""
        await asyncio.to_thread(self._remember, key, job, run, result, created, seconds, run_id)
        return result.SerializeToString()

    def _measured(self, work: Callable[[Run], ResultT], run: Run) -> ResultT:
        """The work on its worker thread: timed, counted while running, and traced as one span."""
        with self.metrics.computation(), tracing.span(f"{self.name}.compute", {"mlmesh.cache_key": run.cache_key}):
            return _then_return_memory(work, run)

    def _remember(
        self, key: str, job: Job, run: Run, result: Message, created: datetime, seconds: float, run_id: str = ""
    ) -> None:
        manifest_base = {
            "stage": self.name,
            "stage_version": self.version,
            "environment": ENVIRONMENT_FINGERPRINT,
            "cache_key": key,
            "inputs": {name: ref_to_dict(ref) for name, ref in job.inputs.items()},
            "params": job.params,
            "created_at": created.isoformat(),
            "duration_seconds": round(seconds, 6),
            **({"run_id": run_id} if run_id else {}),
        }
        for name, ref in run.outputs.items():
            self.store.write_manifest(ref.sha256, {**manifest_base, "output": name, "artifact": ref_to_dict(ref)})
        fingerprints = {name: self.store.fingerprint(ref) for name, ref in run.outputs.items()}
        self.memo.remember(key, result, run.outputs, fingerprints)


# Builds a stage's progress message (its operation metadata, e.g. TrainProgress) from a
# report, the seconds elapsed, the estimated seconds left, and the operation's name.
ProgressMessage = Callable[[Progress, float, float, str], Message]


class LongRunning:
    """Work that outlives the call that asked for it, as a google.longrunning operation.

    The operation is named after the job's cache key, so the same request joins the
    operation already running. It belongs to the stage: a caller that leaves, or whose
    deadline passes, does not stop it (CancelOperation or idleness does).
    """

    def __init__(self, runtime: StageRuntime, kind: str, progress_message: ProgressMessage):
        self.runtime = runtime
        self.kind = kind  # the operation names' prefix: operations/<kind>-<cache key>
        self.progress_message = progress_message

    def start(
        self, job: Job, work: Callable[[Run], ResultT], result_type: type[ResultT], label: str
    ) -> tuple[Operation, bool]:
        """The operation computing `job`, and whether it was already running (joined)."""
        runtime = self.runtime
        runtime.check_inputs(job)
        key = runtime.cache_key(job)
        name = operation_name(self.kind, key)
        running = runtime.operations.get(name)
        joined = running is not None and not running.done

        async def run(operation: Operation) -> ResultT:
            started = time.monotonic()
            first_fraction: float | None = None  # where this run started: 0, or a checkpoint

            def on_progress(progress: Progress) -> None:
                nonlocal first_fraction
                # Progress goes to the service log as well as to the operation's followers.
                log.info("%s: %.0f%% %s", label, progress.fraction * 100, progress.message)
                elapsed = time.monotonic() - started
                if first_fraction is None:
                    first_fraction = progress.fraction
                gained = progress.fraction - first_fraction
                eta = elapsed * (1 - progress.fraction) / gained if gained > 0 else 0.0
                operation.update(self.progress_message(progress, elapsed, eta, name))

            # What GetOperation shows before the first step (not a progress event).
            operation.metadata = self.progress_message(Progress(0.0, "waiting for a worker"), 0.0, 0.0, name)
            try:
                return await runtime.execute(job, work, result_type, on_progress=on_progress)
            except asyncio.CancelledError:
                # Cancelled (CancelOperation, idle): done only once the work has stopped and
                # saved its checkpoint, so a follower never sees a half-stopped operation.
                await runtime.settle(key)
                raise

        return runtime.operations.start(name, run), joined

    async def stream(
        self, job: Job, work: Callable[[Run], ResultT], result_type: type[ResultT], label: str
    ) -> AsyncIterator[Message]:
        """Start or join the operation, then yield each progress message and, last, the
        result: what a server-streaming RPC sends. Ending the stream does not stop the work."""
        started_at = datetime.now(UTC)
        operation, joined = self.start(job, work, result_type, label)
        sent = 0
        while True:
            finished = operation.done  # read first: every event of a done operation is in its history
            while sent < len(operation.history):  # grows while we yield
                yield operation.history[sent]
                sent += 1
            if finished:
                break
            await self.runtime.operations.wait(operation, 30.0)
        result = result_type()
        result.MergeFrom(cast(ResultT, operation.result()))
        if joined:
            stage_info(result).cache_hit = True  # a caller that joined someone else's fit did not compute
            await self.runtime.record_execution(job, stage_info(result).cache_key, result, True, started_at)
        yield result

    async def recall(self, name: str, result_type: type[ResultT], done_message: str) -> Operation | None:
        """A finished operation this process does not hold (it restarted), found in the memo."""
        kind, key = parse_operation_name(name)
        if kind != self.kind:
            return None
        result = await self.runtime.recall(key, result_type)
        if result is None:
            return None
        done = self.progress_message(Progress(1.0, done_message), 0.0, 0.0, name)
        return self.runtime.operations.adopt_finished(name, result, done)


def _then_return_memory(work: Callable[[Run], ResultT], run: Run) -> ResultT:
    """Run the work, then hand the memory it freed back to the system.

    A stage that decoded a 3 GB table would otherwise keep most of those pages
    after answering: glibc keeps freed blocks in its arenas, and Arrow's pool keeps
    its own. Both are asked to let go; it takes milliseconds.
    """
    try:
        return work(run)
    finally:
        return_memory()


def return_memory() -> None:
    # No gc.collect(): it holds the GIL for tens of milliseconds, and arrays are freed by
    # reference counting as soon as the work returns. ctypes calls release the GIL.
    pa = sys.modules.get("pyarrow")
    if pa is not None:
        pa.default_memory_pool().release_unused()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc() -> Any:
    """glibc, for malloc_trim; None elsewhere (musl, macOS), where nothing is trimmed."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _glibc() if sys.platform == "linux" else None


def stage_info(result: Message) -> StageInfo:
    """A stage response's `stage` field: every stage's response message has one (see
    proto/mlmesh/common/v1/common.proto), which protobuf's generic Message type cannot express."""
    info: StageInfo = result.stage  # type: ignore[attr-defined]
    return info


def require(condition: bool, message: str) -> None:
    """Shorthand for request validation."""
    if not condition:
        raise InvalidArgument(message)
