"""Requests to the serving stage, as `mlmesh predict`, `mlmesh run` and the workflow send them.

A table's columns become one Open Inference Protocol tensor each, typed as the
model's metadata says: numbers as FP64 (missing: NaN), everything else as
BYTES text (missing: empty), which the stage reads the way the loader read the
training table (services/serving/columns.py). Large tables go in chunks that
stay under the message limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mlmesh.serving.v2 import open_inference_pb2 as pb

if TYPE_CHECKING:  # pandas is imported where a table is read: `mlmesh run` and the workflow never pay for it
    import pandas as pd

NUMBER_DATATYPES = frozenset({"FP64", "FP32", "FP16", "INT64", "INT32", "INT16", "INT8", "UINT64", "UINT32"})
# Bytes a value may take in a request, for chunking: 8 for a number; text is measured.
_NUMBER_BYTES = 10
_OVERHEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class ServedAnswer:
    """What the workflow's and `mlmesh run`'s rollout step reports: who answered the smoke request."""

    name: str
    version: str
    predicted: str


def _texts(values: pd.Series) -> list[bytes]:
    import pandas as pd

    if pd.api.types.is_datetime64_any_dtype(values):
        return [b"" if pd.isna(v) else pd.Timestamp(v).isoformat().encode() for v in values]
    out = []
    for value in values.tolist():
        if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA or value is pd.NaT:
            out.append(b"")
        elif isinstance(value, bytes):
            out.append(value)
        elif isinstance(value, float) and value == int(value):
            out.append(str(int(value)).encode())  # 3.0 read from a file is the level "3"
        else:
            out.append(str(value).encode())
    return out


def add_column(request: pb.ModelInferRequest, name: str, datatype: str, values: pd.Series) -> None:
    """One input tensor: numbers as FP64 when the model takes numbers, text otherwise."""
    import pandas as pd

    tensor = request.inputs.add(name=name, shape=[len(values)])
    if datatype in NUMBER_DATATYPES:
        tensor.datatype = "FP64"
        tensor.contents.fp64_contents.extend(pd.to_numeric(values, errors="raise").astype("float64").tolist())
    elif datatype == "BOOL" and pd.api.types.is_bool_dtype(values):
        tensor.datatype = "BOOL"
        tensor.contents.bool_contents.extend(values.tolist())
    else:
        tensor.datatype = "BYTES"
        tensor.contents.bytes_contents.extend(_texts(values))


def frame_request(
    name: str, version: str, metadata: pb.ModelMetadataResponse, frame: pd.DataFrame
) -> pb.ModelInferRequest:
    """The rows of `frame` as a request; its columns must include every input the model lists."""
    request = pb.ModelInferRequest(model_name=name, model_version=version)
    for tensor in metadata.inputs:
        add_column(request, tensor.name, tensor.datatype, frame[tensor.name])
    return request


def smoke_request(name: str, version: str, metadata: pb.ModelMetadataResponse) -> pb.ModelInferRequest:
    """One row of missing values: the fitted imputers fill it, so any served model answers it."""
    request = pb.ModelInferRequest(model_name=name, model_version=version, id="smoke")
    for tensor in metadata.inputs:
        sent = request.inputs.add(name=tensor.name, shape=[1])
        if tensor.datatype in NUMBER_DATATYPES or tensor.datatype == "BOOL":
            sent.datatype = "FP64"
            sent.contents.fp64_contents.append(float("nan"))
        else:
            sent.datatype = "BYTES"
            sent.contents.bytes_contents.append(b"")
    return request


def decode(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """The response's outputs as arrays (BYTES as str), typed or raw."""
    outputs: dict[str, np.ndarray] = {}
    for position, tensor in enumerate(response.outputs):
        shape = [int(d) for d in tensor.shape]
        if response.raw_output_contents:
            data = response.raw_output_contents[position]
            if tensor.datatype == "BYTES":
                items, offset = [], 0
                while offset < len(data):
                    length = int.from_bytes(data[offset : offset + 4], "little")
                    items.append(data[offset + 4 : offset + 4 + length].decode("utf-8", "replace"))
                    offset += 4 + length
                outputs[tensor.name] = np.asarray(items, dtype=object).reshape(shape)
            else:
                outputs[tensor.name] = np.frombuffer(data, dtype="<f8").reshape(shape)
        elif tensor.datatype == "BYTES":
            texts = [b.decode("utf-8", "replace") for b in tensor.contents.bytes_contents]
            outputs[tensor.name] = np.asarray(texts, dtype=object).reshape(shape)
        else:
            outputs[tensor.name] = np.asarray(tensor.contents.fp64_contents, dtype="float64").reshape(shape)
    return outputs


def row_chunks(frame: pd.DataFrame, metadata: pb.ModelMetadataResponse, max_bytes: int) -> Iterator[slice]:
    """Row ranges whose requests stay well under `max_bytes` (half of it, for the encoding's overhead)."""
    import pandas as pd

    per_row = 0
    sample = frame.head(1000)
    for tensor in metadata.inputs:
        if tensor.datatype in NUMBER_DATATYPES:
            per_row += _NUMBER_BYTES
        else:
            lengths = sample[tensor.name].astype("str").str.len() if len(sample) else pd.Series([0])
            per_row += int(lengths.max() or 0) + 8
    rows = max(1, (max_bytes // 2 - _OVERHEAD_BYTES) // max(per_row, 1))
    for start in range(0, len(frame), rows):
        yield slice(start, min(start + rows, len(frame)))


def predictions_frame(outputs: dict[str, np.ndarray], version: str) -> pd.DataFrame:
    """The prediction columns `mlmesh predict` adds: predicted, probability_<class> per class, model_version."""
    import pandas as pd

    columns: dict[str, Any] = {"predicted": outputs["predicted"]}
    if "probabilities" in outputs and "classes" in outputs:
        for index, name in enumerate(outputs["classes"]):
            columns[f"probability_{name}"] = outputs["probabilities"][:, index]
    columns["model_version"] = np.full(len(outputs["predicted"]), int(version), dtype="int64")
    return pd.DataFrame(columns)
