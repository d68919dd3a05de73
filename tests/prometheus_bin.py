"""Prometheus and promtool for the tests, from Debian's `prometheus` package, without installing it.

`prometheus_binaries()` returns a folder that holds both programs:

- both on the PATH (in one folder): that folder;
- else a cache, ~/.cache/mlmesh-tests/prometheus-<arch>/ (or under $XDG_CACHE_HOME), filled
  once with `apt-get download prometheus` and `dpkg-deb -x`: about a second, and nothing is
  installed, no postinst runs, no user is made. `apt-get update` runs first only when the
  download fails and we are root (a machine whose package lists are missing or stale).

When neither works the test is skipped with the reason; with CI=true it fails instead, as
everywhere in this suite: a skip in CI would hide a check that never ran.
"""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

PROGRAMS = ("prometheus", "promtool")


def _unavailable(reason: str) -> None:
    """Skip with a visible reason; in CI (CI=true) a skip is a failure."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"prometheus/promtool unavailable: {reason} (CI=true: not skipping)")
    pytest.skip(f"prometheus/promtool unavailable: {reason}")


def _on_path() -> Path | None:
    found = [shutil.which(name) for name in PROGRAMS]
    if all(found):
        folders = {Path(path).resolve().parent for path in found if path}
        if len(folders) == 1:
            return folders.pop()
    return None


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(cmd, 127, "", str(exc))


def _works(folder: Path) -> bool:
    return all((folder / name).is_file() for name in PROGRAMS) and \
        _run([str(folder / "promtool"), "--version"], timeout=60).returncode == 0


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlmesh-tests"


def _download(cache: Path) -> Path:
    """Fetch and unpack the package into `cache`; returns its usr/bin. Caller holds the lock."""
    binaries = cache / "root" / "usr" / "bin"
    if _works(binaries):
        return binaries
    for tool in ("apt-get", "dpkg-deb"):
        if not shutil.which(tool):
            _unavailable(f"not on the PATH, and {tool} (Debian) is not there to fetch Debian's prometheus package")
    cache.mkdir(parents=True, exist_ok=True)
    # Work in a fresh folder next to the cache, then move it in place: an interrupted run leaves
    # no half-unpacked tree behind that a later run would take for a good one.
    with tempfile.TemporaryDirectory(prefix="fetch-", dir=cache) as tmp:
        work = Path(tmp)
        # apt-get runs its download as the user _apt, which must be able to write here.
        work.chmod(0o755)
        fetched = _run(["apt-get", "download", "prometheus"], cwd=work)
        if fetched.returncode != 0 and os.geteuid() == 0:
            updated = _run(["apt-get", "update", "-q"], timeout=600)
            fetched = _run(["apt-get", "download", "prometheus"], cwd=work)
            if fetched.returncode != 0:
                fetched.stderr += f"\n(after apt-get update: exit {updated.returncode} {updated.stderr[-500:]})"
        debs = sorted(work.glob("prometheus_*.deb"))
        if fetched.returncode != 0 or not debs:
            _unavailable(f"`apt-get download prometheus` failed (exit {fetched.returncode}): {fetched.stderr[-1500:]}")
        unpacked = work / "root"
        extracted = _run(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)])
        if extracted.returncode != 0:
            _unavailable(f"`dpkg-deb -x {debs[-1].name}` failed: {extracted.stderr[-1500:]}")
        if not _works(unpacked / "usr" / "bin"):
            _unavailable(f"{debs[-1].name} holds no working prometheus and promtool under usr/bin")
        shutil.rmtree(cache / "root", ignore_errors=True)
        unpacked.rename(cache / "root")
    return binaries


@functools.lru_cache(maxsize=1)
def _cached_binaries() -> Path:
    found = _on_path()
    if found is not None:
        return found
    arch = _run(["dpkg", "--print-architecture"], timeout=30).stdout.strip() or os.uname().machine
    cache = _cache_root() / f"prometheus-{arch}"
    cache.mkdir(parents=True, exist_ok=True)
    # One fetch at a time, across processes (xdist workers, several checkouts on one machine).
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _download(cache)


def prometheus_binaries() -> Path:
    """A folder holding `prometheus` and `promtool` (Debian's package), or skip/fail the test.

    Call it from a test or a fixture: when the programs cannot be had it raises pytest's
    skip (or, with CI=true, its failure) with the reason.
    """
    # lru_cache keeps a found folder for the session; a skip or failure is raised, not cached.
    return _cached_binaries()
