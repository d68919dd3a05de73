"""One typed settings object, read from MLMESH_* environment variables.

Invalid values fail fast with a message that names the variable, so a typo in
a compose file or a pod spec stops the service at start-up instead of later.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# Pipeline order; also the default port of each stage (50051..50055).
STAGES: tuple[str, ...] = ("loader", "preprocess", "features", "trainer", "evaluator")
DEFAULT_PORTS: dict[str, int] = {name: 50051 + i for i, name in enumerate(STAGES)}


# Set by `mlmesh up` in each stage's environment: its own pid, so the stage can die with it.
LAUNCHER_PID = "MLMESH_LAUNCHER_PID"


class SettingsError(ValueError):
    """A configuration variable is missing or malformed."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{name}={value} must be at most {maximum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not math.isfinite(value):
        raise SettingsError(f"{name}={raw!r} must be a finite number")
    if value < minimum:
        raise SettingsError(f"{name}={value} must be at least {minimum}")
    return value


def _artifact_root(env: Mapping[str, str]) -> str:
    raw = env.get("MLMESH_ARTIFACT_ROOT") or "artifacts"
    if "://" in raw and not raw.startswith("file://"):
        return raw.rstrip("/")  # an fsspec URL such as s3://bucket/prefix
    path = Path(raw.removeprefix("file://")).expanduser()
    return str(path.resolve())


@dataclass(frozen=True)
class Settings:
    artifact_root: str
    bind_host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    # Where clients find each stage; defaults to localhost and the stage's port.
    addresses: dict[str, str] = field(default_factory=dict)
    log_level: str = "INFO"
    grace_seconds: float = 5.0
    max_message_bytes: int = 4 * 1024 * 1024
    max_concurrent_rpcs: int = 64
    worker_threads: int = 2
    # Largest in-memory dataset a stage accepts, so one request cannot exhaust the host.
    max_dataset_bytes: int = 2 * 1024**3
    rpc_timeout_seconds: float = 600.0
    # `mlmesh up` restarts a stage that dies at most this many times in ten minutes.
    restart_limit: int = 5
    # A fit writes a checkpoint at most this often (at its next step boundary after it).
    checkpoint_seconds: float = 30.0
    # A long-running operation nobody asks about for this long is cancelled (its checkpoint stays).
    operation_idle_seconds: float = 900.0
    # How long a client keeps trying to reach a stage that went away (a restart) before it gives up.
    reconnect_seconds: float = 120.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        ports = {
            stage: _int(env, f"MLMESH_{stage.upper()}_PORT", default, minimum=0, maximum=65535)
            for stage, default in DEFAULT_PORTS.items()
        }
        addresses = {
            stage: env.get(f"MLMESH_{stage.upper()}_ADDRESS") or f"localhost:{ports[stage]}"
            for stage in STAGES
        }
        raw_level = env.get("MLMESH_LOG_LEVEL") or "INFO"
        log_level = raw_level.upper()
        if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise SettingsError(
                f"MLMESH_LOG_LEVEL={raw_level!r} must be DEBUG, INFO, WARNING or ERROR"
            )
        return cls(
            artifact_root=_artifact_root(env),
            bind_host=env.get("MLMESH_BIND_HOST") or "127.0.0.1",
            ports=ports,
            addresses=addresses,
            log_level=log_level,
            grace_seconds=_float(env, "MLMESH_GRACE_SECONDS", 5.0),
            max_message_bytes=_int(env, "MLMESH_MAX_MESSAGE_BYTES", 4 * 1024 * 1024, minimum=1024),
            max_concurrent_rpcs=_int(env, "MLMESH_MAX_CONCURRENT_RPCS", 64, minimum=1),
            worker_threads=_int(env, "MLMESH_WORKER_THREADS", min(4, os.cpu_count() or 1), minimum=1),
            max_dataset_bytes=_int(env, "MLMESH_MAX_DATASET_BYTES", 2 * 1024**3, minimum=1024),
            rpc_timeout_seconds=_float(env, "MLMESH_RPC_TIMEOUT_SECONDS", 600.0, minimum=0.001),
            restart_limit=_int(env, "MLMESH_RESTART_LIMIT", 5, minimum=0, maximum=1000),
            checkpoint_seconds=_float(env, "MLMESH_CHECKPOINT_SECONDS", 30.0),
            operation_idle_seconds=_float(env, "MLMESH_OPERATION_IDLE_SECONDS", 900.0, minimum=0.1),
            reconnect_seconds=_float(env, "MLMESH_RECONNECT_SECONDS", 120.0),
        )
