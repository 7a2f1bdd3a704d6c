"""Fixtures for the server's own tests: a real server on 127.0.0.1 and a raw stub."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import pytest

from masstasker._pb import masstasker_pb2_grpc as pb_grpc
from masstasker.server import BackgroundServer, Settings


@pytest.fixture
def make_server() -> Iterator[Callable[..., BackgroundServer]]:
    """Factory: ``make_server(**settings)`` starts a server on a free loopback port."""
    started: list[BackgroundServer] = []

    def make(**overrides: object) -> BackgroundServer:
        overrides.setdefault("port", 0)
        overrides.setdefault("listen_http", "")
        server = BackgroundServer(Settings(**overrides))  # type: ignore[arg-type]
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop(grace=0)


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
