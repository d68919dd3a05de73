"""Shared fixtures: real servers on port 0, real channels, a private artifact store.

Plain helper functions (status-code names, assert_serving, expect_error, ports, the pipeline run
up to a stage) live in tests/helpers.py; import them from there.

`@pytest.mark.stages("loader", "preprocess")` on a test or a module makes the `mesh` and `client`
fixtures start only those stages (all five when a test has no such mark). A call to a stage that
was not started fails at once with StageNotStarted, naming the stage and the mark to change.

With CI=true a skipped test fails (see pytest_runtest_makereport below): in CI a skip would hide
a check that never ran. Tests left out with `-m` are deselected, not skipped.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import pytest
import pytest_asyncio

from services.client.mesh import MeshClient
from services.runtime.catalog import STAGES
from services.runtime.server import RunningStage, stage_spec, start_stage
from services.runtime.settings import Settings
from tests.docker_harness import FIGURES_FILE, engine, images  # noqa: F401 - session fixtures of the Docker tests
from tests.helpers import StartedStagesClient, quiet_ports

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
    """The in-process stages' settings. Metrics are still counted, but not served over HTTP
    (MLMESH_METRICS=off): stopping prometheus_client's HTTP server waits for its 0.5 s poll, half
    a second per mesh. tests/test_observability.py turns the endpoint on for what it tests."""
    return Settings.from_env(
        {
            "MLMESH_ARTIFACT_ROOT": str(artifact_root),
            "MLMESH_GRACE_SECONDS": "0.5",
            "MLMESH_DATA_ROOTS": data_roots,
            "MLMESH_METRICS": "off",
        }
    )


def stages_to_start(request: pytest.FixtureRequest) -> tuple[str, ...]:
    """The stages named by the closest `stages` mark (the test's own, else its class's or module's),
    in pipeline order; all five when there is none."""
    marker = request.node.get_closest_marker("stages")
    if marker is None:
        return STAGES
    unknown = sorted(set(marker.args) - set(STAGES))
    if unknown or not marker.args:
        pytest.fail(
            f"{request.node.nodeid}: @pytest.mark.stages takes one or more of {', '.join(STAGES)}; got {marker.args!r}",
            pytrace=False,
        )
    return tuple(name for name in STAGES if name in marker.args)


@pytest_asyncio.fixture
async def mesh(settings: Settings, request: pytest.FixtureRequest) -> AsyncIterator[dict[str, RunningStage]]:
    """The test's stages (see stages_to_start) in this process, each on its own ephemeral port."""
    running: dict[str, RunningStage] = {}
    try:
        for name in stages_to_start(request):
            running[name] = await start_stage(stage_spec(name), settings, port=0)
        yield running
    finally:
        for stage in running.values():
            await stage.stop(0.5)


@pytest_asyncio.fixture
async def client(mesh: dict[str, RunningStage], settings: Settings) -> AsyncIterator[MeshClient]:
    """A client of the mesh fixture's stages; a call to a stage it did not start raises StageNotStarted."""
    async with StartedStagesClient(settings, mesh) as mesh_client:
        yield mesh_client


# ---- parallel workers (pytest-xdist) ----------------------------------------------------------------
# tryfirst: xdist's own hook turns xdist_group marks into the groups it schedules by, so the mark
# must be on the item before that hook runs.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Groups of tests that must share a worker (`--dist loadgroup`):

    - every test that needs a Docker engine: the engine, the base images and the image builds are
      session fixtures, built once on that worker; two workers would each build them;
    - the slow tests of one module: they share the module's fixtures (a running mesh, the corpus's
      tables and CLI runs), which a second worker would build, and run, again.

    Fast tests go to whichever worker is free."""
    for item in items:
        if item.get_closest_marker("docker") is not None:
            item.add_marker(pytest.mark.xdist_group("docker"))
        elif item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.xdist_group(f"slow:{item.module.__name__ if item.module else item.path.name}"))


# ---- CI=true: a skip is a failure ------------------------------------------------------------------
def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """With CI=true a test that skips (in setup or in its body) is reported as failed, with the reason."""
    outcome = yield
    report = outcome.get_result()
    if not (_in_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    report.outcome = "failed"
    report.longrepr = f"{item.nodeid} was skipped, and CI=true makes a skip a failure: {reason}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The safety net for skips the hook above cannot turn into failures (a whole module skipped at
    collection): with CI=true they fail the session, and pytest_terminal_summary names them."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped") if reporter is not None else None
    if _in_ci() and skipped and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# ---- the budget: where the suite's time goes -----------------------------------------------------
TIERS = ("docker", "network", "slow")  # a test's tier is the first of these marks it has, else "fast"
SLOWEST_SHOWN = 20


def tier_of(keywords: Mapping[str, object]) -> str:
    return next((tier for tier in TIERS if tier in keywords), "fast")


def budget_lines(reports: list[pytest.TestReport]) -> list[str]:
    """Test time per tier (setup, call and teardown summed over every worker) and the slowest
    tests, so that growth shows in every run's output."""
    per_test: dict[str, float] = {}
    tiers: dict[str, float] = {}
    counts: dict[str, set[str]] = {}
    for report in reports:
        tier = tier_of(report.keywords)
        per_test[report.nodeid] = per_test.get(report.nodeid, 0.0) + report.duration
        tiers[tier] = tiers.get(tier, 0.0) + report.duration
        counts.setdefault(tier, set()).add(report.nodeid)
    lines = ["test time per tier (summed over workers; a test's tier is its first mark of docker, network, slow):"]
    for tier in ("fast", *TIERS):
        if tier in tiers:
            lines.append(f"  {tier:<8} {tiers[tier]:8.1f} s  {len(counts[tier]):4d} tests")
    lines.append(f"the {SLOWEST_SHOWN} slowest tests (setup + call + teardown):")
    for nodeid, seconds in sorted(per_test.items(), key=lambda item: -item[1])[:SLOWEST_SHOWN]:
        lines.append(f"  {seconds:8.1f} s  {nodeid}")
    return lines


# Every phase's report (setup, call, teardown), as the controller receives them from the workers:
# the terminal's own stats keep only the call phase of a passing test, and a session fixture (an
# image build, a mesh) costs its time in the setup of the first test that uses it.
_PHASE_REPORTS: list[pytest.TestReport] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _PHASE_REPORTS.append(report)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    reports = _PHASE_REPORTS
    if reports and not hasattr(config, "workerinput"):  # the controller (or a run without xdist) reports
        terminalreporter.section("budget", sep="=", bold=True)
        for line in budget_lines(reports):
            terminalreporter.line(line)
        figures = config._tmp_path_factory.getbasetemp() / FIGURES_FILE  # written by the Docker tests' workers
        if figures.is_file():
            terminalreporter.section("deploy figures", sep="=", bold=True)
            for line in figures.read_text().splitlines():
                terminalreporter.line(line)
    skipped = terminalreporter.stats.get("skipped", [])
    if _in_ci() and skipped:
        terminalreporter.section("CI=true: skipped tests are failures", sep="=", red=True, bold=True)
        for report in skipped:
            terminalreporter.line(f"skipped: {report.nodeid or report.fspath}: {_skip_reason(report)}", red=True)
