"""Settings from MLMESH_* variables: defaults, overrides, and errors that name the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.runtime.catalog import STAGES
from services.runtime.settings import DEFAULT_PORTS, Settings, SettingsError, default_max_dataset_bytes

REPO = Path(__file__).resolve().parents[1]


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env({})
    assert settings.ports == {
        "loader": 50051,
        "preprocess": 50052,
        "features": 50053,
        "trainer": 50054,
        "evaluator": 50055,
        "serving": 50056,
    }
    assert settings.metrics_ports["serving"] == 9456
    assert settings.ports == DEFAULT_PORTS and list(settings.ports) == list(STAGES)
    assert settings.addresses == {stage: f"127.0.0.1:{port}" for stage, port in settings.ports.items()}
    assert settings.artifact_root == str(tmp_path.resolve() / "artifacts")
    assert os.path.isabs(settings.artifact_root)
    assert settings.bind_host == "127.0.0.1"
    assert settings.log_level == "INFO"
    assert settings.grace_seconds == 5.0
    assert settings.max_message_bytes == 4 * 1024 * 1024
    assert settings.max_concurrent_rpcs == 64
    assert settings.worker_threads == min(4, os.cpu_count() or 1)
    assert settings.max_dataset_bytes == default_max_dataset_bytes()
    assert settings.rpc_timeout_seconds == 600.0
    assert (settings.serving_poll_seconds, settings.serving_max_batch_rows, settings.serving_max_batch_wait_ms) == (
        2.0,
        256,
        0.0,
    )
    assert (settings.serving_max_request_rows, settings.serving_unseen_levels) == (100_000, "reject")


def test_the_dataset_cap_follows_the_memory_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A quarter of the machine's (or container's) memory, so 10M x 32 runs on a 16 GiB VM by default."""
    from services.runtime import settings as settings_module

    monkeypatch.setattr(settings_module, "memory_limit_bytes", lambda: 16 * 1024**3)
    assert settings_module.default_max_dataset_bytes() == 4 * 1024**3 > 10_000_000 * 33 * 8
    monkeypatch.setattr(settings_module, "memory_limit_bytes", lambda: 512 * 1024**2)
    assert settings_module.default_max_dataset_bytes() == 256 * 1024**2  # never below the floor
    assert Settings.from_env({"MLMESH_MAX_DATASET_BYTES": "5000"}).max_dataset_bytes == 5000
    assert 0 < settings_module.memory_limit_bytes() <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_empty_values_mean_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    env = {"MLMESH_LOADER_PORT": "", "MLMESH_LOG_LEVEL": "", "MLMESH_ARTIFACT_ROOT": "", "MLMESH_GRACE_SECONDS": ""}
    assert Settings.from_env(env) == Settings.from_env({})


def test_from_env_reads_the_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLMESH_TRAINER_PORT", "6004")
    monkeypatch.setenv("MLMESH_ARTIFACT_ROOT", str(tmp_path))
    settings = Settings.from_env()
    assert settings.ports["trainer"] == 6004 and settings.artifact_root == str(tmp_path.resolve())


def test_overrides(tmp_path: Path) -> None:
    env = {
        "MLMESH_ARTIFACT_ROOT": str(tmp_path / "store"),
        "MLMESH_BIND_HOST": "0.0.0.0",
        "MLMESH_LOADER_PORT": "6001",
        "MLMESH_EVALUATOR_PORT": "0",
        "MLMESH_FEATURES_ADDRESS": "features.internal:7000",
        "MLMESH_LOG_LEVEL": "debug",
        "MLMESH_GRACE_SECONDS": "2.5",
        "MLMESH_MAX_MESSAGE_BYTES": "1048576",
        "MLMESH_MAX_CONCURRENT_RPCS": "8",
        "MLMESH_WORKER_THREADS": "3",
        "MLMESH_MAX_DATASET_BYTES": "4096",
        "MLMESH_RPC_TIMEOUT_SECONDS": "0.5",
        "MLMESH_RESTART_LIMIT": "0",
    }
    settings = Settings.from_env(env)
    assert settings.artifact_root == str((tmp_path / "store").resolve())
    assert settings.bind_host == "0.0.0.0"
    assert settings.ports == {**DEFAULT_PORTS, "loader": 6001, "evaluator": 0}
    assert (
        settings.addresses["loader"] == "127.0.0.1:6001"
    )  # follows the overridden port; a wildcard bind is dialled locally
    assert settings.addresses["features"] == "features.internal:7000"
    assert settings.addresses["trainer"] == "127.0.0.1:50054"
    assert settings.log_level == "DEBUG"
    assert settings.grace_seconds == 2.5
    assert settings.max_message_bytes == 1048576
    assert settings.max_concurrent_rpcs == 8
    assert settings.worker_threads == 3
    assert settings.max_dataset_bytes == 4096
    assert settings.rpc_timeout_seconds == 0.5
    assert settings.restart_limit == 0


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("relative/store", "{cwd}/relative/store"),
        ("file://{tmp}/via-uri", "{tmp}/via-uri"),
        ("~/mlmesh-artifacts", "{home}/mlmesh-artifacts"),
        ("s3://bucket/prefix/", "s3://bucket/prefix"),
        ("gs://bucket", "gs://bucket"),
        ("memory://mlmesh", "memory://mlmesh"),
    ],
)
def test_artifact_root_forms(raw: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    values = {"tmp": str(tmp_path), "cwd": str(tmp_path.resolve()), "home": str((tmp_path / "home").resolve())}
    settings = Settings.from_env({"MLMESH_ARTIFACT_ROOT": raw.format(**values)})
    assert settings.artifact_root == expected.format(**values)


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("MLMESH_LOADER_PORT", "abc", "is not an integer"),
        ("MLMESH_TRAINER_PORT", "50054.0", "is not an integer"),
        ("MLMESH_EVALUATOR_PORT", "-1", "must be at least 0"),
        ("MLMESH_LOG_LEVEL", "LOUD", "must be DEBUG, INFO, WARNING or ERROR"),
        ("MLMESH_LOG_LEVEL", "verbose", "must be DEBUG, INFO, WARNING or ERROR"),
        ("MLMESH_GRACE_SECONDS", "soon", "is not a number"),
        ("MLMESH_GRACE_SECONDS", "-1", "must be at least 0"),
        ("MLMESH_MAX_MESSAGE_BYTES", "100", "must be at least 1024"),
        ("MLMESH_MAX_MESSAGE_BYTES", "4MB", "is not an integer"),
        ("MLMESH_MAX_CONCURRENT_RPCS", "0", "must be at least 1"),
        ("MLMESH_WORKER_THREADS", "0", "must be at least 1"),
        ("MLMESH_MAX_DATASET_BYTES", "1k", "is not an integer"),
        ("MLMESH_RPC_TIMEOUT_SECONDS", "0", "must be at least 0.001"),
        ("MLMESH_RESTART_LIMIT", "-1", "must be at least 0"),
        ("MLMESH_RESTART_LIMIT", "many", "is not an integer"),
    ],
)
def test_invalid_values_name_the_variable(name: str, value: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({name: value})
    message = str(caught.value)
    assert message.startswith(f"{name}="), message
    assert value.upper() in message.upper() and fragment in message
    assert isinstance(caught.value, ValueError)


def test_a_stage_process_refuses_to_start_with_a_bad_variable(tmp_path: Path) -> None:
    env = {**os.environ, "MLMESH_LOADER_PORT": "abc", "MLMESH_ARTIFACT_ROOT": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "services.loader"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "loader: invalid configuration: MLMESH_LOADER_PORT='abc' is not an integer" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("MLMESH_LOADER_PORT", "70000", "MLMESH_LOADER_PORT=70000 must be at most 65535"),
        ("MLMESH_GRACE_SECONDS", "nan", "MLMESH_GRACE_SECONDS='nan' must be a finite number"),
        ("MLMESH_RPC_TIMEOUT_SECONDS", "inf", "MLMESH_RPC_TIMEOUT_SECONDS='inf' must be a finite number"),
        ("MLMESH_LOG_LEVEL", "loud", "MLMESH_LOG_LEVEL='loud'"),
    ],
)
def test_out_of_range_values_are_refused_as_typed(variable: str, value: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({variable: value})
    assert fragment in str(caught.value)


def test_data_roots_default_to_the_working_folder_and_resolve_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert Settings.from_env({}).data_roots == (str(tmp_path.resolve()),)
    roots = Settings.from_env(
        {"MLMESH_DATA_ROOTS": " link , file:///srv/x/../data ,s3://bucket/sets,https://h/p/"}
    ).data_roots
    assert roots == (str((tmp_path / "real").resolve()), "/srv/data", "s3://bucket/sets/", "https://h/p/")
    assert Settings.from_env({"MLMESH_DATA_ROOTS": ""}).data_roots == (str(tmp_path.resolve()),)  # empty is unset
    with pytest.raises(SettingsError, match="chains URLs with '::'"):
        Settings.from_env({"MLMESH_DATA_ROOTS": "simplecache::s3://bucket/"})


def test_security_settings_are_checked_at_start(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("x")
    with pytest.raises(SettingsError, match="MLMESH_TLS_CLIENT_CERT and MLMESH_TLS_CLIENT_KEY must be set together"):
        Settings.from_env({"MLMESH_TLS_CLIENT_CERT": str(pem)})
    with pytest.raises(SettingsError, match=r"MLMESH_TLS_CLIENT_CA .mTLS. needs TLS"):
        Settings.from_env({"MLMESH_TLS_CLIENT_CA": str(pem)})
    with pytest.raises(SettingsError, match="MLMESH_REFLECTION='maybe' must be one of: open, token, off"):
        Settings.from_env({"MLMESH_REFLECTION": "maybe"})
    with pytest.raises(SettingsError, match="MLMESH_HEALTH_AUTH"):
        Settings.from_env({"MLMESH_HEALTH_AUTH": "closed"})
    with pytest.raises(SettingsError, match="not both"):
        Settings.from_env({"MLMESH_AUTH_TOKEN": "a" * 20, "MLMESH_AUTH_TOKEN_FILE": str(pem)})
    with pytest.raises(SettingsError, match="printable ASCII without spaces"):
        Settings.from_env({"MLMESH_AUTH_TOKEN": "two words"})
    token = tmp_path / "token"
    token.write_text("s3cr3t-token-value\n")
    settings = Settings.from_env({"MLMESH_AUTH_TOKEN_FILE": str(token), "MLMESH_TLS_CA": str(pem)})
    assert settings.auth_token == "s3cr3t-token-value" and settings.client_tls
    assert not Settings.from_env({}).client_tls
