"""TLS for the gRPC port, and the warnings a server owes when it runs without protection.

Plaintext stays the default so a laptop needs no certificates; a server
that plaintext-listens beyond loopback says so, loudly, at start.
"""

from __future__ import annotations

import ipaddress

import grpc

from masstasker.server.config import Settings

__all__ = ["exposure_warnings", "is_loopback", "server_credentials"]


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise OSError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """The server's TLS credentials from ``--tls-*``, or None for plaintext.

    With ``--tls-client-ca`` clients must present a certificate that CA
    signed (mutual TLS); the handshake fails otherwise.
    """
    if not settings.tls_cert:
        return None
    cert = _read(settings.tls_cert, "TLS certificate (--tls-cert)")
    key = _read(settings.tls_key, "TLS key (--tls-key)")
    client_ca = _read(settings.tls_client_ca, "client CA (--tls-client-ca)") if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=bool(client_ca))


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host`` (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def exposure_warnings(settings: Settings, host: str) -> list[str]:
    """What a server listening on ``host`` with these settings leaves open; empty when nothing."""
    if is_loopback(host):
        return []
    warnings = []
    if not settings.tls_cert:
        warnings.append(
            f"listening in PLAINTEXT on {host}, which is not a loopback address: anyone on the network can read "
            f"the traffic{' and the bearer tokens' if settings.auth_token_file else ''}; use --tls-cert/--tls-key"
        )
    if not settings.auth_token_file and not settings.tls_client_ca:
        warnings.append(
            f"no --auth-token-file nor --tls-client-ca: anyone who can reach {host} can read, change and delete "
            "every task"
        )
    return warnings
