"""The mesh as users run it: `mlmesh up` child processes, the CLI, and the real grpcurl."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.runtime.catalog import PIPELINE_STAGES, STAGES
from services.runtime.settings import DEFAULT_PORTS
from tests.helpers import free_ports, run_script, use_free_ports

# `mlmesh up` child processes, the CLI and grpcurl against them: minutes for the module.
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GRPCURL = BIN / "grpcurl"


class UpProcess:
    def __init__(self, env: dict[str, str], ports: dict[str, int], cwd: Path | None = None, args: tuple[str, ...] = ()):
        self.env, self.ports = env, ports
        self.process = subprocess.Popen(
            [str(BIN / "mlmesh"), "up", *args],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output: list[str] = []

    def wait_for(self, text: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line and self.process.poll() is not None:
                break
            self.output.append(line)
            if text in line:
                return
        raise AssertionError(f"{text!r} never appeared; output:\n{''.join(self.output)}")

    def stop(self) -> None:
        """SIGTERM, so `mlmesh up` stops its children (SIGKILL would orphan them); SIGKILL after 30 s."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def rest(self, timeout: float = 30) -> str:
        out, _ = self.process.communicate(timeout=timeout)
        return "".join(self.output) + out


@pytest.fixture(scope="module")
def mesh_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("artifacts")
    env = {**os.environ, "MLMESH_ARTIFACT_ROOT": str(root), "MLMESH_GRACE_SECONDS": "1"}
    use_free_ports(env)
    return env


@pytest.fixture(scope="module")
def running_mesh(mesh_env: dict[str, str]) -> Iterator[UpProcess]:
    ports = {s: int(mesh_env[f"MLMESH_{s.upper()}_PORT"]) for s in STAGES}
    up = UpProcess(mesh_env, ports)
    up.wait_for("mesh is up")
    yield up
    up.stop()


def mlmesh(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mlmesh"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def grpcurl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(GRPCURL), "-plaintext", *args], capture_output=True, text=True, timeout=60)


def test_status_reports_every_stage_serving(running_mesh: UpProcess, mesh_env: dict[str, str]) -> None:
    result = mlmesh(mesh_env, "status")
    assert result.returncode == 0, result.stdout + result.stderr
    for stage in STAGES:
        assert f"{stage}" in result.stdout
    assert result.stdout.count("SERVING") == len(STAGES)


def test_pipeline_end_to_end_then_all_cache_hits_and_lineage(running_mesh: UpProcess, mesh_env: dict[str, str]) -> None:
    first = mlmesh(mesh_env, "run", "--json", "--min", "accuracy=0.95")
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["decision"] == "PROMOTE" and summary["metrics"]["accuracy"] >= 0.95
    second = json.loads(mlmesh(mesh_env, "run", "--json", "--min", "accuracy=0.95").stdout)
    assert [s.get("cache_hit", False) for s in second["stages"]] == [True] * 5
    assert second["model"]["sha256"] == summary["model"]["sha256"]

    lineage = mlmesh(mesh_env, "lineage", summary["metrics_report"]["sha256"][:10])
    assert lineage.returncode == 0, lineage.stderr
    for stage in ("evaluator", "trainer", "features", "preprocess", "loader"):
        assert f"from {stage}" in lineage.stdout
    assert "sklearn:breast_cancer" in lineage.stdout


def test_grpcurl_lists_describes_checks_and_calls(running_mesh: UpProcess) -> None:
    loader = f"localhost:{running_mesh.ports['loader']}"
    listed = grpcurl(loader, "list")
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) >= {
        "mlmesh.loader.v1.LoaderService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    described = grpcurl(loader, "describe", "mlmesh.loader.v1.LoadRequest")
    assert described.returncode == 0 and "string source = 1;" in described.stdout

    health = grpcurl("-d", '{"service": "mlmesh.loader.v1.LoaderService"}', loader, "grpc.health.v1.Health/Check")
    assert health.returncode == 0 and json.loads(health.stdout) == {"status": "SERVING"}

    loaded = grpcurl("-d", '{"source": "sklearn:iris"}', loader, "mlmesh.loader.v1.LoaderService/Load")
    assert loaded.returncode == 0, loaded.stderr
    reply = json.loads(loaded.stdout)
    assert reply["rows"] == "150" and reply["task_kind"] == "TASK_KIND_CLASSIFICATION"
    assert len(reply["dataset"]["sha256"]) == 64 and reply["dataset"]["uri"].startswith("file://")

    bad = grpcurl("-d", '{"source": "sklearn:nope"}', loader, "mlmesh.loader.v1.LoaderService/Load")
    assert bad.returncode != 0
    assert "InvalidArgument" in bad.stderr and "unknown sklearn dataset 'nope'" in bad.stderr

    trainer = f"localhost:{running_mesh.ports['trainer']}"
    stream = grpcurl("-d", '{"model": "random_forest"}', trainer, "mlmesh.trainer.v1.TrainerService/Train")
    assert "x_train is required" in stream.stderr


def json_objects(text: str) -> list[dict]:
    """Consecutive JSON objects, as grpcurl prints them one after another."""
    decoder, objects, position = json.JSONDecoder(), [], 0
    while (position := len(text) - len(text[position:].lstrip())) < len(text):
        found, position = decoder.raw_decode(text, position)
        objects.append(found)
    return objects


def page_sh_blocks(doc: str, heading: str | None = None) -> list[str]:
    """The ```sh blocks of a page of the docs (`doc`, from the repository root), as written: all of
    them, or those of the section under `## heading` (its subsections included)."""
    text = (ROOT / doc).read_text()
    if heading is not None:
        text = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", text, re.S)


def test_docs_grpcurl_commands_run_as_written(running_mesh: UpProcess, tmp_path: Path) -> None:
    """Every block of docs/grpcurl.md, in one shell, against one mesh."""
    script = "\n".join(page_sh_blocks("docs/grpcurl.md"))
    assert "TrainerService/Train" in script and "column_roles" in script
    script = script.replace("G=.venv/bin/grpcurl", f"G={GRPCURL}")
    for stage, port in running_mesh.ports.items():
        script = script.replace(f"localhost:{DEFAULT_PORTS[stage]}", f"localhost:{port}")
    result = run_script(script, tmp_path)
    replies = json_objects(result.stdout[result.stdout.index('"status": "SERVING"') :].split("}", 1)[1])
    loads = [r for r in replies if "dataset" in r]
    houses = next(r for r in loads if r["target_column"] == "price")
    assert houses["task_kind"] == "TASK_KIND_REGRESSION"
    roles = {c["name"]: (c["role"], c.get("overridden", False)) for c in houses["columns"]}
    assert roles == {
        "zip": ("COLUMN_ROLE_CATEGORICAL", True),
        "row_id": ("COLUMN_ROLE_IGNORE", True),
        "rooms": ("COLUMN_ROLE_NUMERIC", False),
    }
    progress = [r["progress"] for r in replies if "progress" in r]
    [result_event] = [r["result"] for r in replies if "result" in r]
    assert progress and progress[-1]["fraction_done"] == 1
    assert result_event["model_name"] == "random_forest" and len(result_event["model"]["sha256"]) == 64
    # StartTraining, then the google.longrunning.Operations calls on its name.
    operations = [r for r in replies if str(r.get("name", "")).startswith("operations/train-")]
    assert len(operations) == 2 and len({op["name"] for op in operations}) == 1  # waited for, then read
    assert operations[-1]["done"] and operations[-1]["response"]["@type"].endswith("mlmesh.trainer.v1.TrainResult")
    assert operations[-1]["response"]["model"]["sha256"] != result_event["model"]["sha256"]  # 300 trees, not 200


def write_house_prices(folder: Path, rows: int = 400) -> Path:
    """A small table like the docs' data.csv: a zip code stored as a number, a row id, a price."""
    import numpy as np
    import pandas as pd

    rng = np.random.RandomState(0)
    zips = rng.choice([2134, 10001, 94105, 60601], size=rows)
    rooms = rng.randint(1, 6, size=rows)
    price = 100 * rooms + np.select([zips == 94105, zips == 10001], [900, 600], 200) + rng.normal(0, 20, rows)
    frame = pd.DataFrame({"row_id": np.arange(rows), "zip": zips, "rooms": rooms, "price": price.round(2)})
    path = folder / "data.csv"
    frame.to_csv(path, index=False)
    return path


def test_docs_mlmesh_run_commands_run_as_written(
    running_mesh: UpProcess, mesh_env: dict[str, str], tmp_path: Path
) -> None:
    write_house_prices(tmp_path)
    lines = [
        line.split("  #")[0]
        for line in page_sh_blocks("docs/cli.md", "Running the mesh yourself")[0].splitlines()
        if line.startswith(".venv/bin/mlmesh run ")
    ]
    assert len(lines) == 3
    summaries = []
    for line in lines:
        argv = [*shlex.split(line.replace(".venv/bin/", f"{BIN}/")), "--json"]
        result = subprocess.run(argv, env=mesh_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, line + "\n" + result.stdout[-2000:] + result.stderr[-2000:]
        summaries.append(json.loads(result.stdout))
    wine, ridge, overridden = summaries
    assert wine["task_kind"] == "classification" and wine["metrics"]["accuracy"] >= 0.9
    assert ridge["task_kind"] == "regression" and "rmse" in ridge["metrics"] and "accuracy" not in ridge["metrics"]
    roles = {c["name"]: c["role"] for c in ridge["columns"]}
    assert roles["row_id"] == "identifier" and roles["zip"] == "numeric"  # a number unless declared otherwise
    roles = {c["name"]: (c["role"], c.get("overridden", False)) for c in overridden["columns"]}
    assert roles["zip"] == ("categorical", True) and roles["row_id"] == ("ignore", True)
    # Declared categorical, the zip code separates the price levels a linear model could not.
    assert overridden["metrics"]["r2"] > ridge["metrics"]["r2"] + 0.1
    assert overridden["decision"] == "PROMOTE" and any("regression default" in r for r in overridden["reasons"])


def test_stopped_stage_is_named_with_its_address(running_mesh: UpProcess, mesh_env: dict[str, str]) -> None:
    env = {
        **mesh_env,
        "MLMESH_TRAINER_ADDRESS": f"localhost:{free_ports(1)[0]}",
        "MLMESH_RPC_TIMEOUT_SECONDS": "10",
        # How long the client waits for a stage to come back is not what this checks: the default
        # (120 s, for a restart) would only make the test wait.
        "MLMESH_RECONNECT_SECONDS": "2",
    }
    result = mlmesh(env, "run", "--force")
    assert result.returncode == 2
    assert "trainer at localhost:" in result.stderr and "UNAVAILABLE" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_second_up_over_a_running_mesh_says_so_and_exits_non_zero(
    running_mesh: UpProcess, mesh_env: dict[str, str]
) -> None:
    second = subprocess.run([str(BIN / "mlmesh"), "up"], env=mesh_env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1, second.stdout + second.stderr
    assert "mesh is up" not in second.stdout
    port = running_mesh.ports["loader"]
    assert f"port {port} for loader" in second.stderr and "another mlmesh mesh" in second.stderr
    assert "MLMESH_LOADER_PORT" in second.stderr
    # The first mesh is untouched, and commands that only need a mesh for a while use it.
    assert mlmesh(mesh_env, "status").returncode == 0
    borrowed = mlmesh(mesh_env, "with-mesh", "--", str(BIN / "mlmesh"), "status")
    assert borrowed.returncode == 0, borrowed.stderr
    assert "using the mesh already serving" in borrowed.stderr and borrowed.stdout.count("SERVING") == len(STAGES)
    assert mlmesh(mesh_env, "status").returncode == 0  # ...and leave it running


def _ancestors(pid: int) -> set[int]:
    found = set()
    while pid > 1:
        try:
            # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ')'.
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
        found.add(pid)
    return found


def stage_pid(up: UpProcess, stage: str) -> int:
    """The stage process this `mlmesh up` started, found by the name it gives it, as an operator would."""
    named = subprocess.run(["pgrep", "-x", stage], capture_output=True, text=True).stdout.split()
    found = [int(pid) for pid in named if up.process.pid in _ancestors(int(pid))]
    assert found, f"no process named {stage} under mlmesh up"
    return found[0]


def test_up_restarts_a_killed_stage_and_status_counts_it(running_mesh: UpProcess, mesh_env: dict[str, str]) -> None:
    killed = stage_pid(running_mesh, "features")
    os.kill(killed, signal.SIGKILL)
    running_mesh.wait_for("features exited with status -9; restarting in 1s")
    running_mesh.wait_for("features restarted")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = mlmesh(mesh_env, "status")
        if status.returncode == 0:
            break
        time.sleep(0.5)
    assert status.returncode == 0, status.stdout
    line = next(row for row in status.stdout.splitlines() if row.startswith("features"))
    assert "SERVING" in line and "restarts 1" in line and str(killed) not in line
    assert stage_pid(running_mesh, "features") != killed
    # The restarted stage serves the pipeline again.
    assert mlmesh(mesh_env, "run", "--json").returncode == 0


def on_new_ports(env: dict[str, str], **extra: str) -> dict[str, str]:
    """The same store and settings, on ports no other mesh of this module holds."""
    env = {**env, **extra}
    use_free_ports(env)
    return env


def test_up_stops_the_mesh_when_a_stage_is_over_its_restart_limit(mesh_env: dict[str, str]) -> None:
    up = UpProcess(on_new_ports(mesh_env, MLMESH_RESTART_LIMIT="0"), {})
    up.wait_for("mesh is up")
    os.kill(stage_pid(up, "evaluator"), signal.SIGKILL)
    output = up.rest()
    assert up.process.returncode == 1
    assert "over the restart limit" in output and "evaluator" in output
    assert "mesh stopped" in output


def test_killing_up_with_sigkill_takes_its_stages_down_too(mesh_env: dict[str, str]) -> None:
    up = UpProcess(on_new_ports(mesh_env), {})
    up.wait_for("mesh is up")
    children = [stage_pid(up, stage) for stage in STAGES]
    up.process.kill()
    up.process.wait()
    deadline = time.monotonic() + 20
    alive = children
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [
            pid
            for pid in alive
            if subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode == 0
            and "Z" not in subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout
        ]
    assert not alive, f"stages {alive} outlived their launcher"


def test_up_stops_cleanly_on_sigterm(mesh_env: dict[str, str]) -> None:
    up = UpProcess(on_new_ports(mesh_env), {})
    up.wait_for("mesh is up")
    up.process.send_signal(signal.SIGTERM)
    output = up.rest()
    assert up.process.returncode == 0, output
    assert f"mesh stopped ({', '.join(f'{stage}=0' for stage in STAGES)})" in output


@pytest.mark.parametrize("deleted", ["dataset", "transformer", "model"])
def test_a_deleted_object_is_recomputed_by_the_next_mlmesh_run(
    running_mesh: UpProcess, mesh_env: dict[str, str], deleted: str
) -> None:
    args = ("run", "--json", "--source", "sklearn:iris", "--seed", "5")
    first = mlmesh(mesh_env, *args)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    ref = summary["model"] if deleted == "model" else summary["artifacts"][deleted]
    path = Path(ref["uri"].removeprefix("file://"))
    path.unlink()
    second = mlmesh(mesh_env, *args)
    assert second.returncode == 0, second.stderr
    again = json.loads(second.stdout)
    assert again["model"] == summary["model"] and again["metrics_report"] == summary["metrics_report"]
    refs = [again["model"], again["metrics_report"], again["html_report"], *again["artifacts"].values()]
    for each in refs:
        data = Path(each["uri"].removeprefix("file://")).read_bytes()
        assert hashlib.sha256(data).hexdigest() == each["sha256"], each["uri"]


def test_each_run_has_its_own_exact_lineage(running_mesh: UpProcess, mesh_env: dict[str, str], tmp_path: Path) -> None:
    # Two sources whose label vectors are byte-identical: a run's graph must still name only its own source.
    iris = tmp_path / "iris.csv"
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"from sklearn.datasets import load_iris; "
            f"load_iris(as_frame=True).frame.to_csv({str(iris)!r}, index=False)",
        ],
        check=True,
    )
    extra = tmp_path / "iris_with_notes.csv"
    extra.write_text(
        "\n".join(line + (",note" if i == 0 else f",n{i % 7}") for i, line in enumerate(iris.read_text().splitlines()))
        + "\n"
    )
    runs = []
    for source in (iris, extra, iris):
        roles = ("--column", "note=ignore") if source == extra else ()
        done = mlmesh(mesh_env, "run", "--json", "--source", str(source), "--target", "target", *roles)
        assert done.returncode == 0, done.stderr
        runs.append(json.loads(done.stdout))
    assert len({r["run_id"] for r in runs}) == 3

    for run, source in zip(runs, (iris, extra, iris), strict=True):
        graph = mlmesh(mesh_env, "lineage", "--run", run["run_id"], "--json")
        assert graph.returncode == 0, graph.stderr
        steps = json.loads(graph.stdout)
        assert [s["stage"] for s in steps] == list(PIPELINE_STAGES)
        assert all(s["run_id"] == run["run_id"] for s in steps)
        # Closed: every input of the run was an output of an earlier stage of the same run.
        made: set[str] = set()
        for step in steps:
            assert {ref["sha256"] for ref in step["inputs"].values()} <= made, step["stage"]
            made |= {ref["sha256"] for ref in step["outputs"].values()}
        for name in ("transformer", "schema", "profile", "feature_schema", "split_report"):
            assert run["artifacts"][name]["sha256"] in made, name
        assert {run["model"]["sha256"], run["metrics_report"]["sha256"], run["html_report"]["sha256"]} <= made
        assert steps[0]["params"]["source"].endswith(source.name)
    assert [
        s["cache_hit"] for s in json.loads(mlmesh(mesh_env, "lineage", "--run", runs[2]["run_id"], "--json").stdout)
    ] == [True] * 5

    # The note column is ignored, so all three runs train on the same matrix: one model with three
    # producing executions (one fit, two cache hits), each in its own run.
    assert len({r["model"]["sha256"] for r in runs}) == 1
    model = mlmesh(mesh_env, "lineage", runs[0]["model"]["sha256"], "--json")
    touching = json.loads(model.stdout)["runs"]
    producers = [t for t in touching if t["produced_as"] == ["model"]]
    assert {t["run_id"] for t in producers} == {r["run_id"] for r in runs}
    assert sorted(t["cache_hit"] for t in producers) == [False, True, True]
    assert {t["run_id"] for t in touching if t["used_as"] == ["model"]} == {r["run_id"] for r in runs}  # evaluated
    listed = json.loads(mlmesh(mesh_env, "runs", "--json").stdout)
    by_id = {r["run_id"]: r for r in listed}
    assert all(by_id[r["run_id"]]["decision"] == r["decision"] for r in runs)
    assert by_id[runs[0]["run_id"]]["metrics"]["accuracy"] == runs[0]["metrics"]["accuracy"]
    table = mlmesh(mesh_env, "runs")
    assert runs[2]["run_id"] in table.stdout and "5 cache hits" in table.stdout


def test_docs_mlmesh_commands_run_as_written(running_mesh: UpProcess, mesh_env: dict[str, str], tmp_path: Path) -> None:
    """Every `.venv/bin/mlmesh` line of docs/cli.md's "Running the mesh yourself", its placeholders filled."""
    write_house_prices(tmp_path)
    done = json.loads(mlmesh(mesh_env, "run", "--json", "--source", "sklearn:iris").stdout)
    fill = {
        "<run id>": done["run_id"],
        "<sha256, 6+ digit prefix, or artifact URI>": done["model"]["sha256"][:8],
        "-- CMD ARGS": "-- true",
    }
    lines = [
        line.split("  #")[0].strip()
        for line in page_sh_blocks("docs/cli.md", "Running the mesh yourself")[0].splitlines()
        if line.startswith(".venv/bin/mlmesh ")
    ]
    ran = set()
    for line in lines:
        for placeholder, value in fill.items():
            line = line.replace(placeholder, value)
        argv = shlex.split(line.replace(".venv/bin/", f"{BIN}/"))
        command = argv[1]
        if command == "up":
            continue  # running_mesh is this very command; a second one is refused (tested above)
        result = subprocess.run(argv, env=mesh_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, line + "\n" + result.stdout[-2000:] + result.stderr[-2000:]
        assert result.stdout.strip() or command == "with-mesh", line
        ran.add(command)
    assert ran == {"status", "run", "runs", "lineage", "models", "serving", "with-mesh"}


def test_output_cut_short_by_a_pipe_is_no_error(running_mesh: UpProcess, mesh_env: dict[str, str]) -> None:
    done = json.loads(mlmesh(mesh_env, "run", "--json", "--source", "sklearn:iris").stdout)
    piped = subprocess.run(
        f"{BIN / 'mlmesh'} lineage --run {done['run_id']} | head -1",
        shell=True,
        env=mesh_env,
        capture_output=True,
        text=True,
        timeout=60,
        executable="/bin/bash",
    )
    assert piped.stdout.startswith(f"run {done['run_id']}") and "Traceback" not in piped.stderr, piped.stderr


def test_a_script_that_starts_a_mesh_is_not_run_again_inside_its_stages(
    tmp_path: Path, mesh_env: dict[str, str]
) -> None:
    """Stages are forked from a fork server; multiprocessing would import the launching
    script again in each of them, running its top-level code five more times."""
    script = tmp_path / "launch.py"
    script.write_text(
        "import asyncio, os\n"
        "print('script body ran', flush=True)\n"
        "from services.cli.launcher import LocalMesh\n"
        "from services.runtime.settings import Settings\n"
        "async def main():\n"
        "    async with LocalMesh(Settings.from_env()):\n"
        "        print('mesh up', flush=True)\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run(
        [str(BIN / "python"), str(script)],
        env=on_new_ports(mesh_env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("script body ran") == 1 and "mesh up" in done.stdout, done.stdout


def test_a_mesh_starts_under_a_temp_folder_too_deep_for_a_unix_socket(mesh_env: dict[str, str]) -> None:
    """The fork server listens on a Unix socket under TMPDIR, and such a path holds at most 107
    bytes: a deep TMPDIR (a CI job's own folder) must not stop `mlmesh with-mesh` (or `up`)."""
    with tempfile.TemporaryDirectory() as base:
        deep = Path(base) / ("d" * 90)
        deep.mkdir()
        done = subprocess.run(
            [str(BIN / "mlmesh"), "with-mesh", "--", sys.executable, "-c", "print('inside')"],
            env=on_new_ports(mesh_env, TMPDIR=str(deep)),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "inside" in done.stdout and "AF_UNIX" not in done.stderr
