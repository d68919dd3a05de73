"""Encoding of the artifact formats, made byte-for-byte deterministic.

Same inputs and seed must give the same digests, so every encoder here avoids
timestamps, memory addresses and unordered iteration.

Tables between stages are Arrow IPC files: they decode at memory speed
(0.03 s for 1M x 33 floats, against 0.5 s for zstd Parquet) and encode 6
times faster. On a local store they are uncompressed; on an object store,
where the bytes cross a network, their buffers are zstd-compressed. Readers
also accept Parquet, the format of earlier versions. Matrices are .npy files,
read in place from a memory map.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import threading
import zipfile
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from services.runtime.errors import DataLoss, FailedPrecondition, bounded

PARQUET = "application/vnd.apache.parquet"
ARROW = "application/vnd.apache.arrow.file"
NPY = "application/x-npy"
SKOPS = "application/vnd.skops"
JSON = "application/json"
HTML = "text/html"

# Metadata key inside table files; holds target column, task kind, class names.
_TABLE_META_KEY = b"mlmesh"
# Rows per Arrow record batch: a batch is converted from pandas and written before the
# next, so writing a table never holds a second full copy of it (about 32 MiB at 32 floats).
_ROWS_PER_BATCH = 131_072
# numpy refuses larger .npy headers by default too; ours are a few dozen bytes.
_NPY_MAX_HEADER = 10_000

# Types that skops does not trust by default but our stages legitimately store.
# Loading anything else is refused, so a tampered model file cannot run code.
TRUSTED_MODEL_TYPES: tuple[str, ...] = (
    "numpy.dtype",  # the dtype parameter of the encoders
    "services.features.encoders.DatetimeParts",
    "services.features.encoders.median_or_zero",  # the numeric imputer's median
    "sklearn.model_selection._split.KFold",  # TargetEncoder's seeded cross-fitting folds
    "sklearn.model_selection._split.StratifiedKFold",
    # hist_gradient_boosting with native categorical features keeps a
    # partial(check_array, ...) as its input check. A partial can only call a
    # callable that is itself on this list, and check_array only validates.
    "functools.partial",
    "sklearn.utils.validation.check_array",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.feature_selection._univariate_selection.f_classif",
    "sklearn.feature_selection._univariate_selection.f_regression",
    "sklearn.tree._tree.Tree",
)

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)

# np.load parses each .npy header with ast.literal_eval, and skops loads its arrays
# with np.load. On CPython 3.11, AST construction keeps its recursion depth in state
# shared between threads, so two worker threads parsing at once can fail with
# "SystemError: AST constructor recursion depth mismatch" (python/cpython#106905).
# One lock serialises every load that parses .npy headers.
_NPY_LOAD_LOCK = threading.Lock()


def _not_a(what: str, kind: str, exc: Exception) -> FailedPrecondition:
    """A digest-verified artifact that does not decode is the wrong artifact for this field,
    not damaged bytes: the caller passed another ref than the one the producing stage returned."""
    return FailedPrecondition(
        f"{what} is not a readable {kind}: {bounded(exc)}; pass the {what} ref its stage returned"
    )


def human_bytes(count: float) -> str:
    """A size for error messages: '512 bytes', '19.5 KiB', '2.0 GiB'."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


# ---- tables ---------------------------------------------------------------------------
def write_table(sink: Any, frame: pd.DataFrame, metadata: dict[str, Any], compress: bool = False) -> None:
    """A DataFrame as an Arrow IPC file, written batch by batch into `sink` (see HashingWriter)."""
    schema = pa.Schema.from_pandas(frame, preserve_index=False)
    merged = dict(schema.metadata or {})
    merged[_TABLE_META_KEY] = json.dumps(metadata, sort_keys=True).encode()
    schema = schema.with_metadata(merged)
    options = pa.ipc.IpcWriteOptions(compression="zstd" if compress else None)
    with pa.ipc.new_file(pa.PythonFile(sink, mode="w"), schema, options=options) as writer:
        for start in range(0, max(len(frame), 1), _ROWS_PER_BATCH):
            chunk = frame.iloc[start : start + _ROWS_PER_BATCH]
            writer.write_batch(pa.RecordBatch.from_pandas(chunk, schema=schema, preserve_index=False))


def frame_to_parquet(frame: pd.DataFrame, metadata: dict[str, Any]) -> bytes:
    """The earlier table format, still read (see read_table); tests use it to make old artifacts."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    merged = dict(table.schema.metadata or {})
    merged[_TABLE_META_KEY] = json.dumps(metadata, sort_keys=True).encode()
    sink = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(merged), sink, compression="zstd")
    return sink.getvalue()


def read_table(data: bytes | memoryview, what: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A table artifact (Arrow IPC, or Parquet from earlier versions) and its mlmesh metadata.

    Arrow reads `data` in place; only the DataFrame's own columns are new memory.
    """
    buffer = pa.py_buffer(data)
    try:
        if bytes(data[:4]) == b"PAR1":
            table = pq.read_table(pa.BufferReader(buffer))
        else:
            table = pa.ipc.open_file(buffer).read_all()
    except (pa.ArrowException, OSError) as exc:
        raise _not_a(what, "table (Arrow IPC or Parquet file)", exc) from exc
    raw = (table.schema.metadata or {}).get(_TABLE_META_KEY)
    try:
        metadata = json.loads(raw) if raw else {}
    except ValueError as exc:
        raise _not_a(what, "table with readable metadata", exc) from exc
    if not isinstance(metadata, dict):
        raise _not_a(what, "table with readable metadata", ValueError("its metadata is not a JSON object"))
    return table.to_pandas(), metadata


# ---- NumPy ------------------------------------------------------------------------------
def write_npy(sink: Any, array: np.ndarray) -> None:
    """An array as .npy, streamed into `sink` in numpy's 16 MiB chunks."""
    np.lib.format.write_array(sink, np.ascontiguousarray(array), allow_pickle=False)


def array_to_npy(array: np.ndarray) -> bytes:
    sink = io.BytesIO()
    write_npy(sink, array)
    return sink.getvalue()


def npy_to_array(data: bytes | memoryview, what: str) -> np.ndarray:
    """The array an .npy file holds, as a read-only view of `data`: nothing is copied.

    The header is parsed by numpy (with its size limit); the body must be
    exactly the bytes that shape and dtype need, and never Python objects.
    """
    view = memoryview(data).cast("B")
    try:
        stream = io.BytesIO(bytes(view[: _NPY_MAX_HEADER + 16]))
        with _NPY_LOAD_LOCK:
            version = np.lib.format.read_magic(stream)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                raise ValueError(f"unsupported .npy version {version[0]}.{version[1]}")
            shape, fortran_order, dtype = read_header[version](stream, max_header_size=_NPY_MAX_HEADER)
        if dtype.hasobject:
            raise ValueError("it holds Python objects, which are never loaded")
        count = math.prod(shape)
        offset = stream.tell()
        if len(view) - offset != count * dtype.itemsize:
            raise ValueError(
                f"its body has {len(view) - offset} bytes where shape {shape} needs {count * dtype.itemsize}"
            )
        array = np.frombuffer(view, dtype=dtype, count=count, offset=offset)
    except (ValueError, OSError, EOFError) as exc:
        raise _not_a(what, ".npy array", exc) from exc
    return array.reshape(shape, order="F" if fortran_order else "C")


# ---- skops ------------------------------------------------------------------------------
def model_to_skops(obj: Any) -> bytes:
    """skops, rewritten so that equal models give equal bytes.

    skops names array entries after id() of the object and stamps the current
    time on each zip entry. Both are replaced: ids by a running count in
    schema.json order, times by a fixed epoch. Counting every occurrence, not
    every distinct object, drops object sharing from the file: which Python
    objects happen to be shared (a default 0.0 passed to every tree, say)
    depends on the process history, for example whether a fit resumed from a
    checkpoint, and must not change the bytes of an equal model. skops writes
    each occurrence in full, so nothing is lost but that sharing.
    """
    sio = _skops()
    original = zipfile.ZipFile(io.BytesIO(sio.dumps(obj)))
    schema = json.loads(original.read("schema.json"))
    count = itertools.count()

    def new_id(_old: int) -> int:
        return next(count)

    files: dict[str, bytes] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "__id__" in node:
                node["__id__"] = new_id(node["__id__"])
            if isinstance(node.get("file"), str):
                name = f"{node['__id__'] if '__id__' in node else len(files)}.npy"
                files[name] = _zero_padding(original.read(node["file"]))
                node["file"] = name
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED) as out:
        entries = {"schema.json": json.dumps(schema, indent=2).encode(), **files}
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            out.writestr(info, entries[name])
    return sink.getvalue()


def _zero_padding(npy: bytes) -> bytes:
    """An .npy of a padded structured array (a tree's node table) with its padding bytes zeroed.

    numpy copies padding verbatim, and a tree's padding is whatever memory held
    before: equal trees, for example one rebuilt from a checkpoint, could give
    different bytes.
    """
    stream = io.BytesIO(npy)
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(stream)
    fields = dtype.fields  # None for an unstructured dtype, as its names are
    if dtype.names is None or fields is None or dtype.itemsize == sum(fields[n][0].itemsize for n in dtype.names):
        return npy
    with _NPY_LOAD_LOCK:
        padded = np.load(io.BytesIO(npy), allow_pickle=False)
    clean = np.zeros(shape, dtype=dtype, order="F" if fortran_order else "C")
    for name in dtype.names:
        clean[name] = padded[name]
    sink = io.BytesIO()
    np.save(sink, clean, allow_pickle=False)
    return sink.getvalue()


def _skops() -> Any:
    """skops.io, imported on first use: importing it costs about 0.5 s, and a stage must
    answer health soon after it starts, before any model is written or read."""
    import skops.io

    return skops.io


def skops_to_model(data: bytes, what: str) -> Any:
    """Load a model only if every type in it is trusted; never via pickle."""
    sio = _skops()
    try:
        with _NPY_LOAD_LOCK:
            untrusted = set(sio.get_untrusted_types(data=data))
    except (zipfile.BadZipFile, ValueError, KeyError) as exc:
        raise _not_a(what, ".skops file", exc) from exc
    refused = sorted(untrusted - set(TRUSTED_MODEL_TYPES))
    if refused:
        raise DataLoss(f"{what} contains types outside the allow-list and was not loaded: {', '.join(refused)}")
    try:
        with _NPY_LOAD_LOCK:
            return sio.loads(data, trusted=sorted(untrusted))
    except Exception as exc:  # skops raises a variety of types on malformed content
        raise _not_a(what, ".skops model", exc) from exc


# ---- JSON -------------------------------------------------------------------------------
def to_json_bytes(document: Any) -> bytes:
    return (json.dumps(document, sort_keys=True, indent=2) + "\n").encode()


def json_bytes_to_doc(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise _not_a(what, "JSON document", exc) from exc
