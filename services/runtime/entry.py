"""The `mlmesh` command: starts the fork server early for commands that start a mesh."""

from __future__ import annotations

import sys

# Commands that start stages: their fork server's imports run while the CLI imports gRPC.
_STARTS_STAGES = {"up", "with-mesh"}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in _STARTS_STAGES:
        from services.runtime.forks import fork_context

        fork_context()
    from services.runtime.cli import main as cli_main

    return cli_main()
