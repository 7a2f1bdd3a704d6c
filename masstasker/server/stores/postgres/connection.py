"""The store's pooled connection: psycopg's, plus one cursor kept for the one-statement operations.

A lease cycle is two one-statement operations (the owning Query, the
deleting Update), and for each of them ``AsyncConnection.execute`` would make
a new cursor (and with it a new adaptation context). :meth:`PgConnection.one`
runs the statement on a cursor the connection keeps instead. A pooled
connection serves one operation at a time, so the cursor is never shared;
its rows must be read before the next statement on the connection (the store
reads them at once). Statements queued in a pipeline keep using
``execute``: each needs its own cursor to hold its results until the sync.
"""

from __future__ import annotations

from typing import Any, LiteralString

import psycopg

__all__ = ["PgConnection"]


class PgConnection(psycopg.AsyncConnection[Any]):
    """A connection that runs single statements on a cursor it keeps."""

    _kept: psycopg.AsyncCursor[Any] | None = None

    async def one(self, query: LiteralString, params: dict[str, Any] | None = None) -> psycopg.AsyncCursor[Any]:
        """Execute ``query`` (outside a pipeline) on the kept cursor and return it, to fetch from at once."""
        cursor = self._kept
        if cursor is None:
            cursor = self._kept = self.cursor()
        return await cursor.execute(query, params)
