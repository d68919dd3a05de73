"""The loader reads only under MLMESH_DATA_ROOTS (issue 11, section 1).

Attacks on a real loader server on a real port, and through `mlmesh run`
against a real `mlmesh up`: '..', paths outside the roots, symlinks out of a
root, fsspec chains (a::b), percent-encoding, /proc, memory:// and other
schemes, a FIFO, http:// to loopback servers that are not allowed, redirects
out of a URL root, and sources that never answer, dribble, or are too big.

A "secret" file outside every root holds MARKER; it must never appear in a
status message or in the service log. Every refusal has its exact code, a
message under 1 KiB, and leaves the loader SERVING.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import fsspec
import grpc
import pytest
import pytest_asyncio
from fsspec.implementations.memory import MemoryFileSystem

from mlmesh.loader.v1 import loader_pb2
from services.client.mesh import MeshClient
from services.loader import sources
from services.runtime.errors import NotFound, PermissionDenied, ResourceExhausted
from services.runtime.server import RunningStage, stage_spec, start_stage
from services.runtime.settings import Settings, SettingsError
from tests.helpers import (
    DENIED,
    EXHAUSTED,
    FAILED,
    INVALID,
    LATE,
    NOT_FOUND,
    StartedStagesClient,
    assert_serving,
    expect_error,
    free_ports,
)
from tests.test_mesh_processes import UpProcess, on_new_ports

MARKER = "mlmesh-secret-7c1f9e"
CAP = 64 * 1024  # MLMESH_MAX_DATASET_BYTES of the loaders here
READ_SECONDS = 1.0  # MLMESH_SOURCE_READ_SECONDS of the `loader` fixture
BIN = Path(sys.executable).parent

GOOD_CSV = (
    "a,b,label\n" + "".join(f"{(i * 3) % 13 + 0.5},{(i * 7) % 11},{'yes' if i % 2 else 'no'}\n" for i in range(60))
).encode()


# ---- the files: a root, and a secret outside it -------------------------------------------
@dataclass(frozen=True)
class World:
    root: Path  # the loader's only local data root
    outside: Path  # a folder next to it, which no root covers
    secret: Path  # outside/secret.csv, a valid CSV whose header is MARKER


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root, outside = tmp_path_factory.mktemp("root"), tmp_path_factory.mktemp("outside")
    secret = outside / "secret.csv"
    secret.write_text(f"{MARKER},zz\n1,{MARKER}\n2,{MARKER}\n")
    (outside / "secret.txt").write_text(f"{MARKER}\n")
    (root / "good.csv").write_bytes(GOOD_CSV)
    (root / "sub").mkdir()
    (root / "folder.csv").mkdir()
    (root / "link.csv").symlink_to(secret)  # a symlink out of the root
    (root / "linkdir").symlink_to(outside)  # a folder symlink out of it
    (root / "environ.csv").symlink_to("/proc/self/environ")
    (root / "null.csv").symlink_to("/dev/null")
    os.mkfifo(root / "pipe.csv")  # opening it for reading would block until a writer came
    return World(root, outside, secret)


# ---- loopback servers -----------------------------------------------------------------------
class Web:
    """A loopback HTTP server whose paths act as the cases need; counts connections, records paths."""

    def __init__(self, other: str = ""):
        self.connections = 0
        self.paths: list[str] = []
        self.stopping = threading.Event()
        web = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                web.paths.append(self.path)
                web.route(self, other)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self):
                request = super().get_request()
                web.connections += 1
                return request

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def route(self, handler: BaseHTTPRequestHandler, other: str) -> None:
        path = handler.path

        def send(status: int, headers: dict[str, str], body: bytes = b"") -> None:
            handler.send_response(status)
            for key, value in headers.items():
                handler.send_header(key, value)
            handler.end_headers()
            handler.wfile.write(body)

        try:
            if path in ("/data/good.csv", "/secret.csv"):
                body = GOOD_CSV if path == "/data/good.csv" else f"{MARKER},zz\n1,2\n".encode()
                send(200, {"Content-Length": str(len(body))}, body)
            elif path == "/data/redirect-in.csv":
                send(302, {"Location": "/data/good.csv", "Content-Length": "0"})
            elif path == "/data/redirect-out.csv":
                send(302, {"Location": f"{other}/good.csv", "Content-Length": "0"})
            elif path == "/data/redirect-up.csv":
                send(302, {"Location": "/secret.csv", "Content-Length": "0"})
            elif path == "/data/redirect-loop.csv":
                send(302, {"Location": "/data/redirect-loop.csv", "Content-Length": "0"})
            elif path == "/data/big-length.csv":
                send(200, {"Content-Length": str(10 * CAP)}, b"a,b,label\n")
                self.stopping.wait(10)  # the rest never comes; the loader must not wait for it
            elif path == "/data/stream.csv":  # no Content-Length: the body ends when the connection does
                send(200, {}, b"a,b,label\n")
                for _ in range(4 * CAP // 8192):
                    handler.wfile.write(b"1,2,yes\n" * 1024)
            elif path == "/data/dribble.csv":  # a byte at a time: every read succeeds, none finishes
                send(200, {}, b"a")
                while not self.stopping.wait(0.2):
                    handler.wfile.write(b"a")
                    handler.wfile.flush()
            else:
                send(404, {"Content-Length": "0"})
        except OSError:
            pass  # the loader hung up, as it should

    def close(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


class Silent:
    """Accepts connections and never writes a byte."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(connection)

    def close(self) -> None:
        self.sock.close()
        for connection in self.accepted:
            connection.close()


@dataclass
class Servers:
    web: Web  # its /data/ is a URL root
    other: Web  # never a root: must never see a connection
    silent: Silent  # a URL root that never answers
    closed: str  # a URL root on a port nobody listens on


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    other = Web()
    web, silent = Web(other=other.url), Silent()
    yield Servers(web, other, silent, f"http://127.0.0.1:{free_ports(1)[0]}")
    for server in (web, other, silent):
        server.close()


# ---- loaders --------------------------------------------------------------------------------
@dataclass
class Loader:
    stage: RunningStage
    client: MeshClient


class LogText(logging.Handler):
    """Every log record of the process while a loader runs, formatted with any traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest_asyncio.fixture
async def make_loader(world: World, servers: Servers, tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    """Start a loader with one worker thread (so a stuck read would show) and the roots given."""
    log, root_logger = LogText(), logging.getLogger()
    root_logger.addHandler(log)
    level = root_logger.level
    root_logger.setLevel(logging.DEBUG)
    running: list[tuple[RunningStage, MeshClient]] = []

    async def start(roots: str, read_seconds: float = READ_SECONDS) -> Loader:
        settings = Settings.from_env(
            {
                "MLMESH_ARTIFACT_ROOT": str(tmp_path / f"artifacts{len(running)}"),
                "MLMESH_GRACE_SECONDS": "0.5",
                "MLMESH_DATA_ROOTS": roots,
                "MLMESH_WORKER_THREADS": "1",
                "MLMESH_MAX_DATASET_BYTES": str(CAP),
                "MLMESH_SOURCE_CONNECT_SECONDS": "1",
                "MLMESH_SOURCE_READ_SECONDS": str(read_seconds),
                "MLMESH_METRICS": "off",  # unserved, as in conftest.py's settings
            }
        )
        stage = await start_stage(stage_spec("loader"), settings, port=0)
        client = StartedStagesClient(settings, {"loader": stage})
        await client.__aenter__()
        running.append((stage, client))
        return Loader(stage, client)

    try:
        yield start
    finally:
        for stage, client in running:
            await client.__aexit__(None, None, None)
            await stage.stop(0.5)
        root_logger.removeHandler(log)
        root_logger.setLevel(level)
    assert "rpc method=/mlmesh.loader.v1.LoaderService/Load" in log.text  # the log was captured
    assert MARKER not in log.text, "the secret reached the service log"


@pytest_asyncio.fixture
async def loader(make_loader, world: World, servers: Servers) -> Loader:
    roots = f"{world.root},{servers.web.url}/data/,{servers.silent.url}/,{servers.closed}/"
    return await make_loader(roots)


def load(source: str, target: str = "zz", force: bool = False) -> loader_pb2.LoadRequest:
    return loader_pb2.LoadRequest(source=source, target_column=target, force_recompute=force)


async def refused(loader: Loader, source: str, code: grpc.StatusCode, *fragments: str, target: str = "zz") -> str:
    """The load fails with exactly `code`; a bounded message with no secret; the loader still serves."""
    details = await expect_error(loader.client.load(load(source, target)), code, *fragments)
    assert len(details.encode()) < 1024, details
    assert MARKER not in details, details
    if code == DENIED:
        assert "MLMESH_DATA_ROOTS" in details, details
    await assert_serving(loader.stage)
    return details


async def loads(loader: Loader, source: str, target: str = "label") -> loader_pb2.LoadResponse:
    reply = await loader.client.load(load(source, target, force=True))
    assert reply.rows == 60 and list(reply.feature_names) == ["a", "b"]
    return reply


# ---- local paths ----------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_local_paths_outside_the_root_are_refused_unread(loader: Loader, world: World) -> None:
    root, secret = world.root, world.secret
    # The attack this replaces: fsspec read /etc/shadow::x.csv, and the parse error quoted its first line.
    for source in (
        str(secret),  # an absolute path outside the root
        f"{root}/../{world.outside.name}/secret.csv",  # '..' out of the root
        "../" * 12 + str(secret).lstrip("/"),  # relative, from the loader's working folder
        f"{root}/link.csv",  # a symlink in the root pointing out
        f"{root}/linkdir/secret.csv",  # a folder symlink pointing out
        f"{root}/sub/../../{world.outside.name}/secret.csv",
        f"file://{root}/%2e%2e/{world.outside.name}/secret.csv",  # percent-encoded '..'
        f"file://{root}/%2E%2E/{world.outside.name}/secret.csv",
        "file:///tmp/%2e%2e/etc/passwd.csv",
        f"file://{secret}",
        f"file://otherhost{secret}",  # a file URL naming another host
        f"/proc/self/root{secret}",  # /proc's view of the same file
    ):
        await refused(loader, source, DENIED)
    await refused(loader, str(secret), DENIED, f"{str(secret)!r} is outside the folders", repr(str(root)))
    # Missing or present, a path outside the roots gets the same answer: nothing is looked up.
    await refused(loader, str(world.outside / "absent.csv"), DENIED, "is outside the folders")


@pytest.mark.asyncio
async def test_fsspec_chains_and_other_schemes_are_refused(loader: Loader, world: World, servers: Servers) -> None:
    for source in (
        "/etc/passwd::x.csv",
        "/etc/shadow::x.csv",
        f"{world.outside}/secret.txt::x.csv",
        f"{world.root}/good.csv::x.csv",
        "simplecache::file:///etc/passwd.csv",
        "zip://x.csv::file:///tmp/a.zip",
    ):
        await refused(loader, source, DENIED, "chains URLs with '::'")
    for source in (
        "memory://x.csv",
        "local:///etc/passwd.csv",
        "s3://bucket/x.csv",
        "gs://bucket/x.parquet",
        "ftp://127.0.0.1/x.csv",
        "nosuchproto://x.csv",
        "https://example.com/x.csv",
        f"{servers.other.url}/x.csv",
        f"HTTP://127.0.0.1:{servers.other.url.rsplit(':', 1)[1]}/x.csv",
        f"http://localhost:{servers.other.url.rsplit(':', 1)[1]}/x.csv",
        "http://169.254.169.254/latest/meta-data/x.csv",
        "http://[::1]:9/x.csv",
        "http://[fd00::1]/data/x.csv",
    ):
        await refused(loader, source, DENIED)
    assert servers.other.connections == 0, "a refused URL was fetched"


@pytest.mark.asyncio
async def test_fifos_folders_and_control_characters_get_their_own_codes(loader: Loader, world: World) -> None:
    started = time.monotonic()
    await refused(loader, f"{world.root}/pipe.csv", INVALID, "is not a regular file")  # and never blocks
    assert time.monotonic() - started < 5
    await refused(loader, f"{world.root}/folder.csv", INVALID, "is a directory")
    await refused(loader, f"{world.root}/good.csv\x00.csv", INVALID, "control character")
    await refused(loader, f"{world.root}/null.csv", DENIED, "/proc, /sys, /dev")  # -> /dev/null
    absent = world.root / "sub" / "absent.csv"
    await refused(loader, str(absent), NOT_FOUND, f"source file {str(absent)!r} does not exist")


@pytest.mark.asyncio
async def test_files_under_the_root_load(loader: Loader, world: World) -> None:
    root = world.root
    for source in (
        f"{root}/good.csv",
        f"file://{root}/good.csv",
        f"file://localhost{root}/good.csv",
        f"{root}/sub/../good.csv",
    ):
        await loads(loader, source)
    # An allowed file may be named in messages by its columns, bounded.
    details = await refused(loader, f"{root}/good.csv", INVALID, "its columns are: 'a', 'b', 'label'", target="zz")
    assert "yes" not in details


@pytest.mark.asyncio
async def test_proc_sys_and_dev_are_refused_even_under_a_root_of_slash(make_loader, world: World) -> None:
    loader = await make_loader("/")
    for source in (
        f"{world.root}/environ.csv",  # a symlink to /proc/self/environ
        f"{world.root}/null.csv",  # to /dev/null
        "/proc/self/environ::x.csv",
        f"/proc/self/root{world.secret}",
        "/proc/self/cwd/pyproject.csv",
        "/proc/1/environ.csv",
        "/sys/kernel/x.csv",
        "/dev/zero.csv",
        "/dev/stdin.csv",
    ):
        await refused(loader, source, DENIED)
    # /proc/self/environ itself is not even taken for a table.
    await refused(loader, "/proc/self/environ", INVALID, "cannot tell the format")
    await loads(loader, f"{world.root}/good.csv")  # the root of "/" does allow ordinary files


# ---- URLs ------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_urls_under_a_url_root_load_and_others_are_not_fetched(loader: Loader, servers: Servers) -> None:
    web, port = servers.web.url, servers.web.url.rsplit(":", 1)[1]
    await loads(loader, f"{web}/data/good.csv")
    await loads(loader, f"{web}/data/redirect-in.csv")  # a redirect to an allowed URL is followed
    before = list(servers.web.paths)
    for source in (
        f"{web}/secret.csv",
        f"{web}/database.csv",  # outside /data/, even though the prefix matches as text
        f"{web}/data/../secret.csv",
        f"{web}/data/./../secret.csv",
        f"{web}/data/%2e%2e/secret.csv",
        f"{web}/data/%252e%252e/secret.csv",
        f"{web}/data/..%2fsecret.csv",
        f"{web}/data\\..\\secret.csv",
        f"http://user@127.0.0.1:{port}/data/good.csv",
        f"http://127.0.0.1:{port}@127.0.0.1:9/data/good.csv",
        f"{web}/data/ good.csv",
    ):
        await refused(loader, source, DENIED)
    assert servers.web.paths == before, "a refused URL was fetched"

    details = await refused(loader, f"{web}/data/redirect-out.csv", DENIED, "redirects to", "not followed")
    assert servers.other.connections == 0, "a redirect out of the roots was followed"
    assert "/data/redirect-out.csv" in details
    await refused(loader, f"{web}/data/redirect-up.csv", DENIED, "redirects to")
    assert "/secret.csv" not in servers.web.paths
    await refused(loader, f"{web}/data/redirect-loop.csv", FAILED, "redirects more than 3 times")
    await refused(loader, f"{web}/data/missing.csv", FAILED, "answered HTTP 404")
    await refused(loader, f"{servers.closed}/x.csv", FAILED, "connection refused")


@pytest.mark.asyncio
async def test_too_big_is_refused_before_or_while_reading(loader: Loader, servers: Servers) -> None:
    started = time.monotonic()
    await refused(
        loader, f"{servers.web.url}/data/big-length.csv", EXHAUSTED, "Content-Length", "MLMESH_MAX_DATASET_BYTES"
    )
    assert time.monotonic() - started < 5, "the loader waited for a body it had refused"
    await refused(loader, f"{servers.web.url}/data/stream.csv", EXHAUSTED, "larger than the limit of 64.0 KiB")


@pytest.mark.asyncio
async def test_a_silent_server_is_deadline_exceeded_and_the_worker_is_free(
    loader: Loader, servers: Servers, world: World
) -> None:
    started = time.monotonic()
    await refused(loader, f"{servers.silent.url}/x.csv", LATE, "sent nothing for 1 s", "MLMESH_SOURCE_READ_SECONDS")
    assert time.monotonic() - started < READ_SECONDS + 3
    # One worker thread: this answer proves the read let it go.
    await loads(loader, f"{world.root}/good.csv")


@pytest.mark.asyncio
async def test_the_callers_deadline_and_cancellation_stop_a_read(make_loader, world: World, servers: Servers) -> None:
    """Reads that would outlast the caller (a 30 s read timeout) stop when it goes; the one worker frees."""
    loader = await make_loader(f"{world.root},{servers.web.url}/data/,{servers.silent.url}/", read_seconds=30)
    stub = loader.client.stub("loader")
    for source in (f"{servers.silent.url}/x.csv", f"{servers.web.url}/data/dribble.csv"):
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Load(load(source), timeout=1.0)
        assert caught.value.code() == LATE
        reply = await stub.Load(load(f"{world.root}/good.csv", "label", force=True), timeout=10)
        assert reply.rows == 60
        assert time.monotonic() - started < 6, "the worker was held past the caller's deadline"
        await assert_serving(loader.stage)

    call = stub.Load(load(f"{servers.silent.url}/y.csv"), timeout=60)
    await asyncio.sleep(0.5)
    started = time.monotonic()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert (await stub.Load(load(f"{world.root}/good.csv", "label", force=True), timeout=10)).rows == 60
    assert time.monotonic() - started < 5, "the worker was held after the caller cancelled"


# ---- the module itself: races and object stores ----------------------------------------------------
def policy(*roots: str, max_bytes: int = CAP) -> sources.SourcePolicy:
    return sources.SourcePolicy.from_settings(
        Settings.from_env({"MLMESH_DATA_ROOTS": ",".join(roots), "MLMESH_MAX_DATASET_BYTES": str(max_bytes)})
    )


def test_a_folder_swapped_for_a_symlink_after_the_check_is_caught(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "table.csv").write_text("harmless\n")
    elsewhere = tmp_path / "elsewhere"  # outside the root, like world.outside
    elsewhere.mkdir()
    (elsewhere / "table.csv").write_text(world.secret.read_text())
    allowed = policy(str(root))
    real_realpath = os.path.realpath
    swapped = []

    def realpath_then_swap(path: str, *args, **kwargs) -> str:
        resolved = real_realpath(path, *args, **kwargs)
        if not swapped:  # the race: right after the check, a folder on the path becomes a symlink out
            swapped.append(path)
            (root / "dir" / "table.csv").unlink()
            (root / "dir").rmdir()
            (root / "dir").symlink_to(elsewhere)
        return resolved

    monkeypatch.setattr(sources.os.path, "realpath", realpath_then_swap)
    with pytest.raises(PermissionDenied) as caught:
        sources.read_source(str(root / "dir" / "table.csv"), allowed)
    monkeypatch.undo()
    assert swapped and "is outside the folders" in str(caught.value) and MARKER not in str(caught.value)


class StoreFS(MemoryFileSystem):
    """An in-memory stand-in for an object store, under its own scheme."""

    protocol = "mlmeshtest"
    store: ClassVar[dict] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return super()._strip_protocol(path.removeprefix("mlmeshtest://"))


def test_object_store_urls_are_read_through_fsspec_with_the_cap() -> None:
    fsspec.register_implementation("mlmeshtest", StoreFS, clobber=True)
    fs = StoreFS()
    fs.pipe("/bucket/data/good.csv", GOOD_CSV)
    fs.pipe("/bucket/data/big.csv", b"x" * (CAP + 1))
    fs.pipe("/bucket/secret.csv", MARKER.encode())
    allowed = policy("mlmeshtest://bucket/data/")
    assert sources.read_source("mlmeshtest://bucket/data/good.csv", allowed) == GOOD_CSV
    with pytest.raises(ResourceExhausted, match=r"over the limit of 64.0 KiB"):
        sources.read_source("mlmeshtest://bucket/data/big.csv", allowed)
    with pytest.raises(NotFound):
        sources.read_source("mlmeshtest://bucket/data/absent.csv", allowed)
    for refused_source in (
        "mlmeshtest://bucket/secret.csv",
        "mlmeshtest://bucket/data/../secret.csv",
        "mlmeshtest://bucket/data/good.csv::memory://x",
    ):
        with pytest.raises(PermissionDenied) as caught:
            sources.read_source(refused_source, allowed)
        assert MARKER not in str(caught.value)
    # A root that is itself a chain stops the stage at start-up; local roots do not allow URLs.
    with pytest.raises(SettingsError, match="chains URLs with '::'"):
        policy("simplecache::s3://bucket/data/")
    assert policy("/").url_roots == ()


# ---- through `mlmesh run` against `mlmesh up` ----------------------------------------------------
@pytest.mark.slow  # `mlmesh up` child processes
def test_mlmesh_run_is_refused_outside_the_roots_and_trains_inside(world: World, tmp_path: Path) -> None:
    env = on_new_ports(
        {
            **os.environ,
            "MLMESH_ARTIFACT_ROOT": str(tmp_path / "artifacts"),
            "MLMESH_GRACE_SECONDS": "1",
            "MLMESH_DATA_ROOTS": str(world.root),
        }
    )
    up = UpProcess(env, {})
    try:
        up.wait_for("mesh is up")

        def run(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [str(BIN / "mlmesh"), "run", *args],
                cwd=world.root,
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
            )

        for source in (
            str(world.secret),
            f"../{world.outside.name}/secret.csv",
            "link.csv",
            f"{world.secret}::x.csv",
            "/etc/passwd::x.csv",
        ):
            result = run("--source", source, "--target", "zz")
            output = result.stdout + result.stderr
            assert result.returncode == 2, output
            assert "PERMISSION_DENIED" in output and "MLMESH_DATA_ROOTS" in output, output
            assert MARKER not in output
        trained = run("--source", "good.csv", "--target", "label")
        assert trained.returncode == 0, trained.stdout + trained.stderr
    finally:
        up.stop()
    assert MARKER not in "".join(up.output) + up.rest(), "the secret reached the mesh's log"
