"""The seam between the gRPC service and where tasks live: one asynchronous interface, two stores.

The service, status codes, limits, auth and metrics talk to a
:class:`TaskStore` and never learn which one runs. Every store takes and
returns the same values (:class:`TaskSpec` in, :class:`StoredTask` out, refs
as :data:`Ref`) and raises the same errors: :class:`PreconditionFailed`,
:class:`NotFound`, :class:`BadRequest` for the request's own mistakes, and
:class:`StoreUnavailable` when the store cannot answer now. The value types
were born with the in-memory store and are defined there; this module is
where everything else imports them from.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import grpc
from prometheus_client import CollectorRegistry

from masstasker.server.stats import AdminView
from masstasker.server.stores.memory.store import (
    BadRequest,
    DeadLetter,
    GroupRef,
    IdRef,
    LabelRef,
    NotFound,
    PreconditionFailed,
    Ref,
    StoredTask,
    StoreError,
    TaskSpec,
    check_dead_letter,
)

__all__ = [
    "BadRequest",
    "DeadLetter",
    "GroupRef",
    "GroupStats",
    "IdRef",
    "LabelRef",
    "NotFound",
    "PreconditionFailed",
    "Ref",
    "StoreError",
    "StoreUnavailable",
    "StoredTask",
    "TaskSpec",
    "TaskStore",
    "WaitingQueries",
    "check_dead_letter",
]

#: group -> (tasks, visible now)
GroupStats = dict[str, tuple[int, int]]


class StoreUnavailable(Exception):
    """The store cannot be reached, did not answer in time, or is shutting down.

    The service answers UNAVAILABLE with this message, which names the store
    (clients retry such calls). Nothing was changed, or, for a failure during
    a commit, whether it was is unknown, as with any lost answer.
    """

    status_code = grpc.StatusCode.UNAVAILABLE


class WaitingQueries(Protocol):
    """A store's waiting Queries, as metrics and tests see them."""

    count: int  # waiting right now
    wakeups: int  # waiters woken to look for a task, ever (no thundering herd: one per task)


class TaskStore(Protocol):
    """What the service needs from a store. Every method runs on the server's event loop.

    Times are nanoseconds since the Unix epoch. Mutating methods are atomic:
    all or nothing. An answer (or error) is returned only once what it
    reveals is durable.
    """

    #: Names the store in messages (e.g. an UNAVAILABLE answer) and logs.
    name: str

    @property
    def admin(self) -> AdminView:
        """Per-group statistics and listings for the admin API and the metrics."""
        ...

    @property
    def waiters(self) -> WaitingQueries:
        """The waiting Queries."""
        ...

    async def update(self, created: Sequence[TaskSpec], deleted: Sequence[Ref], predicates: Sequence[int]) -> list[int]:
        """Check predicates, delete what the refs select, create; the new IDs in request order."""
        ...

    async def query(
        self, group: str, now: int, own_for: int, max_tasks: int, dead_letter: DeadLetter | None = None
    ) -> list[StoredTask]:
        """Up to ``max_tasks`` visible tasks from the head, owned (new IDs, not_before = now + own_for, attempts
        one higher) if own_for > 0. With ``dead_letter``, an owning Query moves each head task already owned
        ``dead_letter.max_attempts`` times to ``dead_letter.group`` in the same transaction (visible at
        ``now``, ``error`` saying why, not counted toward ``max_tasks``) and takes the next one instead.

        An empty list: nothing visible (or, on a shared store, everything
        visible is held by a concurrent transaction).
        """
        ...

    async def wait(
        self,
        group: str,
        offset: int,
        own_for: int,
        max_tasks: int,
        timeout: float | None,
        dead_letter: DeadLetter | None = None,
    ) -> list[StoredTask]:
        """As :meth:`query` once tasks are visible, waiting for them first; ``now`` = server clock + ``offset``.

        First come first served per group, one task to one waiter, a cancelled
        caller takes nothing. TimeoutError after ``timeout`` seconds.
        """
        ...

    async def bulk_set(
        self,
        refs: Sequence[Ref],
        *,
        group: str | None,
        not_before: int | None,
        body_patch: Callable[[bytes], bytes] | None,
        labels: tuple[tuple[str, str], ...] | None,
    ) -> int:
        """Replace every selected task by a copy with these fields overwritten; how many."""
        ...

    async def debug(self, group: str, limit: int) -> tuple[list[StoredTask], int]:
        """A group's tasks in queue order (group "": all in ID order), at most ``limit`` (0: all), and the count."""
        ...

    async def group_stats(self, now: int) -> tuple[GroupStats, int]:
        """Every non-empty group's (size, visible at ``now``), and the number of tasks."""
        ...

    async def size(self) -> int:
        """How many tasks the store holds."""
        ...

    async def bootstrap(self, group: str) -> bool:
        """Create the bootstrap task in ``group`` if this is the store's first start and the group is empty."""
        ...

    def on_availability(self, callback: Callable[[str | None], Awaitable[None]]) -> None:
        """Call ``callback(reason)`` when the store becomes unavailable and ``callback(None)`` when it is back."""
        ...

    async def failed(self) -> str:
        """Wait until the store fails for good (the process should then exit); return why."""
        ...

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Export the store's own metrics (beyond the per-group gauges every store has)."""
        ...

    def release_waiters(self) -> None:
        """Release every waiting Query with UNAVAILABLE, and refuse new ones (shutdown)."""
        ...

    async def check(self) -> None:
        """Assert the store's invariants (tests)."""
        ...

    async def close(self) -> None:
        """Release everything the store holds."""
        ...
