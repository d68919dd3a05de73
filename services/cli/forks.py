"""The fork server that `mlmesh up` forks its stages from (see launcher.py).

Kept apart from the launcher, and free of gRPC imports, so that the command
line can start it before anything else: its imports (preload.py, about 1.7 s)
then overlap with the launcher's own.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import ForkServerContext

PRELOAD = "services.cli.preload"


def fork_context() -> ForkServerContext:
    """A fork server, started by exec (so it is clean of the caller's gRPC threads), that
    imports what every stage needs once and never gRPC; started on first call."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([PRELOAD])
    from multiprocessing import forkserver

    forkserver.ensure_running()
    return context
