"""TLS and mutual TLS on the gRPC port, with certificates made by the test."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from pki import KeyPair, Pki, client_pair, make_pki, new_ca, server_pair

from masstasker._pb import masstasker_pb2 as pb
from masstasker._pb import masstasker_pb2_grpc as pb_grpc
from masstasker.server import BackgroundServer, Settings, healthcheck
from masstasker.testing import run_server_process

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_server(make_server: Callable[..., BackgroundServer], pki: Pki) -> BackgroundServer:
    return make_server(tls_cert=str(pki.server.cert_path), tls_key=str(pki.server.key_path))


@pytest.fixture
def mtls_server(make_server: Callable[..., BackgroundServer], pki: Pki) -> BackgroundServer:
    return make_server(
        tls_cert=str(pki.server.cert_path), tls_key=str(pki.server.key_path), tls_client_ca=str(pki.ca.cert_path)
    )


@pytest.fixture
def open_channel() -> Iterator[Callable[[str, grpc.ChannelCredentials | None], grpc.Channel]]:
    """``open_channel(target, credentials)``: a secure channel, or a plaintext one for None; closed afterwards."""
    channels: list[grpc.Channel] = []

    def open_(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
        channel = grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)
        channels.append(channel)
        return channel

    yield open_
    for channel in channels:
        channel.close()


def _update(channel: grpc.Channel) -> pb.UpdateResponse:
    response: pb.UpdateResponse = pb_grpc.MassTaskerStub(channel).Update(
        pb.UpdateRequest(created=[pb.Task(group="g")]), timeout=TIMEOUT
    )
    return response


def test_tls_client_works(tls_server: BackgroundServer, pki: Pki, open_channel: Callable[..., grpc.Channel]) -> None:
    channel = open_channel(tls_server.target, grpc.ssl_channel_credentials(root_certificates=pki.ca.cert))
    assert list(_update(channel).created_ids) == [1]


def test_tls_by_host_name(tls_server: BackgroundServer, pki: Pki, open_channel: Callable[..., grpc.Channel]) -> None:
    channel = open_channel(f"localhost:{tls_server.port}", grpc.ssl_channel_credentials(root_certificates=pki.ca.cert))
    assert list(_update(channel).created_ids) == [1]


def test_plaintext_client_fails(tls_server: BackgroundServer, open_channel: Callable[..., grpc.Channel]) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _update(open_channel(tls_server.target, None))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert tls_server.call(lambda s: s.store.size()) == 0


def test_client_that_does_not_trust_the_ca_fails(
    tls_server: BackgroundServer, pki: Pki, open_channel: Callable[..., grpc.Channel]
) -> None:
    # Trusting only some other certificate: the server's chain does not verify.
    channel = open_channel(tls_server.target, grpc.ssl_channel_credentials(root_certificates=pki.stranger.cert))
    with pytest.raises(grpc.RpcError) as err:
        _update(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_accepts_a_client_certificate_from_the_ca(
    mtls_server: BackgroundServer, pki: Pki, open_channel: Callable[..., grpc.Channel]
) -> None:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert, private_key=pki.client.key, certificate_chain=pki.client.cert
    )
    assert list(_update(open_channel(mtls_server.target, credentials)).created_ids) == [1]


def test_mtls_rejects_a_client_without_certificate(
    mtls_server: BackgroundServer, pki: Pki, open_channel: Callable[..., grpc.Channel]
) -> None:
    channel = open_channel(mtls_server.target, grpc.ssl_channel_credentials(root_certificates=pki.ca.cert))
    with pytest.raises(grpc.RpcError) as err:
        _update(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert mtls_server.call(lambda s: s.store.size()) == 0


def test_mtls_rejects_a_certificate_from_another_ca(
    mtls_server: BackgroundServer, pki: Pki, open_channel: Callable[..., grpc.Channel]
) -> None:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert, private_key=pki.stranger.key, certificate_chain=pki.stranger.cert
    )
    with pytest.raises(grpc.RpcError) as err:
        _update(open_channel(mtls_server.target, credentials))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_with_token(
    make_server: Callable[..., BackgroundServer], pki: Pki, tmp_path: Path, open_channel: Callable[..., grpc.Channel]
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    server = make_server(
        tls_cert=str(pki.server.cert_path), tls_key=str(pki.server.key_path), auth_token_file=str(tokens)
    )
    # The way a worker combines both: the token rides on the TLS channel.
    credentials = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=pki.ca.cert), grpc.access_token_call_credentials("s3cret")
    )
    assert list(_update(open_channel(server.target, credentials)).created_ids) == [1]
    bare = open_channel(server.target, grpc.ssl_channel_credentials(root_certificates=pki.ca.cert))
    with pytest.raises(grpc.RpcError) as err:
        _update(bare)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_unreadable_tls_file_is_a_clear_error(pki: Pki, tmp_path: Path) -> None:
    settings = Settings(
        port=0, listen_http="", tls_cert=str(tmp_path / "missing.crt"), tls_key=str(pki.server.key_path)
    )
    server = BackgroundServer(settings)
    with pytest.raises(OSError, match=r"TLS certificate \(--tls-cert\)"):
        server.start()
    server.stop()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tls_cert": "x.crt"}, "--tls-cert and --tls-key go together"),
        ({"tls_key": "x.key"}, "--tls-cert and --tls-key go together"),
        ({"tls_client_ca": "ca.crt"}, "--tls-client-ca needs"),
        ({"metrics_auth": True}, "--metrics-auth needs --auth-token-file"),
    ],
)
def test_contradicting_settings_refuse_to_start(overrides: dict[str, object], message: str) -> None:
    server = BackgroundServer(Settings(port=0, listen_http="", **overrides))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        server.start()
    server.stop()


# -- certificates rotate without a restart -------------------------------------------------------------------


def _der(pair: KeyPair) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pair.cert.decode())


def served_certificate(port: int, ca: KeyPair, client: KeyPair | None = None) -> bytes:
    """The certificate (DER) the server presents to a new connection that trusts only ``ca``."""
    context = ssl.create_default_context(cafile=str(ca.cert_path))
    context.set_alpn_protocols(["h2"])
    if client is not None:
        context.load_cert_chain(client.cert_path, client.key_path)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        certificate = tls.getpeercert(binary_form=True)
    assert certificate is not None
    return certificate


def _fresh_channel(target: str, ca: KeyPair, client: KeyPair | None = None) -> grpc.Channel:
    """A channel with its own connection: gRPC would otherwise share one with an earlier channel."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.cert,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    return grpc.secure_channel(target, credentials, options=[("grpc.use_local_subchannel_pool", 1)])


def _status(target: str, ca: KeyPair, client: KeyPair | None = None) -> grpc.StatusCode:
    with _fresh_channel(target, ca, client) as channel:
        try:
            _update(channel)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@dataclass(frozen=True)
class Live:
    """The files a running server was started with, which the test replaces in place."""

    cert: Path
    key: Path
    client_ca: Path

    def install(self, server: KeyPair | None = None, client_ca: KeyPair | None = None) -> None:
        if server is not None:
            self.cert.write_bytes(server.cert)
            self.key.write_bytes(server.key)
        if client_ca is not None:
            self.client_ca.write_bytes(client_ca.cert)

    def flags(self, *, mutual: bool) -> dict[str, str]:
        flags = {"tls_cert": str(self.cert), "tls_key": str(self.key)}
        return {**flags, "tls_client_ca": str(self.client_ca)} if mutual else flags


@pytest.fixture
def live(tmp_path: Path, pki: Pki) -> Live:
    files = Live(tmp_path / "live" / "tls.crt", tmp_path / "live" / "tls.key", tmp_path / "live" / "client-ca.crt")
    files.cert.parent.mkdir()
    files.install(pki.server, pki.ca)
    return files


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> tuple[KeyPair, KeyPair, KeyPair]:
    """Another CA, a server certificate and a client certificate it signed: what the files rotate to."""
    directory = tmp_path_factory.mktemp("other-pki")
    ca = new_ca(directory, "ca", "The next CA")
    return ca, server_pair(directory, "server", ca), client_pair(directory, "client", ca)


def test_reload_serves_the_new_certificate_to_new_connections(
    make_server: Callable[..., BackgroundServer], pki: Pki, live: Live, other: tuple[KeyPair, KeyPair, KeyPair]
) -> None:
    new_ca_, new_server, _ = other
    server = make_server(**live.flags(mutual=False))
    assert served_certificate(server.port, pki.ca) == _der(pki.server)
    with _fresh_channel(server.target, pki.ca) as before:
        assert list(_update(before).created_ids) == [1]

        live.install(new_server)
        assert server.reload_tls()

        assert served_certificate(server.port, new_ca_) == _der(new_server)
        assert _status(server.target, new_ca_) == grpc.StatusCode.OK
        assert _status(server.target, pki.ca) == grpc.StatusCode.UNAVAILABLE  # the old CA no longer verifies it
        # A connection made before the reload keeps the certificate it was made with, and keeps working.
        assert list(_update(before).created_ids) == [3]


def test_a_bad_new_certificate_keeps_the_old_one_serving(
    make_server: Callable[..., BackgroundServer],
    pki: Pki,
    live: Live,
    other: tuple[KeyPair, KeyPair, KeyPair],
    caplog: pytest.LogCaptureFixture,
) -> None:
    new_ca_, new_server, _ = other
    server = make_server(**live.flags(mutual=False))
    encrypted = serialization.load_pem_private_key(new_server.key, password=None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )
    broken: list[tuple[str, Callable[[], object], str]] = [
        ("not PEM", lambda: live.cert.write_bytes(b"garbage\n"), "holds no PEM certificate"),
        ("a cut-off certificate", lambda: live.cert.write_bytes(new_server.cert[:200]), "not valid PEM"),
        ("the new certificate with the old key", lambda: live.cert.write_bytes(new_server.cert), "does not fit"),
        ("no key file", live.key.unlink, "cannot read the TLS key"),
        ("an encrypted key", lambda: live.install(replace(new_server, key=encrypted)), "encrypted"),
    ]
    for what, damage, why in broken:
        live.install(pki.server)
        damage()
        caplog.clear()
        assert not server.reload_tls(), what
        assert why in caplog.text and "the current certificate keeps serving" in caplog.text, (what, caplog.text)
        assert served_certificate(server.port, pki.ca) == _der(pki.server), what
        assert _status(server.target, pki.ca) == grpc.StatusCode.OK, what
    # Once the files are right, the next reload takes them.
    live.install(new_server)
    assert server.reload_tls()
    assert served_certificate(server.port, new_ca_) == _der(new_server)


def test_reload_rotates_the_client_ca(
    make_server: Callable[..., BackgroundServer], pki: Pki, live: Live, other: tuple[KeyPair, KeyPair, KeyPair]
) -> None:
    new_ca_, _, new_client = other
    server = make_server(**live.flags(mutual=True))
    assert _status(server.target, pki.ca, pki.client) == grpc.StatusCode.OK
    assert _status(server.target, pki.ca, new_client) == grpc.StatusCode.UNAVAILABLE

    live.install(client_ca=new_ca_)
    assert server.reload_tls()
    assert _status(server.target, pki.ca, new_client) == grpc.StatusCode.OK
    assert _status(server.target, pki.ca, pki.client) == grpc.StatusCode.UNAVAILABLE
    assert _status(server.target, pki.ca) == grpc.StatusCode.UNAVAILABLE  # still mutual: no certificate, no entry

    live.client_ca.write_bytes(b"-----BEGIN CERTIFICATE-----\nnonsense\n-----END CERTIFICATE-----\n")
    assert not server.reload_tls()
    assert _status(server.target, pki.ca, new_client) == grpc.StatusCode.OK


def test_reload_without_tls_says_so(server: BackgroundServer) -> None:
    assert not server.reload_tls()


def test_a_key_that_does_not_fit_refuses_to_start(pki: Pki, other: tuple[KeyPair, KeyPair, KeyPair]) -> None:
    settings = Settings(port=0, listen_http="", tls_cert=str(other[1].cert_path), tls_key=str(pki.server.key_path))
    server = BackgroundServer(settings)
    with pytest.raises(ValueError, match=r"--tls-key.*does not fit the certificate"):
        server.start()
    server.stop()


def test_sighup_rotates_the_certificate_and_client_ca_of_a_server_process(
    pki: Pki, live: Live, other: tuple[KeyPair, KeyPair, KeyPair]
) -> None:
    new_ca_, new_server, new_client = other
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in live.flags(mutual=True).items()]
    with run_server_process(*flags) as proc:
        assert served_certificate(proc.port, pki.ca, pki.client) == _der(pki.server)

        live.install(new_server, client_ca=new_ca_)
        proc.send_signal(signal.SIGHUP)
        proc.expect("TLS files reloaded")
        assert served_certificate(proc.port, new_ca_, new_client) == _der(new_server)
        assert _status(proc.target, new_ca_, new_client) == grpc.StatusCode.OK
        assert _status(proc.target, new_ca_, pki.client) == grpc.StatusCode.UNAVAILABLE

        live.cert.write_bytes(b"half-written")
        proc.send_signal(signal.SIGHUP)
        proc.expect("TLS files not reloaded, the current certificate keeps serving: .*holds no PEM certificate")
        assert served_certificate(proc.port, new_ca_, new_client) == _der(new_server)
        assert proc.returncode is None
    assert proc.returncode == 0


# -- the health probe speaks TLS ---------------------------------------------------------------------------


def _probe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK command, with the container's environment ``env``."""
    command = [sys.executable, "-m", "masstasker.server.healthcheck", *args]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MASSTASKER_")} | env
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=60)


def test_healthcheck_against_tls_and_mtls_servers(
    tls_server: BackgroundServer, mtls_server: BackgroundServer, pki: Pki
) -> None:
    # As in a container: the server's own variables, and the probe's.
    tls_env = {
        "MASSTASKER_LISTEN_RPC": tls_server.target,
        "MASSTASKER_TLS_CERT": str(pki.server.cert_path),
        "MASSTASKER_HEALTHCHECK_TLS_CA": str(pki.ca.cert_path),
    }
    done = _probe(tls_env)
    assert done.returncode == 0, done.stderr
    mtls_env = {
        "MASSTASKER_LISTEN_RPC": mtls_server.target,
        "MASSTASKER_TLS_CERT": str(pki.server.cert_path),
        "MASSTASKER_TLS_CLIENT_CA": str(pki.ca.cert_path),
        "MASSTASKER_HEALTHCHECK_TLS_CA": str(pki.ca.cert_path),
        "MASSTASKER_HEALTHCHECK_TLS_CERT": str(pki.client.cert_path),
        "MASSTASKER_HEALTHCHECK_TLS_KEY": str(pki.client.key_path),
    }
    done = _probe(mtls_env)
    assert done.returncode == 0, done.stderr


def test_healthcheck_without_the_ca_fails_and_says_why(
    tls_server: BackgroundServer, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    done = _probe({"MASSTASKER_LISTEN_RPC": tls_server.target, "MASSTASKER_TLS_CERT": str(pki.server.cert_path)})
    assert done.returncode == 1
    assert "the server uses TLS (MASSTASKER_TLS_CERT is set)" in done.stderr
    assert "MASSTASKER_HEALTHCHECK_TLS_CA" in done.stderr
    # Probing from elsewhere, with no hint in the environment: the handshake fails, the probe suggests why.
    assert healthcheck.main(["--target", tls_server.target], env={}) == 1
    assert "UNAVAILABLE" in (err := capsys.readouterr().err) and "give the probe its CA: --tls-ca" in err
    # A CA that did not sign the server's certificate.
    assert healthcheck.main(["--target", tls_server.target, "--tls-ca", str(pki.stranger.cert_path)], env={}) == 1
    assert "is --tls-ca the CA that signed the server's certificate" in capsys.readouterr().err


def test_healthcheck_flags_win_and_the_server_name_is_checked(
    tls_server: BackgroundServer, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = ["--target", tls_server.target, "--tls-ca", str(pki.ca.cert_path)]
    env = {"MASSTASKER_HEALTHCHECK_TLS_CA": str(pki.stranger.cert_path)}
    assert healthcheck.main(ca, env=env) == 0
    assert healthcheck.main([*ca, "--tls-server-name", "localhost"], env={}) == 0
    assert healthcheck.main([*ca, "--tls-server-name", "masstasker.example.com"], env={}) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_healthcheck_against_mtls_without_a_client_certificate(
    mtls_server: BackgroundServer, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = ["--target", mtls_server.target, "--tls-ca", str(pki.ca.cert_path)]
    assert healthcheck.main(ca, env={"MASSTASKER_TLS_CLIENT_CA": str(pki.ca.cert_path)}) == 1
    assert "requires client certificates (MASSTASKER_TLS_CLIENT_CA is set)" in capsys.readouterr().err
    assert healthcheck.main(ca, env={}) == 1
    assert "with mutual TLS is --tls-cert signed by its client CA" in capsys.readouterr().err
    client = ["--tls-cert", str(pki.stranger.cert_path), "--tls-key", str(pki.stranger.key_path)]
    assert healthcheck.main([*ca, *client], env={}) == 1
    client = ["--tls-cert", str(pki.client.cert_path), "--tls-key", str(pki.client.key_path)]
    assert healthcheck.main([*ca, *client], env={}) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-ca", "ca.crt", "--tls-cert", "c.crt"], "--tls-cert and --tls-key go together"),
        (["--tls-cert", "c.crt", "--tls-key", "c.key"], "a client certificate needs --tls-ca too"),
        (["--tls-ca", "/nonexistent/ca.crt"], "cannot read the CA (--tls-ca) /nonexistent/ca.crt"),
    ],
)
def test_healthcheck_misconfigured_says_so(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert healthcheck.main(["--target", "127.0.0.1:1", *args], env={}) == 1
    assert message in capsys.readouterr().err
