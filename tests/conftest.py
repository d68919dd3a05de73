"""Shared fixtures: real servers on port 0, real channels, a private artifact store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from services.runtime.client import MeshClient
from services.runtime.server import RunningStage, stage_spec, start_stage
from services.runtime.settings import STAGES, Settings

__all__ = ["expect_error", "stage_spec"]


@pytest.fixture
def artifact_root(tmp_path: Path) -> Path:
    root = tmp_path / "artifacts"
    root.mkdir()
    return root


@pytest.fixture
def settings(artifact_root: Path) -> Settings:
    return Settings.from_env({"MLMESH_ARTIFACT_ROOT": str(artifact_root), "MLMESH_GRACE_SECONDS": "0.5"})


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
