"""A real Docker engine for the deploy tests, and the images and compose stacks they run.

What it does first (as root, the way CI runs), unless MLMESH_DOCKER_BOOTSTRAP=0:
- installs Debian's docker.io, docker-compose and debootstrap if they are missing;
- starts dockerd if no engine answers (overlay2, then vfs; without iptables if need be);
- for a foreign platform (linux/arm64 on an x86 machine), installs Debian's qemu-user-static
  and registers its binfmt_misc handler, so the engine runs that platform's binaries under
  emulation;
- builds a local base image per platform, since no registry is reachable:
  `debootstrap --arch=<arch> --variant=minbase bookworm` with python3 and python3-venv, added to
  `FROM scratch` by a BuildKit build with `--platform linux/<arch>`, so that the image's metadata
  names its platform (`docker import` would stamp the host's) and a `--platform` build finds it
  locally. It is kept for the next run;
- builds the images from deploy/Dockerfile, unchanged, with BuildKit and `--platform`, handing pip
  this machine's CA bundle as a BuildKit secret and its index settings as build arguments.

When something cannot be had, the tests skip with the reason, except with CI=true, where that is
a failure. Figures (build times, image sizes, up-to-healthy, pipeline wall times) are collected in
FIGURES and printed at the end of each module that uses them.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.runtime.catalog import STAGES
from tests.helpers import free_ports

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPOSE_FILE = ROOT / "deploy" / "docker-compose.yml"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
BIN = Path(sys.executable).parent
GRPCURL = BIN / "grpcurl"

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
BINFMT = Path("/proc/sys/fs/binfmt_misc")

FIGURES: dict[str, str] = {}


def bootstrapping() -> bool:
    """MLMESH_DOCKER_BOOTSTRAP=0: install, start and register nothing; use what is there."""
    return os.environ.get("MLMESH_DOCKER_BOOTSTRAP", "1") != "0"


# ---- platforms -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Platform:
    arch: str  # Docker's and Debian's name: amd64, arm64
    machine: str  # what `uname -m` says on it: x86_64, aarch64
    elf_machine: int  # e_machine in its ELF headers: 62 (x86-64), 183 (AArch64)

    @property
    def docker(self) -> str:
        return f"linux/{self.arch}"


AMD64 = Platform("amd64", "x86_64", 62)
ARM64 = Platform("arm64", "aarch64", 183)
HOST = {p.machine: p for p in (AMD64, ARM64)}.get(platform.machine(), AMD64)

# The host platform's images keep their plain names; another platform's carry its name, since the
# engine's image store holds one platform per tag.
BASE_IMAGE = os.environ.get("MLMESH_TEST_BASE_IMAGE", "mlmesh-base:bookworm")
IMAGE_TAG = "test"


def base_image(p: Platform) -> str:
    return BASE_IMAGE if p == HOST else f"mlmesh-base:bookworm-{p.arch}"


def image_tag(p: Platform) -> str:
    return IMAGE_TAG if p == HOST else f"{IMAGE_TAG}-{p.arch}"


SERVICE_IMAGE = f"mlmesh-service:{IMAGE_TAG}"
PIPELINE_IMAGE = f"mlmesh-pipeline:{IMAGE_TAG}"
PROMETHEUS_IMAGE = f"mlmesh-prometheus:{IMAGE_TAG}"


# ---- commands --------------------------------------------------------------------------------
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
    bootstrap = bootstrapping()
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


# ---- another platform's binaries, under emulation ------------------------------------------
def _handler(p: Platform) -> Path:
    return BINFMT / f"qemu-{p.machine}"


def _handler_works(p: Platform) -> bool:
    """Registered, enabled, and with the F flag: the kernel opened the interpreter when it was
    registered, so it also runs inside containers, whose file systems do not have it."""
    try:
        text = _handler(p).read_text()
    except OSError:
        return False
    flags = re.search(r"^flags: *(\S*)", text, re.M)
    return text.startswith("enabled") and flags is not None and "F" in flags.group(1)


def ensure_emulation(p: Platform) -> str:
    """The host runs p's binaries: natively, or by qemu-user-static through binfmt_misc."""
    if p == HOST:
        return "native"
    if _handler_works(p):
        return f"binfmt handler qemu-{p.machine} already registered"
    if not bootstrapping():
        unavailable(f"no binfmt_misc handler for {p.machine} binaries, and MLMESH_DOCKER_BOOTSTRAP=0")
    if os.geteuid() != 0:
        unavailable(f"no binfmt_misc handler for {p.machine} binaries, and registering one needs root")
    if not (BINFMT / "register").exists():
        mounted = run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], timeout=30)
        if mounted.returncode != 0:
            unavailable(f"binfmt_misc cannot be mounted here: {tail(mounted.stderr, 3)}")
    rule = Path(f"/usr/lib/binfmt.d/qemu-{p.machine}.conf")  # Debian's qemu-user-static ships one per machine
    if not rule.is_file():
        apt_install({"qemu-user-static"})
    if not rule.is_file():
        unavailable(f"qemu-user-static installed no {rule}")
    if not _handler(p).exists():
        try:
            (BINFMT / "register").write_text(rule.read_text().strip())
        except OSError as exc:
            unavailable(f"registering {rule} with binfmt_misc failed: {exc}")
    if not _handler_works(p):
        unavailable(f"the binfmt handler {_handler(p)} is not enabled with the F flag")
    return f"registered Debian's qemu-{p.machine}-static with binfmt_misc"


BASE_DOCKERFILE = """FROM scratch
ADD rootfs.tar /
ENV LANG=C.UTF-8
CMD ["python3"]
"""


def ensure_base_image(engine: Engine, p: Platform) -> str:
    image = base_image(p)
    if run([engine.docker, "image", "inspect", image], timeout=30).returncode == 0:
        return "cached"
    if p == HOST and image != "mlmesh-base:bookworm":
        unavailable(f"MLMESH_TEST_BASE_IMAGE={image} does not exist")
    apt_install({"debootstrap"} if not shutil.which("debootstrap") else set())
    mirror = debian_mirror()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"mlmesh-rootfs-{p.arch}-", dir="/var/tmp") as tmp:
        rootfs, context = Path(tmp) / "rootfs", Path(tmp) / "context"
        boot = run(
            [
                "debootstrap",
                f"--arch={p.arch}",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                "bookworm",
                str(rootfs),
                mirror,
            ],
            timeout=1800,
        )
        if boot.returncode != 0:
            pytest.fail(f"debootstrap --arch={p.arch} from {mirror} failed:\n{tail(boot.stdout)}\n{tail(boot.stderr)}")
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (rootfs / cache).glob("*"):
                if item.is_file():
                    item.unlink()
        context.mkdir()
        (context / "Dockerfile").write_text(BASE_DOCKERFILE)
        # The kernel's file systems are mounted by the engine; their folders stay, empty.
        packed = run(
            [
                "tar",
                "-C",
                str(rootfs),
                "--numeric-owner",
                "--exclude=./proc/*",
                "--exclude=./sys/*",
                "--exclude=./dev/*",
                "-cf",
                str(context / "rootfs.tar"),
                ".",
            ],
            timeout=600,
        )
        assert packed.returncode == 0, packed.stderr
        shutil.rmtree(rootfs)
        built = run(
            [*engine.build, "--platform", p.docker, "-t", image, str(context)],
            timeout=900,
            env={**os.environ, **engine.build_env},
        )
        assert built.returncode == 0, f"building {image} failed:\n{tail(built.stdout)}\n{tail(built.stderr)}"
    return f"debootstrap --arch={p.arch} from {mirror} and build: {time.monotonic() - started:.0f}s"


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
    platform: Platform
    sizes: dict[str, str] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return image_tag(self.platform)

    @property
    def service(self) -> str:
        return f"mlmesh-service:{self.tag}"

    @property
    def pipeline(self) -> str:
        return f"mlmesh-pipeline:{self.tag}"


def build_images(engine: Engine, p: Platform, prometheus: bool = True) -> Images:
    """The service and pipeline images (and Prometheus's) for p, from deploy/Dockerfile as it is."""
    label = "" if p == HOST else f" {p.arch}"
    FIGURES[f"emulation{label}"] = ensure_emulation(p)
    FIGURES[f"base image{label}"] = ensure_base_image(engine, p)
    built = Images(engine, p)
    secrets, args = pip_settings()
    network = ["--network=host"] if engine.host_network_builds else []
    common = ["-f", str(DOCKERFILE), *secrets, *args]
    builds = [  # (name, tag, options, context)
        ("pipeline", built.pipeline, [*common, "--target", "pipeline"], ROOT),
        ("service", built.service, [*common, "--target", "service"], ROOT),
    ]
    if prometheus:
        # Debian's prometheus from the base image's own apt sources; its folder is the whole context.
        tag = f"mlmesh-prometheus:{built.tag}"
        builds.append(("prometheus", tag, ["-f", str(PROMETHEUS_DIR / "Dockerfile")], PROMETHEUS_DIR))
    for name, tag, options, context in builds:
        started = time.monotonic()
        result = run(
            [
                *engine.build,
                *options,
                "--platform",
                p.docker,
                "-t",
                tag,
                "--build-arg",
                f"BASE_IMAGE={base_image(p)}",
                "--label",
                TEST_LABEL,
                *network,
                str(context),
            ],
            timeout=2400,
            env={**os.environ, **engine.build_env},
        )
        assert result.returncode == 0, f"building {name} failed:\n{tail(result.stdout, 60)}\n{tail(result.stderr, 60)}"
        FIGURES[f"build {name}{label}"] = f"{time.monotonic() - started:.0f}s"
    # The images these tags held before are now dangling: drop them, and only them.
    run([engine.docker, "image", "prune", "-f", "--filter", f"label={TEST_LABEL}"], timeout=120)
    listing = run([engine.docker, "image", "ls", "--format", "{{.Repository}}:{{.Tag}} {{.Size}}"], timeout=60).stdout
    wanted = {tag for _, tag, _, _ in builds} | {base_image(p)}
    for line in listing.splitlines():
        name, _, size = line.partition(" ")
        if name in wanted:
            built.sizes[name] = size
    FIGURES[f"image sizes{label}"] = ", ".join(f"{k} {v}" for k, v in built.sizes.items())
    return built


@pytest.fixture(scope="session")
def images(engine: Engine) -> Images:
    """This machine's platform's images, built once per session."""
    return build_images(engine, HOST)


def image_inspect(engine: Engine, image: str) -> dict:
    result = run([engine.docker, "image", "inspect", image], timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)[0]


def image_config(engine: Engine, image: str) -> dict:
    return image_inspect(engine, image)["Config"]


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


@contextlib.contextmanager
def compose_stack(
    images: Images,
    services: tuple[str, ...] = STAGES,
    profiles: tuple[str, ...] = (),
    healthy_within: float = 240,
    variables: dict[str, str] | None = None,
) -> Iterator[Stack]:
    """deploy/docker-compose.yml up with `images`: the stages' host ports (and Prometheus's) free ones,
    the loader's /data a host folder holding one table, and any other compose `variables`;
    `down -v` afterwards."""
    engine = images.engine
    ports = dict(zip([*STAGES, "prometheus"], free_ports(len(STAGES) + 1), strict=True))
    # Readable by the images' uid 10001.
    data = Path(tempfile.mkdtemp(prefix="mlmesh-data-"))
    data.chmod(0o755)
    (data / "houses.csv").write_text(
        "rooms,price\n" + "".join(f"{i % 7 + 1},{100 + 25 * (i % 7) + i % 3}\n" for i in range(60))
    )
    (data / "houses.csv").chmod(0o644)
    env = {
        **os.environ,
        "BASE_IMAGE": base_image(images.platform),
        "MLMESH_IMAGE_TAG": images.tag,
        "MLMESH_PUBLISH_ADDRESS": "127.0.0.1",
        "MLMESH_DATA_DIR": str(data),
    }
    env.update({f"MLMESH_{s.upper()}_HOST_PORT": str(p) for s, p in ports.items()})
    env.update(variables or {})
    env.pop("MLMESH_LOG_LEVEL", None)
    stack = Stack(engine, f"mlmeshtest{uuid.uuid4().hex[:10]}", env, ports)
    label = "" if images.platform == HOST else f" ({images.platform.arch})"
    try:
        started = time.monotonic()
        up = stack.compose(*profiles, "up", "-d", "--no-build", *services, timeout=600)
        assert up.returncode == 0, up.stdout + up.stderr
        for stage in STAGES:
            ids = stack.compose("ps", "-q", stage, timeout=60).stdout.split()
            assert len(ids) == 1, ids
            stack.containers[stage] = ids[0]
        stack.wait_for({s: "healthy" for s in STAGES}, timeout=healthy_within)
        FIGURES[f"up -d to every stage healthy{label}"] = f"{time.monotonic() - started:.1f}s (compose up included)"
        yield stack
    finally:
        # With the same profiles, so that their containers and volumes go too.
        down = stack.compose(*profiles, "down", "-v", "--remove-orphans", timeout=300)
        if down.returncode != 0:
            print(down.stdout + down.stderr, file=sys.stderr)
        shutil.rmtree(data, ignore_errors=True)


def grpcurl(*args: str) -> subprocess.CompletedProcess:
    return run([str(GRPCURL), "-plaintext", *args], timeout=120)


FIGURES_FILE = "deploy-figures.txt"


def print_figures(request: pytest.FixtureRequest) -> None:
    """FIGURES on the terminal, even when the tests pass (a module's autouse fixture calls this)."""
    if not FIGURES:
        return
    lines = ["", "---- deploy figures ----", *(f"{k}: {v}" for k, v in FIGURES.items())]
    FIGURES.clear()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # A worker's terminal is not shown: the controller prints this file in its summary
        # (tests/conftest.py). The workers' temp folders sit inside the controller's.
        shared = request.getfixturevalue("tmp_path_factory").getbasetemp().parent / FIGURES_FILE
        with shared.open("a") as out:
            out.write("\n".join(lines[2:]) + "\n")
        return
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:
        print("\n".join(lines))
        return
    with capture.global_and_fixture_disabled():
        reporter.ensure_newline()
        for line in lines:
            reporter.write_line(line)
