"""Test helpers for MassTasker users: a fake clock and server runners.

The pytest fixtures built on them (``masstasker_server``, ``masstasker_client``, ``masstasker_clock``, …)
are in ``masstasker.pytest_plugin``, which installing masstasker registers with pytest: they are available
in any test without a conftest.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from masstasker._server_process import ServerProcess, run_server_process
from masstasker.client._time import Seconds, to_seconds

if TYPE_CHECKING:
    from masstasker.server.app import BackgroundServer

__all__ = [
    "FakeClock",
    "ServerProcess",
    "run_server",
    "run_server_process",
    "store_args",
    "store_settings",
]


class FakeClock:
    """A clock for tests: ``now()`` moves only when ``advance()`` is called, and waits on it end then.

    Pass it as ``Client(..., clock=clock)``: the client stamps task times and query times from it (and the
    server follows the request's time), and ``run_with_lease``'s heartbeat waits on it. So a test fires a
    heartbeat by ``clock.wait_for_sleepers()`` (the heartbeat is waiting) then ``clock.advance(heartbeat)``
    — no real sleeping, no guessing how long is enough. A waiting ``query`` follows it too: ``advance()``
    makes every client on this clock re-ask its waiting queries at the new time (``on_advance``), so a
    lease that the advance made expire is handed out at once. Thread-safe; ``advance`` may be called from
    any thread or event loop.
    """

    def __init__(self, start: datetime | None = None) -> None:
        """Start at ``start`` (timezone-aware; default: the real time now, so tasks made by real clocks
        interleave). A naive ``start`` is refused, as everywhere in the client: it could mean any zone."""
        if start is not None and (start.tzinfo is None or start.utcoffset() is None):
            raise ValueError(f"start must be a timezone-aware datetime, got the naive {start.isoformat()}")
        self._now = (start or datetime.now(UTC)).astimezone(UTC)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # sleeper count changed
        # Sleepers by key. advance() removes the ones it wakes, so `sleepers` counts only waits still pending
        # and a test can tell "the heartbeat is asleep again" from "it has not woken up yet".
        self._conds: dict[int, tuple[datetime, threading.Condition]] = {}
        self._futures: dict[int, tuple[datetime, asyncio.AbstractEventLoop, asyncio.Future[None]]] = {}
        self._next_key = 0
        self._listeners: dict[int, Callable[[], None]] = {}

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
            listeners = list(self._listeners.values())
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
        if step:
            for listener in listeners:
                listener()
        return now

    def on_advance(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` after every ``advance()`` that moves the clock, until the returned function is
        called. Clients use it to re-ask a waiting query at the new time (``AdvancingClock``)."""
        with self._lock:
            key = self._register_locked()
            self._listeners[key] = callback

        def remove() -> None:
            with self._lock:
                self._listeners.pop(key, None)

        return remove

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


@contextlib.contextmanager
def store_settings(store: str = "memory") -> Iterator[dict[str, Any]]:
    """``Settings`` fields for a server on ``store``, for the duration of the ``with``.

    ``"memory"`` (or ``""``): none. A PostgreSQL DSN or URI: that database in a
    schema of its own that no other test uses, dropped on exit (needs
    ``pip install 'masstasker[postgres]'``), so every test starts from an
    empty store as it would in memory.
    """
    if store in ("", "memory"):
        yield {}
        return
    import psycopg  # the PostgreSQL extra; only when a test asks for PostgreSQL
    from psycopg import sql

    schema = f"mt_test_{os.getpid()}_{next(_schema_numbers)}"
    try:
        yield {"store": store, "store_schema": schema, "store_pool_size": 4}
    finally:
        with psycopg.connect(store, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def store_args(settings: dict[str, Any]) -> list[str]:
    """:func:`store_settings`' fields as ``python -m masstasker.server`` flags."""
    return [arg for name, value in settings.items() for arg in (f"--{name.replace('_', '-')}", str(value))]


_schema_numbers = itertools.count(1)
