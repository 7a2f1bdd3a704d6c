"""The pytest plugin's fixtures with TLS and a token: override the settings and client-options fixtures."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from pki import make_pki

from masstasker import AsyncClient, Client, Unauthenticated, Unavailable, new_task
from masstasker.server import BackgroundServer

TOKEN = "fixture-token"


@pytest.fixture
def masstasker_server_settings(tmp_path: Path) -> dict[str, Any]:
    pki = make_pki(tmp_path)
    (tmp_path / "tokens").write_text(TOKEN)
    return {
        "tls_cert": str(pki.server.cert_path),
        "tls_key": str(pki.server.key_path),
        "auth_token_file": str(tmp_path / "tokens"),
    }


@pytest.fixture
def masstasker_client_options(tmp_path: Path, masstasker_server_settings: dict[str, Any]) -> dict[str, Any]:
    ca = (tmp_path / "ca.crt").read_bytes()
    return {"credentials": grpc.ssl_channel_credentials(root_certificates=ca), "token": TOKEN}


def test_client_fixture_uses_tls_and_the_token(masstasker_client: Client, masstasker_server: BackgroundServer) -> None:
    masstasker_client.create(new_task("g"))
    assert masstasker_server.call(lambda s: s.store.size()) == 1
    assert masstasker_server.settings.tls_cert
    with Client(masstasker_server.target, token=TOKEN) as plaintext, pytest.raises(Unavailable):
        plaintext.create(new_task("g"), timeout=10)  # so the fixture's client did use TLS
    assert masstasker_server.call(lambda s: s.store.size()) == 1


def test_factory_options_win(masstasker_client_factory: Any) -> None:
    with pytest.raises(Unauthenticated):
        masstasker_client_factory(token="").create(new_task("g"))


def test_async_client_fixture_uses_tls_and_the_token(
    masstasker_async_client: AsyncClient, masstasker_server: BackgroundServer, tmp_path: Path
) -> None:
    ca = (tmp_path / "ca.crt").read_bytes()

    async def main() -> None:
        await masstasker_async_client.create(new_task("g"))
        # The server demands both: a client without TLS, or without the token, is refused.
        async with AsyncClient(masstasker_server.target, token=TOKEN) as plaintext:
            with pytest.raises(Unavailable):
                await plaintext.create(new_task("g"), timeout=10)
        tls = grpc.ssl_channel_credentials(root_certificates=ca)
        async with AsyncClient(masstasker_server.target, credentials=tls, token="") as anonymous:
            with pytest.raises(Unauthenticated):
                await anonymous.create(new_task("g"), timeout=10)

    asyncio.run(main())
    assert masstasker_server.call(lambda s: s.store.size()) == 1  # only the fixture's client got through
