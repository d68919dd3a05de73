"""The fork server that `mlmesh up` forks its stages from (see launcher.py).

Kept apart from the launcher, and free of gRPC imports, so that the command
line can start it before anything else: its imports (preload.py, about 1.7 s)
then overlap with the launcher's own.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from multiprocessing.context import ForkServerContext

PRELOAD = "services.cli.preload"


# The fork server listens on a Unix socket at <temp dir>/pymp-XXXXXXXX/listener-XXXXXXXX, and a
# socket's path holds at most 107 bytes: 32 of them are multiprocessing's own names.
_SOCKET_PATH_MAX = 107 - 32


def fork_context() -> ForkServerContext:
    """A fork server, started by exec (so it is clean of the caller's gRPC threads), that
    imports what every stage needs once and never gRPC; started on first call."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([PRELOAD])
    from multiprocessing import forkserver

    # A deep TMPDIR (a CI job's or a test's own folder) would make the socket's path too long
    # to bind ("AF_UNIX path too long"); multiprocessing then gets its folder under /tmp.
    # It picks that folder once, at this first use, and removes it at exit.
    deep = len(tempfile.gettempdir()) > _SOCKET_PATH_MAX and os.access("/tmp", os.W_OK)
    saved, tempfile.tempdir = tempfile.tempdir, ("/tmp" if deep else tempfile.tempdir)
    try:
        forkserver.ensure_running()
    finally:
        tempfile.tempdir = saved
    return context
