"""``python -m masstasker.server.healthcheck``: exit 0 if the local server's gRPC health is SERVING.

The Docker image's HEALTHCHECK runs this. The address comes from
``--target``, else from ``MASSTASKER_LISTEN_RPC`` (a wildcard host is
dialled on loopback), else the default port on 127.0.0.1.

For a server with TLS, give the CA that signed its certificate
(``--tls-ca``); for one with ``--tls-client-ca`` (mutual TLS), also a client
certificate that CA signed (``--tls-cert``/``--tls-key``); and when the
certificate does not name the address dialled (127.0.0.1 or localhost),
the name it does carry (``--tls-server-name``). Each flag can be set as
``MASSTASKER_HEALTHCHECK_<FLAG>`` instead (``MASSTASKER_HEALTHCHECK_TLS_CA``),
so in a container only the environment changes. ``HEALTHCHECK_`` keeps them
apart from the server's own ``MASSTASKER_TLS_CERT``, which the probe, sharing
the container's environment, reads only to say what is missing.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from masstasker.server.config import DEFAULT_PORT, ENV_PREFIX, dial_host, format_address, parse_address
from masstasker.server.tls import read_file

__all__ = ["HEALTHCHECK_ENV_PREFIX", "channel_credentials", "check", "main", "tls_problem"]

#: The probe's own variables: ``--tls-ca`` is ``MASSTASKER_HEALTHCHECK_TLS_CA``.
HEALTHCHECK_ENV_PREFIX = ENV_PREFIX + "HEALTHCHECK_"
_TLS = ("tls_ca", "tls_cert", "tls_key", "tls_server_name")


def default_target(env: Mapping[str, str] = os.environ) -> str:
    """Where the server listens, as seen from inside its own container."""
    listen = env.get(ENV_PREFIX + "LISTEN_RPC")
    if not listen:
        return format_address("127.0.0.1", int(env.get(ENV_PREFIX + "PORT", DEFAULT_PORT)))
    host, port = parse_address(listen)
    return format_address(dial_host(host), port)


def channel_credentials(ca: str, cert: str = "", key: str = "") -> grpc.ChannelCredentials:
    """TLS credentials trusting the CA in the file ``ca``, presenting ``cert``/``key`` if given (mTLS)."""
    return grpc.ssl_channel_credentials(
        root_certificates=read_file(ca, "CA (--tls-ca)"),
        private_key=read_file(key, "client key (--tls-key)") if key else None,
        certificate_chain=read_file(cert, "client certificate (--tls-cert)") if cert else None,
    )


def tls_problem(ca: str, cert: str, key: str, env: Mapping[str, str] = os.environ) -> str | None:
    """What keeps the probe from passing a handshake the local server would ask for, or None.

    ``env`` is the container's: ``MASSTASKER_TLS_CERT`` and
    ``MASSTASKER_TLS_CLIENT_CA`` there say the server wants TLS and client
    certificates, so the probe can name what is missing instead of failing
    with a bare UNAVAILABLE.
    """
    env_name = HEALTHCHECK_ENV_PREFIX + "TLS_"
    if bool(cert) != bool(key):
        return "--tls-cert and --tls-key go together (the probe's client certificate and its key)"
    if cert and not ca:
        return "a client certificate needs --tls-ca too (the CA that signed the server's certificate)"
    if not ca and env.get(ENV_PREFIX + "TLS_CERT"):
        return (
            f"the server uses TLS ({ENV_PREFIX}TLS_CERT is set): give the probe the CA that signed its certificate "
            f"with --tls-ca or {env_name}CA"
        )
    if not cert and env.get(ENV_PREFIX + "TLS_CLIENT_CA"):
        return (
            f"the server requires client certificates ({ENV_PREFIX}TLS_CLIENT_CA is set): give the probe one signed "
            f"by that CA with --tls-cert/--tls-key or {env_name}CERT/{env_name}KEY"
        )
    return None


def check(
    target: str,
    timeout: float,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str = "",
) -> bool:
    """True when the health service answers SERVING for the whole server; says why not on stderr.

    With ``credentials`` the probe speaks TLS; ``server_name`` is the name the
    server's certificate must carry, when not the host in ``target``.
    """
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    if credentials is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, credentials, options=options)
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            print(f"unhealthy: {target}: {exc.code().name}: {exc.details()}{_hint(exc, credentials)}", file=sys.stderr)
            return False
    serving: bool = response.status == health_pb2.HealthCheckResponse.SERVING
    if not serving:
        print(
            f"unhealthy: {target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)}",
            file=sys.stderr,
        )
    return serving


def _hint(exc: grpc.RpcError, credentials: grpc.ChannelCredentials | None) -> str:
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return ""
    if credentials is None:
        return f" (if the server uses TLS, give the probe its CA: --tls-ca or {HEALTHCHECK_ENV_PREFIX}TLS_CA)"
    return (
        " (with TLS: is --tls-ca the CA that signed the server's certificate, does that certificate name the "
        "address dialled (else --tls-server-name), and with mutual TLS is --tls-cert signed by its client CA?)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m masstasker.server.healthcheck",
        description=(__doc__ or "").splitlines()[0],
        epilog=f"Each --tls-* flag can also be set as {HEALTHCHECK_ENV_PREFIX}<FLAG>, e.g. "
        f"{HEALTHCHECK_ENV_PREFIX}TLS_CA; the flag wins.",
    )
    add = parser.add_argument
    add("--target", default=None, help="HOST:PORT of the gRPC server (default: from MASSTASKER_LISTEN_RPC)")
    add("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    add("--tls-ca", default="", metavar="PEM", help="speak TLS, trusting the CA that signed the server's certificate")
    add("--tls-cert", default="", metavar="PEM", help="client certificate, for a server with --tls-client-ca")
    add("--tls-key", default="", metavar="PEM", help="the client certificate's private key")
    add("--tls-server-name", default="", metavar="NAME", help="name the server's certificate carries, if not the host")
    return parser


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] = os.environ) -> int:
    """Exit status 0 when healthy, 1 otherwise (unhealthy, unreachable, or the probe is misconfigured)."""
    args = _parser().parse_args(argv)
    ca, cert, key, server_name = (getattr(args, f) or env.get(HEALTHCHECK_ENV_PREFIX + f.upper(), "") for f in _TLS)
    problem = tls_problem(ca, cert, key, env)
    if problem:
        print(f"healthcheck cannot probe: {problem}", file=sys.stderr)
        return 1
    try:
        credentials = channel_credentials(ca, cert, key) if ca else None
    except OSError as exc:
        print(f"healthcheck cannot probe: {exc}", file=sys.stderr)
        return 1
    return 0 if check(args.target or default_target(env), args.timeout, credentials, server_name) else 1


if __name__ == "__main__":
    sys.exit(main())
