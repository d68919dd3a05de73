"""Runs the five stages as local child processes: the embedded default deployment."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from services.runtime.client import check_health
from services.runtime.settings import STAGES, Settings


class MeshStartError(RuntimeError):
    pass


class LocalMesh:
    """Start with `await mesh.start()`, stop with `mesh.stop()`; also an async context manager."""

    def __init__(self, settings: Settings, env: dict[str, str] | None = None, log_dir: Path | None = None):
        self.settings = settings
        self.env = {**os.environ, **(env or {})}
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen] = {}
        self._logs: list[IO[bytes]] = []

    @property
    def addresses(self) -> dict[str, str]:
        # Where this launcher's own children listen; MLMESH_*_ADDRESS may point clients elsewhere.
        host = self.settings.bind_host
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "[::]") else host
        return {stage: f"{host}:{self.settings.ports[stage]}" for stage in STAGES}

    def _spawn(self, stage: str) -> subprocess.Popen:
        output: IO[bytes] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            output = open(self.log_dir / f"{stage}.log", "ab")  # noqa: SIM115 - closed in stop()
            self._logs.append(output)
        return subprocess.Popen(
            [sys.executable, "-m", f"services.{stage}"],
            env=self.env,
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
        )

    def _log_tail(self, stage: str) -> str:
        if self.log_dir is None:
            return ""
        lines = (self.log_dir / f"{stage}.log").read_text(errors="replace").splitlines()
        return "\n  ".join(["", *lines[-8:]])

    async def start(self, timeout: float = 60.0) -> None:
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
                    if await check_health(self.addresses[stage], timeout=1.0) == "SERVING":
                        pending.discard(stage)
                if pending and time.monotonic() > deadline:
                    raise MeshStartError(
                        f"{', '.join(sorted(pending))} not SERVING after {timeout:.0f}s"
                    )
                if pending:
                    await asyncio.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def dead_stages(self) -> dict[str, int]:
        return {s: p.returncode for s, p in self.processes.items() if p.poll() is not None}

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
        for handle in self._logs:
            handle.close()
        self._logs.clear()
        self.processes.clear()
        return codes

    async def __aenter__(self) -> LocalMesh:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
