"""tritonclient (unmodified, as an application installs it) against the serving stage.

Run by .venv-clients/bin/python (tritonclient needs protobuf<7; mlmesh protobuf 7):

    python triton_battery.py PLAN.json

PLAN names the address, the model to call with its columns (name, datatype, JSON values), and a
model this script may unload and load again. The same calls go through tritonclient.grpc (sync)
and tritonclient.grpc.aio; it prints one JSON document: {"sync": {step: result}, "aio": {...}},
where a result is the call's answer or {"error": <gRPC status name>, "message": ...}.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

NUMPY = {"FP64": np.float64, "INT64": np.int64, "BOOL": np.bool_, "FP32": np.float32, "INT32": np.int32}


def array(column: dict[str, Any]) -> np.ndarray:
    if column["datatype"] == "BYTES":
        return np.asarray([str(v).encode("utf-8") for v in column["values"]], dtype=np.object_)
    values = [np.nan if v is None else v for v in column["values"]]
    return np.asarray(values, dtype=NUMPY[column["datatype"]])


def inputs(columns: list[dict[str, Any]]) -> list[grpcclient.InferInput]:
    made = []
    for column in columns:
        data = array(column)
        tensor = grpcclient.InferInput(column["name"], list(data.shape), column["datatype"])
        tensor.set_data_from_numpy(data)
        made.append(tensor)
    return made


def status_name(error: InferenceServerException) -> str:
    # tritonclient keeps the gRPC code as text: "StatusCode.NOT_FOUND".
    return str(error.status() or "").removeprefix("StatusCode.")


def result_of(result: Any) -> dict[str, Any]:
    response = result.get_response()
    out: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "model_sha256": response.parameters["model_sha256"].string_param,
        "outputs": {o.name: {"datatype": o.datatype, "shape": list(o.shape)} for o in response.outputs},
        "raw_outputs": len(response.raw_output_contents),
    }
    for tensor in response.outputs:
        values = result.as_numpy(tensor.name)
        if values.dtype == np.object_:
            out[tensor.name] = [v.decode("utf-8") for v in values.ravel()]
        else:
            out[tensor.name] = values.tolist()
    return out


async def battery(client: Any, plan: dict[str, Any]) -> dict[str, Any]:
    """Every step, its answer or its error; the client is sync or aio (awaited when it must be)."""
    model, cycle, columns = plan["model"], plan["cycle_model"], plan["columns"]
    results: dict[str, Any] = {}

    async def step(name: str, call: Any, shape: Any = lambda r: r) -> None:
        try:
            value = call()
            if inspect.isawaitable(value):
                value = await value
            results[name] = shape(value)
        except InferenceServerException as error:
            results[name] = {"error": status_name(error), "message": error.message()}

    def infer(name: str = model, cols: Any = None, **kwargs: Any) -> Any:
        return client.infer(name, inputs(columns if cols is None else cols), **kwargs)

    await step("server_live", client.is_server_live)
    await step("server_ready", client.is_server_ready)
    await step("server_metadata", lambda: client.get_server_metadata(as_json=True))
    await step("model_ready", lambda: client.is_model_ready(model))
    await step("model_ready_version_1", lambda: client.is_model_ready(model, "1"))
    await step("model_ready_unknown", lambda: client.is_model_ready("no-such-model"))
    await step("model_metadata", lambda: client.get_model_metadata(model, as_json=True))
    await step("infer", infer, result_of)
    await step(
        "infer_predicted_only",
        lambda: infer(outputs=[grpcclient.InferRequestedOutput("predicted")], request_id="req-7"),
        lambda r: {**result_of(r), "id": r.get_response().id},
    )
    await step("infer_version_1", lambda: infer(model_version="1"), result_of)
    await step("repository_index", lambda: client.get_model_repository_index(as_json=True))

    # Errors, each with its own code.
    await step("infer_unknown_model", lambda: infer("no-such-model"))
    await step("infer_bad_version", lambda: infer(model_version="abc"))
    await step("infer_missing_version", lambda: infer(model_version="99"))
    await step("infer_missing_column", lambda: infer(cols=columns[1:]))
    await step(
        "infer_wrong_datatype",
        lambda: infer(
            cols=[{**columns[0], "datatype": "BYTES", "values": ["1"] * len(columns[0]["values"])}, *columns[1:]]
        ),
    )
    await step(
        "infer_unknown_column",
        lambda: infer(cols=[*columns, {"name": "no_such_column", "datatype": "FP64", "values": columns[0]["values"]}]),
    )
    await step("infer_unknown_output", lambda: infer(outputs=[grpcclient.InferRequestedOutput("nope")]))
    unseen = plan.get("unseen_column")
    if unseen:
        changed = [
            {**c, "values": ["never-seen-level"] * len(c["values"])} if c["name"] == unseen else c for c in columns
        ]
        await step("infer_unseen_level", lambda: infer(cols=changed))
        await step(
            "infer_unseen_level_encoded", lambda: infer(cols=changed, parameters={"unseen_levels": "encode"}), result_of
        )
    await step("load_unknown_model", lambda: client.load_model("no-such-model"))
    # tritonclient's load_model has no version argument: its `config` travels as the parameter
    # "config", which this server does not take (a version is pinned with the "version" parameter).
    await step(
        "load_with_config", lambda: client.load_model(cycle, config=json.dumps({"version_policy": {"latest": {}}}))
    )

    # The repository cycle, on a model of its own: unload, refused, load, answering again.
    cycle_columns = plan["cycle_columns"]
    await step("cycle_unload", lambda: client.unload_model(cycle))
    await step("cycle_ready_after_unload", lambda: client.is_model_ready(cycle))
    await step("cycle_infer_after_unload", lambda: infer(cycle, cycle_columns))
    await step(
        "cycle_index_after_unload",
        lambda: client.get_model_repository_index(as_json=True),
        lambda index: [m for m in index.get("models", []) if m["name"] == cycle],
    )
    await step("cycle_load", lambda: client.load_model(cycle))
    await step("cycle_ready_after_load", lambda: client.is_model_ready(cycle))
    await step("cycle_infer_after_load", lambda: infer(cycle, cycle_columns), result_of)
    return results


async def main() -> None:
    with open(sys.argv[1]) as handle:
        plan = json.load(handle)
    out: dict[str, Any] = {}
    sync = grpcclient.InferenceServerClient(plan["address"])
    try:
        out["sync"] = await battery(sync, plan)
    finally:
        sync.close()
    aio = aioclient.InferenceServerClient(plan["address"])
    try:
        out["aio"] = await battery(aio, plan)
    finally:
        await aio.close()
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
