"""Waiting-Query admission: how many Queries may wait, in total and per connection.

A Query that finds no task and asks to wait holds one slot until it returns:
at most ``--max-waiting-queries`` in total, and ``--max-waiting-per-connection``
for one connection, so a single client cannot take them all. A refusal is
RESOURCE_EXHAUSTED and carries a retry-after hint in its trailing metadata,
since the same call may pass once other waits end; our client pauses that
long and asks again.

gRPC core queues calls that grpc.aio has not picked up yet and sheds them
past a limit; :meth:`WaitingAdmission.grpc_options` sizes that queue so a
burst of every Query we would let wait is held, not dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from masstasker._wire import RETRY_AFTER_MS
from masstasker.server.config import Settings

__all__ = ["WAITING_RETRY_AFTER_MS", "LimitExceeded", "WaitingAdmission"]

#: What a Query refused by a full waiting limit is told to wait before asking again.
WAITING_RETRY_AFTER_MS = 1000
# gRPC core's own default for grpc.server.max_pending_requests: room for calls other than waiting Queries.
_MIN_PENDING_CALLS = 1000


class LimitExceeded(Exception):
    """A limit on a shared resource is reached; asking again after the hint may succeed.

    Carries its own status code and trailing metadata, so the servicer maps it
    without knowing what it is (as grpc-interceptor's exceptions do).
    """

    status_code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_after_ms: int = WAITING_RETRY_AFTER_MS) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms

    @property
    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """The retry-after hint, for the RPC's trailers."""
        return ((RETRY_AFTER_MS, str(self.retry_after_ms)),)


class WaitingAdmission:
    """Both counts of waiting Queries (total, per connection) and the limits on them.

    Use from the server's event loop only.
    """

    def __init__(self, settings: Settings) -> None:
        self.max_total = settings.max_waiting_queries
        self.max_per_connection = settings.max_waiting_per_connection
        self.total = 0
        self._per_connection: dict[str, int] = {}

    @contextmanager
    def admit(self, connection: str) -> Iterator[None]:
        """Hold one waiting slot of ``connection`` while the block runs; LimitExceeded if none is free. O(1)."""
        if self.total >= self.max_total:
            raise LimitExceeded(
                f"{self.total} Queries are waiting, the server's limit (--max-waiting-queries); try again later"
            )
        counts = self._per_connection
        held = counts.get(connection, 0)
        if held >= self.max_per_connection:
            raise LimitExceeded(
                f"this connection already has {held} waiting Queries, the limit per connection "
                "(--max-waiting-per-connection); use more connections or fewer waits"
            )
        counts[connection] = held + 1
        self.total += 1
        try:
            yield
        finally:
            self.total -= 1
            left = counts[connection] - 1
            if left:
                counts[connection] = left
            else:
                del counts[connection]

    def grpc_options(self) -> list[tuple[str, int]]:
        """gRPC server options that keep core from shedding a burst of admissible waiting Queries.

        Calls that arrived but that grpc.aio has not taken yet wait in gRPC core's
        pending queue (grpc.aio takes one at a time, ~5,000/s on a small machine).
        Past 1,000 queued calls core drops new ones at random, past 3,000 all of
        them, and their clients get CANCELLED: 10,000 workers starting together
        lost 30-60 % of their Queries. Make room for a burst of every Query we
        would let wait, plus ordinary traffic (docs/performance.md).
        """
        pending = self.max_total + _MIN_PENDING_CALLS
        return [
            ("grpc.server.max_pending_requests", pending),
            ("grpc.server.max_pending_requests_hard_limit", 2 * pending),
        ]

    def _check(self) -> None:
        """Assert the counts agree: the total is the sum per connection, none above its limit."""
        counts = self._per_connection
        assert self.total == sum(counts.values()), (self.total, counts)
        assert all(0 < held <= self.max_per_connection for held in counts.values()), counts
