"""TLS for the gRPC port, certificates that rotate without a restart, and the warnings a server owes when
it runs without protection.

Plaintext stays the default so a laptop needs no certificates; a server
that plaintext-listens beyond loopback says so, loudly, at start.

:class:`ServerTls` reads ``--tls-cert``, ``--tls-key`` and ``--tls-client-ca``
and checks them (the key matches the certificate, every file is PEM) before
gRPC sees them. :meth:`ServerTls.reload` (SIGHUP calls it) reads and checks
them again and, only if they pass, hands them to gRPC, which uses them for
every handshake from then on; connections already open keep the certificate
they were made with. A bad new file leaves the old certificate serving, and
the log says why. So cert-manager or an ACME client can replace the files in
place and signal the server.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import threading
from dataclasses import dataclass

import grpc

from masstasker.server.config import Settings

__all__ = ["ServerTls", "TlsFiles", "exposure_warnings", "is_loopback", "load_tls_files", "read_file"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    """The PEM bytes the server hands gRPC: a certificate chain, its key, the client CA (None: no mTLS)."""

    cert: bytes
    key: bytes
    client_ca: bytes | None


def read_file(path: str, what: str) -> bytes:
    """The file's bytes; OSError naming ``what`` (e.g. "TLS key (--tls-key)") and the path if unreadable."""
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise OSError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc


def _read_all(settings: Settings) -> TlsFiles:
    cert = read_file(settings.tls_cert, "TLS certificate (--tls-cert)")
    key = read_file(settings.tls_key, "TLS key (--tls-key)")
    client_ca = read_file(settings.tls_client_ca, "client CA (--tls-client-ca)") if settings.tls_client_ca else None
    return TlsFiles(cert, key, client_ca)


def _no_password() -> bytes:
    # gRPC cannot use an encrypted key; without this OpenSSL would prompt on the terminal for a passphrase.
    raise ValueError("the key is encrypted; gRPC needs an unencrypted PEM key")


def _check(settings: Settings, files: TlsFiles) -> None:
    """Raise ValueError saying what is wrong, unless gRPC can serve with ``files``."""
    if b"-----BEGIN CERTIFICATE-----" not in files.cert:
        raise ValueError(f"the TLS certificate (--tls-cert) {settings.tls_cert} holds no PEM certificate")
    if b"PRIVATE KEY-----" not in files.key:
        raise ValueError(f"the TLS key (--tls-key) {settings.tls_key} holds no PEM private key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # The stdlib checks a chain and its key only from files, so this reads the paths once more; the
    # caller compares what it read before and after, so what passed here is what gRPC gets.
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key, password=_no_password)
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(
            f"the TLS key (--tls-key) {settings.tls_key} does not fit the certificate (--tls-cert) "
            f"{settings.tls_cert}, or one of them is not valid PEM: {exc}"
        ) from exc
    if files.client_ca is not None:
        try:
            context.load_verify_locations(cadata=files.client_ca.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"the client CA (--tls-client-ca) {settings.tls_client_ca} holds no valid PEM certificate: {exc}"
            ) from exc


def load_tls_files(settings: Settings) -> TlsFiles:
    """Read and check ``--tls-cert``, ``--tls-key`` and ``--tls-client-ca``.

    Raises OSError when a file cannot be read, ValueError when what it holds
    cannot serve (not PEM, a key that does not match the certificate, an
    encrypted key), or when the files changed while being read.
    """
    files = _read_all(settings)
    _check(settings, files)
    if _read_all(settings) != files:
        # Caught halfway through a replacement: the pair that passed might not be the pair we hold.
        raise ValueError("the TLS files changed while being read; try again once they are all in place")
    return files


def _configuration(files: TlsFiles) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(files.key, files.cert)], root_certificates=files.client_ca)


class ServerTls:
    """The server's TLS credentials from ``--tls-*``; :meth:`reload` swaps in new files for new handshakes."""

    def __init__(self, settings: Settings) -> None:
        """Read and check the files (see :func:`load_tls_files`); raises OSError or ValueError."""
        self._settings = settings
        self._files = load_tls_files(settings)
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ServerTls | None:
        """TLS for these settings, or None when ``--tls-cert`` is not set (plaintext)."""
        return cls(settings) if settings.tls_cert else None

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate (``--tls-client-ca``)."""
        return self._files.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials for ``add_secure_port`` that follow :meth:`reload`.

        With ``--tls-client-ca`` clients must present a certificate that CA
        signed (mutual TLS); the handshake fails otherwise.
        """
        return grpc.dynamic_ssl_server_credentials(
            _configuration(self._files),
            self._fetch,  # type: ignore[arg-type]  # grpc-stubs leaves out the None (no change) gRPC documents
            require_client_authentication=self.mutual,
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # gRPC calls this before every handshake, on its own thread. None keeps what it has: a new
        # configuration makes gRPC build a new TLS context, so each reload hands one over exactly once.
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def reload(self) -> bool:
        """Re-read and check the files; if they pass, new handshakes use them.

        On any problem the current certificate keeps serving, the log says
        why, and this returns False.
        """
        try:
            files = load_tls_files(self._settings)
        except (OSError, ValueError) as exc:
            log.error("TLS files not reloaded, the current certificate keeps serving: %s", exc)
            return False
        with self._lock:
            self._files = files
            self._pending = _configuration(files)
        log.info(
            "TLS files reloaded: new connections get the certificate in %s%s",
            self._settings.tls_cert,
            f" and client certificates are checked against {self._settings.tls_client_ca}" if self.mutual else "",
        )
        return True


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
