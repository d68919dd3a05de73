"""A tiny gRPC health probe for container health checks.

    python -m services.runtime.probe [--address HOST:PORT] [--service NAME] [--stage STAGE] [--timeout S]

Asks the standard gRPC health service and exits 0 only if the answer is
SERVING; anything else (NOT_SERVING, an unknown service, no answer within the
timeout, nothing listening) exits 1, which Docker counts as unhealthy. A bare
port check would pass for a server that accepts connections but no longer
answers; this does not.

Without --address it probes the local stage named by --stage or MLMESH_STAGE,
on that stage's port (MLMESH_<STAGE>_PORT, default 50051..50055), at
MLMESH_BIND_HOST unless that is a wildcard address. It speaks TLS, presents a
client certificate and sends a bearer token when the same MLMESH_TLS_* and
MLMESH_AUTH_TOKEN* variables the CLI reads say so. It imports only grpcio and
the health stubs, so it starts fast enough to run every few seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

from services.runtime.catalog import STAGES
from services.runtime.settings import Settings, SettingsError, dialable_host

UNHEALTHY = 1  # Docker: 0 healthy, 1 unhealthy (2 is reserved)


def default_address(stage: str, env: Mapping[str, str] | None = None) -> str:
    """Where the local `stage` listens, from the same variables the stage reads."""
    settings = Settings.from_env(os.environ if env is None else env)
    return f"{dialable_host(settings.bind_host)}:{settings.ports[stage]}"


def check(address: str, service: str = "", timeout: float = 3.0, settings: Settings | None = None) -> str:
    """The serving status name of `service` at `address`, or why it could not be asked."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.runtime.security import call_metadata, open_sync_channel

    settings = settings or Settings.from_env()
    with open_sync_channel(address, settings) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=timeout,
                metadata=call_metadata(settings),
            )
        except grpc.RpcError as error:
            if not isinstance(error, grpc.Call):
                return f"ERROR ({error})"
            code, details = error.code(), error.details()
            if code == grpc.StatusCode.NOT_FOUND:  # the health service knows no such name
                return f"SERVICE_UNKNOWN ({details or f'no health status for {service!r}'})"
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return f"UNREACHABLE ({code.name}: {details})"
            return f"ERROR ({code.name}: {details})"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.runtime.probe",
        description="gRPC health probe: exit 0 only if the service answers SERVING.",
    )
    parser.add_argument("--address", help="HOST:PORT to ask (default: the local stage's port)")
    parser.add_argument("--service", default="", help="service name to ask about (default: the whole server)")
    parser.add_argument("--stage", choices=STAGES, help="the local stage to probe (default: $MLMESH_STAGE)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    address = args.address
    if not address:
        stage = args.stage or os.environ.get("MLMESH_STAGE", "")
        if stage not in STAGES:
            print(
                f"probe: no --address, and MLMESH_STAGE={stage!r} is not one of {', '.join(STAGES)}",
                file=sys.stderr,
            )
            return UNHEALTHY
        try:
            address = default_address(stage)
        except SettingsError as exc:
            print(f"probe: invalid configuration: {exc}", file=sys.stderr)
            return UNHEALTHY
    try:
        status = check(address, args.service, args.timeout)
    except SettingsError as exc:
        print(f"probe: invalid configuration: {exc}", file=sys.stderr)
        return UNHEALTHY
    label = f"{address} {args.service}".rstrip()
    print(f"{label}: {status}")
    return 0 if status == "SERVING" else UNHEALTHY


if __name__ == "__main__":
    sys.exit(main())
