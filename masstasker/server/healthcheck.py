"""``python -m masstasker.server.healthcheck``: exit 0 if the local server's gRPC health is SERVING.

The Docker image's HEALTHCHECK runs this. The address comes from
``--target``, else from ``MASSTASKER_LISTEN_RPC`` (a wildcard host is
dialled on loopback), else the default port on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from masstasker.server.config import DEFAULT_PORT, ENV_PREFIX, format_address, parse_address

__all__ = ["check", "main"]

_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def default_target(env: dict[str, str] | os._Environ[str] = os.environ) -> str:
    """Where the server listens, as seen from inside its own container."""
    listen = env.get(ENV_PREFIX + "LISTEN_RPC")
    if not listen:
        return format_address("127.0.0.1", int(env.get(ENV_PREFIX + "PORT", DEFAULT_PORT)))
    host, port = parse_address(listen)
    return format_address(_WILDCARDS.get(host, host), port)


def check(target: str, timeout: float) -> bool:
    """True when the health service answers SERVING for the whole server."""
    with grpc.insecure_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            print(f"unhealthy: {target}: {exc.code().name}", file=sys.stderr)
            return False
    serving: bool = response.status == health_pb2.HealthCheckResponse.SERVING
    if not serving:
        print(
            f"unhealthy: {target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)}",
            file=sys.stderr,
        )
    return serving


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0 when healthy, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=None, help="HOST:PORT of the gRPC server")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    return 0 if check(args.target or default_target(), args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
