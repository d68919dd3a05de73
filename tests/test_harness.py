"""The suite's own machinery, in tests/conftest.py: the `stages` mark that starts only the stages a
test calls, and the CI=true rule that a skipped test is a failure."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlmesh.loader.v1 import loader_pb2
from mlmesh.preprocess.v1 import preprocess_pb2
from services.client.mesh import MeshClient
from services.runtime.catalog import STAGES
from services.runtime.server import RunningStage
from tests.docker_harness import ARM64, HOST, Platform, base_image, ensure_emulation
from tests.helpers import StageNotStarted, assert_serving

pytest_plugins = ("pytester",)
REPO = Path(__file__).resolve().parents[1]


# ---- the stages mark --------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_without_a_mark_the_mesh_has_all_five_stages(mesh: dict[str, RunningStage]) -> None:
    assert tuple(mesh) == STAGES
    for stage in mesh.values():
        await assert_serving(stage)


@pytest.mark.asyncio
@pytest.mark.stages("preprocess", "loader")
async def test_the_mark_starts_only_its_stages_in_pipeline_order(
    mesh: dict[str, RunningStage], client: MeshClient
) -> None:
    assert tuple(mesh) == ("loader", "preprocess")
    loaded = await client.load(loader_pb2.LoadRequest(source="sklearn:iris"))
    prepared = await client.preprocess(preprocess_pb2.PreprocessRequest(dataset=loaded.dataset))
    assert (loaded.rows, prepared.rows_in) == (150, 150)


@pytest.mark.asyncio
@pytest.mark.stages("loader")
async def test_a_call_to_a_stage_not_started_fails_at_once_naming_it(client: MeshClient) -> None:
    loaded = await client.load(loader_pb2.LoadRequest(source="sklearn:iris"))
    with pytest.raises(StageNotStarted) as caught:
        await client.preprocess(preprocess_pb2.PreprocessRequest(dataset=loaded.dataset))
    message = str(caught.value)
    assert "called the preprocess stage, but its mesh started only loader" in message
    assert "add 'preprocess' to the test's @pytest.mark.stages(...)" in message


def test_an_unknown_stage_in_the_mark_is_an_error_naming_the_stages(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("from tests.conftest import artifact_root, client, data_roots, mesh, settings\n")
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.asyncio
        @pytest.mark.stages("loader", "trainr")
        async def test_typo(mesh):
            assert mesh
        """
    )
    result = run_inner(pytester)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*@pytest.mark.stages takes one or more of loader, preprocess*got ('loader', 'trainr')*"]
    )


# ---- CI=true: a skip is a failure ---------------------------------------------------------------
SKIPPING = """
import pytest

def test_skips_in_its_body():
    pytest.skip("no frobnicator here")

@pytest.fixture
def missing_tool():
    pytest.skip("no widget tool")

def test_skips_in_a_fixture(missing_tool):
    pass

def test_passes():
    assert 1 + 1 == 2

@pytest.mark.slow
def test_deselected_by_marker():
    pytest.skip("never runs under -m 'not slow'")
"""


def run_inner(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """pytest on pytester's folder, in this process (so this checkout's `tests` package imports), with
    the markers it uses."""
    pytester.makeini(
        "[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
        "markers =\n    slow: slow\n    stages(*names): stages\n"
    )
    return pytester.runpytest_inprocess("-p", "no:cacheprovider", *args)


@pytest.fixture
def ci_hooks(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(
        "from tests.conftest import pytest_runtest_makereport, pytest_sessionfinish, pytest_terminal_summary\n"
    )
    pytester.makepyfile(test_skipping=SKIPPING)
    return pytester


def test_with_ci_true_every_skip_fails_and_names_the_test(
    ci_hooks: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", "true")
    result = run_inner(ci_hooks, "-m", "not slow")
    result.assert_outcomes(passed=1, failed=1, errors=1, deselected=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "*test_skipping.py::test_skips_in_its_body was skipped, and CI=true makes a skip a failure: "
            "Skipped: no frobnicator here*",
            "*test_skipping.py::test_skips_in_a_fixture was skipped, and CI=true makes a skip a failure: "
            "Skipped: no widget tool*",
        ]
    )


def test_without_ci_a_skip_is_a_skip(ci_hooks: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    result = run_inner(ci_hooks, "-m", "not slow")
    result.assert_outcomes(passed=1, skipped=2, deselected=1)
    assert result.ret == pytest.ExitCode.OK


def test_with_ci_true_a_module_skipped_at_collection_fails_the_session(
    ci_hooks: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    ci_hooks.makepyfile(test_whole_module="import pytest\npytest.skip('no engine here', allow_module_level=True)\n")
    monkeypatch.setenv("CI", "true")
    result = run_inner(ci_hooks, "test_whole_module.py")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        ["*CI=true: skipped tests are failures*", "*skipped: *test_whole_module.py*no engine here*"]
    )


GROUPED = """
import pytest

@pytest.mark.docker
@pytest.mark.parametrize("i", range(4))
def test_in_docker(i):
    pass

@pytest.mark.parametrize("i", range(4))
def test_anywhere(i):
    pass
"""


# ---- parallel workers: the Docker tests share one ----------------------------------------------
def test_under_xdist_the_docker_tests_all_run_on_one_worker(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make test` runs with `-n auto --dist loadgroup`; the Docker tests' engine and images are per
    worker session fixtures, so they must all land on one worker. pytest 9.2 silently broke that
    grouping (pytest-xdist issue 1386); this fails if a release does it again."""
    pytester.makeconftest("from tests.conftest import pytest_collection_modifyitems\n")
    pytester.makeini("[pytest]\nmarkers =\n    docker: docker\n")
    for module in ("test_a", "test_b"):
        pytester.makepyfile(**{module: GROUPED})
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the workers import this checkout's tests.conftest
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup", "-v")
    result.assert_outcomes(passed=16)
    workers = {line.split("]")[0] for line in result.outlines if "PASSED" in line and "test_in_docker" in line}
    assert len(workers) == 1, result.outlines


# ---- the Docker harness: another platform's binaries ----------------------------------------------
UNKNOWN = Platform("nosuch", "nosuch-machine", 0)  # no binfmt handler can exist for it


def test_without_a_binfmt_handler_the_foreign_platform_tests_skip_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLMESH_DOCKER_BOOTSTRAP", "0")  # register nothing: as on a machine that cannot
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no binfmt_misc handler for nosuch-machine binaries"):
        ensure_emulation(UNKNOWN)


def test_with_ci_true_a_missing_binfmt_handler_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLMESH_DOCKER_BOOTSTRAP", "0")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"nosuch-machine.*CI=true: not skipping"):
        ensure_emulation(UNKNOWN)


def test_this_machines_own_platform_needs_no_emulation() -> None:
    assert ensure_emulation(HOST) == "native"
    assert base_image(HOST) == "mlmesh-base:bookworm" and base_image(ARM64) == "mlmesh-base:bookworm-arm64"
