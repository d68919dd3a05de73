"""Shared fixtures: real servers on port 0, real channels, a private artifact store."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from services.runtime.client import MeshClient
from services.runtime.launcher import LocalMesh
from services.runtime.server import RunningStage, stage_spec, start_stage
from services.runtime.settings import STAGES, Settings

__all__ = ["expect_error", "free_ports", "stage_spec", "start_local_mesh", "use_free_ports"]


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def data_roots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """MLMESH_DATA_ROOTS for every mesh a test starts: pytest's temp folders, where tests write
    their tables, and the repository. In this process's environment, so `mlmesh up` and other
    subprocesses started with os.environ inherit it; the `settings` fixture passes it on."""
    roots = f"{tmp_path_factory.getbasetemp()},{REPO}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLMESH_DATA_ROOTS", roots)
        yield roots


def quiet_ports(count: int) -> list[int]:
    """Free ports below the kernel's ephemeral range (32768 and up), so no client connection of
    the session takes one while a stage is not listening on it."""
    import random

    chosen: list[int] = []
    for port in random.sample(range(20000, 32000), 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        chosen.append(port)
        if len(chosen) == count:
            return chosen
    raise RuntimeError("no free ports between 20000 and 32000")


@pytest.fixture(scope="session", autouse=True)
def metrics_ports() -> Iterator[dict[str, int]]:
    """MLMESH_<STAGE>_METRICS_PORT for every mesh a test starts, instead of the defaults 9451..9455,
    which a developer's own `mlmesh up` may hold. In this process's environment, so `mlmesh up`,
    pyflyte and stage processes started with os.environ inherit them. Stages a test starts in
    this process (start_stage with port 0) serve metrics on any free port instead."""
    ports = dict(zip(STAGES, quiet_ports(len(STAGES)), strict=True))
    with pytest.MonkeyPatch.context() as patch:
        for stage, port in ports.items():
            patch.setenv(f"MLMESH_{stage.upper()}_METRICS_PORT", str(port))
        yield ports


@pytest.fixture
def artifact_root(tmp_path: Path) -> Path:
    root = tmp_path / "artifacts"
    root.mkdir()
    return root


@pytest.fixture
def settings(artifact_root: Path, data_roots: str) -> Settings:
    return Settings.from_env(
        {"MLMESH_ARTIFACT_ROOT": str(artifact_root), "MLMESH_GRACE_SECONDS": "0.5", "MLMESH_DATA_ROOTS": data_roots}
    )


@pytest_asyncio.fixture
async def mesh(settings: Settings) -> AsyncIterator[dict[str, RunningStage]]:
    """All five stages in this process, each on its own ephemeral port."""
    running = {name: await start_stage(stage_spec(name), settings, port=0) for name in STAGES}
    try:
        yield running
    finally:
        for stage in running.values():
            await stage.stop(0.5)


@pytest_asyncio.fixture
async def client(mesh: dict[str, RunningStage], settings: Settings) -> AsyncIterator[MeshClient]:
    async with MeshClient(settings, addresses={n: s.address for n, s in mesh.items()}) as mesh_client:
        yield mesh_client


async def expect_error(awaitable, code: grpc.StatusCode, *fragments: str) -> str:
    """Await a call that must fail with `code`; its message must contain every fragment."""
    from services.runtime.client import StageCallError

    with pytest.raises(StageCallError) as caught:
        await awaitable
    error = caught.value
    assert error.code == code, f"expected {code.name}, got {error.code.name}: {error.details}"
    for fragment in fragments:
        assert fragment in error.details, f"{fragment!r} not in {error.details!r}"
    return error.details


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def use_free_ports(env: dict[str, str]) -> dict[str, int]:
    """Point `env` at a mesh of its own: free gRPC and metrics ports for every stage (so it never
    collides with another mesh a test holds open), and clients at those ports. Returns the gRPC ports."""
    ports = dict(zip(STAGES, free_ports(len(STAGES)), strict=True))
    for (stage, port), metrics_port in zip(ports.items(), quiet_ports(len(STAGES)), strict=True):
        env[f"MLMESH_{stage.upper()}_PORT"] = str(port)
        env[f"MLMESH_{stage.upper()}_METRICS_PORT"] = str(metrics_port)
        env.pop(f"MLMESH_{stage.upper()}_ADDRESS", None)
    return ports


def start_local_mesh(base: Path) -> tuple[LocalMesh, dict[str, str]]:
    """`mlmesh up`'s LocalMesh on free ports, with a private artifact store, HOME and TMPDIR, and the
    environment that points the CLI and pyflyte at it. Stage logs go to base/logs."""
    env = {
        **os.environ,
        "MLMESH_ARTIFACT_ROOT": str(base / "artifacts"),
        "MLMESH_GRACE_SECONDS": "1",
        "HOME": str(base / "home"),  # Flyte's local cache lives under ~/.flyte
        "TMPDIR": str(base / "tmp"),  # Flyte writes decks under the temp folder
    }
    for folder in ("home", "tmp"):
        (base / folder).mkdir()
    use_free_ports(env)
    mesh = LocalMesh(Settings.from_env(env), env=env, log_dir=base / "logs")
    asyncio.run(mesh.start())
    return mesh, env
