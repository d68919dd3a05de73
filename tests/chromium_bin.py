"""Headless Chromium for the tests, from Debian's `chromium-headless-shell` package, without installing it.

`chromium()` returns a `Chromium` that takes screenshots of local pages:

- `chromium-headless-shell` on the PATH: that program;
- else a cache, ~/.cache/mlmesh-tests/chromium-<arch>/, filled once from Debian's packages
  (tests/debian_packages.py; about 90 MB, a few seconds): the shell, `chromium-common` (its
  resources), and every library it depends on, recursively, that this machine lacks (libopus0,
  libpulse0, ...). Nothing is installed and no maintainer script runs; the program then runs
  with LD_LIBRARY_PATH pointing into the cache.

When neither works the test is skipped with the reason; with CI=true it fails instead, as
everywhere in this suite: a skip in CI would hide a check that never ran.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.debian_packages import download, fetched, install, run, unavailable

PACKAGE = "chromium-headless-shell"
PROGRAM = "chromium-headless-shell"
WHAT = "headless Chromium"


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
        return run([str(self.program), "--no-sandbox", "--version"], timeout=60, env=self.env)

    def screenshot(
        self, page: Path, png: Path, width: int = 1280, height: int = 2400, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        """Render a local page (no network: the page is self-contained) and write a PNG of the window."""
        with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
            return run(
                [
                    str(self.program),
                    "--no-sandbox",
                    "--disable-gpu",
                    "--hide-scrollbars",
                    "--mute-audio",
                    "--no-first-run",
                    "--disable-extensions",
                    f"--user-data-dir={profile}",
                    f"--window-size={width},{height}",
                    f"--screenshot={png}",
                    page.resolve().as_uri(),
                ],
                timeout=timeout,
                env=self.env,
            )


def _unpacked(root: Path) -> Chromium:
    program = root / "usr" / "lib" / "chromium" / PROGRAM
    folders = sorted({str(p.parent) for p in root.rglob("*.so*") if p.is_file()})
    return Chromium(program, tuple(folders))


def _works(found: Chromium) -> bool:
    return found.program.is_file() and found.version().returncode == 0


def _installed(package: str) -> bool:
    status = run(["dpkg-query", "-W", "-f=${Status}", package], timeout=30)
    return status.returncode == 0 and "install ok installed" in status.stdout


def _packages_to_fetch() -> list[str]:
    """The shell, its resources, and the libraries among its dependencies (recursively) this machine lacks."""
    listed = run(
        [
            "apt-cache",
            "depends",
            "--recurse",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            PACKAGE,
        ],
        timeout=120,
    )
    names = sorted({line.strip() for line in listed.stdout.splitlines() if line and not line.startswith((" ", "<"))})
    # Only shared libraries: fonts, debconf and the like are not needed to draw a page (the
    # system's fonts serve), and libelogind0 would stand in for systemd's libraries.
    wanted = [n for n in names if n.startswith("lib") and n != "libelogind0" and not _installed(n)]
    return [PACKAGE, "chromium-common", *wanted]


def _fill(cache: Path) -> Chromium:
    """The unpacked packages in `cache`, fetched when they are not there yet."""
    found = _unpacked(cache / "root")
    if _works(found):
        return found
    with tempfile.TemporaryDirectory(prefix="fetch-", dir=cache) as tmp:
        unpacked = download(Path(tmp), _packages_to_fetch, WHAT, tools=("apt-cache", "dpkg-query"))
        candidate = _unpacked(unpacked)
        if not _works(candidate):
            missing = run(["ldd", str(candidate.program)], env=candidate.env).stdout
            lacking = [line.strip() for line in missing.splitlines() if "not found" in line]
            unavailable(WHAT, f"the unpacked {PACKAGE} does not run; missing libraries: {lacking[:10]}")
        return _unpacked(install(unpacked, cache))


@functools.lru_cache(maxsize=1)
def _cached() -> Chromium:
    on_path = shutil.which(PROGRAM)
    if on_path and _works(Chromium(Path(on_path))):
        return Chromium(Path(on_path))
    return fetched("chromium", _fill)


def chromium() -> Chromium:
    """Headless Chromium (Debian's package), or skip/fail the test with the reason.

    Call it from a test or a fixture; lru_cache keeps a found program for the session,
    while a skip or failure is raised, not cached.
    """
    return _cached()
