"""Test certificates made on the spot: a CA, a server certificate for localhost, client certificates.

EC P-256 keys keep generation in the milliseconds. Nothing here is meant to
be secure; it is meant to look like what a real deployment hands the server.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate and its PEM private key, in memory and on disk."""

    cert: bytes
    key: bytes
    cert_path: Path
    key_path: Path


@dataclass(frozen=True)
class Pki:
    """Everything a TLS test needs."""

    ca: KeyPair  # signed the server and the client certificate
    server: KeyPair  # for localhost and 127.0.0.1
    client: KeyPair  # a client certificate from ``ca``
    stranger: KeyPair  # a client certificate from another CA


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    common_name: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer_cert.subject if issuer_cert else _name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256()), key


def _write(directory: Path, stem: str, pair: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> KeyPair:
    cert = pair[0].public_bytes(serialization.Encoding.PEM)
    key = pair[1].private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert)
    key_path.write_bytes(key)
    return KeyPair(cert, key, cert_path, key_path)


def _load(pair: KeyPair) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = serialization.load_pem_private_key(pair.key, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return x509.load_pem_x509_certificate(pair.cert), key


def new_ca(directory: Path, stem: str, common_name: str) -> KeyPair:
    """Another CA, written to ``directory/stem.crt`` and ``.key``."""
    return _write(directory, stem, _issue(common_name, None, ca=True))


def server_pair(directory: Path, stem: str, ca: KeyPair) -> KeyPair:
    """A fresh server certificate (new key, new serial) for localhost and 127.0.0.1, signed by ``ca``."""
    return _write(directory, stem, _issue("localhost", _load(ca), server=True))


def client_pair(directory: Path, stem: str, ca: KeyPair, common_name: str = "worker") -> KeyPair:
    """A fresh client certificate signed by ``ca``."""
    return _write(directory, stem, _issue(common_name, _load(ca)))


def make_pki(directory: Path) -> Pki:
    """Write a fresh CA, server, client and stranger certificate into ``directory``."""
    ca = _issue("MassTasker test CA", None, ca=True)
    other_ca = _issue("Some other CA", None, ca=True)
    return Pki(
        ca=_write(directory, "ca", ca),
        server=_write(directory, "server", _issue("localhost", ca, server=True)),
        client=_write(directory, "client", _issue("worker-1", ca)),
        stranger=_write(directory, "stranger", _issue("intruder", other_ca)),
    )
