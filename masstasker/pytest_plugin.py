"""The pytest plugin: MassTasker fixtures in any test, without a conftest.

Installing masstasker registers this module (entry point ``pytest11``), so pytest imports it in every test
run of every project on that machine. It therefore imports nothing of ours at module level: our protobuf
bindings (proto package ``masstasker``) are loaded only when a test uses one of these fixtures, and a
project with its own bindings of the Go ``masstasker.proto`` runs its other tests untouched. (Using our
fixtures and such bindings in one process would still clash: that is protobuf's one-pool rule.)

``masstasker_server``
    A fresh in-process server for this test on a free 127.0.0.1 port (``.target``, ``.port``).
``masstasker_server_process``
    The same, as a real ``python -m masstasker.server`` subprocess: true end to end.
``masstasker_client`` / ``masstasker_async_client``
    A ``Client`` / ``AsyncClient`` connected to ``masstasker_server``, closed after the test.
``masstasker_client_factory`` / ``masstasker_async_client_factory``
    Make more clients for that server (e.g. ``factory(clock=clock)``, or one per simulated worker).
``masstasker_clock``
    A ``FakeClock``: time moves only when the test calls ``advance()``.
``masstasker_store``
    ``"memory"``; override it to return a PostgreSQL DSN and every server fixture uses a PostgreSQL
    store (a fresh schema per test): your worker tests then run against the shared store too.
``masstasker_server_settings`` / ``masstasker_client_options``
    Override these (return a dict) to give ``masstasker_server`` settings such as ``tls_cert``,
    ``tls_key``, ``tls_client_ca`` or ``auth_token_file``, and every client fixture the matching
    ``credentials=`` and ``token=``.

The server fixtures need the server's dependencies (``pip install masstasker``); the client fixtures
need nothing more. The helpers behind them (``FakeClock``, ``run_server``, ``run_server_process``) are in
``masstasker.testing``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # imported inside the fixtures at run time: see the module docstring
    from masstasker.client import AsyncClient, Client
    from masstasker.server.app import BackgroundServer
    from masstasker.testing import FakeClock, ServerProcess

__all__ = [
    "masstasker_async_client",
    "masstasker_async_client_factory",
    "masstasker_client",
    "masstasker_client_factory",
    "masstasker_client_options",
    "masstasker_clock",
    "masstasker_server",
    "masstasker_server_process",
    "masstasker_server_settings",
    "masstasker_store",
]


@pytest.fixture
def masstasker_server_settings() -> dict[str, Any]:
    """``Settings`` fields for ``masstasker_server`` (none by default). Override it for TLS or tokens::

    @pytest.fixture
    def masstasker_server_settings(tmp_path):
        (tmp_path / "tokens").write_text("s3cret")
        return {"auth_token_file": str(tmp_path / "tokens")}
    """
    return {}


@pytest.fixture
def masstasker_client_options() -> dict[str, Any]:
    """Options every client fixture passes to ``Client``/``AsyncClient`` (none by default), such as
    ``token=`` or ``credentials=``; options given to a factory call win. Override it with the server's."""
    return {}


@pytest.fixture
def masstasker_store() -> str:
    """Where the server fixtures keep tasks: ``"memory"`` (the default) or a PostgreSQL DSN or URI.

    Override it to run your worker tests against a PostgreSQL-backed server; each test gets an empty
    schema of its own, dropped afterwards. With the throwaway cluster this package's
    ``masstasker.testing_postgres`` plugin starts (Unix socket, temporary directory)::

        @pytest.fixture
        def masstasker_store(postgresql_dsn):
            return postgresql_dsn
    """
    return "memory"


@pytest.fixture
def masstasker_server(masstasker_server_settings: dict[str, Any], masstasker_store: str) -> Iterator[BackgroundServer]:
    """A fresh in-process MassTasker server for this test; dial ``masstasker_server.target``."""
    from masstasker.testing import run_server, store_settings

    with store_settings(masstasker_store) as store, run_server(**store, **masstasker_server_settings) as server:
        yield server


@pytest.fixture
def masstasker_server_process(masstasker_store: str) -> Iterator[ServerProcess]:
    """A fresh ``python -m masstasker.server`` subprocess for this test; dial ``.target``."""
    from masstasker.testing import run_server_process, store_args, store_settings

    with store_settings(masstasker_store) as store, run_server_process(*store_args(store)) as server:
        yield server


@pytest.fixture
def masstasker_clock() -> FakeClock:
    """A ``FakeClock`` starting at the real time now."""
    from masstasker.testing import FakeClock

    return FakeClock()


@pytest.fixture
def masstasker_client_factory(
    masstasker_server: BackgroundServer, masstasker_client_options: dict[str, Any]
) -> Iterator[Callable[..., Client]]:
    """``factory(**options)`` makes a ``Client`` for ``masstasker_server`` (options as for ``Client``)."""
    from masstasker.client import Client

    clients: list[Client] = []

    def make(**options: Any) -> Client:
        client = Client(masstasker_server.target, **{**masstasker_client_options, **options})
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def masstasker_client(masstasker_client_factory: Callable[..., Client]) -> Client:
    """A ``Client`` (system clock) connected to ``masstasker_server``."""
    return masstasker_client_factory()


@pytest.fixture
def masstasker_async_client_factory(
    masstasker_server: BackgroundServer, masstasker_client_options: dict[str, Any]
) -> Iterator[Callable[..., AsyncClient]]:
    """``factory(**options)`` makes an ``AsyncClient`` for ``masstasker_server``; it connects lazily, in the
    event loop that first uses it, so it works with ``asyncio.run`` as well as with async test plugins."""
    from masstasker.client import AsyncClient

    clients: list[AsyncClient] = []

    def make(**options: Any) -> AsyncClient:
        client = AsyncClient(masstasker_server.target, **{**masstasker_client_options, **options})
        clients.append(client)
        return client

    yield make
    for client in clients:
        _close_async(client)


@pytest.fixture
def masstasker_async_client(masstasker_async_client_factory: Callable[..., AsyncClient]) -> AsyncClient:
    """An ``AsyncClient`` (system clock) connected to ``masstasker_server``."""
    return masstasker_async_client_factory()


def _close_async(client: AsyncClient) -> None:
    """Close an async client from synchronous teardown. The loop its channel was made in is usually gone by
    now (``asyncio.run`` closed it); grpc.aio lets a fresh loop close the channel and free its resources."""
    asyncio.run(client.close())
