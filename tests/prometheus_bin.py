"""Prometheus and promtool for the tests, from Debian's `prometheus` package, without installing it.

`prometheus_binaries()` returns a folder that holds both programs:

- both on the PATH (in one folder): that folder;
- else a cache, ~/.cache/mlmesh-tests/prometheus-<arch>/, filled once from Debian's package
  (tests/debian_packages.py): about a second, nothing installed, no postinst run, no user made.

When neither works the test is skipped with the reason; with CI=true it fails instead.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

from tests.debian_packages import download, fetched, install, run, unavailable

PROGRAMS = ("prometheus", "promtool")
WHAT = "prometheus/promtool"


def _on_path() -> Path | None:
    found = [shutil.which(name) for name in PROGRAMS]
    if all(found):
        folders = {Path(path).resolve().parent for path in found if path}
        if len(folders) == 1:
            return folders.pop()
    return None


def _works(folder: Path) -> bool:
    return (
        all((folder / name).is_file() for name in PROGRAMS)
        and run([str(folder / "promtool"), "--version"], timeout=60).returncode == 0
    )


def _fill(cache: Path) -> Path:
    """The package's usr/bin in `cache`, fetched and unpacked when it is not there yet."""
    binaries = cache / "root" / "usr" / "bin"
    if _works(binaries):
        return binaries
    with tempfile.TemporaryDirectory(prefix="fetch-", dir=cache) as tmp:
        unpacked = download(Path(tmp), lambda: ["prometheus"], WHAT)
        if not _works(unpacked / "usr" / "bin"):
            unavailable(WHAT, "Debian's prometheus package holds no working prometheus and promtool under usr/bin")
        return install(unpacked, cache) / "usr" / "bin"


@functools.lru_cache(maxsize=1)
def _cached_binaries() -> Path:
    return _on_path() or fetched("prometheus", _fill)


def prometheus_binaries() -> Path:
    """A folder holding `prometheus` and `promtool` (Debian's package), or skip/fail the test.

    Call it from a test or a fixture: when the programs cannot be had it raises pytest's
    skip (or, with CI=true, its failure) with the reason.
    """
    # lru_cache keeps a found folder for the session; a skip or failure is raised, not cached.
    return _cached_binaries()
