"""Test helpers for MassTasker users: a fake clock, server runners, and the pytest plugin.

Installing masstasker registers this module as a pytest plugin (entry point ``pytest11``), so these
fixtures are available in any test without a conftest:

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
``masstasker_server_settings`` / ``masstasker_client_options``
    Override these (return a dict) to give ``masstasker_server`` settings such as ``tls_cert``,
    ``tls_key``, ``tls_client_ca`` or ``auth_token_file``, and every client fixture the matching
    ``credentials=`` and ``token=``.

The server fixtures need the server's dependencies (``pip install masstasker``); the client fixtures
need nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest

from masstasker._server_process import ServerProcess, run_server_process
from masstasker.client import AsyncClient, Client
from masstasker.client._time import Seconds, to_seconds

if TYPE_CHECKING:
    from masstasker.server.app import BackgroundServer

__all__ = [
    "FakeClock",
    "ServerProcess",
    "masstasker_async_client",
    "masstasker_async_client_factory",
    "masstasker_client",
    "masstasker_client_factory",
    "masstasker_client_options",
    "masstasker_clock",
    "masstasker_server",
    "masstasker_server_process",
    "masstasker_server_settings",
    "run_server",
    "run_server_process",
]


class FakeClock:
    """A clock for tests: ``now()`` moves only when ``advance()`` is called, and waits on it end then.

    Pass it as ``Client(..., clock=clock)``: the client stamps task times and query times from it (and the
    server follows the request's time), and ``run_with_lease``'s heartbeat waits on it. So a test fires a
    heartbeat by ``clock.wait_for_sleepers()`` (the heartbeat is waiting) then ``clock.advance(heartbeat)``
    — no real sleeping, no guessing how long is enough. Thread-safe; ``advance`` may be called from any
    thread or event loop.
    """

    def __init__(self, start: datetime | None = None) -> None:
        """Start at ``start`` (UTC; default: the real time now, so tasks made by real clocks interleave)."""
        self._now = (start or datetime.now(UTC)).astimezone(UTC)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # sleeper count changed
        # Sleepers by key. advance() removes the ones it wakes, so `sleepers` counts only waits still pending
        # and a test can tell "the heartbeat is asleep again" from "it has not woken up yet".
        self._conds: dict[int, tuple[datetime, threading.Condition]] = {}
        self._futures: dict[int, tuple[datetime, asyncio.AbstractEventLoop, asyncio.Future[None]]] = {}
        self._next_key = 0

    def now(self) -> datetime:
        """The fake time."""
        with self._lock:
            return self._now

    def advance(self, by: Seconds) -> datetime:
        """Move time forward by ``by`` and wake every sleeper whose time has come; return the new time."""
        step = timedelta(seconds=to_seconds(by, name="advance"))
        with self._lock:
            self._now += step
            now = self._now
            conds = [cond for deadline, cond in self._conds.values() if deadline <= now]
            self._conds = {key: entry for key, entry in self._conds.items() if entry[0] > now}
            due = [(key, loop, fut) for key, (deadline, loop, fut) in self._futures.items() if deadline <= now]
            for key, _, _ in due:
                del self._futures[key]
            self._changed.notify_all()
        # Outside our lock: a sleeper holds its condition while it takes our lock, so the reverse order
        # here would deadlock. A sleeper re-checks the time under its condition, so none is missed.
        for cond in conds:
            with cond:
                cond.notify_all()
        for _, loop, fut in due:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(_resolve, fut)
        return now

    @property
    def sleepers(self) -> int:
        """How many waits (sync and async) on this clock are pending: not yet woken by ``advance()``."""
        with self._lock:
            return len(self._conds) + len(self._futures)

    def wait_for_sleepers(self, count: int = 1, *, timeout: float = 10.0) -> None:
        """Block (real time, at most ``timeout``) until at least ``count`` waits are pending.

        From a thread other than the sleepers' event loop; in a coroutine use ``wait_for_sleepers_async``.
        """
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._conds) + len(self._futures) >= count, timeout):
                raise TimeoutError(f"expected {count} sleeper(s) on the fake clock within {timeout}s")

    async def wait_for_sleepers_async(self, count: int = 1, *, timeout: float = 10.0) -> None:
        """``wait_for_sleepers`` for a coroutine: waits without blocking the event loop."""
        # A worker thread does the blocking wait, so sleepers on this very loop can make progress.
        await asyncio.to_thread(self.wait_for_sleepers, count, timeout=timeout)

    def wait_for(self, cond: threading.Condition, predicate: Callable[[], bool], timeout: float) -> bool:
        """``cond.wait_for(predicate, timeout)`` (the caller holds ``cond``) with ``timeout`` in fake time."""
        with self._lock:
            deadline = self._now + timedelta(seconds=timeout)
            key = self._register_locked()
            self._conds[key] = (deadline, cond)
            self._changed.notify_all()
        try:
            while not predicate():
                if self.now() >= deadline:
                    return predicate()
                cond.wait()
            return True
        finally:
            with self._lock:
                self._conds.pop(key, None)  # already gone if advance() woke us
                self._changed.notify_all()

    async def sleep(self, seconds: float) -> None:
        """``asyncio.sleep`` in fake time: returns once ``advance()`` reaches now + ``seconds``."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            deadline = self._now + timedelta(seconds=seconds)
            if deadline <= self._now:
                return
            key = self._register_locked()
            self._futures[key] = (deadline, loop, fut)
            self._changed.notify_all()
        try:
            await fut
        finally:
            with self._lock:
                self._futures.pop(key, None)  # already gone if advance() woke us; here if we were cancelled
                self._changed.notify_all()

    def _register_locked(self) -> int:
        self._next_key += 1
        return self._next_key

    def __repr__(self) -> str:
        return f"FakeClock({self.now().isoformat()})"


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


# -- servers -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def run_server(**settings: Any) -> Iterator[BackgroundServer]:
    """An in-process server on a free 127.0.0.1 port (``Settings`` fields as keywords), stopped on exit."""
    from masstasker.server.app import BackgroundServer
    from masstasker.server.config import Settings

    settings = {"host": "127.0.0.1", "port": 0, "listen_http": "", **settings}
    with BackgroundServer(Settings(**settings)) as server:
        yield server


# -- the pytest plugin ---------------------------------------------------------------------------------------


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
def masstasker_server(masstasker_server_settings: dict[str, Any]) -> Iterator[BackgroundServer]:
    """A fresh in-process MassTasker server for this test; dial ``masstasker_server.target``."""
    with run_server(**masstasker_server_settings) as server:
        yield server


@pytest.fixture
def masstasker_server_process() -> Iterator[ServerProcess]:
    """A fresh ``python -m masstasker.server`` subprocess for this test; dial ``.target``."""
    with run_server_process() as server:
        yield server


@pytest.fixture
def masstasker_clock() -> FakeClock:
    """A ``FakeClock`` starting at the real time now."""
    return FakeClock()


@pytest.fixture
def masstasker_client_factory(
    masstasker_server: BackgroundServer, masstasker_client_options: dict[str, Any]
) -> Iterator[Callable[..., Client]]:
    """``factory(**options)`` makes a ``Client`` for ``masstasker_server`` (options as for ``Client``)."""
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
