"""The shared, content-addressed artifact store.

Layout under the root (a local folder or any fsspec URL such as s3://bucket/mlmesh):

    objects/<aa>/<sha256><suffix>   immutable artifact bytes, named by their digest
    manifests/<sha256>.json         who produced an artifact, from what, with which parameters
    memo/<stage>/<cache key>.json   a stage's stored response for one cache key

Writes are atomic (temporary file + rename locally; object stores publish a
put whole), and every read re-hashes the bytes against the reference.

Large artifacts never sit whole in memory on their way through the store:
`put_streamed` hashes the bytes in the same pass that writes them, and
`get_buffer` hashes them in the same pass that reads them into one buffer,
which the formats then decode in place (see formats.py). sha256 is hashlib's, which
is OpenSSL's, with the CPU's SHA instructions where it has them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import posixpath
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from mlmesh.common.v1.common_pb2 import ArtifactRef
from services.runtime.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    StageError,
    Unavailable,
    bounded,
)
from services.runtime.metrics import NO_STORE_METRICS, StoreMetrics

log = logging.getLogger(__name__)

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# C0 controls (NUL included) and DEL never belong in a path; NUL even crashes os calls.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A full disk or an exhausted quota: the store needs room, retrying as is will not help.
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}

# Suffixes make the object folder readable by people and tools; the digest is the identity.
SUFFIXES = {
    "application/vnd.apache.parquet": ".parquet",
    "application/vnd.apache.arrow.file": ".arrow",
    "application/x-npy": ".npy",
    "application/vnd.skops": ".skops",
    "application/json": ".json",
    "text/html": ".html",
}


def _show(value: object, limit: int = 120) -> str:
    """A caller-supplied string for an error message: quoted, escaped and bounded."""
    return bounded(repr(value), limit)


def sha256_hex(data: bytes | memoryview) -> str:
    # hashlib releases the GIL while it hashes a large buffer, so other threads run meanwhile.
    return hashlib.sha256(data).hexdigest()


# Reads go file -> buffer -> hash in pieces of this size, small enough to stay in cache.
_READ_CHUNK = 4 << 20
# A temporary object file nobody has written to for this long was left by a killed writer.
STALE_TEMPORARY_SECONDS = 3600.0


class HashingWriter:
    """A write-only file that hashes and counts what passes through it.

    Encoders (numpy's write_array, Arrow's IPC writer through pa.PythonFile)
    write into it chunk by chunk, so an artifact is hashed in the same pass
    that writes it, and never needs to exist whole as one bytes object.
    """

    def __init__(self, target: BinaryIO):
        self._target = target
        self._hash = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, chunk: Any) -> int:
        view = memoryview(chunk).cast("B")
        self._hash.update(view)
        self._target.write(view)
        self.size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._target.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        """The encoder's close; the store closes the file itself once it is synced."""

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def canonical_json(value: Any) -> bytes:
    """JSON with sorted keys and no insignificant whitespace: equal values, equal bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def ref_to_dict(ref: ArtifactRef) -> dict[str, Any]:
    return {
        "uri": ref.uri,
        "sha256": ref.sha256,
        "size_bytes": ref.size_bytes,
        "media_type": ref.media_type,
    }


def ref_from_dict(data: dict[str, Any]) -> ArtifactRef:
    return ArtifactRef(
        uri=data["uri"],
        sha256=data["sha256"],
        size_bytes=int(data.get("size_bytes", 0)),
        media_type=data.get("media_type", ""),
    )


class DamagedDocument(ValueError):
    """A store document that exists but cannot be used: not JSON, or not an object."""

    def __init__(self, relative_path: str, reason: str):
        super().__init__(f"store document {relative_path} {reason}")
        self.relative_path = relative_path
        self.reason = reason


def _is_manifest(doc: dict[str, Any]) -> bool:
    inputs = doc.get("inputs", {})
    return (
        isinstance(doc.get("stage"), str)
        and isinstance(inputs, dict)
        and all(isinstance(ref, dict) and isinstance(ref.get("sha256"), str) for ref in inputs.values())
    )


@dataclass(frozen=True)
class StoredObject:
    ref: ArtifactRef
    data: bytes


class ArtifactStore:
    def __init__(self, root: str):
        self.root_url = root
        self.fs, root_path = fsspec.core.url_to_fs(root)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root_path = posixpath.normpath(os.path.realpath(root_path) if self.is_local else root_path)
        # Where reads, writes and digest failures are counted; a stage puts its metrics here.
        self.metrics: StoreMetrics = NO_STORE_METRICS

    # ---- paths and URIs -------------------------------------------------------------
    def _object_path(self, digest: str, media_type: str) -> str:
        suffix = SUFFIXES.get(media_type, "")
        return f"{self.root_path}/objects/{digest[:2]}/{digest}{suffix}"

    def _uri(self, path: str) -> str:
        return f"file://{path}" if self.is_local else self.fs.unstrip_protocol(path)

    def resolve(self, uri: str) -> str:
        """Map a ref's URI to a path inside this store, refusing anything outside it."""
        if not uri:
            raise InvalidArgument("artifact ref has an empty uri")
        if _CONTROL.search(uri):
            raise InvalidArgument(
                f"artifact uri {_show(uri)} contains a control character (such as NUL); "
                "pass the ref a previous stage returned, unchanged"
            )
        protocol, path = fsspec.core.split_protocol(uri)
        if self.is_local:
            if protocol not in (None, "file", "local"):
                raise InvalidArgument(
                    f"artifact uri {_show(uri)} uses scheme {_show(protocol)}, but the store is the "
                    f"local folder {self.root_path}; pass a ref this store produced"
                )
            path = os.path.realpath(path)
        else:
            own = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
            if protocol not in own:
                raise InvalidArgument(
                    f"artifact uri {_show(uri)} is not in the store {self.root_url}; pass a ref this store produced"
                )
            path = posixpath.normpath(self.fs._strip_protocol(uri))
        objects = f"{self.root_path}/objects/"
        if not path.startswith(objects):
            raise InvalidArgument(f"artifact uri {_show(uri)} points outside the store's objects folder {objects}")
        return path

    @staticmethod
    def check_ref(ref: ArtifactRef, field: str) -> None:
        """Validate a ref's shape before touching storage."""
        if not ref.uri:
            raise InvalidArgument(f"{field}.uri is required: pass the ref a previous stage returned")
        if not _SHA256_HEX.match(ref.sha256):
            raise InvalidArgument(f"{field}.sha256 must be 64 lowercase hex characters, got {_show(ref.sha256)}")

    # ---- objects --------------------------------------------------------------------
    def put(self, data: bytes, media_type: str) -> ArtifactRef:
        return self.put_streamed(media_type, lambda sink: sink.write(data))

    def put_streamed(self, media_type: str, write: Callable[[HashingWriter], Any]) -> ArtifactRef:
        """Store what `write` writes into the sink it is given, hashing it on the way.

        The bytes go to a temporary file in the objects folder; once complete and
        synced, the file is renamed to its digest's name (an object store gets one
        put of the finished file). Content addressing makes a rewrite of identical
        bytes a no-op, but a damaged copy (wrong digest) is replaced, not trusted.
        """
        with self.metrics.store_operation("write") as measured:
            ref = self._write_object(media_type, write)
            measured.nbytes = ref.size_bytes
        return ref

    def _write_object(self, media_type: str, write: Callable[[HashingWriter], Any]) -> ArtifactRef:
        objects = f"{self.root_path}/objects"
        folder = objects if self.is_local else tempfile.gettempdir()
        tmp = path = ""
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
            # Buffered: Arrow's writer sends many small pieces (padding, metadata) between columns.
            with os.fdopen(fd, "wb", buffering=1 << 20) as handle:
                sink = HashingWriter(handle)
                write(sink)
                handle.flush()
                if self.is_local:
                    os.fsync(handle.fileno())
            digest = sink.hexdigest()
            path = self._object_path(digest, media_type)
            if not self._exists_intact(path, digest):
                if self.is_local:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    os.replace(tmp, path)
                else:
                    self.fs.put_file(tmp, path)
        except OSError as exc:
            mapped = self._write_failed(path or objects, exc)
            if mapped is exc:
                raise
            raise mapped from exc
        finally:
            # Never leave a partial object behind, whatever failed (a full disk included).
            if tmp:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        return ArtifactRef(uri=self._uri(path), sha256=digest, size_bytes=sink.size, media_type=media_type)

    def remove_stale_temporaries(self, older_than: float = STALE_TEMPORARY_SECONDS) -> int:
        """Delete temporary object files a killed writer left behind; returns how many.

        Only files untouched for `older_than` seconds go: a live writer keeps its
        file's mtime fresh, and other stages may be writing to the same store.
        """
        if not self.is_local:
            return 0
        removed = 0
        cutoff = time.time() - older_than
        with contextlib.suppress(FileNotFoundError), os.scandir(f"{self.root_path}/objects") as entries:
            for entry in entries:
                if entry.name.startswith(".tmp-") and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                            os.unlink(entry.path)
                            removed += 1
        return removed

    def get(self, ref: ArtifactRef, field: str = "artifact") -> bytes:
        """An object's bytes, verified against its digest."""
        with self.metrics.store_operation("read", ref.uri) as measured:
            with self._reading(ref, field) as path:
                data = self.fs.cat_file(path)
            self._verify(ref, field, sha256_hex(data))
            measured.nbytes = len(data)
        return data

    def get_buffer(self, ref: ArtifactRef, field: str = "artifact") -> memoryview:
        """An object's bytes in one buffer, verified against its digest, for decoding in place.

        The file is read chunk by chunk straight into the buffer, and each chunk is
        hashed while it is still in the CPU's cache: one pass, one copy in memory.
        Decoders (formats.py) then build arrays and tables over the buffer itself.
        It is not a memory map on purpose: a mapped file truncated in place by
        anyone, while a stage still uses the map, kills the stage with SIGBUS; a
        buffer it owns can only ever fail the digest check.
        """
        if not self.is_local:
            return memoryview(self.get(ref, field))
        with self.metrics.store_operation("read", ref.uri) as measured:
            view = self._read_into_buffer(ref, field)
            measured.nbytes = len(view)
        return view

    def _read_into_buffer(self, ref: ArtifactRef, field: str) -> memoryview:
        with self._reading(ref, field) as path, open(path, "rb", buffering=0) as handle:
            size = os.fstat(handle.fileno()).st_size
            # np.empty, not bytearray: pages are not zeroed first, only written once by the read.
            view = np.empty(size, dtype=np.uint8).data.cast("B")
            digest = hashlib.sha256()
            filled = 0
            while filled < size:
                count = handle.readinto(view[filled : filled + _READ_CHUNK])
                if not count:
                    break  # the file shrank since fstat: the digest check below refuses it
                digest.update(view[filled : filled + count])
                filled += count
        self._verify(ref, field, digest.hexdigest())
        return view[:filled].toreadonly()

    def _verify(self, ref: ArtifactRef, field: str, actual: str) -> None:
        if actual != ref.sha256:
            self.metrics.verification_failed()
            raise DataLoss(
                f"{field} {_show(ref.uri)} is corrupt or was replaced: expected sha256 {ref.sha256}, "
                f"found {actual}. Rerun the stage that produced it with force_recompute=true"
            )

    @contextlib.contextmanager
    def _reading(self, ref: ArtifactRef, field: str) -> Iterator[str]:
        """The path of a ref's object, with the file system's errors mapped to honest statuses."""
        self.check_ref(ref, field)
        path = self.resolve(ref.uri)
        try:
            yield path
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(
                f"{field} {_show(ref.uri)} is not in the artifact store; it was deleted or never "
                "written. Rerun the stage that produced it with force_recompute=true"
            ) from None
        except IsADirectoryError:
            raise FailedPrecondition(
                f"{field} {_show(ref.uri)} names a folder in the artifact store, not an object; "
                "pass the ref the producing stage returned"
            ) from None
        except OSError as exc:
            if exc.errno in (errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ):
                # No object can live at such a path: the ref is malformed, retrying will not help.
                raise InvalidArgument(
                    f"{field} {_show(ref.uri)} is not a path the artifact store can hold ({exc.strerror}); "
                    "pass the ref a previous stage returned, unchanged"
                ) from None
            raise Unavailable(f"artifact store unreadable at {_show(ref.uri)}: {bounded(exc, 120)}") from exc

    def check_stored(self, ref: ArtifactRef, field: str) -> None:
        """A ref someone hands us to keep (registry lineage): well formed, inside this store,
        named by its own digest, and present with its size. Cheap: no bytes are read."""
        self.check_ref(ref, field)
        path = self.resolve(ref.uri)
        if not path.rsplit("/", 1)[-1].startswith(ref.sha256):
            raise InvalidArgument(
                f"{field} {_show(ref.uri)} is not the object of sha256 {ref.sha256[:12]}...; "
                "pass the ref a stage returned, unchanged"
            )
        try:
            size = self.fs.size(path)
        except (FileNotFoundError, NotADirectoryError):
            size = None
        if size is None:
            raise NotFound(f"{field} {_show(ref.uri)} is not in the artifact store; pass a ref of this store")
        if ref.size_bytes and size != ref.size_bytes:
            raise InvalidArgument(f"{field} says {ref.size_bytes} bytes but the stored object has {size}")

    def exists(self, ref: ArtifactRef) -> bool:
        """Cheap presence check (size only) used before serving a memoized response."""
        try:
            path = self.resolve(ref.uri)
            return self.fs.size(path) == ref.size_bytes
        except (OSError, InvalidArgument):
            return False

    def fingerprint(self, ref: ArtifactRef) -> list[Any] | None:
        """What the file system says about an object, cheaply: None if it is not there.

        Locally: size, mtime, ctime and inode. Rewriting a file's bytes changes its
        ctime, which no user can set back (unlike mtime), so an unchanged
        fingerprint means unchanged bytes without reading them.
        """
        try:
            return self.fingerprint_at(self.resolve(ref.uri))
        except InvalidArgument:
            return None

    def doc_fingerprint(self, parts: tuple[str, ...]) -> list[Any] | None:
        """The same for a document (a memo entry): unchanged means not rewritten, damaged or deleted."""
        return self.fingerprint_at(self._doc_path(*parts))

    def fingerprint_at(self, path: str) -> list[Any] | None:
        try:
            if self.is_local:
                stat = os.stat(path)
                return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
            info = self.fs.info(path)
            return [info.get("size"), str(info.get("ETag") or info.get("etag") or info.get("mtime") or "")]
        except OSError:
            return None

    def intact(self, ref: ArtifactRef, recorded: list[Any] | None) -> bool:
        """The object is there with the bytes its digest names: by fingerprint, or else by re-hashing."""
        current = self.fingerprint(ref)
        if current is None or current[0] != ref.size_bytes:
            return False
        if recorded is not None and current == recorded:
            return True
        try:
            return self._exists_intact(self.resolve(ref.uri), ref.sha256)
        except (OSError, StageError):
            return False

    def _exists_intact(self, path: str, digest: str) -> bool:
        try:
            if not self.is_local:
                return sha256_hex(self.fs.cat_file(path)) == digest
            digest_now = hashlib.sha256()
            with open(path, "rb", buffering=0) as handle:
                while chunk := handle.read(_READ_CHUNK):
                    digest_now.update(chunk)
            return digest_now.hexdigest() == digest
        except (FileNotFoundError, NotADirectoryError):
            return False
        except IsADirectoryError:
            raise self._folder_in_the_way(path) from None

    def _relative(self, path: str) -> str:
        return path.removeprefix(self.root_path).lstrip("/")

    def _folder_in_the_way(self, path: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"the artifact store {self.root_url} has a folder at {self._relative(path)} where a file "
            "belongs; remove that folder and retry"
        )

    def _write_failed(self, path: str, exc: OSError) -> Exception:
        """The status for a failed store write: full disk and folders get their own codes."""
        if exc.errno in _NO_SPACE:
            reason = "disk quota exceeded" if exc.errno != errno.ENOSPC else "no space left on device"
            return ResourceExhausted(
                f"the artifact store {self.root_url} is full ({reason}) while writing "
                f"{self._relative(path)}; nothing was stored. Free space there or point "
                "MLMESH_ARTIFACT_ROOT at a larger volume, then retry"
            )
        if isinstance(exc, IsADirectoryError):
            return self._folder_in_the_way(path)
        return exc

    def _write_atomic(self, path: str, data: bytes, durable: bool = True) -> None:
        try:
            if not self.is_local:
                # Object stores make a single put visible all at once.
                self.fs.pipe_file(path, data)
                return
            self._write_local(path, data, durable)
        except OSError as exc:
            mapped = self._write_failed(path, exc)
            if mapped is exc:
                raise
            raise mapped from exc

    @staticmethod
    def _write_local(path: str, data: bytes, durable: bool = True) -> None:
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                if durable:
                    os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            # Never leave a partial object behind, whatever failed (a full disk included).
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    # ---- small JSON documents (manifests, memo entries) ------------------------------
    def _doc_path(self, *parts: str) -> str:
        return "/".join([self.root_path, *parts])

    def write_doc(self, parts: tuple[str, ...], doc: dict[str, Any], durable: bool = True, pretty: bool = True) -> None:
        """Atomic always; `durable=False` skips the fsync, for records a crash may lose (a run's log).
        `pretty=False` writes one line, several times faster (json's C encoder does no indenting)."""
        body = (json.dumps(doc, sort_keys=True, indent=2) if pretty else json.dumps(doc, sort_keys=True)).encode()
        self._write_atomic(self._doc_path(*parts), body, durable)

    def list_names(self, parts: tuple[str, ...]) -> list[str]:
        """The names in a folder of the store, sorted; empty when it does not exist."""
        try:
            entries = self.fs.ls(self._doc_path(*parts), detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(posixpath.basename(str(entry).rstrip("/")) for entry in entries)

    def write_blob(self, parts: tuple[str, ...], data: bytes) -> None:
        """Bytes at a named path (a checkpoint), written atomically like every object."""
        self._write_atomic(self._doc_path(*parts), data)

    def read_blob(self, parts: tuple[str, ...]) -> bytes | None:
        try:
            return self.fs.cat_file(self._doc_path(*parts))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def remove(self, parts: tuple[str, ...]) -> None:
        """Delete a named path and everything under it; absent is fine."""
        path = self._doc_path(*parts)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)

    def load_doc(self, parts: tuple[str, ...]) -> dict[str, Any] | None:
        """A document, None when absent; DamagedDocument when present but not a JSON object."""
        path = self._doc_path(*parts)
        try:
            raw = self.fs.cat_file(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except IsADirectoryError:
            raise DamagedDocument("/".join(parts), "is a folder, not a file") from None
        try:
            doc = json.loads(raw)
        except ValueError as exc:  # truncated, not JSON, or not UTF-8
            raise DamagedDocument("/".join(parts), f"is not valid JSON ({bounded(exc, 80)})") from None
        if not isinstance(doc, dict):
            raise DamagedDocument("/".join(parts), f"holds a JSON {type(doc).__name__}, not an object")
        return doc

    def read_doc(self, parts: tuple[str, ...]) -> dict[str, Any] | None:
        """A document, or None when absent or damaged: a damaged one is logged and rewritten later."""
        try:
            return self.load_doc(parts)
        except DamagedDocument as damaged:
            log.warning("%s; treating it as absent", damaged)
            return None

    def manifest(self, digest: str) -> dict[str, Any] | None:
        manifest = self.read_doc(("manifests", f"{digest}.json"))
        if manifest is not None and not _is_manifest(manifest):
            log.warning("manifests/%s.json has the wrong shape; treating it as absent", digest)
            return None
        return manifest

    def write_manifest(self, digest: str, manifest: dict[str, Any]) -> None:
        # The first producer of a given content stays on record; identical bytes
        # produced later add nothing to its history. A damaged record is replaced.
        if self.manifest(digest) is None:
            self.write_doc(("manifests", f"{digest}.json"), manifest)

    def find_digest(self, artifact: str) -> str:
        """Accept a sha256, a unique prefix of one, or an artifact URI."""
        candidate = artifact.strip().lower()
        if "/" in candidate:
            candidate = posixpath.basename(candidate).split(".")[0]
        if _SHA256_HEX.match(candidate):
            return candidate
        if len(candidate) >= 6 and re.fullmatch(r"[0-9a-f]+", candidate):
            pattern = self._doc_path("manifests", f"{candidate}*.json")
            matches = self.fs.glob(pattern)
            if len(matches) == 1:
                return posixpath.basename(matches[0]).removesuffix(".json")
            if len(matches) > 1:
                raise InvalidArgument(f"artifact prefix {artifact!r} is ambiguous; give more digits")
        raise NotFound(f"no artifact matches {artifact!r}; pass a sha256, a prefix of 6+ hex digits or a URI")

    def lineage(self, digest: str) -> list[dict[str, Any]]:
        """The manifests from an artifact back to its source, breadth first, each once."""
        chain: list[dict[str, Any]] = []
        seen: set[str] = set()
        queue = [digest]
        while queue:
            current = queue.pop(0)
            if current in seen:
                continue
            seen.add(current)
            manifest = self.manifest(current)
            if manifest is None:
                if current == digest:
                    raise NotFound(f"no manifest for artifact {digest}; it was not produced by a stage")
                continue
            chain.append(manifest)
            queue.extend(ref["sha256"] for ref in manifest.get("inputs", {}).values())
        return chain
