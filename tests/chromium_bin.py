"""Headless Chromium for the tests, from Debian's `chromium-headless-shell` package, without installing it.

`chromium()` returns a `Chromium` that takes screenshots of local pages:

- `chromium-headless-shell` on the PATH: that program;
- else a cache, ~/.cache/mlmesh-tests/chromium-<arch>/ (or under $XDG_CACHE_HOME), filled once
  with `apt-get download` and `dpkg-deb -x` (about 90 MB of packages, a few seconds): the shell,
  `chromium-common` (its resources), and every library it depends on, recursively, that this
  machine lacks (libopus0, libpulse0, ...). Nothing is installed and no maintainer script runs;
  the program then runs with LD_LIBRARY_PATH pointing into the cache.

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
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE = "chromium-headless-shell"
PROGRAM = "chromium-headless-shell"


def _unavailable(reason: str) -> None:
    """Skip with a visible reason; in CI (CI=true) a skip is a failure."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"headless Chromium unavailable: {reason} (CI=true: not skipping)")
    pytest.skip(f"headless Chromium unavailable: {reason}")


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C", **(env or {})}
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(cmd, 127, "", str(exc))


@dataclass(frozen=True)
class Chromium:
    program: Path
    library_path: tuple[str, ...] = field(default_factory=tuple)

    @property
    def env(self) -> dict[str, str]:
        if not self.library_path:
            return {}
        inherited = os.environ.get("LD_LIBRARY_PATH", "")
        return {"LD_LIBRARY_PATH": ":".join([*self.library_path, *([inherited] if inherited else [])])}

    def version(self) -> subprocess.CompletedProcess:
        return _run([str(self.program), "--no-sandbox", "--version"], timeout=60, env=self.env)

    def screenshot(self, page: Path, png: Path, width: int = 1280, height: int = 2400, timeout: float = 120) -> subprocess.CompletedProcess:
        """Render a local page (no network: the page is self-contained) and write a PNG of the window."""
        with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
            return _run([
                str(self.program), "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
                "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
                f"--window-size={width},{height}", f"--screenshot={png}", page.resolve().as_uri(),
            ], timeout=timeout, env=self.env)


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlmesh-tests"


def _unpacked(root: Path) -> Chromium:
    program = root / "usr" / "lib" / "chromium" / PROGRAM
    folders = sorted({str(p.parent) for p in root.rglob("*.so*") if p.is_file()})
    return Chromium(program, tuple(folders))


def _works(found: Chromium) -> bool:
    return found.program.is_file() and found.version().returncode == 0


def _installed(package: str) -> bool:
    status = _run(["dpkg-query", "-W", "-f=${Status}", package], timeout=30)
    return status.returncode == 0 and "install ok installed" in status.stdout


def _packages_to_fetch() -> list[str]:
    """The shell, its resources, and the libraries among its dependencies (recursively) this machine lacks."""
    listed = _run([
        "apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
        "--no-breaks", "--no-replaces", "--no-enhances", PACKAGE,
    ], timeout=120)
    names = sorted({line.strip() for line in listed.stdout.splitlines() if line and not line.startswith((" ", "<"))})
    # Only shared libraries: fonts, debconf and the like are not needed to draw a page (the
    # system's fonts serve), and libelogind0 would stand in for systemd's libraries.
    wanted = [n for n in names if n.startswith("lib") and n != "libelogind0" and not _installed(n)]
    return [PACKAGE, "chromium-common", *wanted]


def _download(cache: Path) -> Chromium:
    """Fetch and unpack the packages into `cache`. Caller holds the lock."""
    found = _unpacked(cache / "root")
    if _works(found):
        return found
    for tool in ("apt-get", "apt-cache", "dpkg-deb", "dpkg-query"):
        if not shutil.which(tool):
            _unavailable(f"not on the PATH, and {tool} (Debian) is not there to fetch Debian's {PACKAGE} package")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fetch-", dir=cache) as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # apt-get downloads as the user _apt, which must be able to write here
        packages = _packages_to_fetch()
        fetched = _run(["apt-get", "download", *packages], cwd=work)
        if fetched.returncode != 0 and os.geteuid() == 0:
            updated = _run(["apt-get", "update", "-q"], timeout=600)
            fetched = _run(["apt-get", "download", *_packages_to_fetch()], cwd=work)
            if fetched.returncode != 0:
                fetched.stderr += f"\n(after apt-get update: exit {updated.returncode} {updated.stderr[-500:]})"
        debs = sorted(work.glob("*.deb"))
        if fetched.returncode != 0 or not any(d.name.startswith(f"{PACKAGE}_") for d in debs):
            _unavailable(f"`apt-get download {PACKAGE} ...` failed (exit {fetched.returncode}): {fetched.stderr[-1500:]}")
        unpacked = work / "root"
        for deb in debs:
            extracted = _run(["dpkg-deb", "-x", str(deb), str(unpacked)])
            if extracted.returncode != 0:
                _unavailable(f"`dpkg-deb -x {deb.name}` failed: {extracted.stderr[-1500:]}")
        candidate = _unpacked(unpacked)
        if not _works(candidate):
            missing = _run(["ldd", str(candidate.program)], env=candidate.env).stdout
            lacking = [line.strip() for line in missing.splitlines() if "not found" in line]
            _unavailable(f"the unpacked {PACKAGE} does not run; missing libraries: {lacking[:10]}")
        shutil.rmtree(cache / "root", ignore_errors=True)
        unpacked.rename(cache / "root")
    return _unpacked(cache / "root")


@functools.lru_cache(maxsize=1)
def _cached() -> Chromium:
    on_path = shutil.which(PROGRAM)
    if on_path and _works(Chromium(Path(on_path))):
        return Chromium(Path(on_path))
    arch = _run(["dpkg", "--print-architecture"], timeout=30).stdout.strip() or os.uname().machine
    cache = _cache_root() / f"chromium-{arch}"
    cache.mkdir(parents=True, exist_ok=True)
    # One fetch at a time, across processes (xdist workers, several checkouts on one machine).
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _download(cache)


def chromium() -> Chromium:
    """Headless Chromium (Debian's package), or skip/fail the test with the reason.

    Call it from a test or a fixture; lru_cache keeps a found program for the session,
    while a skip or failure is raised, not cached.
    """
    return _cached()
