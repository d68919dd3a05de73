"""A steady load of inference requests through tritonclient.grpc.aio, until told to stop.

Run by .venv-clients/bin/python (tritonclient needs protobuf<7; mlmesh protobuf 7):

    python triton_load.py PLAN.json OUT.jsonl STOP_FILE

PLAN: {"address": ..., "concurrency": 16, "models": [{"name": ..., "columns": [{name, datatype, values}]}]}.
Each of `concurrency` workers sends requests back to back, the models in turn, until STOP_FILE
exists. Every request is one line of OUT (written as it ends, so a test can follow it):

    {"model", "start", "end" (time.time()), "version" (the response's model_version, "" on an
     error), "answer" (a digest of the outputs), "error" (the gRPC status name, "" when OK), "message"}

At the end it prints a summary: {"requests", "errors", "versions": {model: {version: count}}}.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import sys
import time
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

NUMPY = {"FP64": np.float64, "INT64": np.int64, "BOOL": np.bool_}


def inputs(columns: list[dict[str, Any]]) -> list[grpcclient.InferInput]:
    made = []
    for column in columns:
        if column["datatype"] == "BYTES":
            data = np.asarray([str(v).encode("utf-8") for v in column["values"]], dtype=np.object_)
        else:
            data = np.asarray([np.nan if v is None else v for v in column["values"]], dtype=NUMPY[column["datatype"]])
        tensor = grpcclient.InferInput(column["name"], list(data.shape), column["datatype"])
        tensor.set_data_from_numpy(data)
        made.append(tensor)
    return made


def digest(result: Any) -> str:
    """The outputs' bytes, hashed: one model version gives one answer for the same rows."""
    hashed = hashlib.sha256()
    for tensor in result.get_response().outputs:
        values = result.as_numpy(tensor.name)
        hashed.update(tensor.name.encode())
        hashed.update(b"".join(values.ravel()) if values.dtype == np.object_ else values.tobytes())
    return hashed.hexdigest()[:16]


async def main() -> None:
    plan_path, out_path, stop_path = sys.argv[1:4]
    with open(plan_path) as handle:
        plan = json.load(handle)
    models = plan["models"]
    client = aioclient.InferenceServerClient(plan["address"])
    counts: dict[str, collections.Counter] = {m["name"]: collections.Counter() for m in models}
    totals = collections.Counter()
    out = open(out_path, "a", buffering=1)  # noqa: SIM115 - line-buffered for the whole run

    async def worker(index: int) -> None:
        turn = index
        while not os.path.exists(stop_path):
            model = models[turn % len(models)]
            turn += 1
            record: dict[str, Any] = {
                "model": model["name"],
                "start": time.time(),
                "version": "",
                "answer": "",
                "error": "",
                "message": "",
            }
            try:
                result = await client.infer(model["name"], inputs(model["columns"]), client_timeout=30)
                record["version"] = result.get_response().model_version
                record["answer"] = digest(result)
            except InferenceServerException as error:
                record["error"] = str(error.status() or "UNKNOWN").removeprefix("StatusCode.")
                record["message"] = (error.message() or "")[:300]
            record["end"] = time.time()
            totals["requests"] += 1
            totals["errors"] += bool(record["error"])
            counts[model["name"]][record["version"] or record["error"]] += 1
            out.write(json.dumps(record) + "\n")

    try:
        await asyncio.gather(*(worker(i) for i in range(int(plan.get("concurrency", 16)))))
    finally:
        await client.close()
        out.close()
    print(json.dumps({**totals, "versions": {name: dict(c) for name, c in counts.items()}}))


if __name__ == "__main__":
    asyncio.run(main())
