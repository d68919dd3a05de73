"""Transport security and identity (issue 11): TLS, mTLS, bearer tokens and roles, on real ports.

Certificates are made at test time (tests/certs.py, or openssl where
docs/security.md shows it). In-process stages cover each refusal and its code;
`mlmesh up` child processes cover the CLI, the probe, the real grpcurl and
docs/security.md's commands as written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from mlmesh.evaluator.v1 import evaluator_pb2
from services.client.mesh import MeshClient, PipelineConfig, StageCallError, check_health, load_request
from services.runtime.catalog import PIPELINE_STAGES, STAGES
from services.runtime.security import AuthInterceptor, load_tokens, open_channel
from services.runtime.server import RunningStage, stage_spec, start_stage
from services.runtime.settings import Settings, SettingsError
from tests.certs import Issued, Pki
from tests.helpers import logged_rpc_line, run_script, use_free_ports
from tests.test_mesh_processes import UpProcess, page_sh_blocks

BIN = Path(sys.executable).parent
GRPCURL = BIN / "grpcurl"
IRIS = PipelineConfig(source="sklearn:iris", minimums={"accuracy": 0.5})


class Material:
    """Everything a secured mesh needs, made once per module: two unrelated CAs, certificates, tokens."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.ca = Pki(folder / "ca")
        self.stranger_ca = Pki(folder / "stranger", "stranger")
        self.server = self.ca.issue("mlmesh stages", hosts=["localhost", "127.0.0.1"])
        self.expired = self.ca.issue("mlmesh stages", hosts=["localhost"], expired=True, file_name="expired")
        self.client = self.ca.issue("pipeline-runner", client=True)
        self.stranger = self.stranger_ca.issue("intruder", client=True)
        self.runner_token, self.release_token = secrets.token_hex(32), secrets.token_hex(32)
        self.tokens = folder / "tokens"
        self.tokens.write_text(
            f"# name roles token\nrunner pipeline {self.runner_token}\nrelease pipeline,register {self.release_token}\n"
        )

    def server_env(self, artifacts: Path, mtls: bool = False, tokens: bool = False, **extra: str) -> dict[str, str]:
        env = {
            "MLMESH_ARTIFACT_ROOT": str(artifacts),
            "MLMESH_GRACE_SECONDS": "0.5",
            "MLMESH_TLS_CERT": str(self.server.cert),
            "MLMESH_TLS_KEY": str(self.server.key),
        }
        if mtls:
            env["MLMESH_TLS_CLIENT_CA"] = str(self.ca.cert)
        if tokens:
            env["MLMESH_AUTH_TOKENS_FILE"] = str(self.tokens)
        return {**env, **extra}

    def client_env(
        self, artifacts: Path, ca: Path | None = None, cert: Issued | None = None, token: str = ""
    ) -> dict[str, str]:
        env = {"MLMESH_ARTIFACT_ROOT": str(artifacts), "MLMESH_RECONNECT_SECONDS": "20"}
        if ca is not None:
            env["MLMESH_TLS_CA"] = str(ca)
        if cert is not None:
            env["MLMESH_TLS_CLIENT_CERT"], env["MLMESH_TLS_CLIENT_KEY"] = str(cert.cert), str(cert.key)
        if token:
            env["MLMESH_AUTH_TOKEN"] = token
        return env

    def full_client_env(self, artifacts: Path) -> dict[str, str]:
        return self.client_env(artifacts, self.ca.cert, self.client, self.runner_token)


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Material:
    return Material(tmp_path_factory.mktemp("pki"))


async def _start(names: tuple[str, ...], env: dict[str, str]) -> dict[str, RunningStage]:
    settings = Settings.from_env({"MLMESH_METRICS": "off", **env})  # unserved, as in conftest.py's settings
    return {name: await start_stage(stage_spec(name), settings, port=0) for name in names}


async def _stop(stages: dict[str, RunningStage]) -> None:
    for stage in stages.values():
        await stage.stop(0.2)


def _addresses(stages: dict[str, RunningStage]) -> dict[str, str]:
    # 127.0.0.1: a name in the stages' certificate, as the CLI dials by default.
    return {name: f"127.0.0.1:{stage.port}" for name, stage in stages.items()}


async def _load(env: dict[str, str], stages: dict[str, RunningStage], timeout: float = 30) -> object:
    async with MeshClient(Settings.from_env(env), addresses=_addresses(stages)) as client:
        return await asyncio.wait_for(client.load(load_request(IRIS)), timeout)


async def _refused(env: dict[str, str], stages: dict[str, RunningStage]) -> StageCallError:
    started = time.monotonic()
    with pytest.raises(StageCallError) as caught:
        await _load(env, stages)
    # A security mismatch is not a stage that is down: the client says so within seconds,
    # instead of retrying for MLMESH_RECONNECT_SECONDS.
    assert time.monotonic() - started < 15
    return caught.value


# ---- TLS -------------------------------------------------------------------------------------
@pytest_asyncio.fixture
async def tls_mesh(material: Material, tmp_path: Path) -> AsyncIterator[dict[str, RunningStage]]:
    stages = await _start(STAGES, material.server_env(tmp_path / "artifacts"))
    yield stages
    await _stop(stages)


@pytest.mark.asyncio
async def test_a_tls_mesh_runs_the_pipeline_for_clients_that_trust_its_ca(
    material: Material,
    tls_mesh: dict[str, RunningStage],
    tmp_path: Path,
) -> None:
    env = material.client_env(tmp_path / "artifacts", ca=material.ca.cert)
    async with MeshClient(Settings.from_env(env), addresses=_addresses(tls_mesh)) as client:
        run = await client.run_pipeline(IRIS)
    assert run.evaluate.metrics["accuracy"] >= 0.9
    assert await check_health(f"localhost:{tls_mesh['loader'].port}", settings=Settings.from_env(env)) == "SERVING"


@pytest.mark.asyncio
@pytest.mark.slow  # each refusal waits out gRPC's connection attempts: seconds
async def test_plaintext_and_untrusting_clients_are_refused_with_what_to_set(
    material: Material,
    tls_mesh: dict[str, RunningStage],
    tmp_path: Path,
) -> None:
    plaintext = await _refused(material.client_env(tmp_path), tls_mesh)
    assert plaintext.code == grpc.StatusCode.UNAVAILABLE and "set MLMESH_TLS_CA" in plaintext.details
    wrong_ca = await _refused(material.client_env(tmp_path, ca=material.stranger_ca.cert), tls_mesh)
    assert wrong_ca.code == grpc.StatusCode.UNAVAILABLE
    assert "TLS handshake failed" in wrong_ca.details and "MLMESH_TLS_CA" in wrong_ca.details


@pytest.mark.asyncio
@pytest.mark.slow  # each refusal waits out gRPC's connection attempts: seconds
async def test_a_tls_client_of_a_plaintext_stage_is_told_so(material: Material, tmp_path: Path) -> None:
    stages = await _start(("loader",), {"MLMESH_ARTIFACT_ROOT": str(tmp_path / "a")})
    try:
        error = await _refused(material.client_env(tmp_path, ca=material.ca.cert), stages)
    finally:
        await _stop(stages)
    assert error.code == grpc.StatusCode.UNAVAILABLE and "TLS handshake failed" in error.details


@pytest.mark.asyncio
async def test_a_stage_will_not_start_with_an_expired_or_unreadable_certificate(
    material: Material, tmp_path: Path
) -> None:
    env = material.server_env(
        tmp_path, MLMESH_TLS_CERT=str(material.expired.cert), MLMESH_TLS_KEY=str(material.expired.key)
    )
    with pytest.raises(OSError, match="the certificate expired on"):
        await _start(("loader",), env)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(OSError, match="is not a PEM certificate"):
        await _start(("loader",), material.server_env(tmp_path, MLMESH_TLS_CERT=str(garbage)))
    with pytest.raises(SettingsError, match="MLMESH_TLS_CERT and MLMESH_TLS_KEY must be set together"):
        Settings.from_env({"MLMESH_TLS_CERT": str(material.server.cert)})
    with pytest.raises(SettingsError, match="is not a file"):
        Settings.from_env({"MLMESH_TLS_CA": str(tmp_path / "missing.pem")})


# ---- mTLS --------------------------------------------------------------------------------------
@pytest.mark.asyncio
@pytest.mark.slow  # each refusal waits out gRPC's connection attempts: seconds
async def test_mtls_admits_only_certificates_of_the_client_ca(
    material: Material,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stages = await _start(("loader",), material.server_env(tmp_path / "artifacts", mtls=True))
    try:
        no_cert = await _refused(material.client_env(tmp_path, ca=material.ca.cert), stages)
        assert no_cert.code == grpc.StatusCode.UNAVAILABLE and "MLMESH_TLS_CLIENT_CERT" in no_cert.details
        stranger = await _refused(material.client_env(tmp_path, ca=material.ca.cert, cert=material.stranger), stages)
        assert stranger.code == grpc.StatusCode.UNAVAILABLE and "MLMESH_TLS_CLIENT_CERT" in stranger.details
        with caplog.at_level(logging.INFO, logger="mlmesh.rpc"):
            loaded = await _load(material.client_env(tmp_path, ca=material.ca.cert, cert=material.client), stages)
        assert loaded.rows == 150
    finally:
        await _stop(stages)
    [line] = [r.getMessage() for r in caplog.records if "LoaderService/Load" in r.getMessage()]
    assert "status=OK" in line and re.search(r"caller=cert:\S*pipeline-runner", line), line


# ---- bearer tokens and roles -------------------------------------------------------------------
@pytest_asyncio.fixture
async def token_mesh(material: Material, tmp_path: Path) -> AsyncIterator[dict[str, RunningStage]]:
    stages = await _start(STAGES, material.server_env(tmp_path / "artifacts", tokens=True))
    yield stages
    await _stop(stages)


async def _raw_load(stages: dict[str, RunningStage], material: Material, metadata: tuple) -> grpc.StatusCode:
    from mlmesh.loader.v1 import loader_pb2_grpc

    settings = Settings.from_env(material.client_env(material.folder, ca=material.ca.cert))
    async with open_channel(f"localhost:{stages['loader'].port}", settings) as channel:
        try:
            await loader_pb2_grpc.LoaderServiceStub(channel).Load(load_request(IRIS), metadata=metadata, timeout=20)
        except grpc.aio.AioRpcError as error:
            assert len(error.details().encode()) <= 1024
            assert material.runner_token not in error.details() and "wrong" not in error.details()
            return error.code()
    return grpc.StatusCode.OK


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer wrong-token-of-some-length"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer "),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Basic cnVubmVyOnB3"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer RUNNER"),), grpc.StatusCode.OK),
    ],
)
async def test_stage_calls_need_a_valid_bearer_token(
    material: Material,
    token_mesh: dict[str, RunningStage],
    metadata: tuple,
    code: grpc.StatusCode,
) -> None:
    metadata = tuple((key, value.replace("RUNNER", material.runner_token)) for key, value in metadata)
    assert await _raw_load(token_mesh, material, metadata) == code
    # Health stays open to probes without a token.
    settings = Settings.from_env(material.client_env(material.folder, ca=material.ca.cert))
    assert await check_health(f"localhost:{token_mesh['loader'].port}", settings=settings) == "SERVING"


@pytest.mark.asyncio
async def test_fuzzed_authorization_metadata_is_always_unauthenticated(
    material: Material,
    token_mesh: dict[str, RunningStage],
) -> None:
    """Random schemes, lengths, bytes and near-misses of a real token: never INTERNAL, never admitted."""
    import random

    rng = random.Random(11)
    real = material.runner_token
    values = [
        "",
        " ",
        "Bearer",
        "bearer  ",
        f"Bearer {real[:-1]}",
        f"Bearer {real}x",
        f"Bearer {real.upper()}",
        f"Token {real}",
        f"Bearer  {real}x",
        "Bearer " + "a" * 4000,
    ]
    alphabet = "".join(chr(c) for c in range(33, 127))
    for _ in range(40):
        length = rng.choice([1, 16, 63, 64, 65, 500])
        values.append(
            rng.choice(["Bearer ", "bearer ", "", "Basic "]) + "".join(rng.choice(alphabet) for _ in range(length))
        )
    codes = {await _raw_load(token_mesh, material, (("authorization", value),)) for value in values}
    assert codes == {grpc.StatusCode.UNAUTHENTICATED}
    # Binary metadata under the same key is not a token either.
    assert (
        await _raw_load(token_mesh, material, (("authorization-bin", bytes(range(256))),))
        == grpc.StatusCode.UNAUTHENTICATED
    )


@pytest.mark.asyncio
async def test_registering_a_model_needs_the_register_role(
    material: Material,
    token_mesh: dict[str, RunningStage],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner_env = material.client_env(tmp_path / "artifacts", ca=material.ca.cert, token=material.runner_token)
    release_env = material.client_env(tmp_path / "artifacts", ca=material.ca.cert, token=material.release_token)
    async with MeshClient(Settings.from_env(runner_env), addresses=_addresses(token_mesh)) as runner:
        run = await runner.run_pipeline(IRIS)
        request = evaluator_pb2.RegisterModelRequest(
            name="iris", model=run.train.model, metrics_report=run.evaluate.metrics_report
        )
        caplog.set_level(logging.INFO, logger="mlmesh.rpc")  # until the test ends: the line follows the status
        with pytest.raises(StageCallError) as refused:
            await runner.register_model(request)
        line = await logged_rpc_line(caplog, "/mlmesh.evaluator.v1.EvaluatorService/RegisterModel")
    assert "status=PERMISSION_DENIED" in line and "caller=token:runner" in line, line
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "token 'runner' may not call RegisterModel: it needs the role 'register'" in refused.value.details
    async with MeshClient(Settings.from_env(release_env), addresses=_addresses(token_mesh)) as release:
        assert (await release.register_model(request)).model_version.version == 1


@pytest.mark.asyncio
async def test_health_and_reflection_can_require_tokens_too(material: Material, tmp_path: Path) -> None:
    env = material.server_env(tmp_path / "a", tokens=True, MLMESH_HEALTH_AUTH="token", MLMESH_REFLECTION="token")
    stages = await _start(("loader",), env)
    address = f"localhost:{stages['loader'].port}"
    anonymous = Settings.from_env(material.client_env(tmp_path, ca=material.ca.cert))
    holder = Settings.from_env(material.client_env(tmp_path, ca=material.ca.cert, token=material.runner_token))
    try:
        assert await check_health(address, settings=anonymous) == "UNREACHABLE (UNAUTHENTICATED)"
        assert await check_health(address, settings=holder) == "SERVING"
        tls = ["-cacert", str(material.ca.cert)]
        listed = await _grpcurl_async(*tls, address, "list")
        assert listed.returncode != 0 and "Unauthenticated" in listed.stderr
        listed = await _grpcurl_async(*tls, "-H", f"authorization: Bearer {material.runner_token}", address, "list")
        assert listed.returncode == 0 and "mlmesh.loader.v1.LoaderService" in listed.stdout
    finally:
        await _stop(stages)
    stages = await _start(("loader",), material.server_env(tmp_path / "a", MLMESH_REFLECTION="off"))
    try:
        listed = await _grpcurl_async("-cacert", str(material.ca.cert), f"localhost:{stages['loader'].port}", "list")
        assert listed.returncode != 0 and "does not support the reflection API" in listed.stderr
    finally:
        await _stop(stages)


def _grpcurl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(GRPCURL), *args], capture_output=True, text=True, timeout=60)


async def _grpcurl_async(*args: str) -> subprocess.CompletedProcess:
    """grpcurl against a stage served by this very event loop, which must keep running meanwhile."""
    process = await asyncio.create_subprocess_exec(
        str(GRPCURL), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return subprocess.CompletedProcess(args, process.returncode, out.decode(), err.decode())


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("runner pipeline\n", "expected 'NAME ROLES TOKEN', found 2 fields"),
        ("runner root SECRET\n", "unknown role 'root'"),
        ("runner pipeline short\n", "at least 16 ASCII characters"),
        ("../x pipeline SECRET\n", "the name must be"),
        ("a pipeline SECRET\na register SECRET\n", "the name 'a' is used twice"),
        ("# only a comment\n", "lists no token"),
    ],
)
def test_a_bad_token_file_stops_the_stage_without_echoing_tokens(tmp_path: Path, content: str, problem: str) -> None:
    secret = "s3cr3t-" + secrets.token_hex(16)
    path = tmp_path / "tokens"
    path.write_text(content.replace("SECRET", secret))
    with pytest.raises(SettingsError) as caught:
        load_tokens(str(path))
    assert problem in str(caught.value) and secret not in str(caught.value) and "short" not in str(caught.value)


def test_every_token_is_compared_and_the_right_one_found(tmp_path: Path) -> None:
    tokens = [secrets.token_hex(20) for _ in range(3)]
    path = tmp_path / "tokens"
    path.write_text("".join(f"t{i} pipeline {t}\n" for i, t in enumerate(tokens)))
    auth = AuthInterceptor(Settings.from_env({"MLMESH_ARTIFACT_ROOT": str(tmp_path)}), load_tokens(str(path)))
    assert [auth.identify(t).name for t in tokens] == ["t0", "t1", "t2"]
    assert auth.identify(tokens[0][:-1]) is None and auth.identify("") is None
    assert all(len(t.digest) == 32 for t in auth.tokens)  # only digests are kept


# ---- real processes: mlmesh up, the CLI, the probe, grpcurl ------------------------------------
@pytest.fixture(scope="module")
def secured_up(
    material: Material, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[UpProcess, dict[str, str]]]:
    artifacts = tmp_path_factory.mktemp("secured-artifacts")
    env = {
        **os.environ,
        **material.server_env(artifacts, mtls=True, tokens=True),
        **material.full_client_env(artifacts),
        "MLMESH_GRACE_SECONDS": "1",
    }
    ports = use_free_ports(env)
    up = UpProcess({**env}, ports)
    up.wait_for("mesh is up")
    yield up, env
    up.stop()


@pytest.mark.slow  # `mlmesh up` child processes
def test_the_cli_and_probe_work_over_mtls_with_a_token(
    secured_up: tuple[UpProcess, dict[str, str]], material: Material
) -> None:
    _up, env = secured_up
    status = subprocess.run([str(BIN / "mlmesh"), "status"], env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and status.stdout.count("SERVING") == len(STAGES), status.stdout + status.stderr
    # The runner token may not register models (it has "pipeline" only), so the run does not ask to.
    run = subprocess.run(
        [str(BIN / "mlmesh"), "run", "--source", "sklearn:iris", "--json", "--no-register"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["metrics"]["accuracy"] >= 0.9
    # The run's lineage records who made each call.
    records = sorted((Path(env["MLMESH_ARTIFACT_ROOT"]) / "runs" / summary["run_id"]).glob("*.json"))
    assert len(records) == len(PIPELINE_STAGES)
    assert all(json.loads(r.read_text())["caller"].startswith("token:runner,cert:") for r in records)
    probe = [sys.executable, "-m", "services.runtime.probe", "--stage", "trainer"]
    ok = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stdout + ok.stderr
    untrusting = {
        k: v for k, v in env.items() if not k.startswith(("MLMESH_TLS_CA", "MLMESH_TLS_CERT", "MLMESH_TLS_KEY"))
    }
    untrusting = {k: v for k, v in untrusting.items() if k != "MLMESH_TLS_CLIENT_CA"}
    bad = subprocess.run(probe, env=untrusting, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "SERVING" not in bad.stdout.replace("NOT_SERVING", ""), bad.stdout
    # `mlmesh status` without the CA says what to set rather than only "unreachable".
    status = subprocess.run([str(BIN / "mlmesh"), "status"], env=untrusting, capture_output=True, text=True, timeout=60)
    assert status.returncode == 1 and status.stdout.count("set MLMESH_TLS_CA") == len(STAGES), status.stdout
    anonymous = {k: v for k, v in env.items() if k != "MLMESH_AUTH_TOKEN"}
    refused = subprocess.run(
        [str(BIN / "mlmesh"), "run", "--source", "sklearn:iris"],
        env=anonymous,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "UNAUTHENTICATED" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.slow  # `mlmesh up` child processes
def test_pyflyte_runs_the_workflow_over_mtls_with_a_token(
    secured_up: tuple[UpProcess, dict[str, str]],
    material: Material,
    tmp_path: Path,
) -> None:
    """The Flyte tasks are clients too: the same variables secure their calls."""
    _, env = secured_up
    home, temp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir(), temp.mkdir()
    flyte_env = {**env, "HOME": str(home), "TMPDIR": str(temp)}
    command = [str(BIN / "pyflyte"), "run", "workflow/pipeline.py", "training_pipeline", "--source", "sklearn:wine"]
    root = Path(__file__).resolve().parents[1]
    # The workflow registers what it promotes, so it needs a token with the role "register".
    release = {**flyte_env, "MLMESH_AUTH_TOKEN": material.release_token}
    result = subprocess.run(command, cwd=root, env=release, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "decision  PROMOTE" in result.stdout and "registered as wine-logistic_regression v1" in result.stdout
    # "runner" may train and evaluate, but the promotion step is refused, by name.
    runner = subprocess.run(
        [*command, "--seed", "3"], cwd=root, env=flyte_env, capture_output=True, text=True, timeout=300
    )
    output = " ".join((runner.stdout + runner.stderr).split())
    assert runner.returncode != 0 and "PERMISSION_DENIED: token 'runner' may not call RegisterModel" in output
    anonymous = {k: v for k, v in flyte_env.items() if k != "MLMESH_AUTH_TOKEN"}
    refused = subprocess.run(
        [*command, "--seed", "4"], cwd=root, env=anonymous, capture_output=True, text=True, timeout=300
    )
    assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stdout + refused.stderr


@pytest.mark.slow  # `mlmesh up` child processes
def test_real_grpcurl_over_mtls(secured_up: tuple[UpProcess, dict[str, str]], material: Material) -> None:
    up, _ = secured_up
    address = f"localhost:{up.ports['loader']}"
    tls = ["-cacert", str(material.ca.cert), "-cert", str(material.client.cert), "-key", str(material.client.key)]
    listed = _grpcurl(*tls, address, "list")
    assert listed.returncode == 0 and "mlmesh.loader.v1.LoaderService" in listed.stdout, listed.stderr
    health = _grpcurl(*tls, address, "grpc.health.v1.Health/Check")
    assert health.returncode == 0 and '"status": "SERVING"' in health.stdout
    bearer = ["-H", f"authorization: Bearer {material.runner_token}"]
    loaded = _grpcurl(*tls, *bearer, "-d", '{"source": "sklearn:iris"}', address, "mlmesh.loader.v1.LoaderService/Load")
    assert loaded.returncode == 0 and json.loads(loaded.stdout)["rows"] == "150", loaded.stderr
    anonymous = _grpcurl(*tls, "-d", '{"source": "sklearn:iris"}', address, "mlmesh.loader.v1.LoaderService/Load")
    assert anonymous.returncode != 0 and "Code: Unauthenticated" in anonymous.stderr
    without_cert = _grpcurl("-cacert", str(material.ca.cert), *bearer, address, "list")
    assert without_cert.returncode != 0
    plaintext = _grpcurl("-plaintext", address, "list")
    assert plaintext.returncode != 0


@pytest.mark.slow  # `mlmesh up` child processes
def test_each_call_is_logged_with_its_caller(secured_up: tuple[UpProcess, dict[str, str]]) -> None:
    up, env = secured_up
    mlmesh_run = [str(BIN / "mlmesh"), "run", "--source", "sklearn:wine", "--json"]
    ran = subprocess.run([*mlmesh_run, "--no-register"], env=env, capture_output=True, text=True, timeout=180)
    assert ran.returncode == 0, ran.stderr[-2000:]
    # The same run asking to register: "runner" lacks the role, so RegisterModel is refused.
    denied = subprocess.run(mlmesh_run, env=env, capture_output=True, text=True, timeout=180)
    assert denied.returncode != 0 and "PERMISSION_DENIED" in denied.stderr, denied.stderr[-2000:]
    anonymous = {k: v for k, v in env.items() if k != "MLMESH_AUTH_TOKEN"}
    refused = subprocess.run(mlmesh_run, env=anonymous, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr, refused.stderr[-2000:]
    up.stop()
    output = up.rest()
    calls = [line for line in output.splitlines() if " rpc method=/mlmesh." in line]
    succeeded = [line for line in calls if "status=OK" in line]
    # Every call names its token and certificate: "runner" from the CLI, "release" from the workflow's run.
    assert succeeded and all(
        re.search(r"caller=token:(runner|release),cert:\S*pipeline-runner", line) for line in succeeded
    ), "\n".join(succeeded[-5:])
    assert any("caller=token:runner," in line for line in succeeded)
    assert any("status=UNAUTHENTICATED" in line and "caller=cert:" in line for line in calls)  # the anonymous run
    assert any("status=PERMISSION_DENIED" in line and "caller=token:runner," in line for line in calls)  # RegisterModel


# ---- docs/security.md's "Transport security and identity", as written -------------------------
def _block(blocks: list[str], marker: str) -> str:
    [found] = [block for block in blocks if marker in block]
    return found


@pytest.mark.slow  # `mlmesh up` child processes
def test_docs_securing_the_mesh_commands_run_as_written(tmp_path: Path) -> None:
    blocks = page_sh_blocks("docs/security.md", "Transport security and identity")
    make_certs, settings, up_block, clients = (
        _block(blocks, "openssl req -x509"),
        _block(blocks, "export MLMESH_TLS_CERT"),
        _block(blocks, "mlmesh up"),
        _block(blocks, "mlmesh status"),
    )
    assert up_block.strip() == ".venv/bin/mlmesh up"
    run_script(make_certs, tmp_path, timeout=60)
    # The environment the settings block leaves behind, exactly.
    exported = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", settings + "\nenv -0"],
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
        env=dict(os.environ),
    )
    assert exported.returncode == 0, exported.stderr
    env = dict(item.split("=", 1) for item in exported.stdout.decode().split("\0") if "=" in item)
    assert len(Path(tmp_path, env["MLMESH_AUTH_TOKEN_FILE"]).read_text().strip()) == 64
    ports = use_free_ports(env)
    env.update(MLMESH_ARTIFACT_ROOT=str(tmp_path / "artifacts"), MLMESH_GRACE_SECONDS="1")
    up = UpProcess(env, ports, cwd=tmp_path)  # docs/security.md's `.venv/bin/mlmesh up`, in the folder with certs/
    try:
        up.wait_for("mesh is up")
        script = clients.replace(".venv/bin/", f"{BIN}/")
        for stage, port in ports.items():
            script = script.replace(f"localhost:{50051 + STAGES.index(stage)}", f"localhost:{port}")
        out = run_script(script, tmp_path, env).stdout
        assert out.count("SERVING") >= len(STAGES) + 1  # mlmesh status (every stage) and the probe
        assert "PROMOTE" in out and "mlmesh.loader.v1.LoaderService" in out and '"rows": "150"' in out
        # The same mesh refuses a caller without the token or the certificate.
        anonymous = {k: v for k, v in env.items() if k != "MLMESH_AUTH_TOKEN_FILE"}
        refused = subprocess.run(
            [str(BIN / "mlmesh"), "run", "--source", "sklearn:iris"],
            cwd=tmp_path,
            env=anonymous,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 2 and "UNAUTHENTICATED" in refused.stderr
    finally:
        up.stop()
