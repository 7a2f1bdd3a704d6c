"""One dedicated connection per server: notifications in, and the truth about whether the database is there.

It LISTENs on the schema's channel and hands each notification's group to
``on_notify``. Between notifications it pings every ``interval`` seconds with
a one-second deadline, so a database that stops answering is noticed within
about two seconds, and one that shuts down at once (its socket closes). It
then calls ``on_down`` and reconnects every half second; once a connection
works again it calls ``on_up`` (which rechecks the pool before the server
says it serves again). In poll-only mode (a pooler that does not pass
notifications) it only pings.
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
    ) -> None:
        self._conninfo = conninfo
        self._channel = channel
        self._poll_only = poll_only
        self._interval = interval
        self._on_notify = on_notify
        self._on_down = on_down
        self._on_up = on_up
        self._task: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None

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

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        conn: psycopg.AsyncConnection[Any] = await psycopg.AsyncConnection.connect(
            self._conninfo,
            autocommit=True,
            prepare_threshold=None,
        )
        if not self._poll_only:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
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
                if up:
                    up = False
                    log.error("PostgreSQL store unreachable: %s", exc)
                    self._on_down(str(exc) or type(exc).__name__)
                if conn is not None:
                    await conn.close()
                    conn = None
                await asyncio.sleep(_RECONNECT_EVERY)

    async def _serve(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Deliver notifications and ping until the connection fails."""
        while True:
            if self._poll_only:
                await asyncio.sleep(self._interval)
            else:
                async for notify in conn.notifies(timeout=self._interval):
                    self._on_notify(payload_group(notify.payload))
            await asyncio.wait_for(conn.execute("SELECT 1"), timeout=_PING_TIMEOUT)
