"""The `mlmesh` command: starts the fork server early for commands that start a mesh."""

from __future__ import annotations

import os
import sys

# Commands that start stages: their fork server's imports run while the CLI imports gRPC.
_STARTS_STAGES = {"up", "with-mesh"}


def main() -> int:
    # gRPC's C core logs connection events (a GOAWAY from a stage that is stopping) at INFO
    # unless told otherwise; on a person's terminal those are noise. GRPC_VERBOSITY=INFO brings them back.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    if len(sys.argv) > 1 and sys.argv[1] in _STARTS_STAGES:
        from services.cli.forks import fork_context

        fork_context()
    from services.cli.main import main as cli_main

    return cli_main()
