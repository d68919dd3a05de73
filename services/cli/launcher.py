"""Runs the five stages as local child processes: the embedded default deployment."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import multiprocessing
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from services.cli.forks import fork_context
from services.client.mesh import check_health
from services.runtime.catalog import STAGES
from services.runtime.metrics import metrics_url
from services.runtime.settings import LAUNCHER_PID, Settings, dialable_host


class MeshStartError(RuntimeError):
    pass


def _run_stage(stage: str, env: dict[str, str], log_path: str | None) -> None:
    """A stage's process, forked from the fork server: the same as `python -m services.<stage>`."""
    _name_process(stage)
    # Its own process group: a Ctrl-C at the terminal reaches the launcher (which stops
    # the stages in order) and the command it runs, not every stage at once mid-call.
    os.setpgid(0, 0)
    # The fork server hands each child the launcher's end of the pipe that keeps the server
    # alive (for children that start processes of their own; stages never do). Held open
    # here, it would keep the server, and so the stages, running after the launcher died.
    from multiprocessing import forkserver

    # _forkserver_alive_fd is CPython's private attribute, which typeshed does not declare.
    server = forkserver._forkserver
    alive_fd = server._forkserver_alive_fd  # type: ignore[attr-defined]
    if alive_fd is not None:
        os.close(alive_fd)
        server._forkserver_alive_fd = None  # type: ignore[attr-defined]
    if log_path is not None:
        descriptor = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(descriptor, 1)
        os.dup2(descriptor, 2)
        os.close(descriptor)
    os.environ.clear()
    # The stage stops when its parent dies (server.stop_with_launcher): here the fork server,
    # which itself exits as soon as the launcher does.
    os.environ.update({**env, LAUNCHER_PID: str(os.getppid())})
    runpy.run_module(f"services.{stage}", run_name="__main__", alter_sys=True)


def _name_process(name: str) -> None:
    """The name ps, top and pgrep show (Linux): every forked stage would otherwise look like
    the fork server. `ps -o pid,comm --ppid <fork server>` lists the stages by name."""
    if sys.platform == "linux":
        import ctypes

        pr_set_name = 15
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_name, name.encode()[:15], 0, 0, 0)


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """multiprocessing imports the parent's main script again in every child it starts (so
    that pickled functions defined there resolve). A stage needs nothing from it, and a
    script that launches a mesh (a benchmark, a user's program) must not run again, with
    its imports and side effects, inside five stage processes. Without a __file__ and a
    __spec__, the main module is not imported in the child."""
    main = sys.modules["__main__"]
    saved_file = main.__dict__.pop("__file__", None)
    saved_spec = getattr(main, "__spec__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__spec__ = saved_spec
        if saved_file is not None:
            main.__file__ = saved_file


class StageProcess:
    """A forked stage, with the part of subprocess.Popen's interface the launcher uses."""

    def __init__(self, process: multiprocessing.process.BaseProcess):
        assert process.pid is not None, "a StageProcess is a started process"
        self._process = process
        self._pid: int = process.pid

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def send_signal(self, signum: int) -> None:
        if self._process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(f"services.{self._process.name}", timeout or 0)
        return self._process.exitcode


# Restarts count against MLMESH_RESTART_LIMIT within this window, like a crash-loop guard.
RESTART_WINDOW_SECONDS = 600.0
RESTART_BACKOFF_SECONDS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)


@dataclass
class Supervision:
    """What `mlmesh up` knows about one stage's restarts."""

    restarts: int = 0
    recent: deque[float] = field(default_factory=deque)  # monotonic times of restarts in the window
    due: float | None = None  # when the next restart may happen
    last_exit: int | None = None


def port_in_use(host: str, port: int) -> bool:
    """True when a listening socket already holds host:port (a bind test, not a connect)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR ignores sockets in TIME_WAIT, so only a live listener makes this fail.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


class LocalMesh:
    """Start with `await mesh.start()`, stop with `mesh.stop()`; also an async context manager."""

    def __init__(self, settings: Settings, env: dict[str, str] | None = None, log_dir: Path | None = None):
        self.settings = settings
        self.env = {**os.environ, **(env or {})}
        self.log_dir = log_dir
        self.processes: dict[str, StageProcess] = {}
        self.supervision: dict[str, Supervision] = {stage: Supervision() for stage in STAGES}

    @property
    def addresses(self) -> dict[str, str]:
        # Where this launcher's own children listen; MLMESH_*_ADDRESS may point clients elsewhere.
        host = dialable_host(self.settings.bind_host)
        return {stage: f"{host}:{self.settings.ports[stage]}" for stage in STAGES}

    def _spawn(self, stage: str) -> StageProcess:
        log_path = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = str(self.log_dir / f"{stage}.log")
        process = fork_context().Process(
            target=_run_stage,
            args=(stage, dict(self.env), log_path),
            name=stage,
            daemon=False,
        )
        with _main_module_hidden():
            process.start()
        return StageProcess(process)

    def _log_tail(self, stage: str) -> str:
        if self.log_dir is None or not (self.log_dir / f"{stage}.log").is_file():
            return ""
        lines = (self.log_dir / f"{stage}.log").read_text(errors="replace").splitlines()
        return "\n  ".join(["", *lines[-8:]])

    @property
    def metrics_urls(self) -> dict[str, str]:
        """Where each stage serves Prometheus metrics; empty when MLMESH_METRICS=off."""
        if not self.settings.metrics:
            return {}
        return {stage: metrics_url(self.settings.metrics_host, self.settings.metrics_ports[stage]) for stage in STAGES}

    async def _check_ports_free(self) -> None:
        """Refuse to start over another mesh (or any program) that holds our ports."""
        for stage in STAGES:
            port = self.settings.ports[stage]
            if port == 0 or not port_in_use(self.settings.bind_host, port):
                continue
            status = await check_health(self.addresses[stage], timeout=1.0, settings=self.settings)
            who = "another mlmesh mesh (its health says SERVING)" if status == "SERVING" else "another program"
            raise MeshStartError(
                f"port {port} for {stage} on {self.settings.bind_host} is already in use by {who}; stop it, "
                f"or choose other ports with MLMESH_{stage.upper()}_PORT"
            )
        # After the gRPC ports, whose check can say that another mesh holds them.
        if self.settings.metrics:
            for stage in STAGES:
                port = self.settings.metrics_ports[stage]
                if port != 0 and port_in_use(self.settings.metrics_host, port):
                    raise MeshStartError(
                        f"metrics port {port} for {stage} on {self.settings.metrics_host} is already in use; stop what "
                        f"holds it, choose another with MLMESH_{stage.upper()}_METRICS_PORT, or set MLMESH_METRICS=off"
                    )

    async def running_elsewhere(self) -> bool:
        """True when every stage's address already answers SERVING: a mesh this launcher did not start."""
        statuses = await asyncio.gather(
            *(check_health(self.addresses[s], timeout=1.0, settings=self.settings) for s in STAGES)
        )
        return all(status == "SERVING" for status in statuses)

    async def start_or_reuse(self) -> bool:
        """Start the mesh, or use the one already serving on these ports; True if this call started it.

        For commands that only need a mesh for a while (`with-mesh`, `run --start-mesh`):
        the mesh someone left running serves them, and stays running afterwards.
        """
        if await self.running_elsewhere():
            return False
        await self.start()
        return True

    async def start(self, timeout: float = 60.0) -> None:
        await self._check_ports_free()
        for stage in STAGES:
            self.processes[stage] = self._spawn(stage)
        deadline = time.monotonic() + timeout
        pending = set(STAGES)
        try:
            while pending:
                for stage in list(pending):
                    code = self.processes[stage].poll()
                    if code is not None:
                        raise MeshStartError(
                            f"{stage} exited with status {code} during start-up{self._log_tail(stage)}"
                        )
                    if await check_health(self.addresses[stage], timeout=1.0, settings=self.settings) == "SERVING":
                        pending.discard(stage)
                if pending and time.monotonic() > deadline:
                    raise MeshStartError(f"{', '.join(sorted(pending))} not SERVING after {timeout:.0f}s")
                if pending:
                    await asyncio.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def dead_stages(self) -> dict[str, int]:
        return {s: code for s, p in self.processes.items() if (code := p.poll()) is not None}

    def supervise(self, now: float | None = None) -> tuple[list[str], dict[str, int]]:
        """Restart dead stages with backoff; returns (messages, stages over the restart limit).

        A stage that dies is restarted after 1 s, then 2, 4, ... 30 s, as long as it
        has restarted fewer than MLMESH_RESTART_LIMIT times in the last ten minutes.
        """
        now = time.monotonic() if now is None else now
        messages, exhausted = [], {}
        for stage, code in self.dead_stages().items():
            state = self.supervision[stage]
            while state.recent and now - state.recent[0] > RESTART_WINDOW_SECONDS:
                state.recent.popleft()
            if state.due is None:
                state.last_exit = code
                if len(state.recent) >= self.settings.restart_limit:
                    exhausted[stage] = code
                    continue
                delay = RESTART_BACKOFF_SECONDS[min(len(state.recent), len(RESTART_BACKOFF_SECONDS) - 1)]
                state.due = now + delay
                messages.append(
                    f"{stage} exited with status {code}; restarting in {delay:.0f}s "
                    f"({len(state.recent) + 1} of {self.settings.restart_limit} in {RESTART_WINDOW_SECONDS / 60:.0f} min)"
                )
            elif now >= state.due:
                state.due = None
                state.restarts += 1
                state.recent.append(now)
                self.processes[stage] = self._spawn(stage)
                messages.append(f"{stage} restarted (pid {self.processes[stage].pid})")
        return messages, exhausted

    def write_state(self, path: Path) -> None:
        """What `mlmesh status` shows beside health: pids and restarts of this launcher's stages."""
        state = {
            "launcher_pid": os.getpid(),
            "stages": {
                stage: {
                    "pid": self.processes[stage].pid if stage in self.processes else None,
                    "address": self.addresses[stage],
                    "restarts": self.supervision[stage].restarts,
                    "last_exit": self.supervision[stage].last_exit,
                }
                for stage in STAGES
            },
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state, indent=2, sort_keys=True))
        temporary.replace(path)

    def stop(self) -> dict[str, int]:
        """SIGTERM everyone, give them the grace period, then SIGKILL stragglers."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.grace_seconds + 5
        codes = {}
        for stage, process in self.processes.items():
            try:
                codes[stage] = process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                codes[stage] = process.wait()
        self.processes.clear()
        return codes

    async def __aenter__(self) -> LocalMesh:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
