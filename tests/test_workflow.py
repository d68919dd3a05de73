"""The Flyte workflow against a live mesh: pyflyte run, caches, decks, errors, sweep, package."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.runtime.launcher import LocalMesh
from services.runtime.settings import STAGES, Settings
from tests.test_mesh_processes import free_ports

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def flyte_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    base = tmp_path_factory.mktemp("flyte")
    env = {
        **os.environ,
        "MLMESH_ARTIFACT_ROOT": str(base / "artifacts"),
        "MLMESH_GRACE_SECONDS": "1",
        "HOME": str(base / "home"),  # Flyte's local cache lives under ~/.flyte
        "TMPDIR": str(base / "tmp"),  # decks are written under the temp folder
    }
    for folder in ("home", "tmp"):
        (base / folder).mkdir()
    for stage, port in zip(STAGES, free_ports(len(STAGES)), strict=True):
        env[f"MLMESH_{stage.upper()}_PORT"] = str(port)
    settings = Settings.from_env(env)
    mesh = LocalMesh(settings, env=env, log_dir=base / "logs")
    asyncio.run(mesh.start())
    env["_LOG_DIR"] = str(base / "logs")
    yield env
    mesh.stop()


def pyflyte(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "pyflyte"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def rpc_lines(env: dict[str, str], stage: str) -> list[str]:
    return [l for l in (Path(env["_LOG_DIR"]) / f"{stage}.log").read_text().splitlines() if "rpc method=" in l]


def test_pyflyte_run_end_to_end_then_served_from_caches(flyte_env: dict[str, str]) -> None:
    first = pyflyte(flyte_env, "run", "workflow/pipeline.py", "training_pipeline")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "PipelineResult(" in first.stdout and "decision='PROMOTE'" in first.stdout
    accuracy = float(re.search(r"'accuracy': ([0-9.]+)", first.stdout).group(1))
    assert accuracy >= 0.95
    assert "registered_as='breast_cancer-logistic_regression v1'" in first.stdout

    decks = list(Path(flyte_env["TMPDIR"]).rglob("deck.html"))
    assert decks, "the evaluate task wrote no deck"
    deck = "\n".join(d.read_text() for d in decks)
    assert 'class="roc"' in deck and "confusion-matrix" in deck and "<td>accuracy</td>" in deck

    before = {stage: len(rpc_lines(flyte_env, stage)) for stage in STAGES}
    second = pyflyte(flyte_env, "run", "workflow/pipeline.py", "training_pipeline")
    assert second.returncode == 0, second.stderr
    model = re.search(r"model=ArtifactRef\(uri='[^']+', sha256='([0-9a-f]{64})'", first.stdout).group(1)
    assert f"sha256='{model}'" in second.stdout
    after = {stage: rpc_lines(flyte_env, stage) for stage in STAGES}
    # The loader is asked again (Flyte cannot know whether a source changed) and answers from its memo.
    assert len(after["loader"]) == before["loader"] + 1 and "cache_hit=true" in after["loader"][-1]
    # Every other stage was served from Flyte's cache: no new calls reached them...
    for stage in ("preprocess", "features", "trainer"):
        assert len(after[stage]) == before[stage], f"{stage} was called again"
    # ...except the registry, which found the model already registered.
    assert "RegisterModel" in after["evaluator"][-1] and "Evaluate" not in after["evaluator"][-1]
    models = subprocess.run([str(BIN / "mlmesh"), "models", "--json"], env=flyte_env, capture_output=True, text=True)
    [entry] = json.loads(models.stdout)
    assert entry["name"] == "breast_cancer-logistic_regression" and len(entry["versions"]) == 1

    third = pyflyte(flyte_env, "run", "--overwrite-cache", "workflow/pipeline.py", "training_pipeline")
    assert third.returncode == 0, third.stderr
    trainer_calls = rpc_lines(flyte_env, "trainer")
    assert len(trainer_calls) == before["trainer"] + 1, "--overwrite-cache did not reach the trainer"


def test_stopped_service_is_named_with_its_address(flyte_env: dict[str, str]) -> None:
    dead = f"localhost:{free_ports(1)[0]}"
    env = {**flyte_env, "MLMESH_TRAINER_ADDRESS": dead, "MLMESH_RPC_TIMEOUT_SECONDS": "10"}
    result = pyflyte(env, "run", "workflow/pipeline.py", "training_pipeline", "--seed", "7")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"trainer at {dead} failed with UNAVAILABLE" in re.sub(r"\s+", " ", output)
    assert "grpc/_channel.py" not in output and "_cython" not in output


def test_sweep_picks_the_candidate_that_is_really_best(flyte_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in flyte_env.items():
        monkeypatch.setenv(name, value)
    for stage in STAGES:
        monkeypatch.setenv(f"MLMESH_{stage.upper()}_ADDRESS", f"127.0.0.1:{flyte_env[f'MLMESH_{stage.upper()}_PORT']}")
    from workflow.pipeline import ModelCandidate, sweep_pipeline

    features_calls = len(rpc_lines(flyte_env, "features"))
    candidates = [
        ModelCandidate("random_forest", {"n_estimators": "1", "max_depth": "1"}),  # a stump: weak
        ModelCandidate("logistic_regression", {"C": "1.0"}),
        ModelCandidate("sgd", {"max_iter": "5", "tol": "null"}),
    ]
    result = sweep_pipeline(source="sklearn:wine", candidates=candidates, metric="f1_macro", seed=3, minimums={})
    scores = [m["f1_macro"] for m in result.candidate_metrics]
    assert len(scores) == 3
    assert result.best_index == scores.index(max(scores))
    assert result.best.metrics["f1_macro"] == max(scores)
    assert scores[0] < max(scores)  # the stump really is worse
    assert len(rpc_lines(flyte_env, "features")) - features_calls == 1, "features ran more than once"

    lowest_loss = sweep_pipeline(source="sklearn:wine", candidates=candidates, metric="log_loss", lower_is_better=True, seed=3, minimums={})
    losses = [m["log_loss"] for m in lowest_loss.candidate_metrics]
    assert lowest_loss.best_index == losses.index(min(losses))


def test_pyflyte_package_needs_no_backend(tmp_path: Path, flyte_env: dict[str, str]) -> None:
    output = tmp_path / "flyte-package.tgz"
    result = pyflyte(flyte_env, "--pkgs", "workflow", "package", "-o", str(output), "--force")
    assert result.returncode == 0, result.stdout + result.stderr
    archive = tarfile.open(output)
    names = archive.getnames()
    train_spec = archive.extractfile(next(n for n in names if n.endswith("workflow.pipeline.train_1.pb"))).read()
    assert b"mlmesh-pipeline:latest" in train_spec  # tasks name the pipeline image
    for expected in ("training_pipeline", "sweep_pipeline", "training_pipeline_nightly", "training_pipeline_demo"):
        assert any(expected in n for n in names), f"{expected} missing from {names}"
