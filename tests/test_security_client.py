"""The clients' side of security: ``token=`` / ``MASSTASKER_TOKEN``, TLS credentials, and the pytest fixtures."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from pki import Pki, make_pki

from masstasker import AsyncClient, Client, Unauthenticated, Unavailable, new_task
from masstasker._pb import masstasker_pb2 as pb
from masstasker._pb import masstasker_pb2_grpc as pb_grpc
from masstasker.client._auth import TOKEN_ENV, resolve_token
from masstasker.server import BackgroundServer

TOKEN = "worker-token-42"


@pytest.fixture(autouse=True)
def no_ambient_token(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's shell may hold a worker token; these tests decide for themselves.
    monkeypatch.delenv(TOKEN_ENV, raising=False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN}\n")
    return path


@pytest.fixture
def auth_server(make_server: Callable[..., BackgroundServer], token_file: Path) -> BackgroundServer:
    return make_server(auth_token_file=str(token_file))


# -- where the token comes from ----------------------------------------------------------------------------------


def test_resolve_token() -> None:
    assert resolve_token("abc", {}) == "abc"
    assert resolve_token(" abc\n", {}) == "abc"  # as read from a secrets file
    assert resolve_token(None, {TOKEN_ENV: "from-env\n"}) == "from-env"
    assert resolve_token("explicit", {TOKEN_ENV: "from-env"}) == "explicit"
    assert resolve_token("", {TOKEN_ENV: "from-env"}) is None  # "" turns the variable off
    assert resolve_token(None, {}) is None


@pytest.mark.parametrize("bad", ["two words", "tab\there", "line\nbreak", "naïve"])
def test_unsendable_token_is_refused_without_quoting_it(bad: str) -> None:
    with pytest.raises(ValueError, match="printable ASCII") as err:
        resolve_token(bad, {})
    assert bad not in str(err.value)
    with pytest.raises(ValueError, match=TOKEN_ENV):
        resolve_token(None, {TOKEN_ENV: bad})


# -- Client ----------------------------------------------------------------------------------------------------


def test_client_with_and_without_token(auth_server: BackgroundServer) -> None:
    with Client(auth_server.target) as anonymous:
        with pytest.raises(Unauthenticated, match="missing authorization") as err:
            anonymous.create(new_task("g"))
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert isinstance(err.value, PermissionError)
    with Client(auth_server.target, token="wrong") as wrong, pytest.raises(Unauthenticated, match="not accepted"):
        wrong.create(new_task("g"))
    with Client(auth_server.target, token=TOKEN) as client:
        task = new_task("g")
        client.create(task)
        assert client.peek("g", wait=False).id == task.id
        # The raw stub goes through the same channel, so it carries the token too.
        assert client.rpc.Debug(pb.DebugRequest(), timeout=10).num_tasks == 1


def test_client_reads_the_token_from_the_environment(
    auth_server: BackgroundServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with Client(auth_server.target) as client:
        client.create(new_task("g"))
    with Client(auth_server.target, token="") as anonymous, pytest.raises(Unauthenticated):
        anonymous.create(new_task("g"))


class RecordingProxy(pb_grpc.MassTaskerServicer):
    """Records the metadata of each Debug call, then forwards the call, metadata and all, to ``upstream``."""

    def __init__(self, upstream: str) -> None:
        self.channel = grpc.insecure_channel(upstream)
        self.stub = pb_grpc.MassTaskerStub(self.channel)
        self.seen: list[dict[str, str]] = []

    def Debug(self, request: pb.DebugRequest, context: grpc.ServicerContext) -> pb.DebugResponse:
        metadata = [(m.key, m.value) for m in context.invocation_metadata() if not m.key.startswith(("grpc-", ":"))]
        self.seen.append(dict(metadata))
        try:
            response: pb.DebugResponse = self.stub.Debug(request, metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details())
        return response


@pytest.fixture
def proxy(auth_server: BackgroundServer) -> Iterator[tuple[str, RecordingProxy]]:
    servicer = RecordingProxy(auth_server.target)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_MassTaskerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None).wait()
    servicer.channel.close()


def test_client_token_and_metadata_of_its_own(proxy: tuple[str, RecordingProxy]) -> None:
    target, recorder = proxy
    with Client(target, token=TOKEN) as client:
        # A caller's own metadata is kept, the token is added; the real server behind accepts the token.
        response = client.rpc.Debug(pb.DebugRequest(), timeout=10, metadata=[("x-request-id", "1")])
        assert response.num_tasks == 0
    with Client(target, token="") as anonymous, pytest.raises(grpc.RpcError) as refused:
        anonymous.rpc.Debug(pb.DebugRequest(), timeout=10, metadata=[("x-request-id", "2")])
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED  # the raw stub's own error type
    (first, second) = recorder.seen
    assert first["x-request-id"] == "1" and first["authorization"] == f"Bearer {TOKEN}"
    assert second["x-request-id"] == "2" and "authorization" not in second


def test_async_client_token_and_metadata_of_its_own(proxy: tuple[str, RecordingProxy]) -> None:
    target, recorder = proxy

    async def main() -> None:
        async with AsyncClient(target, token=TOKEN) as client:
            await client.rpc.Debug(pb.DebugRequest(), timeout=10, metadata=(("x-request-id", "3"),))

    asyncio.run(main())
    (seen,) = recorder.seen
    assert seen["x-request-id"] == "3" and seen["authorization"] == f"Bearer {TOKEN}"


def test_client_over_tls_with_token(make_server: Callable[..., BackgroundServer], pki: Pki, token_file: Path) -> None:
    server = make_server(
        tls_cert=str(pki.server.cert_path), tls_key=str(pki.server.key_path), auth_token_file=str(token_file)
    )
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert)
    with Client(server.target, credentials=credentials, token=TOKEN) as client:
        client.create(new_task("g"))
    with Client(server.target, token=TOKEN) as plaintext, pytest.raises(Unavailable):
        plaintext.create(new_task("g"))


def test_client_with_a_client_certificate(make_server: Callable[..., BackgroundServer], pki: Pki) -> None:
    server = make_server(
        tls_cert=str(pki.server.cert_path), tls_key=str(pki.server.key_path), tls_client_ca=str(pki.ca.cert_path)
    )
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert, private_key=pki.client.key, certificate_chain=pki.client.cert
    )
    with Client(server.target, credentials=credentials) as client:
        client.create(new_task("g"))
        assert client.peek("g", wait=False).group == "g"
    # The certificate is what got us in: the same server refuses a client without one, or with a stranger's.
    no_certificate = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert)
    stranger = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert, private_key=pki.stranger.key, certificate_chain=pki.stranger.cert
    )
    for refused in (no_certificate, stranger):
        with Client(server.target, credentials=refused) as client, pytest.raises(Unavailable):
            client.create(new_task("g"), timeout=10)
    assert server.call(lambda s: s.store.size()) == 1


# -- AsyncClient -----------------------------------------------------------------------------------------------


def test_async_client_with_and_without_token(auth_server: BackgroundServer, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        anonymous = AsyncClient(auth_server.target)
        with pytest.raises(Unauthenticated, match="missing authorization"):
            await anonymous.create(new_task("g"))
        await anonymous.close()
        async with AsyncClient(auth_server.target, token=TOKEN) as client:
            task = new_task("g")
            await client.create(task)
            assert (await client.peek("g", wait=False)).id == task.id
            assert (await client.rpc.Debug(pb.DebugRequest(), timeout=10)).num_tasks == 1
        monkeypatch.setenv(TOKEN_ENV, TOKEN)
        async with AsyncClient(auth_server.target) as from_env:
            await from_env.create(new_task("g"))

    asyncio.run(main())


def test_async_client_over_mtls_with_token(
    make_server: Callable[..., BackgroundServer], pki: Pki, token_file: Path
) -> None:
    server = make_server(
        tls_cert=str(pki.server.cert_path),
        tls_key=str(pki.server.key_path),
        tls_client_ca=str(pki.ca.cert_path),
        auth_token_file=str(token_file),
    )
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert, private_key=pki.client.key, certificate_chain=pki.client.cert
    )

    async def main() -> None:
        async with AsyncClient(server.target, credentials=credentials, token=TOKEN) as client:
            await client.create(new_task("g"))
            assert (await client.peek("g", wait=False)).group == "g"

    asyncio.run(main())


def test_bad_environment_token_fails_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "has space")
    with pytest.raises(ValueError, match=TOKEN_ENV):
        AsyncClient("127.0.0.1:1")
    with pytest.raises(ValueError, match=TOKEN_ENV):
        Client("127.0.0.1:1")
