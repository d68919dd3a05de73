"""The Axion path, on every change: linux/arm64 images, built and run under emulation.

tests/docker_harness.py registers Debian's qemu-user-static with binfmt_misc (when it can), builds
an arm64 base image with `debootstrap --arch=arm64`, then the service and pipeline images from
deploy/Dockerfile, unchanged, with BuildKit and `--platform linux/arm64`. Here:

- the images say arm64, and their interpreter and native extensions are AArch64 ELF files;
- deploy/docker-compose.yml runs the six stages from them: healthy through the images' own gRPC
  healthcheck, reached from the host by grpcurl;
- the pipeline service runs `pyflyte run` to a decision;
- the same run on this machine's own (x86-64) images, with the same inputs and seed, is compared
  with it artifact by artifact: digests first, then, where the bytes differ, every number in them.
  docs/deploy.md states the result (section "Axion (linux/arm64)"), and the test holds it to that.

A machine whose kernel cannot run arm64 binaries (no binfmt_misc, or no root to register qemu)
skips with the reason, except with CI=true, where that is a failure.
"""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.runtime.catalog import STAGES
from services.runtime.settings import DEFAULT_PORTS
from tests.docker_harness import (
    ARM64,
    FIGURES,
    HOST,
    ROOT,
    Engine,
    Images,
    Stack,
    base_image,
    build_images,
    compose_stack,
    grpcurl,
    image_inspect,
    print_figures,
    published,
    run,
    tail,
)

# Emulated builds and runs are slow: give them room, and keep them out of the fast tier.
pytestmark = [pytest.mark.timeout(3600), pytest.mark.docker, pytest.mark.network, pytest.mark.slow]

DEPLOY_DOC = ROOT / "docs" / "deploy.md"
# Under emulation a stage takes a while to import scikit-learn and start serving, and each health
# check (a new Python process importing grpcio) takes seconds of CPU: at compose's 5 s interval the
# six checks alone would fill two cores and time out. docs/deploy.md gives the same settings.
HEALTHY_WITHIN = 600
EMULATED_HEALTHCHECKS = {
    "MLMESH_HEALTHCHECK_INTERVAL": "20s",
    "MLMESH_HEALTHCHECK_TIMEOUT": "15s",
    "MLMESH_HEALTHCHECK_START_PERIOD": "300s",
}
# The run both architectures make: the compose pipeline's defaults, as JSON.
PIPELINE_JSON = ("run", "--rm", "-e", "MLMESH_OUTPUT=json", "pipeline")
PRINT_FINGERPRINT = "import json; from services.runtime.stage import ENVIRONMENT_FINGERPRINT as e; print(json.dumps(e))"
# Which stage writes each artifact of the run's lineage.
PRODUCER = {
    "dataset": "loader",
    "schema": "loader",
    "profile": "loader",
    "train": "preprocess",
    "test": "preprocess",
    "split_report": "preprocess",
    "x_train": "features",
    "x_test": "features",
    "y_train": "features",
    "y_test": "features",
    "transformer": "features",
    "feature_schema": "features",
    "model": "trainer",
    "metrics_report": "evaluator",
    "html_report": "evaluator",
}


@pytest.fixture(scope="module", autouse=True)
def figures(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    print_figures(request)


@pytest.fixture(scope="module")
def arm64_images(engine: Engine) -> Images:
    if HOST == ARM64:
        pytest.fail("this machine is arm64 itself: tests/test_compose.py already runs these images natively")
    return build_images(engine, ARM64, prometheus=False)


@pytest.fixture(scope="module")
def arm64_stack(arm64_images: Images) -> Iterator[Stack]:
    with compose_stack(arm64_images, healthy_within=HEALTHY_WITHIN, variables=EMULATED_HEALTHCHECKS) as stack:
        yield stack


# ---- the images --------------------------------------------------------------------------------
def elf_machine(header: bytes) -> int:
    """e_machine of a 64-bit little-endian ELF file (183 is AArch64, 62 x86-64)."""
    assert header[:4] == b"\x7fELF" and header[4] == 2 and header[5] == 1, header[:8]
    return int.from_bytes(header[18:20], "little")


NATIVE_FILES = (
    "import importlib.util as u, os, platform, sys; "
    "print(platform.machine()); print(os.path.realpath(sys.executable)); "
    "[print(u.find_spec(m).origin) for m in sys.argv[1:]]"
)
NATIVE_MODULES = ("numpy._core._multiarray_umath", "grpc._cython.cygrpc", "sklearn.utils._random")


def test_the_images_are_arm64_through_and_through(arm64_images: Images) -> None:
    engine = arm64_images.engine
    for image in (base_image(ARM64), arm64_images.service, arm64_images.pipeline):
        meta = image_inspect(engine, image)
        assert (meta["Os"], meta["Architecture"]) == ("linux", "arm64"), (image, meta["Architecture"])
    for image in (arm64_images.service, arm64_images.pipeline):
        found = run(
            [
                engine.docker,
                "run",
                "--rm",
                "--entrypoint",
                "/opt/venv/bin/python",
                image,
                "-c",
                NATIVE_FILES,
                *NATIVE_MODULES,
            ],
            timeout=300,
        )
        assert found.returncode == 0, found.stderr
        machine, *paths = found.stdout.split()
        assert machine == "aarch64" and len(paths) == 1 + len(NATIVE_MODULES), found.stdout
        # The files themselves, read on the host: AArch64 code, whatever the container claims.
        container = run([engine.docker, "create", image], timeout=60).stdout.strip()
        try:
            for path in paths:
                copied = subprocess.run(
                    [engine.docker, "cp", f"{container}:{path}", "-"], capture_output=True, timeout=120
                )
                assert copied.returncode == 0, copied.stderr[-500:]
                # `docker cp ... -` writes a tar stream: the file's bytes follow a 512-byte header.
                assert elf_machine(copied.stdout[512:532]) == ARM64.elf_machine, (image, path)
        finally:
            run([engine.docker, "rm", "-f", container], timeout=60)


# ---- the stack ---------------------------------------------------------------------------------
def test_every_arm64_stage_is_healthy_and_answers_grpcurl(arm64_stack: Stack) -> None:
    for stage in STAGES:
        state = arm64_stack.inspect(stage)
        assert state["Status"] == "running" and state["Health"]["Status"] == "healthy", (stage, state)
        last = state["Health"]["Log"][-1]
        assert last["ExitCode"] == 0 and last["Output"].strip() == f"127.0.0.1:{DEFAULT_PORTS[stage]}: SERVING"
        check = grpcurl(published(arm64_stack, stage), "grpc.health.v1.Health/Check")
        assert check.returncode == 0 and json.loads(check.stdout) == {"status": "SERVING"}, (stage, check.stderr)
    loader = published(arm64_stack, "loader")
    listed = grpcurl(loader, "list")
    assert {"mlmesh.loader.v1.LoaderService", "grpc.health.v1.Health"} <= set(listed.stdout.split()), listed.stderr
    loaded = grpcurl(
        "-d", '{"source": "/data/houses.csv", "target_column": "price"}', loader, "mlmesh.loader.v1.LoaderService/Load"
    )
    assert loaded.returncode == 0 and json.loads(loaded.stdout)["rows"] == "60", loaded.stderr


def pipeline_result(stack: Stack, label: str) -> dict[str, Any]:
    """`compose run --rm pipeline` with MLMESH_OUTPUT=json: the workflow's whole result."""
    started = time.monotonic()
    result = stack.compose(*PIPELINE_JSON, timeout=2400)
    FIGURES[f"pipeline in compose, cold, {label}"] = f"{time.monotonic() - started:.1f}s"
    assert result.returncode == 0, tail(result.stdout, 60) + tail(result.stderr, 60) + stack.logs()
    # pyflyte prints a line of its own first; the result is the JSON object after it.
    return json.loads(result.stdout[result.stdout.index("{") :])


def artifact_bytes(stack: Stack, ref: dict[str, Any]) -> bytes:
    path = ref["uri"].removeprefix("file://")
    assert path.startswith("/artifacts/objects/"), ref["uri"]
    command = [*stack.engine.compose, "-p", stack.project, "-f", str(ROOT / "deploy" / "docker-compose.yml")]
    read = subprocess.run(
        [*command, "exec", "-T", "evaluator", "cat", path], capture_output=True, timeout=120, env=stack.env
    )
    assert read.returncode == 0, read.stderr[-500:]
    return read.stdout


# ---- comparing two artifacts number by number ----------------------------------------------------
def numbers_in(value: Any, path: str = "", depth: int = 0) -> Iterator[tuple[str, Any]]:
    """(path, leaf) for every leaf: numbers as floats, arrays element-wise (as one array), the rest as is."""
    if depth > 12:
        yield path, repr(value)[:200]
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from numbers_in(value[key], f"{path}/{key}", depth + 1)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from numbers_in(item, f"{path}[{index}]", depth + 1)
    elif isinstance(value, np.ndarray | bool | str | bytes) or value is None:
        yield path, value
    elif isinstance(value, int | float | np.number):
        yield path, float(value)
    elif hasattr(value, "__dict__"):  # a fitted estimator: its learned attributes
        yield path + ":" + type(value).__name__, "type"
        yield from numbers_in(vars(value), path, depth + 1)
    else:
        yield path, repr(value)[:200]


NUMBER = r"-?\d+\.\d+(?:e-?\d+)?"


def decoded(media_type: str, data: bytes) -> Any:
    if media_type == "application/x-npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if media_type == "application/vnd.apache.arrow.file":
        import pyarrow as pa

        table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
        return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    if media_type == "application/json":
        document = json.loads(data)
        # A report's provenance names the stages' own runs (times, run ids, cache keys), which differ
        # between any two stores, of one architecture or two: not a result.
        if isinstance(document, dict):
            document.pop("provenance", None)
        return document
    if media_type == "application/vnd.skops":
        import skops.io

        return skops.io.loads(data, trusted=skops.io.get_untrusted_types(data=data))  # our own artifacts
    if media_type == "text/html":
        text = data.decode()
        # The page's plots are drawn from the metrics report, compared on its own: a curve's points
        # can come and go where its thresholds differ in their last bits. Here: which plots there
        # are, and everything outside them, the numbers (metrics, tables) and the words around them.
        plots = re.findall(r"<svg\b[^>]*>", text)
        rest = re.sub(r"<svg\b.*?</svg>", "<svg/>", text, flags=re.S)
        # Its "What ran" card is the provenance (above), in HTML.
        rest = re.sub(r'<section class="card what-ran">.*?</section>', "", rest, flags=re.S)
        return {
            "plots": plots,
            "numbers": [float(n) for n in re.findall(NUMBER, rest)],
            "words": re.sub(NUMBER, "#", rest),
        }
    raise AssertionError(f"no comparison for {media_type}")


def compare(media_type: str, a: bytes, b: bytes) -> tuple[float, list[str]]:
    """The largest absolute difference between the two artifacts' numbers, and whatever else differs."""
    left, right = dict(numbers_in(decoded(media_type, a))), dict(numbers_in(decoded(media_type, b)))
    problems = [f"only in one: {path}" for path in sorted(left.keys() ^ right.keys())[:5]]
    largest = 0.0
    for path in sorted(left.keys() & right.keys()):
        x, y = left[path], right[path]
        if isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.dtype.kind in "fc" and y.dtype.kind in "fc":
            if x.shape != y.shape or not np.array_equal(np.isnan(x), np.isnan(y)):
                problems.append(f"{path}: shapes {x.shape} and {y.shape}, or gaps, differ")
            elif x.size:
                largest = max(largest, float(np.nanmax(np.abs(x - y), initial=0.0)))
        elif isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and np.array_equal(x, y)):
                problems.append(f"{path}: arrays differ")
        elif isinstance(x, float) and isinstance(y, float):
            if not (math.isnan(x) and math.isnan(y)):
                largest = max(largest, abs(x - y))
        elif x != y:
            problems.append(f"{path}: {str(x)[:60]!r} != {str(y)[:60]!r}")
    return largest, problems[:8]


def documented_comparison() -> dict[str, str]:
    """docs/deploy.md's table: artifact -> "byte-identical" or "numerically equal"."""
    section = DEPLOY_DOC.read_text().split("### Across architectures", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| \w+ \| (byte-identical|numerically equal)", section, re.M)
    return dict(rows)


# ---- the pipeline, and the comparison --------------------------------------------------------------
def test_arm64_pipeline_decides_and_matches_the_x86_run(arm64_stack: Stack, images: Images, tmp_path: Path) -> None:
    arm = pipeline_result(arm64_stack, "arm64 (emulated)")
    assert arm["decision"] == "PROMOTE" and arm["registered_as"], {k: arm[k] for k in ("decision", "reasons")}
    with compose_stack(images) as x86_stack:
        x86 = pipeline_result(x86_stack, HOST.arch)
        assert (arm["decision"], arm["reasons"]) == (x86["decision"], x86["reasons"])
        assert arm["metrics"].keys() == x86["metrics"].keys()
        metric_gap = max(abs(arm["metrics"][k] - x86["metrics"][k]) for k in arm["metrics"])
        rows, observed, largest, unequal = [], {}, 0.0, []
        for name in sorted(PRODUCER, key=lambda n: (STAGES.index(PRODUCER[n]), n)):
            mine, theirs = arm["lineage"][name], x86["lineage"][name]
            assert mine["media_type"] == theirs["media_type"], name
            if mine["sha256"] == theirs["sha256"]:
                observed[name], detail = "byte-identical", ""
            else:
                arm_bytes, x86_bytes = artifact_bytes(arm64_stack, mine), artifact_bytes(x86_stack, theirs)
                gap, problems = compare(mine["media_type"], arm_bytes, x86_bytes)
                observed[name], detail = "numerically equal", f"largest |difference| {gap:.3g}"
                largest = max(largest, gap)
                if problems:
                    # Kept for a look: the two files side by side.
                    suffix = Path(mine["uri"]).suffix
                    (tmp_path / f"{name}.arm64{suffix}").write_bytes(arm_bytes)
                    (tmp_path / f"{name}.x86{suffix}").write_bytes(x86_bytes)
                    unequal.append(f"{name}: {'; '.join(problems)} (both files in {tmp_path})")
            rows.append(f"{name} ({PRODUCER[name]}): {observed[name]} {detail}".rstrip())
        FIGURES["metrics, largest |arm64 - x86|"] = f"{metric_gap:.3g}"
        FIGURES["artifacts, arm64 vs x86"] = "\n  " + "\n  ".join(rows)
        # The cache key says so: the same request gets a different key on each, the instruction set
        # being part of it, so a store shared by both never answers one with the other's result.
        keys, machines = {}, {}
        for label, stack in (("arm64", arm64_stack), ("x86", x86_stack)):
            loaded = grpcurl(
                "-d", '{"source": "sklearn:wine"}', published(stack, "loader"), "mlmesh.loader.v1.LoaderService/Load"
            )
            assert loaded.returncode == 0, loaded.stderr
            keys[label] = json.loads(loaded.stdout)["stage"]["cache_key"]  # grpcurl keeps the proto names
            fingerprint = stack.compose("exec", "-T", "loader", "python", "-c", PRINT_FINGERPRINT, timeout=300)
            assert fingerprint.returncode == 0, fingerprint.stderr
            machines[label] = json.loads(fingerprint.stdout)["machine"]
        assert machines == {"arm64": ARM64.machine, "x86": HOST.machine}
        assert keys["arm64"] != keys["x86"], keys
    # Numerically equal means equal to well within what any metric or threshold could notice.
    assert not unequal, "\n".join(unequal + rows)
    assert metric_gap <= 1e-9 and largest <= 1e-6, (metric_gap, largest, rows)
    # docs/deploy.md tells users which is which; it must say what this run saw.
    assert documented_comparison() == observed, "\n".join(rows)
