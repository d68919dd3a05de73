"""deploy/docker-compose.yml on a real Docker engine.

What the harness does first (as root, the way CI runs):
- installs Debian's docker.io, docker-compose and debootstrap if they are missing;
- starts dockerd if no engine answers (overlay2, then vfs; without iptables if need be);
- builds the local base image the images start from, since no registry is reachable:
  `debootstrap --variant=minbase bookworm` with python3 and python3-venv, imported
  with `docker import` as mlmesh-base:bookworm (kept for the next run);
- builds both images with BuildKit, handing pip this machine's CA bundle as a
  BuildKit secret and its index settings as build arguments.

Then the stack: all five healthy through gRPC health, grpcurl from the host on the
published ports, the pipeline service to success, the `observability` profile's
Prometheus (Debian's package, built on the same base) scraping all five and counting
the pipeline's calls, a hung and a stopped service reported unhealthy, the pipeline
failing with the stage's name, and `down -v`.

No engine and none can be started: the tests skip with the reason, except with
CI=true, where that is a failure. Figures (image sizes, up-to-healthy, pipeline
wall time) are printed at the end of the run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.runtime.settings import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, STAGES
from tests.helpers import free_ports, run_script

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPOSE_FILE = ROOT / "deploy" / "docker-compose.yml"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
BIN = Path(sys.executable).parent
GRPCURL = BIN / "grpcurl"

BASE_IMAGE = os.environ.get("MLMESH_TEST_BASE_IMAGE", "mlmesh-base:bookworm")
IMAGE_TAG = "test"
SERVICE_IMAGE = f"mlmesh-service:{IMAGE_TAG}"
PIPELINE_IMAGE = f"mlmesh-pipeline:{IMAGE_TAG}"
PROMETHEUS_IMAGE = f"mlmesh-prometheus:{IMAGE_TAG}"
# The stack runs with the optional profile on: Prometheus scrapes the stages all along.
OBSERVABILITY = ("--profile", "observability")
TEST_LABEL = "org.mlmesh.test-image=1"
DOCKERD_LOG = Path("/var/log/mlmesh-dockerd.log")
APT_PACKAGES = {
    "docker": "docker.io",
    "dockerd": "docker.io",
    "docker-compose": "docker-compose",
    "debootstrap": "debootstrap",
}

# A Docker engine, and images built from Debian's and PyPI's packages.
pytestmark = [pytest.mark.timeout(1800), pytest.mark.docker, pytest.mark.network]

FIGURES: dict[str, str] = {}


def unavailable(reason: str) -> None:
    """Skip with a visible reason; in CI (CI=true) a skip is a failure."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"Docker engine tests cannot run: {reason} (CI=true: not skipping)")
    pytest.skip(f"Docker engine tests cannot run: {reason}")


def run(cmd: list[str], timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        return subprocess.CompletedProcess(cmd, 124, out, err + f"\n(timed out after {timeout}s)")


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


# ---- the engine ----------------------------------------------------------------------------
def apt_install(packages: set[str]) -> None:
    if not packages:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        unavailable(f"{', '.join(sorted(packages))} missing, and apt-get as root is not available here")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    update = run(["apt-get", "update", "-q"], timeout=600, env=env)
    install = run(["apt-get", "install", "-y", "-q", *sorted(packages)], timeout=900, env=env)
    if install.returncode != 0:
        unavailable(
            f"apt-get install {' '.join(sorted(packages))} failed:\n{tail(update.stderr)}\n{tail(install.stderr)}"
        )


def engine_answers(docker: str) -> bool:
    return run([docker, "info", "--format", "{{.ServerVersion}}"], timeout=30).returncode == 0


def start_dockerd(docker: str) -> str:
    """Start dockerd in the background; return how it was started."""
    dockerd = shutil.which("dockerd")
    if not dockerd:
        unavailable("dockerd is not installed")
    attempts = [
        ["--storage-driver=overlay2"],
        ["--storage-driver=vfs"],
        ["--storage-driver=overlay2", "--iptables=false", "--ip-masq=false"],
        ["--storage-driver=vfs", "--iptables=false", "--ip-masq=false", "--bridge=none"],
    ]
    errors = []
    DOCKERD_LOG.parent.mkdir(parents=True, exist_ok=True)
    for options in attempts:
        with open(DOCKERD_LOG, "ab") as log:
            log.write(f"\n==== mlmesh tests: dockerd {' '.join(options)} ====\n".encode())
            log.flush()
            process = subprocess.Popen(
                [dockerd, *options],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            if engine_answers(docker):
                return " ".join(options)
            time.sleep(1)
        if process.poll() is None:  # running but never answered: stop the one we started
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        log_tail = tail(DOCKERD_LOG.read_text(errors="replace"), 8)
        errors.append(f"dockerd {' '.join(options)}: exit {process.returncode}\n{log_tail}")
    unavailable("dockerd did not start:\n" + "\n".join(errors))
    raise AssertionError("unreachable")


def client_major(docker: str) -> int:
    version = run([docker, "version", "--format", "{{.Client.Version}}"], timeout=30).stdout.strip()
    match = re.match(r"(\d+)\.", version)
    return int(match.group(1)) if match else 0


@dataclass
class Engine:
    docker: str
    build: list[str]  # a BuildKit build command; the tag, options and context follow
    build_env: dict[str, str]
    compose: list[str]
    started: str  # how dockerd was started, or "already running"
    host_network_builds: bool = False


@pytest.fixture(scope="session")
def engine() -> Engine:
    bootstrap = os.environ.get("MLMESH_DOCKER_BOOTSTRAP", "1") != "0"  # 0: neither install nor start anything
    missing = {pkg for tool, pkg in APT_PACKAGES.items() if not shutil.which(tool)}
    if missing and not bootstrap:
        unavailable(f"missing {', '.join(sorted(missing))} and MLMESH_DOCKER_BOOTSTRAP=0")
    apt_install(missing)
    docker = shutil.which("docker")
    if not docker:
        unavailable("no docker CLI after installing docker.io")
    started = "already running"
    if not engine_answers(docker):
        if not bootstrap:
            unavailable("no Docker engine answers, and MLMESH_DOCKER_BOOTSTRAP=0")
        if os.geteuid() != 0:
            unavailable("no Docker engine answers, and starting dockerd needs root")
        started = start_dockerd(docker)

    # BuildKit: buildx if present, else a pre-23 CLI (such as Debian's docker.io) with DOCKER_BUILDKIT=1.
    if run([docker, "buildx", "version"], timeout=30).returncode == 0:
        build, build_env = [docker, "buildx", "build", "--load"], {}
    else:
        candidates = [c for c in (docker, "/usr/bin/docker") if Path(c).exists()]
        legacy = next((c for c in candidates if 0 < client_major(c) < 23), None)
        if legacy is None:
            unavailable(f"no BuildKit-capable docker CLI: {docker} has no buildx and is 23 or newer")
        build, build_env = [legacy, "build", "--progress=plain"], {"DOCKER_BUILDKIT": "1"}

    if run([docker, "compose", "version"], timeout=30).returncode == 0:
        compose = [docker, "compose"]
    elif shutil.which("docker-compose"):
        compose = [shutil.which("docker-compose")]
    else:
        unavailable("neither `docker compose` nor docker-compose is installed")
    engine = Engine(docker, build, build_env, compose, started, host_network_builds="iptables=false" in started)
    versions = run(
        [docker, "version", "--format", "server {{.Server.Version}}, client {{.Client.Version}}"], timeout=30
    )
    compose_version = run([*compose, "version", "--short"], timeout=30).stdout.strip()
    FIGURES["engine"] = (
        f"{versions.stdout.strip()}; dockerd: {started}; compose: {' '.join(compose)} {compose_version}; "
        f"build: {' '.join(build)}"
    )
    return engine


# ---- the base image ------------------------------------------------------------------------
def debian_mirror() -> str:
    """The Debian mirror apt on this machine uses for bookworm."""
    sources = Path("/etc/apt/sources.list.d")
    for path in sorted(sources.glob("*.sources")) if sources.is_dir() else []:
        for block in path.read_text().split("\n\n"):
            fields = dict(
                (k.strip().lower(), v.strip())
                for k, _, v in (
                    line.partition(":") for line in block.splitlines() if ":" in line and not line.startswith("#")
                )
            )
            if "deb" in fields.get("types", "").split() and "bookworm" in fields.get("suites", "").split():
                return fields["uris"].split()[0]
    for path in [Path("/etc/apt/sources.list"), *sorted(sources.glob("*.list"))]:
        if path.is_file():
            for line in path.read_text().splitlines():
                match = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s", line)
                if match:
                    return match.group(1)
    return "http://deb.debian.org/debian"


def ensure_base_image(engine: Engine) -> str:
    if run([engine.docker, "image", "inspect", BASE_IMAGE], timeout=30).returncode == 0:
        return "cached"
    if BASE_IMAGE != "mlmesh-base:bookworm":
        unavailable(f"MLMESH_TEST_BASE_IMAGE={BASE_IMAGE} does not exist")
    apt_install({"debootstrap"} if not shutil.which("debootstrap") else set())
    mirror = debian_mirror()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mlmesh-rootfs-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        boot = run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                "bookworm",
                str(rootfs),
                mirror,
            ],
            timeout=1200,
        )
        if boot.returncode != 0:
            pytest.fail(f"debootstrap from {mirror} failed:\n{tail(boot.stdout)}\n{tail(boot.stderr)}")
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (rootfs / cache).glob("*"):
                if item.is_file():
                    item.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            [engine.docker, "import", "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]', "-", BASE_IMAGE],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            timeout=600,
        )
        tar.stdout.close()
        tar.wait()
        assert imported.returncode == 0, imported.stderr
    return f"debootstrap from {mirror} and import: {time.monotonic() - started:.0f}s"


# ---- the images ----------------------------------------------------------------------------
def pip_settings() -> tuple[list[str], list[str]]:
    """This machine's pip settings as build options: (secret options, build-arg options)."""
    config: dict[str, str] = {}
    listed = run([sys.executable, "-m", "pip", "config", "list"], timeout=60).stdout
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        config[key.split(".", 1)[-1]] = value.strip().strip("'\"")
    ca = next(
        (
            c
            for c in (
                os.environ.get("PIP_CERT"),
                config.get("cert"),
                os.environ.get("REQUESTS_CA_BUNDLE"),
                os.environ.get("SSL_CERT_FILE"),
            )
            if c and Path(c).is_file()
        ),
        None,
    )
    secrets = ["--secret", f"id=pip_ca,src={ca}"] if ca else []
    args = []
    for name, key in (
        ("PIP_INDEX_URL", "index-url"),
        ("PIP_EXTRA_INDEX_URL", "extra-index-url"),
        ("PIP_TRUSTED_HOST", "trusted-host"),
    ):
        value = os.environ.get(name) or config.get(key)
        if value:
            args += ["--build-arg", f"{name}={value}"]
    return secrets, args


@dataclass
class Images:
    engine: Engine
    sizes: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="session")
def images(engine: Engine) -> Images:
    FIGURES["base image"] = ensure_base_image(engine)
    secrets, args = pip_settings()
    network = ["--network=host"] if engine.host_network_builds else []
    builds = [  # (name, tag, options, context)
        ("pipeline", PIPELINE_IMAGE, ["-f", str(DOCKERFILE), "--target", "pipeline", *secrets, *args], ROOT),
        ("service", SERVICE_IMAGE, ["-f", str(DOCKERFILE), "--target", "service", *secrets, *args], ROOT),
        # Debian's prometheus from the base image's own apt sources; its folder is the whole context.
        ("prometheus", PROMETHEUS_IMAGE, ["-f", str(PROMETHEUS_DIR / "Dockerfile")], PROMETHEUS_DIR),
    ]
    for name, tag, options, context in builds:
        started = time.monotonic()
        result = run(
            [
                *engine.build,
                *options,
                "-t",
                tag,
                "--build-arg",
                f"BASE_IMAGE={BASE_IMAGE}",
                "--label",
                TEST_LABEL,
                *network,
                str(context),
            ],
            timeout=1500,
            env={**os.environ, **engine.build_env},
        )
        assert result.returncode == 0, f"building {name} failed:\n{tail(result.stdout, 60)}\n{tail(result.stderr, 60)}"
        FIGURES[f"build {name}"] = f"{time.monotonic() - started:.0f}s"
    # The images these tags held before are now dangling: drop them, and only them.
    run([engine.docker, "image", "prune", "-f", "--filter", f"label={TEST_LABEL}"], timeout=120)
    listing = run([engine.docker, "image", "ls", "--format", "{{.Repository}}:{{.Tag}} {{.Size}}"], timeout=60).stdout
    built = Images(engine)
    for line in listing.splitlines():
        name, _, size = line.partition(" ")
        if name in (SERVICE_IMAGE, PIPELINE_IMAGE, PROMETHEUS_IMAGE, BASE_IMAGE):
            built.sizes[name] = size
    FIGURES["image sizes"] = ", ".join(f"{k} {v}" for k, v in built.sizes.items())
    return built


def image_config(engine: Engine, image: str) -> dict:
    result = run([engine.docker, "image", "inspect", image], timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)[0]["Config"]


def test_both_image_flavours(images: Images) -> None:
    docker = images.engine.docker
    service, pipeline = image_config(images.engine, SERVICE_IMAGE), image_config(images.engine, PIPELINE_IMAGE)
    for config in (service, pipeline):
        assert config["User"] == "10001:10001"
        assert "PYTHONUNBUFFERED=1" in config["Env"]
        assert isinstance(config["Entrypoint"], list)
    assert service["Healthcheck"]["Test"][-2:] == ["-m", "services.runtime.probe"]
    assert pipeline["Healthcheck"]["Test"] == ["NONE"]

    check = (
        "import importlib.util as u, os, sys; "
        "print(u.find_spec('flytekit') is not None, u.find_spec('services.runtime.probe') is not None, os.getuid())"
    )
    in_service = run([docker, "run", "--rm", "--entrypoint", "/opt/venv/bin/python", SERVICE_IMAGE, "-c", check])
    assert in_service.stdout.split() == ["False", "True", "10001"], in_service.stdout + in_service.stderr
    in_pipeline = run([docker, "run", "--rm", "--entrypoint", "/opt/venv/bin/python", PIPELINE_IMAGE, "-c", check])
    assert in_pipeline.stdout.split() == ["True", "True", "10001"], in_pipeline.stdout + in_pipeline.stderr
    usage = run([docker, "run", "--rm", PIPELINE_IMAGE, "--help"])  # the entrypoint is pyflyte
    assert usage.returncode == 0 and "pyflyte" in usage.stdout and "run" in usage.stdout, usage.stdout + usage.stderr


def test_stage_serves_read_only_without_privileges(images: Images) -> None:
    """The Kubernetes security context, in Docker: read-only root, no capabilities, user 10001."""
    docker = images.engine.docker
    name = f"mlmesh-ro-{uuid.uuid4().hex[:8]}"
    started = run(
        [
            docker,
            "run",
            "-d",
            "--name",
            name,
            "--read-only",
            "--tmpfs",
            "/tmp",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "-e",
            "MLMESH_STAGE=features",
            "-e",
            "MLMESH_ARTIFACT_ROOT=/tmp/artifacts",
            SERVICE_IMAGE,
        ]
    )
    assert started.returncode == 0, started.stderr
    try:
        deadline, answer = time.monotonic() + 120, None
        while time.monotonic() < deadline:
            answer = run([docker, "exec", name, "/opt/venv/bin/python", "-m", "services.runtime.probe"], timeout=60)
            if answer.returncode == 0:
                break
            time.sleep(1)
        logs = run([docker, "logs", name]).stderr
        assert answer is not None and answer.returncode == 0, answer.stdout + answer.stderr + logs
        assert answer.stdout.strip() == "127.0.0.1:50053: SERVING"
    finally:
        run([docker, "rm", "-f", name])


# ---- the stack -----------------------------------------------------------------------------
@dataclass
class Stack:
    engine: Engine
    project: str
    env: dict[str, str]
    ports: dict[str, int]
    containers: dict[str, str] = field(default_factory=dict)

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return run(
            [*self.engine.compose, "-p", self.project, "-f", str(COMPOSE_FILE), *args], timeout=timeout, env=self.env
        )

    def inspect(self, stage: str) -> dict:
        result = run([self.engine.docker, "inspect", self.containers[stage]], timeout=60)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)[0]["State"]

    def health(self) -> dict[str, str]:
        ids = [self.containers[s] for s in STAGES]
        fmt = "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}"
        result = run([self.engine.docker, "inspect", "--format", fmt, *ids], timeout=60)
        lines = result.stdout.splitlines()
        return {s: line for s, line in zip(STAGES, lines, strict=False)}

    def logs(self) -> str:
        return tail(self.compose("logs", "--no-color", "--tail", "30", timeout=120).stdout, 120)

    def wait_for(self, wanted: dict[str, str], timeout: float) -> float:
        started = time.monotonic()
        state: dict[str, str] = {}
        while time.monotonic() - started < timeout:
            state = self.health()
            if all(state.get(s, "").endswith(" " + w) for s, w in wanted.items()):
                return time.monotonic() - started
            if any(line.startswith("exited") for s, line in state.items() if wanted.get(s) == "healthy"):
                break
            time.sleep(0.5)
        raise AssertionError(f"wanted {wanted}, have {state}\n{self.logs()}")


def published(stack: Stack, stage: str) -> str:
    return f"127.0.0.1:{stack.ports[stage]}"


@pytest.fixture(scope="module")
def stack(images: Images, request: pytest.FixtureRequest) -> Iterator[Stack]:
    engine = images.engine
    # The stages' host ports, and Prometheus's (MLMESH_PROMETHEUS_HOST_PORT): never a fixed port.
    ports = dict(zip([*STAGES, "prometheus"], free_ports(len(STAGES) + 1), strict=True))
    # The loader's /data: a host folder holding one table, readable by the images' uid 10001.
    data = Path(tempfile.mkdtemp(prefix="mlmesh-data-"))
    data.chmod(0o755)
    (data / "houses.csv").write_text(
        "rooms,price\n" + "".join(f"{i % 7 + 1},{100 + 25 * (i % 7) + i % 3}\n" for i in range(60))
    )
    (data / "houses.csv").chmod(0o644)
    env = {
        **os.environ,
        "BASE_IMAGE": BASE_IMAGE,
        "MLMESH_IMAGE_TAG": IMAGE_TAG,
        "MLMESH_PUBLISH_ADDRESS": "127.0.0.1",
        "MLMESH_DATA_DIR": str(data),
    }
    env.update({f"MLMESH_{s.upper()}_HOST_PORT": str(p) for s, p in ports.items()})
    env.pop("MLMESH_LOG_LEVEL", None)
    stack = Stack(engine, f"mlmeshtest{uuid.uuid4().hex[:10]}", env, ports)
    try:
        started = time.monotonic()
        up = stack.compose(*OBSERVABILITY, "up", "-d", "--no-build", *STAGES, "prometheus")
        assert up.returncode == 0, up.stdout + up.stderr
        for stage in STAGES:
            ids = stack.compose("ps", "-q", stage, timeout=60).stdout.split()
            assert len(ids) == 1, ids
            stack.containers[stage] = ids[0]
        stack.wait_for({s: "healthy" for s in STAGES}, timeout=240)
        FIGURES["up -d to all five healthy"] = f"{time.monotonic() - started:.1f}s (compose up itself included)"
        yield stack
    finally:
        # With the profile, so that its container and volume go too.
        down = stack.compose(*OBSERVABILITY, "down", "-v", "--remove-orphans", timeout=180)
        if down.returncode != 0:
            print(down.stdout + down.stderr, file=sys.stderr)
        shutil.rmtree(data, ignore_errors=True)


def test_all_five_are_healthy_through_grpc_health(stack: Stack) -> None:
    for stage in STAGES:
        state = stack.inspect(stage)
        assert state["Status"] == "running" and state["Health"]["Status"] == "healthy"
        last = state["Health"]["Log"][-1]
        assert last["ExitCode"] == 0 and last["Output"].strip() == f"127.0.0.1:{DEFAULT_PORTS[stage]}: SERVING"


def grpcurl(*args: str) -> subprocess.CompletedProcess:
    return run([str(GRPCURL), "-plaintext", *args], timeout=60)


def test_grpcurl_from_the_host(stack: Stack) -> None:
    loader = published(stack, "loader")
    listed = grpcurl(loader, "list")
    assert listed.returncode == 0, listed.stderr
    assert {"mlmesh.loader.v1.LoaderService", "grpc.health.v1.Health"} <= set(listed.stdout.split())
    health = grpcurl("-d", '{"service": "mlmesh.loader.v1.LoaderService"}', loader, "grpc.health.v1.Health/Check")
    assert health.returncode == 0 and json.loads(health.stdout) == {"status": "SERVING"}
    loaded = grpcurl("-d", '{"source": "sklearn:iris"}', loader, "mlmesh.loader.v1.LoaderService/Load")
    assert loaded.returncode == 0, loaded.stderr
    reply = json.loads(loaded.stdout)
    assert reply["rows"] == "150" and reply["dataset"]["uri"].startswith("file:///artifacts/objects/")
    # The loader reads the mounted /data, and nothing else of the container.
    table = grpcurl(
        "-d", '{"source": "/data/houses.csv", "target_column": "price"}', loader, "mlmesh.loader.v1.LoaderService/Load"
    )
    assert table.returncode == 0 and json.loads(table.stdout)["rows"] == "60", table.stderr
    for outside in ("/etc/passwd::x.csv", "/app/../etc/shadow.csv", "/artifacts/x.csv", "/proc/self/environ.csv"):
        refused = grpcurl(
            "-d", json.dumps({"source": outside, "target_column": "x"}), loader, "mlmesh.loader.v1.LoaderService/Load"
        )
        assert refused.returncode != 0 and "Code: PermissionDenied" in refused.stderr, (outside, refused.stderr)
        assert "root:" not in refused.stderr
    # Every published port answers, and the CLI's status sees the mesh from the host.
    for stage in STAGES:
        check = grpcurl(published(stack, stage), "grpc.health.v1.Health/Check")
        assert check.returncode == 0 and "SERVING" in check.stdout, f"{stage}: {check.stderr}"
    env = {**os.environ, **{f"MLMESH_{s.upper()}_ADDRESS": published(stack, s) for s in STAGES}}
    status = run([str(BIN / "mlmesh"), "status"], env=env, timeout=60)
    assert status.returncode == 0 and status.stdout.count("SERVING") == 5, status.stdout


def test_pipeline_service_runs_to_success(stack: Stack) -> None:
    started = time.monotonic()
    result = stack.compose("run", "--rm", "pipeline", timeout=900)
    cold = time.monotonic() - started
    assert result.returncode == 0, tail(result.stdout, 60) + tail(result.stderr, 60) + stack.logs()
    assert (
        "decision  PROMOTE" in result.stdout and "registered as breast_cancer-logistic_regression v1" in result.stdout
    )
    FIGURES["pipeline in compose, cold (compose run --rm)"] = f"{cold:.1f}s"

    # Reading the report, as docs/deploy.md says: it is in the store, next to the services.
    html_uri = re.search(r"^report +(/artifacts/objects/\S+?\.html)$", result.stdout, re.M)  # the summary's report line
    assert html_uri, result.stdout
    report = stack.compose("exec", "-T", "evaluator", "cat", html_uri.group(1), timeout=60)
    assert report.returncode == 0 and "<html" in report.stdout.lower() and "accuracy" in report.stdout
    models = stack.compose("run", "--rm", "--no-deps", "--entrypoint", "mlmesh", "pipeline", "models", timeout=300)
    assert models.returncode == 0 and "breast_cancer-logistic_regression" in models.stdout, (
        models.stdout + models.stderr
    )

    started = time.monotonic()
    again = stack.compose("run", "--rm", "pipeline", timeout=900)
    FIGURES["pipeline in compose, warm (service caches)"] = f"{time.monotonic() - started:.1f}s"
    assert again.returncode == 0, tail(again.stdout, 40) + tail(again.stderr, 40)


def promql(stack: Stack, query: str) -> list[dict]:
    """An instant query over Prometheus's HTTP API, from the host on the published port."""
    url = f"http://127.0.0.1:{stack.ports['prometheus']}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def test_prometheus_scrapes_the_five_stages_and_counts_the_pipeline(stack: Stack) -> None:
    """The observability profile: after the pipeline runs (the test above), Prometheus has every stage
    up and the loader's Load calls with grpc_code OK, from the stages' own /metrics."""
    wanted = {
        "up": 'up{job="mlmesh"} == 1',
        "loads": 'sum(grpc_server_handled_total{job="mlmesh", stage="loader", grpc_method="Load", grpc_code="OK"})',
        "hits": 'sum by (stage) (mlmesh_cache_requests_total{job="mlmesh", result="hit"})',
    }
    started, seen, last_error = time.monotonic(), {}, ""
    # A scrape every 5 s (deploy/prometheus/prometheus.yml): the numbers arrive within seconds.
    while time.monotonic() - started < 90:
        try:
            seen = {name: promql(stack, query) for name, query in wanted.items()}
        except OSError as exc:  # Prometheus still starting
            last_error = str(exc)
            time.sleep(1)
            continue
        # The warm run's last calls may be younger than the last scrape: wait for every number.
        hit_stages = {r["metric"]["stage"] for r in seen["hits"] if float(r["value"][1]) > 0}
        if (
            len(seen["up"]) == len(STAGES)
            and seen["loads"]
            and float(seen["loads"][0]["value"][1]) >= 2
            and hit_stages == set(STAGES)
        ):
            break
        time.sleep(1)
    FIGURES["Prometheus: all five up and the loads counted after"] = f"{time.monotonic() - started:.1f}s"
    assert {r["metric"]["stage"] for r in seen.get("up", [])} == set(STAGES), (seen, last_error, stack.logs())
    assert {r["metric"]["instance"] for r in seen["up"]} == {f"{s}:{DEFAULT_METRICS_PORTS[s]}" for s in STAGES}
    # Two pipeline runs, one Load each, and the grpcurl Loads of test_grpcurl_from_the_host.
    assert seen["loads"] and float(seen["loads"][0]["value"][1]) >= 2, seen["loads"]
    # The warm run was served from the caches: every stage counted hits; the stages' own `stage`
    # label is kept (honor_labels), not doubled as exported_stage.
    assert {r["metric"]["stage"] for r in seen["hits"] if float(r["value"][1]) > 0} == set(STAGES), seen["hits"]
    assert not promql(stack, '{job="mlmesh", exported_stage!=""}')
    # The alert rules are loaded, and none fires on a healthy mesh.
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.ports['prometheus']}/api/v1/rules", timeout=10) as response:
        groups = json.loads(response.read())["data"]["groups"]
    assert {r["name"] for g in groups for r in g["rules"]} >= {"MlmeshStageDown", "MlmeshStageErrorRatioHigh"}
    assert not promql(stack, 'ALERTS{alertstate="firing"}')
    # Prometheus runs as the image's non-root user.
    ids = stack.compose("ps", "-q", "prometheus", timeout=60).stdout.split()
    assert len(ids) == 1, ids
    user = run([stack.engine.docker, "inspect", "--format", "{{.Config.User}}", ids[0]], timeout=60).stdout.strip()
    assert user and not user.startswith(("0", "root")), user


def test_hung_service_is_reported_unhealthy(stack: Stack) -> None:
    """A frozen server still holds its port; only a real gRPC health check notices."""
    docker, container = stack.engine.docker, stack.containers["evaluator"]
    frozen = run([docker, "kill", "--signal", "SIGSTOP", container], timeout=60)
    assert frozen.returncode == 0, frozen.stderr
    try:
        waited = stack.wait_for({"evaluator": "unhealthy"}, timeout=90)
        FIGURES["hung evaluator reported unhealthy after"] = f"{waited:.0f}s"
        log = stack.inspect("evaluator")["Health"]["Log"][-1]
        assert log["ExitCode"] != 0 and ("DEADLINE_EXCEEDED" in log["Output"] or "timeout" in log["Output"]), log
        probe = run(
            [
                sys.executable,
                "-m",
                "services.runtime.probe",
                "--address",
                published(stack, "evaluator"),
                "--timeout",
                "2",
            ],
            timeout=60,
        )
        assert probe.returncode == 1 and "UNREACHABLE" in probe.stdout
    finally:
        run([docker, "kill", "--signal", "SIGCONT", container], timeout=60)
    stack.wait_for({"evaluator": "healthy"}, timeout=90)


def test_stopped_service_is_unhealthy_and_the_pipeline_names_it(stack: Stack) -> None:
    stop = stack.compose("stop", "trainer", timeout=120)
    assert stop.returncode == 0, stop.stderr
    state = stack.inspect("trainer")
    assert state["Status"] == "exited" and state["Health"]["Status"] == "unhealthy"
    assert state["ExitCode"] == 0, "the trainer drains and exits cleanly on SIGTERM"
    probe = run([sys.executable, "-m", "services.runtime.probe", "--address", published(stack, "trainer")], timeout=60)
    assert probe.returncode == 1 and "UNREACHABLE" in probe.stdout

    # --no-deps: otherwise compose would start the trainer again before running the pipeline.
    started = time.monotonic()
    result = stack.compose(
        "run",
        "--rm",
        "--no-deps",
        "pipeline",
        "run",
        "workflow/pipeline.py",
        "training_pipeline",
        "--seed",
        "7",
        timeout=600,
    )
    FIGURES["pipeline failing on the stopped trainer"] = f"{time.monotonic() - started:.1f}s"
    assert result.returncode != 0
    output = re.sub(r"\s+", " ", result.stdout + result.stderr)
    assert "trainer at trainer:50054 failed with UNAVAILABLE" in output, tail(result.stdout + result.stderr, 60)


def test_up_brings_the_mesh_back_and_exits_with_the_pipeline_status(stack: Stack) -> None:
    # The README's one command; it restarts the stopped trainer, waits for health, runs, and stops everything.
    started = time.monotonic()
    result = stack.compose("up", "--no-build", "--exit-code-from", "pipeline", timeout=900)
    FIGURES["up --exit-code-from pipeline (trainer restarted)"] = f"{time.monotonic() - started:.1f}s"
    assert result.returncode == 0, tail(result.stdout, 60) + tail(result.stderr, 60)
    assert "decision  PROMOTE" in result.stdout


def test_down_removes_containers_and_the_volume(stack: Stack) -> None:
    # docs/deploy.md's `down -v`, with the profile the stack was started with (Prometheus and its volume).
    down = stack.compose(*OBSERVABILITY, "down", "-v", "--remove-orphans", timeout=180)
    assert down.returncode == 0, down.stderr
    docker = stack.engine.docker
    left = run([docker, "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={stack.project}"]).stdout
    volumes = run(
        [docker, "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={stack.project}"]
    ).stdout
    assert not left.strip() and not volumes.strip(), (left, volumes)


# ---- the same mesh with TLS, mTLS and tokens (README "Securing the mesh") ------------------------
TLS_COMPOSE_FILE = ROOT / "deploy" / "docker-compose.tls.yml"


def test_tls_override_runs_the_pipeline_over_mtls(images: Images, tmp_path: Path) -> None:
    from tests.test_mesh_processes import readme_section_blocks

    blocks = readme_section_blocks("Securing the mesh")
    recipe = next(block for block in blocks if "openssl req -x509" in block)
    compose_block = next(block for block in blocks if "docker-compose.tls.yml" in block)
    permissions, up_line = [line.strip() for line in compose_block.splitlines() if line.strip()]
    assert up_line == (
        "docker compose -f deploy/docker-compose.yml -f deploy/docker-compose.tls.yml "
        "up --build --exit-code-from pipeline"
    )
    for script in (recipe, permissions):
        run_script(script, tmp_path, timeout=120)
    certs = tmp_path / "certs"
    tmp_path.chmod(0o755)
    certs.chmod(0o755)
    engine = images.engine
    ports = dict(zip(STAGES, free_ports(len(STAGES)), strict=True))
    env = {
        **os.environ,
        "BASE_IMAGE": BASE_IMAGE,
        "MLMESH_IMAGE_TAG": IMAGE_TAG,
        "MLMESH_PUBLISH_ADDRESS": "127.0.0.1",
        "MLMESH_CERTS_DIR": str(certs),
        **{f"MLMESH_{s.upper()}_HOST_PORT": str(p) for s, p in ports.items()},
    }
    env.pop("MLMESH_LOG_LEVEL", None)
    project = f"mlmeshtls{uuid.uuid4().hex[:10]}"
    compose = [*engine.compose, "-p", project, "-f", str(COMPOSE_FILE), "-f", str(TLS_COMPOSE_FILE)]
    try:
        # The README's command; --no-build because the images were built above, under this test's tag.
        started = time.monotonic()
        result = run([*compose, "up", "--no-build", "--exit-code-from", "pipeline"], timeout=900, env=env)
        FIGURES["TLS compose: up --exit-code-from pipeline"] = f"{time.monotonic() - started:.1f}s"
        stack_logs = tail(run([*compose, "logs", "--no-color", "--tail", "20"], timeout=120, env=env).stdout, 100)
        assert result.returncode == 0, tail(result.stdout, 60) + tail(result.stderr, 60) + stack_logs
        assert "decision  PROMOTE" in result.stdout
        logs = run([*compose, "logs", "--no-color", "loader"], timeout=120, env=env).stdout
        assert "mTLS, bearer tokens" in logs and re.search(r"caller=token:workflow,cert:\S*pipeline-runner", logs), (
            tail(logs)
        )

        # From the host: the published ports need the CA, a client certificate and a token.
        up = run([*compose, "up", "-d", "--no-build", *STAGES], timeout=300, env=env)
        assert up.returncode == 0, up.stderr
        loader = f"127.0.0.1:{ports['loader']}"
        tls = ["-cacert", str(certs / "ca.pem"), "-cert", str(certs / "client.pem"), "-key", str(certs / "client.key")]
        token = ["-H", f"authorization: Bearer {(certs / 'workflow.token').read_text().strip()}"]
        deadline = time.monotonic() + 180
        while run([str(GRPCURL), *tls, loader, "grpc.health.v1.Health/Check"], timeout=30).returncode != 0:
            assert time.monotonic() < deadline, "the TLS loader never answered"
            time.sleep(1)
        loaded = run(
            [
                str(GRPCURL),
                *tls,
                *token,
                "-d",
                '{"source": "sklearn:iris"}',
                loader,
                "mlmesh.loader.v1.LoaderService/Load",
            ],
            timeout=60,
        )
        assert loaded.returncode == 0 and json.loads(loaded.stdout)["rows"] == "150", loaded.stderr
        anonymous = run(
            [str(GRPCURL), *tls, "-d", '{"source": "sklearn:iris"}', loader, "mlmesh.loader.v1.LoaderService/Load"],
            timeout=60,
        )
        assert anonymous.returncode != 0 and "Code: Unauthenticated" in anonymous.stderr
        assert run([str(GRPCURL), "-plaintext", loader, "list"], timeout=60).returncode != 0
        assert run([str(GRPCURL), "-cacert", str(certs / "ca.pem"), loader, "list"], timeout=60).returncode != 0
    finally:
        down = run([*compose, "down", "-v", "--remove-orphans"], timeout=180, env=env)
        if down.returncode != 0:
            print(down.stdout + down.stderr, file=sys.stderr)


@pytest.fixture(scope="module", autouse=True)
def print_figures(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if not FIGURES:
        return
    lines = ["", "---- deploy figures ----", *(f"{k}: {v}" for k, v in FIGURES.items())]
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:
        print("\n".join(lines))
        return
    with capture.global_and_fixture_disabled():  # shown even when the tests pass
        reporter.ensure_newline()
        for line in lines:
            reporter.write_line(line)
