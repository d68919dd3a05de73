"""The load generator of bench/bench_serving.py: tritonclient's asyncio gRPC client against each server.

    .venv/bin/python bench/bench_serving.py     # runs this file as: .venv-clients/bin/python bench/serving_client.py SPEC OUT

It runs in .venv-clients (tritonclient requires protobuf<7, mlmesh protobuf 7),
so it imports nothing of mlmesh. SPEC, a JSON file that bench_serving.py
writes, names the servers (address, model, the output that holds the
prediction, whether that output is a class code or a class name), the rows
(a .npy of float64, one column per model input) and the cases. Every server
gets the same requests: one FP64 tensor of shape [rows] per column, sent as
raw_input_contents (tritonclient's way), with the request parameter
content_type "pd" (MLServer's pandas codec: the columns become one DataFrame;
mlmesh ignores the parameter) and one requested output.

A case is closed-loop: `concurrency` callers share one client (one channel)
and each sends its next request as soon as the last one answers, for
`seconds`, after a warm-up. Rows go round the table in order, one row per
request at batch 1; a larger batch is the table repeated up to that many
rows. The runs interleave the servers (run 1 of every server and case, then
run 2, ...; the servers' order turns each run), so a change in the
machine's load is shared. Around each measurement, the CPU time of each
server's process tree, of this client and of the whole machine is read from
/proc, so the report can say where the two cores went.

Every answer is checked: a row's class must be the one the server gave for
that row in one request of the whole table, and the servers must agree on
the whole table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_tree(root: int) -> list[int]:
    """`root` and every process below it, from /proc (MLServer's inference workers are its children)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (their own threads; children they reaped excluded)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU time every core spent on anything but idle and iowait, since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class Target:
    """One server: its client, and how to read the predicted class out of an answer."""

    def __init__(self, spec: dict[str, Any], class_names: list[str]):
        import tritonclient.grpc.aio as grpcclient
        from tritonclient.grpc import InferRequestedOutput

        self.label: str = spec["label"]
        self.model: str = spec["model"]
        self.output: str = spec["output"]
        self.codes: bool = spec["codes"]
        self.pid: int = spec["pid"]
        self.client = grpcclient.InferenceServerClient(spec["address"])
        self.outputs = [InferRequestedOutput(self.output)]
        self.class_names = class_names

    def classes(self, result: Any) -> list[str]:
        values = result.as_numpy(self.output).reshape(-1)
        if self.codes:
            return [self.class_names[int(code)] for code in values]
        return [value.decode() if isinstance(value, bytes) else str(value) for value in values]


def build_inputs(block: Any, columns: list[str]) -> list[Any]:
    import numpy as np
    from tritonclient.grpc import InferInput

    inputs = []
    for index, name in enumerate(columns):
        tensor = InferInput(name, [len(block)], "FP64")
        tensor.set_data_from_numpy(np.ascontiguousarray(block[:, index], dtype="float64"))
        inputs.append(tensor)
    return inputs


async def measure(
    target: Target,
    requests: list[list[Any]],
    expected: list[list[str]],
    concurrency: int,
    seconds: float,
    parameters: dict[str, Any],
) -> dict[str, Any]:
    """Closed loop for `seconds`: latencies, throughput, CPU, and answers that differ from `expected`."""
    latencies: list[float] = []
    wrong = 0
    errors: list[str] = []
    turn = 0
    deadline = 0.0

    async def caller() -> None:
        nonlocal turn, wrong
        while time.perf_counter() < deadline:
            index = turn % len(requests)
            turn += 1
            started = time.perf_counter()
            try:
                result = await target.client.infer(
                    target.model, requests[index], outputs=target.outputs, parameters=parameters
                )
            except Exception as exc:  # noqa: BLE001 - counted and reported: a benchmark keeps going
                errors.append(str(exc)[:300])
                continue
            latencies.append(time.perf_counter() - started)
            if target.classes(result) != expected[index]:
                wrong += 1

    tree = process_tree(target.pid)
    server_before, client_before, busy_before = cpu_seconds(tree), time.process_time(), machine_busy_seconds()
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    server_cpu = cpu_seconds(tree) - server_before
    client_cpu = time.process_time() - client_before
    busy = machine_busy_seconds() - busy_before
    count = len(latencies)
    rows = count * len(expected[0])
    return {
        "requests": count,
        "rows": rows,
        "seconds": elapsed,
        "requests_per_second": count / elapsed,
        "rows_per_second": rows / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "mean_ms": statistics.fmean(latencies) * 1000 if latencies else float("nan"),
        "wrong_answers": wrong,
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        # Where the machine's cores went during the run, in cores (CPU seconds per second).
        "server_cores": server_cpu / elapsed,
        "client_cores": client_cpu / elapsed,
        "other_cores": max(0.0, busy - server_cpu - client_cpu) / elapsed,
        "server_cpu_ms_per_request": server_cpu / count * 1000 if count else float("nan"),
    }


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    table = np.load(spec["rows_file"])
    columns: list[str] = spec["columns"]
    parameters: dict[str, Any] = spec["parameters"]
    targets = [Target(t, spec["class_names"]) for t in spec["targets"]]
    whole = build_inputs(table, columns)

    # The reference: each server's classes for the whole table in one request; they must agree.
    reference: dict[str, list[str]] = {}
    for target in targets:
        result = await target.client.infer(target.model, whole, outputs=target.outputs, parameters=parameters)
        reference[target.label] = target.classes(result)
    first = targets[0].label
    agreement = {
        t.label: sum(a != b for a, b in zip(reference[t.label], reference[first], strict=True)) for t in targets
    }
    truth = reference[first]

    cases = []
    for case in spec["cases"]:
        size = case["rows"]
        if size == 1:
            requests = [build_inputs(table[i : i + 1], columns) for i in range(len(table))]
            expected = [[truth[i]] for i in range(len(table))]
        else:
            picked = np.arange(size) % len(table)
            requests = [build_inputs(table[picked], columns)]
            expected = [[truth[i] for i in picked]]
        cases.append((case, requests, expected))

    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        t.label: {c["name"]: [] for c in spec["cases"]} for t in targets
    }
    for number in range(spec["runs"]):
        order = targets[number % len(targets) :] + targets[: number % len(targets)]
        for case, requests, expected in cases:
            for target in order:
                await measure(target, requests, expected, case["concurrency"], spec["warmup_seconds"], parameters)
                figures = await measure(target, requests, expected, case["concurrency"], spec["seconds"], parameters)
                if figures["requests"] == 0:
                    # A server that answers nothing has stopped: the rest of the runs would measure nothing.
                    raise SystemExit(f"{target.label} answered no request: {figures['first_error']}")
                runs[target.label][case["name"]].append(figures)
                print(
                    f"run {number + 1}/{spec['runs']} {case['name']:<26} {target.label:<22} "
                    f"{figures['requests_per_second']:8.1f} req/s  p50 {figures['p50_ms']:7.2f} ms  "
                    f"p99 {figures['p99_ms']:7.2f} ms  server {figures['server_cores']:.2f} cores  "
                    f"other {figures['other_cores']:.2f}",
                    flush=True,
                )
    for target in targets:
        await target.client.close()
    return {"reference_disagreements": agreement, "reference_classes": reference, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Drive Open Inference Protocol servers with tritonclient's asyncio gRPC client "
        "(started by bench/bench_serving.py, in .venv-clients)."
    )
    parser.add_argument("spec", type=Path, help="the JSON spec bench_serving.py writes")
    parser.add_argument("out", type=Path, help="where to write the measurements (JSON)")
    args = parser.parse_args()
    spec = json.loads(args.spec.read_text())
    args.out.write_text(json.dumps(asyncio.run(run(spec)), indent=1))


if __name__ == "__main__":
    main()
