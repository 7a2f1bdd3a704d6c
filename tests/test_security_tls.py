"""TLS and mutual TLS on the gRPC port, with certificates made by the test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from pki import Pki, make_pki

from masstasker._pb import masstasker_pb2 as pb
from masstasker._pb import masstasker_pb2_grpc as pb_grpc
from masstasker.server import BackgroundServer, Settings

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
