"""deploy/docker-compose.yml on a real Docker engine, with this machine's platform's images.

tests/docker_harness.py provides the engine (installed and started if need be), the local base
image and the images built from deploy/Dockerfile; tests/test_compose_arm64.py runs the same stack
from linux/arm64 images under emulation.

Here: both image flavours, a stage serving read-only without privileges, then the stack: every
stage healthy through gRPC health, grpcurl from the host on the published ports, the pipeline
service to success, the serving stage answering the Open Inference Protocol for the model the
pipeline promoted (grpcurl from the host), the `observability` profile's Prometheus (Debian's
package, built on the same base) scraping all six and counting the pipeline's calls and the
prediction, a hung and a stopped service reported unhealthy, the pipeline failing with the
stage's name, `down -v`, and the TLS override, where a `predict` token gets predictions only.

No engine and none can be started: the tests skip with the reason, except with CI=true, where
that is a failure. Figures (image sizes, up-to-healthy, pipeline wall time) are printed at the end.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.runtime.catalog import PIPELINE_STAGES, STAGES
from services.runtime.settings import DEFAULT_METRICS_PORTS, DEFAULT_PORTS
from tests.docker_harness import (
    BASE_IMAGE,
    BIN,
    COMPOSE_FILE,
    FIGURES,
    GRPCURL,
    IMAGE_TAG,
    OBSERVABILITY,
    PIPELINE_IMAGE,
    ROOT,
    SERVICE_IMAGE,
    Images,
    Stack,
    compose_stack,
    grpcurl,
    image_config,
    print_figures,
    published,
    run,
    tail,
)
from tests.helpers import free_ports, run_script

# A Docker engine, and images built from Debian's and PyPI's packages.
pytestmark = [pytest.mark.timeout(1800), pytest.mark.docker, pytest.mark.network]

# What the compose pipeline registers (its defaults: sklearn:breast_cancer, logistic regression).
MODEL = "breast_cancer-logistic_regression"
INFERENCE = "inference.GRPCInferenceService"
# Run inside the serving container: the ModelInfer requests it answered for MODEL, from its own /metrics.
SERVED_OK = (
    "import urllib.request; from prometheus_client.parser import text_string_to_metric_families as parse; "
    "text = urllib.request.urlopen('http://127.0.0.1:9456/metrics', timeout=10).read().decode(); "
    "print(sum(s.value for f in parse(text) for s in f.samples if s.name == 'mlmesh_serving_requests_total' "
    f"and s.labels.get('model') == '{MODEL}' and s.labels.get('code') == 'OK'))"
)


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
@pytest.fixture(scope="module")
def stack(images: Images) -> Iterator[Stack]:
    with compose_stack(images, (*STAGES, "prometheus"), OBSERVABILITY) as stack:
        yield stack


def test_every_stage_is_healthy_through_grpc_health(stack: Stack) -> None:
    for stage in STAGES:
        state = stack.inspect(stage)
        assert state["Status"] == "running" and state["Health"]["Status"] == "healthy"
        last = state["Health"]["Log"][-1]
        assert last["ExitCode"] == 0 and last["Output"].strip() == f"127.0.0.1:{DEFAULT_PORTS[stage]}: SERVING"


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
    assert status.returncode == 0 and status.stdout.count("SERVING") == len(STAGES), status.stdout


def test_pipeline_service_runs_to_success(stack: Stack) -> None:
    started = time.monotonic()
    result = stack.compose("run", "--rm", "pipeline", timeout=900)
    cold = time.monotonic() - started
    assert result.returncode == 0, tail(result.stdout, 60) + tail(result.stderr, 60) + stack.logs()
    assert (
        "decision  PROMOTE" in result.stdout and "registered as breast_cancer-logistic_regression v1" in result.stdout
    )
    # The workflow's last task had serving load the version and answer a smoke request, over the
    # compose network at the address the pipeline service is given (serving:50056).
    assert re.search(rf"^served +{MODEL} v1 at serving:50056 \(smoke request answered ", result.stdout, re.M), (
        result.stdout
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


def inference(options: list[str], address: str, method: str, body: dict) -> subprocess.CompletedProcess:
    """grpcurl from the host: one call of the Open Inference Protocol, with `options` (TLS, token)."""
    return run([str(GRPCURL), *options, "-d", json.dumps(body), address, f"{INFERENCE}/{method}"], timeout=60)


def ready_models(options: list[str], address: str, within: float = 30) -> dict[str, dict]:
    """RepositoryIndex until MODEL is READY (while serving starts, reads the registry, loads the model)."""
    started, seen = time.monotonic(), ""
    while time.monotonic() - started < within:
        index = inference(options, address, "RepositoryIndex", {})
        seen = index.stdout + index.stderr
        if index.returncode == 0:
            models = {m["name"]: m for m in json.loads(index.stdout).get("models", [])}
            if models.get(MODEL, {}).get("state") == "READY":
                return models
        time.sleep(0.5)
    raise AssertionError(f"{MODEL} is not READY after {within:.0f} s; RepositoryIndex said: {seen}")


def test_serving_answers_for_the_promoted_model_from_the_host(stack: Stack) -> None:
    """The pipeline's PROMOTE (the test above) registered version 1; serving, polling the registry
    in the shared volume, serves it without a restart, and grpcurl on the host's published port
    gets its metadata and a prediction over the Open Inference Protocol (KServe V2)."""
    from sklearn.datasets import load_breast_cancer

    plaintext, serving = ["-plaintext"], published(stack, "serving")
    models = ready_models(plaintext, serving)
    assert models[MODEL]["version"] == "1", models
    metadata = inference(plaintext, serving, "ModelMetadata", {"name": MODEL})
    assert metadata.returncode == 0, metadata.stderr
    described = json.loads(metadata.stdout)
    assert described["name"] == MODEL and described["versions"] == ["1"], described
    inputs = described["inputs"]
    data = load_breast_cancer()
    assert {i["name"] for i in inputs} == set(data.feature_names) and {i["datatype"] for i in inputs} == {"FP64"}
    # The dataset's first row, a malignant tumour, one FP64 value per input that ModelMetadata lists.
    row = dict(zip(data.feature_names, data.data[0].tolist(), strict=True))
    request = {
        "model_name": MODEL,
        "id": "compose-1",
        "inputs": [
            {"name": i["name"], "datatype": "FP64", "shape": [1], "contents": {"fp64_contents": [row[i["name"]]]}}
            for i in inputs
        ],
    }
    reply = inference(plaintext, serving, "ModelInfer", request)
    assert reply.returncode == 0, reply.stderr + stack.logs()
    response = json.loads(reply.stdout)
    assert (response["model_name"], response["model_version"], response["id"]) == (MODEL, "1", "compose-1")
    outputs = {output["name"]: output for output in response["outputs"]}
    predicted = [base64.b64decode(value).decode() for value in outputs["predicted"]["contents"]["bytes_contents"]]
    assert predicted == [str(data.target_names[data.target[0]])] == ["malignant"], outputs
    # A request without the inputs is the caller's mistake, named.
    empty = inference(plaintext, serving, "ModelInfer", {"model_name": MODEL})
    assert empty.returncode != 0 and "Code: InvalidArgument" in empty.stderr, empty.stderr


def promql(stack: Stack, query: str) -> list[dict]:
    """An instant query over Prometheus's HTTP API, from the host on the published port."""
    url = f"http://127.0.0.1:{stack.ports['prometheus']}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def test_prometheus_scrapes_every_stage_and_counts_the_pipeline_and_the_prediction(stack: Stack) -> None:
    """The observability profile: after the pipeline runs and serving answers (the tests above),
    Prometheus has every stage up, the loader's Load calls with grpc_code OK and serving's
    predictions for the model's version 1, from the stages' own /metrics."""
    # What serving itself counted, read from its /metrics inside its container: the workflow's smoke
    # request after each PROMOTE, and the prediction of test_serving_answers_for_the_promoted_model_from_the_host.
    counted = stack.compose("exec", "-T", "serving", "python", "-c", SERVED_OK, timeout=120)
    assert counted.returncode == 0, counted.stderr
    served_ok = float(counted.stdout)
    assert served_ok >= 1, counted.stdout
    wanted = {
        "up": 'up{job="mlmesh"} == 1',
        "loads": 'sum(grpc_server_handled_total{job="mlmesh", stage="loader", grpc_method="Load", grpc_code="OK"})',
        "hits": 'sum by (stage) (mlmesh_cache_requests_total{job="mlmesh", result="hit"})',
        "predictions": f'mlmesh_serving_requests_total{{job="mlmesh", model="{MODEL}", version="1", code="OK"}}',
        "refused": f'mlmesh_serving_requests_total{{job="mlmesh", model="{MODEL}", code="INVALID_ARGUMENT"}}',
        "live": f'mlmesh_serving_live_version{{job="mlmesh", stage="serving", model="{MODEL}"}}',
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
            and hit_stages == set(PIPELINE_STAGES)
            and [float(r["value"][1]) for r in seen["predictions"]] == [served_ok]
        ):
            break
        time.sleep(1)
    FIGURES["Prometheus: every stage up and the calls counted after"] = f"{time.monotonic() - started:.1f}s"
    assert {r["metric"]["stage"] for r in seen.get("up", [])} == set(STAGES), (seen, last_error, stack.logs())
    assert {r["metric"]["instance"] for r in seen["up"]} == {f"{s}:{DEFAULT_METRICS_PORTS[s]}" for s in STAGES}
    # Two pipeline runs, one Load each, and the grpcurl Loads of test_grpcurl_from_the_host.
    assert seen["loads"] and float(seen["loads"][0]["value"][1]) >= 2, seen["loads"]
    # The warm run was served from the caches: every pipeline stage counted hits; the stages' own
    # `stage` label is kept (honor_labels), not doubled as exported_stage.
    hit_stages = {r["metric"]["stage"] for r in seen["hits"] if float(r["value"][1]) > 0}
    assert hit_stages == set(PIPELINE_STAGES), seen["hits"]
    # Prometheus has serving's count of answered predictions, and, apart, the one refused request
    # (test_serving_answers_for_the_promoted_model_from_the_host's, without inputs); serving serves version 1.
    assert [float(r["value"][1]) for r in seen["predictions"]] == [served_ok], (seen["predictions"], served_ok)
    assert [float(r["value"][1]) for r in seen["refused"]] == [1.0], seen["refused"]
    assert [float(r["value"][1]) for r in seen["live"]] == [1.0], seen["live"]
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
        # The wait for a restarting stage (120 s by default) is not what this checks.
        "-e",
        "MLMESH_RECONNECT_SECONDS=3",
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
    # docs/deploy.md's one command; it restarts the stopped trainer, waits for health, runs, and stops everything.
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


# ---- the same mesh with TLS, mTLS and tokens (docs/security.md) ----------------------------------
TLS_COMPOSE_FILE = ROOT / "deploy" / "docker-compose.tls.yml"


def test_tls_override_runs_the_pipeline_over_mtls(images: Images, tmp_path: Path) -> None:
    from tests.test_mesh_processes import page_sh_blocks

    blocks = page_sh_blocks("docs/security.md", "Transport security and identity")
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
        # docs/security.md's command; --no-build because the images were built above, under this test's tag.
        started = time.monotonic()
        result = run([*compose, "up", "--no-build", "--exit-code-from", "pipeline"], timeout=900, env=env)
        FIGURES["TLS compose: up --exit-code-from pipeline"] = f"{time.monotonic() - started:.1f}s"
        stack_logs = tail(run([*compose, "logs", "--no-color", "--tail", "20"], timeout=120, env=env).stdout, 100)
        assert result.returncode == 0, tail(result.stdout, 60) + tail(result.stderr, 60) + stack_logs
        assert "decision  PROMOTE" in result.stdout
        # The smoke request went to serving over TLS, with the workflow's token (pipeline,register).
        # (`up` prefixes each line with the container's name.)
        assert re.search(rf"\bserved +{MODEL} v1 at serving:50056 \(smoke request", result.stdout), tail(
            result.stdout, 30
        )
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

        # serving, with the application's token of docs/security.md's recipe (`app`, role `predict`): it serves
        # the model this mesh's pipeline promoted, and that token gets predictions only.
        serving = f"127.0.0.1:{ports['serving']}"
        [app_token] = [
            line.split()[2] for line in (certs / "tokens").read_text().splitlines() if line.startswith("app ")
        ]
        app = [*tls, "-H", f"authorization: Bearer {app_token}"]
        models = ready_models(app, serving)
        assert models[MODEL]["version"] == "1", models
        ready = inference(app, serving, "ModelReady", {"name": MODEL})
        assert ready.returncode == 0 and json.loads(ready.stdout) == {"ready": True}, ready.stderr
        unload = inference(app, serving, "RepositoryModelUnload", {"model_name": MODEL})  # needs `register`
        assert unload.returncode != 0 and "Code: PermissionDenied" in unload.stderr, unload.stderr
        on_loader = run(  # needs `pipeline`
            [str(GRPCURL), *app, "-d", '{"source": "sklearn:iris"}', loader, "mlmesh.loader.v1.LoaderService/Load"],
            timeout=60,
        )
        assert on_loader.returncode != 0 and "Code: PermissionDenied" in on_loader.stderr, on_loader.stderr
        # Without a token: refused (reflection is open here, so the call itself is what is refused).
        anonymous = inference(tls, serving, "ModelReady", {"name": MODEL})
        assert anonymous.returncode != 0 and "Code: Unauthenticated" in anonymous.stderr, anonymous.stderr
    finally:
        down = run([*compose, "down", "-v", "--remove-orphans"], timeout=180, env=env)
        if down.returncode != 0:
            print(down.stdout + down.stderr, file=sys.stderr)


@pytest.fixture(scope="module", autouse=True)
def figures(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    print_figures(request)
