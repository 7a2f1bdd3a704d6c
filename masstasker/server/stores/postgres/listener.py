"""One dedicated connection per server: notifications in, and the truth about whether the database is there.

It LISTENs on the schema's channel and hands each notification's group to
``on_notify``. Between notifications it pings every ``interval`` seconds with
a one-second deadline. One failed ping is not yet an outage (an overloaded
machine, a backend that is slow for a moment): the listener drops that
connection and opens a new one at once, with the same deadline (and calls
``on_replaced`` if that works), and only if that fails too calls ``on_down``. So a database that stops answering is
noticed within about three seconds, and one that shuts down at once (its
socket closes, the new connection is refused) at once. While down it
reconnects every half second; once a connection works again it calls
``on_up`` (which rechecks the pool before the server says it serves again).
In poll-only mode (a pooler that does not pass notifications) it only pings.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg import sql

from masstasker.server.stores.postgres.codec import payload_group

__all__ = ["Listener"]

log = logging.getLogger("masstasker.server.postgres")

_PING_TIMEOUT = 1.0
_RECONNECT_EVERY = 0.5
# How long a ping past its deadline may still end by itself before it is cancelled.
_ABANDON_AFTER = 10.0


class _PingTimeout(TimeoutError):
    """A ping past its deadline; its connection now belongs to the task that waits for it to end."""


class Listener:
    """Runs in the background from :meth:`start` to :meth:`close`."""

    def __init__(
        self,
        conninfo: str,
        channel: str,
        *,
        poll_only: bool,
        interval: float,
        on_notify: Callable[[str | None], None],
        on_down: Callable[[str], None],
        on_up: Callable[[], Awaitable[None]],
        on_replaced: Callable[[], None] = lambda: None,
    ) -> None:
        self._conninfo = conninfo
        self._channel = channel
        self._poll_only = poll_only
        self._interval = interval
        self._on_notify = on_notify
        self._on_down = on_down
        self._on_up = on_up
        self._on_replaced = on_replaced
        self._task: asyncio.Task[None] | None = None
        self._abandoned: set[asyncio.Task[None]] = set()
        #: The PostgreSQL backend serving the current connection (for operators and tests).
        self.backend_pid: int | None = None
        #: Pings that failed while a new connection still worked: slow moments that were not outages.
        self.ping_failures = 0

    async def start(self) -> None:
        """Connect and listen now (errors propagate: the server cannot start), then keep at it."""
        conn = await self._connect()
        self._task = asyncio.get_running_loop().create_task(self._run(conn), name="masstasker-pg-listener")

    async def close(self) -> None:
        """Stop listening and close the connection."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for task in list(self._abandoned):
            task.cancel()
        await asyncio.gather(*self._abandoned, return_exceptions=True)

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        conn: psycopg.AsyncConnection[Any] = await psycopg.AsyncConnection.connect(
            self._conninfo,
            autocommit=True,
            prepare_threshold=None,
        )
        if not self._poll_only:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
        self.backend_pid = conn.info.backend_pid
        return conn

    async def _run(self, conn: psycopg.AsyncConnection[Any] | None) -> None:
        up = True
        while True:
            try:
                if conn is None:
                    conn = await asyncio.wait_for(self._connect(), timeout=_PING_TIMEOUT * 3)
                if not up:
                    await self._on_up()
                    up = True
                    log.info("PostgreSQL store reachable again")
                await self._serve(conn)
            except asyncio.CancelledError:
                if conn is not None:
                    await conn.close()
                raise
            except (psycopg.Error, OSError, TimeoutError) as exc:
                if conn is not None and not isinstance(exc, _PingTimeout):
                    await conn.close()
                conn = None
                if up:
                    conn = await self._second_opinion(exc)
                    if conn is not None:
                        continue
                    up = False
                    log.error("PostgreSQL store unreachable: %s", exc)
                    self._on_down(str(exc) or type(exc).__name__)
                await asyncio.sleep(_RECONNECT_EVERY)

    async def _second_opinion(self, exc: BaseException) -> psycopg.AsyncConnection[Any] | None:
        """After a failed ping: a new connection, or None if the database does not take one either."""
        try:
            conn = await asyncio.wait_for(self._connect(), timeout=_PING_TIMEOUT)
        except (psycopg.Error, OSError, TimeoutError):
            return None
        self.ping_failures += 1
        log.warning("PostgreSQL store: a ping failed (%s), a new connection works", str(exc) or type(exc).__name__)
        # Notifications sent while the old connection hung are lost: every waiter looks once. Whatever
        # ended the old connection may have ended others (the pool's): the owner rechecks them.
        self._on_notify(None)
        self._on_replaced()
        return conn

    async def _serve(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Deliver notifications and ping until the connection fails."""
        while True:
            if self._poll_only:
                await asyncio.sleep(self._interval)
            else:
                async for notify in conn.notifies(timeout=self._interval):
                    self._on_notify(payload_group(notify.payload))
            await self._ping(conn)

    async def _ping(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """``SELECT 1`` within the deadline, or TimeoutError.

        Not ``wait_for``: cancelling a statement makes psycopg ask the server to cancel it and wait up
        to ten seconds for that, the very wait a ping must not make. A ping past its deadline is left
        to end by itself, with its connection, in the background.
        """
        ping = asyncio.ensure_future(conn.execute("SELECT 1"))
        try:
            done, _ = await asyncio.wait({ping}, timeout=_PING_TIMEOUT)
        except asyncio.CancelledError:
            ping.cancel()  # stopping: the caller closes the connection
            raise
        if not done:
            closing = asyncio.ensure_future(self._abandon(conn, ping))
            self._abandoned.add(closing)
            closing.add_done_callback(self._abandoned.discard)
            raise _PingTimeout(f"no answer to a ping within {_PING_TIMEOUT:g} s")
        await ping

    @staticmethod
    async def _abandon(conn: psycopg.AsyncConnection[Any], ping: asyncio.Future[Any]) -> None:
        # The connection is closed only once the ping has let go of its socket.
        try:
            await asyncio.wait({ping}, timeout=_ABANDON_AFTER)
            ping.cancel()  # psycopg then asks the server to cancel, and closes the connection if it cannot
            await asyncio.gather(ping, return_exceptions=True)
        finally:
            ping.cancel()  # the listener is closing: the closed connection makes the ping end at once
            await conn.close()
