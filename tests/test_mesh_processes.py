"""The mesh as users run it: `mlmesh up` child processes, the CLI, and the real grpcurl."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.runtime.settings import STAGES

BIN = Path(sys.executable).parent
GRPCURL = BIN / "grpcurl"


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class UpProcess:
    def __init__(self, env: dict[str, str], ports: dict[str, int]):
        self.env, self.ports = env, ports
        self.process = subprocess.Popen(
            [str(BIN / "mlmesh"), "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
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

    def rest(self, timeout: float = 30) -> str:
        out, _ = self.process.communicate(timeout=timeout)
        return "".join(self.output) + out


@pytest.fixture(scope="module")
def mesh_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("artifacts")
    env = {**os.environ, "MLMESH_ARTIFACT_ROOT": str(root), "MLMESH_GRACE_SECONDS": "1"}
    for stage, port in zip(STAGES, free_ports(len(STAGES)), strict=True):
        env[f"MLMESH_{stage.upper()}_PORT"] = str(port)
    return env


@pytest.fixture(scope="module")
def running_mesh(mesh_env: dict[str, str]) -> Iterator[UpProcess]:
    ports = {s: int(mesh_env[f"MLMESH_{s.upper()}_PORT"]) for s in STAGES}
    up = UpProcess(mesh_env, ports)
    up.wait_for("mesh is up")
    yield up
    if up.process.poll() is None:
        up.process.kill()
        up.process.wait()


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
        "mlmesh.loader.v1.LoaderService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
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


def test_stopped_stage_is_named_with_its_address(running_mesh: UpProcess, mesh_env: dict[str, str]) -> None:
    env = {**mesh_env, "MLMESH_TRAINER_ADDRESS": f"localhost:{free_ports(1)[0]}", "MLMESH_RPC_TIMEOUT_SECONDS": "10"}
    result = mlmesh(env, "run", "--force")
    assert result.returncode == 2
    assert "trainer at localhost:" in result.stderr and "UNAVAILABLE" in result.stderr
    assert "Traceback" not in result.stderr


def test_up_notices_a_killed_stage_and_stops_the_rest(running_mesh: UpProcess) -> None:
    # Runs last in this module: it takes the mesh down.
    pid = int(subprocess.run(["pgrep", "-f", "-P", str(running_mesh.process.pid), "services.features"],
                             capture_output=True, text=True).stdout.split()[0])
    os.kill(pid, signal.SIGKILL)
    output = running_mesh.rest()
    assert running_mesh.process.returncode == 1
    assert "exited unexpectedly" in output and "features" in output
    assert "mesh stopped" in output


def test_up_stops_cleanly_on_sigterm(mesh_env: dict[str, str]) -> None:
    up = UpProcess(mesh_env, {})
    up.wait_for("mesh is up")
    up.process.send_signal(signal.SIGTERM)
    output = up.rest()
    assert up.process.returncode == 0, output
    assert "mesh stopped (loader=0, preprocess=0, features=0, trainer=0, evaluator=0)" in output
