"""What the loader may read, and reading it without trusting the caller.

A LoadRequest names its source as text, and anyone who can reach the loader
can send one. Handing that text to fsspec.open read whatever the process
could: `/etc/shadow::x.csv` (a chained URL that passes the ".csv" check; a
parse error then quoted its first line), `/proc/self/environ`, `..` and
symlinks out of the data folder, `http://169.254.169.254/...` (a cloud's
metadata service) and other internal addresses, `memory://`, and a URL that
never answers held a worker thread for good.

So the loader reads only under MLMESH_DATA_ROOTS (see settings.py):

- a local path (plain or file://) whose real path, with symlinks and '..'
  resolved, lies under a local root, and never one under /proc, /sys or /dev;
- a URL that starts with a configured URL root: http(s) through the standard
  library, with connect and read timeouts, an overall deadline and a size cap;
  other schemes (s3://, gs://, ...) through fsspec, with the same cap;
- nothing else: chained URLs (`a::b`), memory:// and other schemes are refused.

A refusal is PERMISSION_DENIED and says what to change. No message quotes a
byte of any file, and a refused source is never opened, fetched or even
checked for existence.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import re
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from services.runtime.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    StageError,
    bounded,
)
from services.runtime.formats import human_bytes
from services.runtime.settings import Settings

# The kernel's own views: a root of "/" must not make them readable (environ, memory maps, devices).
NEVER_READ = ("/proc", "/sys", "/dev")

# fsspec schemes that are never a data source: in-process memory, and wrappers or
# archives that open another URL or local file named inside them.
REFUSED_SCHEMES = frozenset(
    {
        "memory",
        "local",
        "file",
        "data",
        "reference",
        "zip",
        "tar",
        "libarchive",
        "dir",
        "cached",
        "simplecache",
        "filecache",
        "blockcache",
        "dask",
        "jupyter",
        "jlab",
    }
)

CHUNK = 1024 * 1024  # bytes per read; cancellation and the deadline are checked between reads
MAX_REDIRECTS = 3
MAX_SHOWN_PATH = 200  # characters of a quoted path: keeps a message under 1 KiB even in 4-byte UTF-8
MAX_SHOWN_ROOTS = 4
ROOTS_HELP = "MLMESH_DATA_ROOTS"


@dataclass(frozen=True)
class SourcePolicy:
    """What may be read, and how long and how much a read may take."""

    local_roots: tuple[str, ...]  # real, absolute folders
    url_roots: tuple[str, ...]  # URL prefixes ending in "/", scheme and host in lower case
    max_bytes: int
    connect_seconds: float = 10.0
    read_seconds: float = 30.0
    # No read outlasts this, whatever the caller's deadline (a caller may send none).
    longest_seconds: float = 600.0

    @classmethod
    def from_settings(cls, settings: Settings) -> SourcePolicy:
        local, urls = [], []
        for root in settings.data_roots:  # settings refuse chained (::) roots at start-up
            if "://" in root:
                urls.append(_normal_url(root))
            else:
                local.append(root)
        return cls(
            local_roots=tuple(local),
            url_roots=tuple(urls),
            max_bytes=settings.max_dataset_bytes,
            connect_seconds=settings.source_connect_seconds,
            read_seconds=settings.source_read_seconds,
            longest_seconds=settings.rpc_timeout_seconds,
        )


def read_source(
    name: str,
    policy: SourcePolicy,
    cancelled: threading.Event | None = None,
    deadline: float | None = None,
) -> bytes:
    """The bytes of a file source, if the policy allows it; runs on a worker thread.

    `cancelled` is set when the caller goes away, `deadline` is the caller's
    (time.monotonic()); either stops the read within a chunk or, for http, at once.
    """
    cancelled = cancelled or threading.Event()
    longest = time.monotonic() + policy.longest_seconds
    deadline = longest if deadline is None else min(deadline, longest)
    refuse_chain(name)
    if is_local(name):
        return _read_local(name, policy, cancelled, deadline)
    url = _check_url(name, policy)
    if _scheme(url) in ("http", "https"):
        return _fetch_http(url, policy, cancelled, deadline)
    return _fetch_fsspec(url, policy, cancelled, deadline)


def refuse_chain(name: str) -> None:
    """fsspec reads `a::b` as "a, wrapped around b": /etc/shadow::x.csv opens /etc/shadow."""
    scheme, sep, rest = name.partition("://")
    if sep and scheme.lower() in ("http", "https") and rest.startswith("["):
        rest = rest.partition("]")[2]  # an IPv6 host such as [fd00::1] is not a chain
        name = f"{scheme}://{rest}"
    if "::" in name:
        raise PermissionDenied(
            f"source {shown_source(name)} chains URLs with '::', which the loader never reads; "
            f"name one local file or URL under {ROOTS_HELP}"
        )


def is_local(name: str) -> bool:
    return "://" not in name or _scheme(name) == "file"


def shown_source(name: str) -> str:
    """A source for messages: a path quoted and bounded, keeping its end; a URL without query or user info."""
    # A URL's query may hold a signature or token, and user info a password: neither is shown.
    # (A chain such as simplecache::file:///x has no one scheme and is shown as it is.)
    if "://" in name and _scheme(name) != "file" and re.fullmatch(r"[a-z][a-z0-9+.-]*", _scheme(name)):
        try:
            split = urlsplit(name)
            netloc = split.netloc.rpartition("@")[2]
            text = f"{split.scheme}://{'***@' if '@' in split.netloc else ''}{netloc}{split.path}"
            text += "?..." if split.query else ""
        except ValueError:
            text = "(an unparsable URL)"
    else:
        text = name
    text = repr(text)
    return text if len(text) <= MAX_SHOWN_PATH else "..." + text[-MAX_SHOWN_PATH:]


# ---- local files -------------------------------------------------------------------------
def _local_path(name: str) -> str:
    """The absolute path a plain or file:// source names, '..' and symlinks not yet resolved."""
    if is_local(name) and "://" in name:
        split = urlsplit(name)
        if split.netloc not in ("", "localhost"):
            raise PermissionDenied(
                f"source {shown_source(name)} is a file on another host; the loader reads local files "
                f"under {ROOTS_HELP} and URLs under its URL roots"
            )
        if split.query or split.fragment:
            raise InvalidArgument(
                f"source {shown_source(name)}: a file:// URL takes no '?' or '#'; percent-encode them in a file name"
            )
        path = unquote(split.path)  # file:///data/%2e%2e/x.csv means /data/../x.csv
    else:
        path = name
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise InvalidArgument(f"source {shown_source(name)} holds a control character (such as NUL); no file has one")
    try:
        return os.path.abspath(path)
    except ValueError as exc:  # e.g. a lone surrogate the file system cannot encode
        raise InvalidArgument(f"source {shown_source(name)} is not a usable path: {bounded(exc, 80)}") from None


def _under(path: str, root: str) -> bool:
    """Whether `path` is `root` or inside it, by path components (/data2 is not inside /data)."""
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:
        return False


def _refuse_kernel_trees(path: str, shown: str) -> None:
    if any(_under(path, tree) for tree in NEVER_READ):
        raise PermissionDenied(
            f"source {shown} is under {', '.join(NEVER_READ)}, which the loader never reads, whatever {ROOTS_HELP} says"
        )


def _check_roots(real: str, policy: SourcePolicy, shown: str) -> None:
    """`real` (symlinks resolved) must be inside a local root and outside the kernel's trees."""
    _refuse_kernel_trees(real, shown)
    if not any(_under(real, root) for root in policy.local_roots):
        raise PermissionDenied(
            f"source {shown} is outside the folders this loader may read ({ROOTS_HELP}: "
            f"{_shown_roots(policy.local_roots)}); put the file under one of them, or add its folder to "
            f"{ROOTS_HELP} where the loader runs"
        )


def _shown_roots(roots: tuple[str, ...]) -> str:
    if not roots:
        return "none"
    shown = [repr(r if len(r) <= 80 else "..." + r[-80:]) for r in roots[:MAX_SHOWN_ROOTS]]
    more = len(roots) - MAX_SHOWN_ROOTS
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _read_local(name: str, policy: SourcePolicy, cancelled: threading.Event, deadline: float) -> bytes:
    absolute = _local_path(name)
    shown = shown_source(absolute)
    # The path as named too: /proc/self/cwd/x.csv resolves to the working folder, outside /proc.
    _refuse_kernel_trees(absolute, shown)
    # Only the real path counts for the roots: a symlink or '..' out of a root is refused,
    # a symlink from elsewhere into a root is fine. Nothing outside a root is opened or
    # stat'ed, and a refusal reads the same whether or not the file exists.
    real = os.path.realpath(absolute)
    _check_roots(real, policy, shown)
    try:
        # stat before open: opening a device can itself do something; a FIFO would block.
        info = os.stat(real)
        _require_regular_file(info, shown)
        _check_size(info.st_size, policy.max_bytes, "source file")
        # O_NOFOLLOW: the last component cannot have become a symlink since realpath;
        # O_NONBLOCK: a FIFO swapped in since the stat does not block this worker.
        fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise NotFound(f"source file {shown} does not exist") from None
    except NotADirectoryError:
        raise NotFound(f"source file {shown} does not exist") from None
    except PermissionError:
        raise FailedPrecondition(f"source file {shown} is not readable by the loader") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PermissionDenied(
                f"source {shown} changed into a symlink while it was opened; not read (the loader reads only "
                f"real files under {ROOTS_HELP})"
            ) from None
        if exc.errno in (errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ, errno.ENXIO):
            raise InvalidArgument(f"source {shown} is not a usable path: {exc.strerror}") from None
        raise
    with os.fdopen(fd, "rb", buffering=0) as handle:
        _require_regular_file(os.fstat(fd), shown)
        # A folder on the way may have been swapped for a symlink after realpath:
        # what is open now is what counts (Linux names it in /proc/self/fd).
        try:
            opened = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            opened = None  # no /proc (not Linux): the checks above stand
        if opened is not None:
            _check_roots(opened.removesuffix(" (deleted)"), policy, shown)
        return _capped(lambda: handle.read(CHUNK), policy.max_bytes, cancelled, deadline, "source file")


def _require_regular_file(info: os.stat_result, shown: str) -> None:
    if stat.S_ISDIR(info.st_mode):
        # e.g. a Spark or Dask "table.parquet" folder of part files
        raise InvalidArgument(f"source {shown} is a directory; pass a single CSV or Parquet file")
    if not stat.S_ISREG(info.st_mode):
        raise InvalidArgument(
            f"source {shown} is not a regular file (a FIFO, socket or device); pass a CSV or Parquet file"
        )


# ---- reading with a cap, a deadline and cancellation ---------------------------------------
def _check_size(size: int, max_bytes: int, subject: str) -> None:
    if size > max_bytes:
        raise ResourceExhausted(
            f"{subject} is {human_bytes(size)}, over the limit of {human_bytes(max_bytes)} (MLMESH_MAX_DATASET_BYTES)"
        )


def _check_time(cancelled: threading.Event, deadline: float) -> None:
    if cancelled.is_set():
        raise Cancelled("the caller went away; reading the source stopped")
    if time.monotonic() >= deadline:
        raise DeadlineExceeded("reading the source took longer than the call's deadline; it stopped")


def _capped(
    read: Callable[[], bytes], max_bytes: int, cancelled: threading.Event, deadline: float, subject: str
) -> bytes:
    """read() until it returns b'', at most max_bytes in all, stopping when cancelled or late.

    The size known before reading may be missing (a streamed HTTP body) or stale (a growing file)."""
    chunks: list[bytes] = []
    total = 0
    while True:
        _check_time(cancelled, deadline)
        chunk = read()
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:
            raise ResourceExhausted(
                f"{subject} is larger than the limit of {human_bytes(max_bytes)} (MLMESH_MAX_DATASET_BYTES); "
                "reading stopped there"
            )
        chunks.append(chunk)


# ---- URLs --------------------------------------------------------------------------------
def _scheme(name: str) -> str:
    return name.split("://", 1)[0].strip().lower()


def _normal_url(url: str) -> str:
    """Scheme and host in lower case, so HTTP://Host/ compares equal to http://host/; the path as is."""
    scheme, _, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    return f"{scheme.lower()}://{host.lower()}{slash}{path}"


def _fully_unquoted(text: str) -> str:
    """%252e%252e is %2e%2e after one decoding and '..' after two: decode until nothing changes."""
    for _ in range(5):
        decoded = unquote(text)
        if decoded == text:
            return text
        text = decoded
    return text


def _check_url(url: str, policy: SourcePolicy) -> str:
    """`url`, if it lies under a URL root; PermissionDenied otherwise. Nothing is fetched."""
    shown = shown_source(url)
    scheme = _scheme(url)
    if scheme in REFUSED_SCHEMES:
        raise PermissionDenied(
            f"source {shown}: the loader never reads {scheme}:// sources; name a local file or a URL under {ROOTS_HELP}"
        )
    if any(ord(c) <= 32 or ord(c) == 127 for c in url) or "\\" in url:
        raise PermissionDenied(
            f"source {shown} holds a backslash, space or control character; not read (percent-encode them in a "
            f"URL under {ROOTS_HELP})"
        )
    try:
        split = urlsplit(url)
    except ValueError as exc:
        raise InvalidArgument(f"source {shown} is not a valid URL: {bounded(exc, 80)}") from None
    if "@" in split.netloc:
        raise PermissionDenied(
            f"source {shown} has user info (user@host) in it, and no URL root of {ROOTS_HELP} allows that; "
            "put credentials in the store's own configuration, not in the URL"
        )
    for segment in split.path.split("/"):
        plain = _fully_unquoted(segment)
        if plain in (".", "..") or "/" in plain or "\\" in plain:
            raise PermissionDenied(
                f"source {shown} has a '.' or '..' path segment (perhaps percent-encoded), which could leave the "
                f"URL roots of {ROOTS_HELP}; name the file by its plain path"
            )
    if not any(_normal_url(url).startswith(root) for root in policy.url_roots):
        raise PermissionDenied(
            f"source {shown} is not under a URL this loader may read ({ROOTS_HELP}: "
            f"{_shown_roots(policy.url_roots)}); add a URL prefix such as https://data.example.com/public/ "
            f"to {ROOTS_HELP} where the loader runs, or copy the file under a local root"
        )
    return url


def _fetch_http(url: str, policy: SourcePolicy, cancelled: threading.Event, deadline: float) -> bytes:
    """GET `url` with the standard library (not fsspec, whose HTTP driver has no timeouts we
    control); a redirect is followed only to a URL that is itself allowed, a few times at most."""
    first = url
    for _ in range(MAX_REDIRECTS + 1):
        with _HttpGet(url, policy, cancelled, deadline) as get:
            response = get.response
            if response.status in (301, 302, 303, 307, 308):
                target = urljoin(url, (response.getheader("Location") or "").strip())
                try:
                    url = _check_url(target, policy)
                except PermissionDenied:
                    raise PermissionDenied(
                        f"source {shown_source(first)} redirects to {shown_source(target)}, which is not under "
                        f"{ROOTS_HELP}; not followed"
                    ) from None
                continue
            if response.status != 200:
                raise FailedPrecondition(
                    f"source {shown_source(url)} answered HTTP {response.status} {bounded(response.reason, 60)}"
                )
            return get.body()
    raise FailedPrecondition(f"source {shown_source(first)} redirects more than {MAX_REDIRECTS} times; not followed")


class _HttpGet:
    """One GET, bounded in time: a connect timeout, a timeout on each read, and a watchdog
    thread that shuts the socket down at the deadline or when the caller goes away, so that
    not even a server sending a byte at a time (each read succeeds) holds the worker longer."""

    def __init__(self, url: str, policy: SourcePolicy, cancelled: threading.Event, deadline: float):
        self.url, self.policy, self.cancelled, self.deadline = url, policy, cancelled, deadline
        self.shown = shown_source(url)
        self.connection: http.client.HTTPConnection | None = None
        self.response: http.client.HTTPResponse
        self.fired = ""  # "cancelled" or "deadline", once the watchdog has shut the socket
        self._done = threading.Event()

    def __enter__(self) -> _HttpGet:
        split = urlsplit(self.url)
        _check_time(self.cancelled, self.deadline)
        connect_seconds = max(0.001, min(self.policy.connect_seconds, self.deadline - time.monotonic()))
        try:
            port = split.port
        except ValueError:
            raise InvalidArgument(f"source {self.shown} has an invalid port") from None
        if split.scheme.lower() == "https":
            self.connection = http.client.HTTPSConnection(
                split.hostname or "", port, timeout=connect_seconds, context=ssl.create_default_context()
            )
        else:
            self.connection = http.client.HTTPConnection(split.hostname or "", port, timeout=connect_seconds)
        try:
            with self._network_errors():
                try:
                    self.connection.connect()
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"source {self.shown} did not accept a connection within {connect_seconds:g} s "
                        "(MLMESH_SOURCE_CONNECT_SECONDS)"
                    ) from None
                self.connection.sock.settimeout(self.policy.read_seconds)
                threading.Thread(
                    target=self._watch, args=(self.connection.sock,), daemon=True, name="mlmesh-source-watchdog"
                ).start()
                target = (split.path or "/") + (f"?{split.query}" if split.query else "")
                self.connection.putrequest("GET", target, skip_accept_encoding=True)
                self.connection.putheader("Accept-Encoding", "identity")  # Content-Length is then the real size
                self.connection.putheader("User-Agent", "mlmesh-loader")
                self.connection.endheaders()
                self.response = self.connection.getresponse()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        if self.connection is not None:
            self.connection.close()

    def body(self) -> bytes:
        """The response body: refused before reading when Content-Length is over the cap, and cut at the cap."""
        declared = self.response.getheader("Content-Length")
        length = None
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                raise FailedPrecondition(f"source {self.shown} sent an invalid Content-Length") from None
            _check_size(length, self.policy.max_bytes, f"source {self.shown} (by its Content-Length)")
        with self._network_errors():
            # read1: at most one socket read per call, so the checks between chunks run.
            data = _capped(
                lambda: self.response.read1(CHUNK),
                self.policy.max_bytes,
                self.cancelled,
                self.deadline,
                f"source {self.shown}",
            )
        self._raise_if_fired()  # a socket the watchdog shut reads as the end of the body
        if length is not None and len(data) != length:
            raise FailedPrecondition(
                f"source {self.shown} closed the connection after {len(data)} of its {length} bytes"
            )
        return data

    def _watch(self, sock: socket.socket) -> None:
        while not self._done.wait(min(0.05, max(0.0, self.deadline - time.monotonic()))):
            if self.cancelled.is_set() or time.monotonic() >= self.deadline:
                self.fired = "cancelled" if self.cancelled.is_set() else "deadline"
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # a blocked recv returns at once
                return

    def _raise_if_fired(self) -> None:
        if self.fired == "cancelled":
            raise Cancelled("the caller went away; reading the source stopped")
        if self.fired == "deadline":
            raise DeadlineExceeded(f"source {self.shown} was still sending at the call's deadline; the read stopped")

    @contextlib.contextmanager
    def _network_errors(self) -> Iterator[None]:
        """Network failures as statuses. Never UNAVAILABLE: clients retry that for minutes, and
        a source that is down or refuses is the request's problem, not the loader's."""
        try:
            yield
        except StageError:
            raise
        except (OSError, http.client.HTTPException) as exc:
            self._raise_if_fired()  # the watchdog's shutdown surfaces as some connection error
            if isinstance(exc, TimeoutError):
                raise DeadlineExceeded(
                    f"source {self.shown} sent nothing for {self.policy.read_seconds:g} s (MLMESH_SOURCE_READ_SECONDS)"
                ) from None
            if isinstance(exc, socket.gaierror):
                raise FailedPrecondition(
                    f"source {self.shown}: its host name does not resolve ({bounded(exc, 80)})"
                ) from None
            if isinstance(exc, ssl.SSLError):
                raise FailedPrecondition(f"source {self.shown}: TLS failed ({bounded(exc, 120)})") from None
            if isinstance(exc, ConnectionRefusedError):
                raise FailedPrecondition(f"source {self.shown}: connection refused") from None
            raise FailedPrecondition(
                f"source {self.shown} could not be read: {type(exc).__name__} {bounded(exc, 120)}"
            ) from None


def _fetch_fsspec(url: str, policy: SourcePolicy, cancelled: threading.Event, deadline: float) -> bytes:
    """An object store URL (s3://, gs://, ...) under a URL root, through its fsspec driver."""
    import fsspec

    shown = shown_source(url)
    scheme = _scheme(url)
    try:
        fs, path = fsspec.core.url_to_fs(url, **_storage_options(scheme, policy))
        size = fs.size(path)
        if size is not None:
            _check_size(int(size), policy.max_bytes, f"source {shown}")
        with fs.open(path, "rb") as handle:
            return _capped(lambda: handle.read(CHUNK), policy.max_bytes, cancelled, deadline, f"source {shown}")
    except StageError:
        raise
    except FileNotFoundError:
        raise NotFound(f"source {shown} does not exist") from None
    except IsADirectoryError:
        raise InvalidArgument(f"source {shown} is a directory; pass a single CSV or Parquet file") from None
    except ImportError as exc:
        raise FailedPrecondition(
            f"the loader cannot read {scheme}:// sources: {bounded(exc, 120)}; install its fsspec driver (e.g. s3fs, gcsfs)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - drivers raise their own types; all are the source's problem
        raise FailedPrecondition(
            f"source {shown} could not be read: {type(exc).__name__} {bounded(exc, 120)}"
        ) from None


def _storage_options(scheme: str, policy: SourcePolicy) -> dict[str, Any]:
    """The timeouts, where a driver takes them (s3fs through botocore)."""
    if scheme in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": policy.connect_seconds, "read_timeout": policy.read_seconds}}
    return {}
