"""Open Inference Protocol tensors to numpy and back, checking everything a caller sends.

A request carries each input either in its typed `contents` or as raw
little-endian bytes in `raw_input_contents` (tritonclient's way), never both.
Every input here is one column: shape [n] or [n, 1], the same n for all. A
BYTES element in raw form is its length as 4 little-endian bytes, then the bytes.

Nothing a caller sent is echoed unbounded: names are cut to MAX_SHOWN_NAME.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlmesh.serving.v2 import open_inference_pb2 as pb
from services.runtime.errors import InvalidArgument, ResourceExhausted

MAX_SHOWN_NAME = 60
# The numeric datatypes of the protocol, as numpy little-endian dtypes.
NUMERIC_DTYPES: dict[str, str] = {
    "BOOL": "?",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}
DATATYPES = (*NUMERIC_DTYPES, "BYTES")
# The field of InferTensorContents each datatype uses (FP16 travels only as raw bytes).
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_LENGTH = struct.Struct("<I")


def shown(name: str) -> str:
    return repr(name if len(name) <= MAX_SHOWN_NAME else name[:MAX_SHOWN_NAME] + "...")


@dataclass
class Column:
    """One decoded input: its datatype and its n values (numbers, or bytes objects for BYTES)."""

    name: str
    datatype: str
    values: np.ndarray


def _rows(tensor: Any, max_rows: int) -> int:
    # On every input of every request: the common case is checked first, and names are quoted only in refusals.
    shape = tensor.shape
    dimensions = len(shape)
    rows = shape[0] if dimensions else -1
    if 0 <= rows <= max_rows and (dimensions == 1 or (dimensions == 2 and shape[1] == 1)):
        return int(rows)
    name = shown(tensor.name)
    if not 1 <= dimensions <= 2 or (dimensions == 2 and shape[1] != 1):
        raise InvalidArgument(
            f"input {name} has shape {list(shape)[:4]}; each input is one column, of shape [rows] or [rows, 1]"
        )
    if rows < 0:
        raise InvalidArgument(f"input {name} has a negative dimension {rows}; send the row count")
    raise ResourceExhausted(
        f"input {name} has {rows} rows; this server takes at most {max_rows} rows per request "
        "(MLMESH_SERVING_MAX_REQUEST_ROWS); split the batch"
    )


def _typed(tensor: Any, rows: int) -> np.ndarray:
    datatype = tensor.datatype
    if datatype not in CONTENTS_FIELD:
        raise InvalidArgument(f"input {shown(tensor.name)}: datatype {datatype} travels only in raw_input_contents")
    field = CONTENTS_FIELD[datatype]
    contents = tensor.contents
    for other in set(CONTENTS_FIELD.values()) - {field}:
        if len(getattr(contents, other)):
            raise InvalidArgument(
                f"input {shown(tensor.name)} is {datatype} but fills contents.{other}; put its values in contents.{field}"
            )
    values = getattr(contents, field)
    if len(values) != rows:
        raise InvalidArgument(
            f"input {shown(tensor.name)} has shape [{rows}] but {len(values)} values in contents.{field}"
        )
    if datatype == "BYTES":
        array = np.empty(rows, dtype=object)
        array[:] = list(values)
        return array
    array = np.asarray(values, dtype=NUMERIC_DTYPES[datatype])
    if datatype in ("INT8", "INT16", "UINT8", "UINT16") and rows:
        # Narrow integers travel widened (int_contents is int32): refuse what does not fit.
        wide = np.asarray(values, dtype="<i8")
        if not np.array_equal(wide, array.astype("<i8")):
            raise InvalidArgument(f"input {shown(tensor.name)} holds values outside the range of {datatype}")
    return array


def _raw_bytes(name: str, data: bytes, rows: int) -> np.ndarray:
    array = np.empty(rows, dtype=object)
    offset = 0
    for index in range(rows):
        if offset + 4 > len(data):
            raise InvalidArgument(
                f"input {shown(name)}: raw BYTES hold {index} elements, not {rows} (each is a 4-byte length, then the bytes)"
            )
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += 4
        if offset + length > len(data):
            raise InvalidArgument(f"input {shown(name)}: raw BYTES element {index} runs past the end of its buffer")
        array[index] = data[offset : offset + length]
        offset += length
    if offset != len(data):
        raise InvalidArgument(f"input {shown(name)}: raw BYTES hold more than the {rows} elements its shape says")
    return array


def _raw(tensor: Any, data: bytes, rows: int) -> np.ndarray:
    if tensor.HasField("contents"):
        raise InvalidArgument(
            f"input {shown(tensor.name)} has both contents and raw_input_contents; send its values once"
        )
    if tensor.datatype == "BYTES":
        return _raw_bytes(tensor.name, data, rows)
    dtype = np.dtype(NUMERIC_DTYPES[tensor.datatype])
    if len(data) != rows * dtype.itemsize:
        raise InvalidArgument(
            f"input {shown(tensor.name)}: raw contents of {len(data)} bytes do not hold {rows} {tensor.datatype} values "
            f"({rows * dtype.itemsize} bytes)"
        )
    if tensor.datatype == "BOOL" and np.frombuffer(data, dtype=np.uint8).max(initial=0) > 1:
        raise InvalidArgument(f"input {shown(tensor.name)}: raw BOOL bytes must each be 0 or 1")
    return np.frombuffer(data, dtype=dtype)


def decode_inputs(request: pb.ModelInferRequest, max_rows: int, max_inputs: int) -> tuple[list[Column], int]:
    """The request's inputs as columns, and the row count they share."""
    inputs = request.inputs
    if not inputs:
        raise InvalidArgument("the request has no inputs; send one tensor per column (ModelMetadata lists them)")
    if len(inputs) > max_inputs:
        raise InvalidArgument(f"the request has {len(inputs)} inputs; this model takes at most {max_inputs}")
    raw = request.raw_input_contents
    if raw and len(raw) != len(inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(inputs)} inputs; send one per input, in order"
        )
    columns: list[Column] = []
    seen: set[str] = set()
    rows: int | None = None
    for position, tensor in enumerate(inputs):
        name, datatype = tensor.name, tensor.datatype
        if name in seen:
            raise InvalidArgument(f"input {shown(name)} appears twice; send each column once")
        seen.add(name)
        if datatype not in DATATYPES:
            raise InvalidArgument(
                f"input {shown(name)} has datatype {shown(datatype)}; the protocol's are {', '.join(DATATYPES)}"
            )
        count = _rows(tensor, max_rows)
        if rows is None:
            rows = count
        elif count != rows:
            raise InvalidArgument(
                f"input {shown(tensor.name)} has {count} rows but the inputs before it have {rows}; "
                "every column of a batch has one value per row"
            )
        values = _raw(tensor, raw[position], count) if raw else _typed(tensor, count)
        columns.append(Column(name, datatype, values))
    assert rows is not None, "there is at least one input"
    return columns, rows


# ---- outputs --------------------------------------------------------------------------------
def encode_output(name: str, values: np.ndarray, raw: bool) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes]:
    """One output tensor, typed or raw (the raw bytes are returned beside it, b"" when typed)."""
    tensor = pb.ModelInferResponse.InferOutputTensor(name=name, shape=list(values.shape))
    if values.dtype == object:
        tensor.datatype = "BYTES"
        encoded = [value.encode("utf-8") if isinstance(value, str) else bytes(value) for value in values.ravel()]
        if raw:
            return tensor, b"".join(_LENGTH.pack(len(item)) + item for item in encoded)
        tensor.contents.bytes_contents.extend(encoded)
        return tensor, b""
    array = np.ascontiguousarray(values, dtype="<f8")
    tensor.datatype = "FP64"
    if raw:
        return tensor, array.tobytes()
    tensor.contents.fp64_contents.extend(array.ravel().tolist())
    return tensor, b""
