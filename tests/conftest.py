"""Fixtures for the server's own tests: a real server on 127.0.0.1 and a raw stub, on either store.

The server, waiting, client, example and operator (admin API, CLI, dashboard)
tests run once per store: in memory, and on PostgreSQL (a throwaway cluster, a
fresh schema per test). A test that looks at the in-memory store's internals
says so with ``@pytest.mark.memory_only("why")``. Every other module runs in
memory only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from masstasker._pb import masstasker_pb2_grpc as pb_grpc
from masstasker.server import BackgroundServer, Settings
from masstasker.testing import store_settings

# The modules whose tests run on both stores (issue 11: the same tests, not a copy of them).
BOTH_STORES = {
    "test_server",
    "test_waiting",
    "test_client",
    "test_client_lease",
    "test_example",
    "test_admin",
    "test_operator_cli",
    "test_dashboard",
    "test_admin_model",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "memory_only(reason): the test inspects the in-memory store's internals")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store_kind" not in metafunc.fixturenames:
        return
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    both = module in BOTH_STORES and metafunc.definition.get_closest_marker("memory_only") is None
    metafunc.parametrize("store_kind", ["memory", "postgres"] if both else ["memory"], indirect=True)


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    """ "memory" or "postgres": which store this test's servers use (see pytest_generate_tests)."""
    return str(getattr(request, "param", "memory"))


@pytest.fixture
def masstasker_store(store_kind: str, request: pytest.FixtureRequest) -> str:
    """The plugin's store choice, for the client and example tests: the session's cluster for "postgres"."""
    if store_kind == "postgres":
        return str(request.getfixturevalue("postgresql_dsn"))
    return "memory"


@pytest.fixture
def make_server(masstasker_store: str) -> Iterator[Callable[..., BackgroundServer]]:
    """Factory: ``make_server(**settings)`` starts a server on a free loopback port, on this test's store.

    ``clock`` (keyword): the server's clock, for tests that move time by hand.
    """
    started: list[BackgroundServer] = []
    stores: list[Any] = []

    def make(clock: Callable[[], int] = time.time_ns, **overrides: object) -> BackgroundServer:
        context = store_settings(masstasker_store)
        stores.append(context)
        for name, value in context.__enter__().items():
            overrides.setdefault(name, value)
        overrides.setdefault("port", 0)
        overrides.setdefault("listen_http", "")
        server = BackgroundServer(Settings(**overrides), clock=clock)  # type: ignore[arg-type]
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop(grace=0)
    for context in stores:
        context.__exit__(None, None, None)


@pytest.fixture
def server(make_server: Callable[..., BackgroundServer]) -> BackgroundServer:
    """A fresh server with default settings."""
    return make_server()


@pytest.fixture
def channel(server: BackgroundServer) -> Iterator[grpc.Channel]:
    """A plain channel to ``server``."""
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.MassTaskerStub:
    """The raw generated stub, so these tests see exactly what is on the wire."""
    return pb_grpc.MassTaskerStub(channel)


@pytest.fixture
def check_store(server: BackgroundServer) -> Iterator[Callable[[], None]]:
    """Call to assert the server's store invariants; also runs after the test."""

    def check() -> None:
        server.call(lambda s: s.store.check())

    yield check
    check()
