"""Programs for the tests from Debian's packages, without installing them (Prometheus, Chromium).

`fetched(name, fill)` gives a cache folder, ~/.cache/mlmesh-tests/<name>-<arch>/ (or under
$XDG_CACHE_HOME), and fills it once, one process at a time. `download(work, packages, what)`
fetches packages with `apt-get download` and unpacks them with `dpkg-deb -x` into work/root:
nothing is installed and no maintainer script runs. `apt-get update` runs first only when the
download fails and we are root (a machine whose package lists are missing or stale).

When a program cannot be had, `unavailable` skips the test with the reason; with CI=true it
fails instead, as everywhere in this suite: a skip in CI would hide a check that never ran.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import pytest

T = TypeVar("T")


def unavailable(what: str, reason: str) -> NoReturn:
    """Skip with a visible reason; in CI (CI=true) a skip is a failure."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} unavailable: {reason} (CI=true: not skipping)")
    pytest.skip(f"{what} unavailable: {reason}")


def run(
    cmd: list[str], cwd: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C", **(env or {})}
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(cmd, 127, "", str(exc))


def fetched(name: str, fill: Callable[[Path], T]) -> T:
    """`fill(cache)` for this machine's architecture, holding the cache's lock."""
    arch = run(["dpkg", "--print-architecture"], timeout=30).stdout.strip() or os.uname().machine
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    cache = Path(base) / "mlmesh-tests" / f"{name}-{arch}"
    cache.mkdir(parents=True, exist_ok=True)
    # One fetch at a time, across processes (xdist workers, several checkouts on one machine).
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return fill(cache)


def download(work: Path, packages: Callable[[], list[str]], what: str, tools: tuple[str, ...] = ()) -> Path:
    """Fetch `packages()` into `work` and unpack each into work/root; returns work/root.

    Work happens in a fresh folder that the caller moves into place once it checked the result
    (`install`): an interrupted run leaves no half-unpacked tree that a later run would trust.
    """
    for tool in ("apt-get", "dpkg-deb", *tools):
        if not shutil.which(tool):
            unavailable(what, f"not on the PATH, and {tool} (Debian) is not there to fetch Debian's package")
    work.chmod(0o755)  # apt-get downloads as the user _apt, which must be able to write here
    fetched_now = run(["apt-get", "download", *packages()], cwd=work)
    if fetched_now.returncode != 0 and os.geteuid() == 0:
        updated = run(["apt-get", "update", "-q"], timeout=600)
        fetched_now = run(["apt-get", "download", *packages()], cwd=work)
        if fetched_now.returncode != 0:
            fetched_now.stderr += f"\n(after apt-get update: exit {updated.returncode} {updated.stderr[-500:]})"
    debs = sorted(work.glob("*.deb"))
    if fetched_now.returncode != 0 or not debs:
        unavailable(what, f"`apt-get download` failed (exit {fetched_now.returncode}): {fetched_now.stderr[-1500:]}")
    unpacked = work / "root"
    for deb in debs:
        extracted = run(["dpkg-deb", "-x", str(deb), str(unpacked)])
        if extracted.returncode != 0:
            unavailable(what, f"`dpkg-deb -x {deb.name}` failed: {extracted.stderr[-1500:]}")
    return unpacked


def install(unpacked: Path, cache: Path) -> Path:
    """Move a checked tree into place as cache/root (replacing an older one)."""
    shutil.rmtree(cache / "root", ignore_errors=True)
    unpacked.rename(cache / "root")
    return cache / "root"
