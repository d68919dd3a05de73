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

from services.runtime.catalog import STAGES

# Each stage's default gRPC port, in catalog order from 50051 (loader) up.
DEFAULT_PORTS: dict[str, int] = {name: 50051 + i for i, name in enumerate(STAGES)}
# Where each stage serves Prometheus metrics over HTTP by default (9451..9455).
DEFAULT_METRICS_PORTS: dict[str, int] = {name: 9451 + i for i, name in enumerate(STAGES)}


# Set by `mlmesh up` in each stage's environment: its own pid, so the stage can die with it.
LAUNCHER_PID = "MLMESH_LAUNCHER_PID"


def dialable_host(bind_host: str) -> str:
    """The host a local client dials to reach a stage bound to `bind_host`.

    A wildcard bind is reached on 127.0.0.1. An IP literal rather than "localhost"
    keeps the client from trying ::1 first, whose "connection refused" would hide
    the real error (a TLS mismatch, say) from the caller.
    """
    host = "127.0.0.1" if bind_host in ("", "0.0.0.0", "::", "[::]") else bind_host
    return f"[{host}]" if ":" in host and not host.startswith("[") else host  # an IPv6 literal


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


def memory_limit_bytes() -> int:
    """The memory this process may use: the machine's, or its container's cgroup limit if lower."""
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw.isdigit():  # "max" (v2) means no limit; v1 reports a huge number instead
            limit = min(limit, int(raw))
    return limit


def default_max_dataset_bytes() -> int:
    """A quarter of the memory limit, at least 256 MiB.

    A stage holds its input, the DataFrame decoded from it and its outputs
    while it works: three to four times the dataset at peak (see
    bench/bench_scale.py). A quarter leaves room for that and for the other
    stages on the same machine: 4 GiB on a 16 GiB VM, enough for 10M rows of
    32 numeric columns (2.6 GB).
    """
    return max(256 * 1024**2, memory_limit_bytes() // 4)


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


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = (env.get(name) or default).strip().lower()
    if raw not in choices:
        raise SettingsError(f"{name}={raw[:40]!r} must be one of: {', '.join(choices)}")
    return raw


def _file(env: Mapping[str, str], name: str) -> str:
    """A path setting that must name a readable file when set (certificates, keys, token files)."""
    raw = env.get(name) or ""
    if not raw:
        return ""
    path = Path(raw).expanduser()
    if not path.is_file():
        raise SettingsError(f"{name}={raw[:200]!r} is not a file")
    return str(path.resolve())


def _data_roots(env: Mapping[str, str]) -> tuple[str, ...]:
    """MLMESH_DATA_ROOTS: comma-separated local folders and URL prefixes the loader may read.

    Unset (or empty, like every setting) means the working directory the stage started in,
    which under `mlmesh up` is where the user ran it. Local entries are resolved (symlinks, '..') once, here.
    """
    raw = env.get("MLMESH_DATA_ROOTS")
    entries = [entry.strip() for entry in (raw or ".").split(",") if entry.strip()]
    roots = []
    for entry in entries:
        if "::" in entry:
            raise SettingsError(
                f"MLMESH_DATA_ROOTS entry {entry[:80]!r} chains URLs with '::'; the loader never reads those"
            )
        if "://" in entry and not entry.startswith("file://"):
            roots.append(entry if entry.endswith("/") else entry + "/")
        else:
            roots.append(os.path.realpath(Path(entry.removeprefix("file://")).expanduser()))
    return tuple(roots)


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
    # Where clients find each stage; defaults to this host (see dialable_host) and the stage's port.
    addresses: dict[str, str] = field(default_factory=dict)
    log_level: str = "INFO"
    log_format: str = "text"  # "text" (one readable line per call) or "json" (one object per line)
    # Prometheus metrics: each stage serves /metrics over plain HTTP on its own port, unless off.
    metrics: bool = True
    metrics_host: str = "127.0.0.1"
    metrics_ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_METRICS_PORTS))
    grace_seconds: float = 5.0
    max_message_bytes: int = 4 * 1024 * 1024
    max_concurrent_rpcs: int = 64
    worker_threads: int = 2
    # Largest in-memory dataset a stage accepts, so one request cannot exhaust the host.
    max_dataset_bytes: int = field(default_factory=default_max_dataset_bytes)
    rpc_timeout_seconds: float = 600.0
    # `mlmesh up` restarts a stage that dies at most this many times in ten minutes.
    restart_limit: int = 5
    # A fit writes a checkpoint at most this often (at its next step boundary after it).
    checkpoint_seconds: float = 30.0
    # A long-running operation nobody asks about for this long is cancelled (its checkpoint stays).
    operation_idle_seconds: float = 900.0
    # How long a client keeps trying to reach a stage that went away (a restart) before it gives up.
    reconnect_seconds: float = 120.0
    # What the loader may read (see services/loader/sources.py): local folders and URL prefixes.
    data_roots: tuple[str, ...] = field(default_factory=lambda: (os.path.realpath("."),))
    # A remote source (http, object stores) must connect and then send bytes within these.
    source_connect_seconds: float = 10.0
    source_read_seconds: float = 30.0
    # The serving stage (see docs/serving.md): how often it reads the registry for new versions,
    # how many rows one request and one shared batch may hold, how long a batch waits to fill,
    # and whether levels a model never saw are refused ("reject") or encoded as its encoder does.
    serving_poll_seconds: float = 2.0
    serving_max_request_rows: int = 100_000
    serving_max_batch_rows: int = 256
    serving_max_batch_wait_ms: float = 0.0
    serving_unseen_levels: str = "reject"
    # Transport security and identity (see services/runtime/security.py). Server side:
    tls_cert: str = ""  # this stage's certificate chain (PEM); with tls_key, the stage serves TLS only
    tls_key: str = ""
    tls_client_ca: str = ""  # set: callers must present a certificate this CA signed (mTLS)
    auth_tokens_file: str = ""  # set: callers must send a bearer token listed there
    health_auth: str = "open"  # "open" (probes need no token) or "token"
    reflection: str = "open"  # "open", "token" (any valid token) or "off"
    # Client side (CLI, workflow tasks, probe, launcher):
    tls_ca: str = ""  # CA bundle that signed the stages' certificates; set: clients use TLS
    tls_client_cert: str = ""  # this client's certificate and key, for a stage that requires mTLS
    tls_client_key: str = ""
    tls_server_name: str = ""  # expected name in the stages' certificates, when addresses differ
    auth_token: str = ""  # bearer token sent with every call

    @property
    def client_tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        ports = {
            stage: _int(env, f"MLMESH_{stage.upper()}_PORT", default, minimum=0, maximum=65535)
            for stage, default in DEFAULT_PORTS.items()
        }
        bind_host = env.get("MLMESH_BIND_HOST") or "127.0.0.1"
        addresses = {
            stage: env.get(f"MLMESH_{stage.upper()}_ADDRESS") or f"{dialable_host(bind_host)}:{ports[stage]}"
            for stage in STAGES
        }
        raw_level = env.get("MLMESH_LOG_LEVEL") or "INFO"
        log_level = raw_level.upper()
        if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise SettingsError(f"MLMESH_LOG_LEVEL={raw_level!r} must be DEBUG, INFO, WARNING or ERROR")
        return cls(
            artifact_root=_artifact_root(env),
            bind_host=bind_host,
            ports=ports,
            addresses=addresses,
            log_level=log_level,
            log_format=_choice(env, "MLMESH_LOG_FORMAT", "text", ("text", "json")),
            metrics=_choice(env, "MLMESH_METRICS", "on", ("on", "off")) == "on",
            metrics_host=env.get("MLMESH_METRICS_HOST") or bind_host,
            metrics_ports={
                stage: _int(env, f"MLMESH_{stage.upper()}_METRICS_PORT", default, minimum=0, maximum=65535)
                for stage, default in DEFAULT_METRICS_PORTS.items()
            },
            grace_seconds=_float(env, "MLMESH_GRACE_SECONDS", 5.0),
            max_message_bytes=_int(env, "MLMESH_MAX_MESSAGE_BYTES", 4 * 1024 * 1024, minimum=1024),
            max_concurrent_rpcs=_int(env, "MLMESH_MAX_CONCURRENT_RPCS", 64, minimum=1),
            worker_threads=_int(env, "MLMESH_WORKER_THREADS", min(4, os.cpu_count() or 1), minimum=1),
            max_dataset_bytes=_int(env, "MLMESH_MAX_DATASET_BYTES", default_max_dataset_bytes(), minimum=1024),
            rpc_timeout_seconds=_float(env, "MLMESH_RPC_TIMEOUT_SECONDS", 600.0, minimum=0.001),
            restart_limit=_int(env, "MLMESH_RESTART_LIMIT", 5, minimum=0, maximum=1000),
            checkpoint_seconds=_float(env, "MLMESH_CHECKPOINT_SECONDS", 30.0),
            operation_idle_seconds=_float(env, "MLMESH_OPERATION_IDLE_SECONDS", 900.0, minimum=0.1),
            reconnect_seconds=_float(env, "MLMESH_RECONNECT_SECONDS", 120.0),
            data_roots=_data_roots(env),
            source_connect_seconds=_float(env, "MLMESH_SOURCE_CONNECT_SECONDS", 10.0, minimum=0.1),
            source_read_seconds=_float(env, "MLMESH_SOURCE_READ_SECONDS", 30.0, minimum=0.1),
            serving_poll_seconds=_float(env, "MLMESH_SERVING_POLL_SECONDS", 2.0, minimum=0.05),
            serving_max_request_rows=_int(env, "MLMESH_SERVING_MAX_REQUEST_ROWS", 100_000, minimum=1),
            serving_max_batch_rows=_int(env, "MLMESH_SERVING_MAX_BATCH_ROWS", 256, minimum=1),
            serving_max_batch_wait_ms=_float(env, "MLMESH_SERVING_MAX_BATCH_WAIT_MS", 0.0),
            serving_unseen_levels=_choice(env, "MLMESH_SERVING_UNSEEN_LEVELS", "reject", ("reject", "encode")),
            **_security(env),
        )


def _security(env: Mapping[str, str]) -> dict[str, str]:
    values = {
        "tls_cert": _file(env, "MLMESH_TLS_CERT"),
        "tls_key": _file(env, "MLMESH_TLS_KEY"),
        "tls_client_ca": _file(env, "MLMESH_TLS_CLIENT_CA"),
        "auth_tokens_file": _file(env, "MLMESH_AUTH_TOKENS_FILE"),
        "health_auth": _choice(env, "MLMESH_HEALTH_AUTH", "open", ("open", "token")),
        "reflection": _choice(env, "MLMESH_REFLECTION", "open", ("open", "token", "off")),
        "tls_ca": _file(env, "MLMESH_TLS_CA"),
        "tls_client_cert": _file(env, "MLMESH_TLS_CLIENT_CERT"),
        "tls_client_key": _file(env, "MLMESH_TLS_CLIENT_KEY"),
        "tls_server_name": (env.get("MLMESH_TLS_SERVER_NAME") or "").strip(),
        "auth_token": _token(env),
    }
    for first, second in (("tls_cert", "tls_key"), ("tls_client_cert", "tls_client_key")):
        if bool(values[first]) != bool(values[second]):
            raise SettingsError(f"MLMESH_{first.upper()} and MLMESH_{second.upper()} must be set together")
    if values["tls_client_ca"] and not values["tls_cert"]:
        raise SettingsError("MLMESH_TLS_CLIENT_CA (mTLS) needs TLS: set MLMESH_TLS_CERT and MLMESH_TLS_KEY too")
    return values


def _token(env: Mapping[str, str]) -> str:
    """The client's bearer token: MLMESH_AUTH_TOKEN, or the first line of MLMESH_AUTH_TOKEN_FILE."""
    token = env.get("MLMESH_AUTH_TOKEN") or ""
    path = _file(env, "MLMESH_AUTH_TOKEN_FILE")
    if token and path:
        raise SettingsError("set MLMESH_AUTH_TOKEN or MLMESH_AUTH_TOKEN_FILE, not both")
    if path:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
        token = lines[0] if lines else ""
    token = token.strip()
    if path and not token:
        raise SettingsError("MLMESH_AUTH_TOKEN_FILE is empty")
    if token and (len(token) > 4096 or not token.isascii() or not token.isprintable() or " " in token):
        raise SettingsError("the bearer token must be printable ASCII without spaces, at most 4096 characters")
    return token
