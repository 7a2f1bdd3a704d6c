"""The in-memory store behind the store seam: Store, Waiters and the data directory, as one TaskStore.

Store and Waiters are synchronous and run on the event loop; each operation
here is one plain call on them, so the seam costs one coroutine per RPC.
With ``--data-dir`` every answer (errors included: a NOT_FOUND reveals a
delete) waits until everything committed so far is durable, as the
durability package promises.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from prometheus_client import CollectorRegistry

from masstasker.server.config import Settings
from masstasker.server.convert import check_timestamp_ns
from masstasker.server.durability import Persistence
from masstasker.server.stores.base import GroupStats, Ref, StoredTask, TaskSpec
from masstasker.server.stores.memory.store import Store
from masstasker.server.stores.memory.waiters import Waiters

__all__ = ["MemoryTaskStore"]

log = logging.getLogger(__name__)


class MemoryTaskStore:
    """Every task in this process; :meth:`open` recovers them from ``--data-dir`` when given."""

    name = "in-memory store"

    def __init__(self, store: Store, clock: Callable[[], int], persistence: Persistence | None = None) -> None:
        self.store = store
        self.persistence = persistence
        self.waiters = Waiters(store, clock)
        self._clock = clock
        # Without a data directory nothing is ever waited for: no check on the hot path at all.
        self._durable = persistence.sync if persistence is not None else None

    @classmethod
    async def open(cls, settings: Settings, clock: Callable[[], int]) -> MemoryTaskStore:
        """A fresh store, or the one recovered from ``settings.data_dir``."""
        store = Store(clock)
        persistence = None
        if settings.data_dir:
            persistence = await Persistence.open(
                settings.data_dir, store, fsync=settings.fsync, snapshot_min_log_bytes=settings.snapshot_min_log_bytes
            )
        return cls(store, clock, persistence)

    async def update(
        self, created: Sequence[TaskSpec], deleted: Sequence[Ref] = (), predicates: Sequence[int] = ()
    ) -> list[int]:
        """See :meth:`TaskStore.update`."""
        if self._durable is None:
            return self.store.update(created, deleted, predicates)
        try:
            return self.store.update(created, deleted, predicates)
        finally:
            await self._durable()

    async def query(self, group: str, now: int, own_for: int = 0, max_tasks: int = 1) -> list[StoredTask]:
        """See :meth:`TaskStore.query`."""
        if self._durable is None:
            return self.store.query(group, now, own_for, max_tasks)
        try:
            return self.store.query(group, now, own_for, max_tasks)
        finally:
            await self._durable()

    async def wait(
        self, group: str, offset: int, own_for: int, max_tasks: int, timeout: float | None
    ) -> list[StoredTask]:
        """See :meth:`TaskStore.wait`."""
        store = self.store

        def take(now: int) -> list[StoredTask]:
            if own_for:
                check_timestamp_ns(now + own_for, "now + own_for")
            return store.query(group, now, own_for, max_tasks)

        if self._durable is None:
            return await self.waiters.wait(group, offset, take, timeout)
        try:
            return await self.waiters.wait(group, offset, take, timeout)
        finally:
            await self._durable()

    async def bulk_set(
        self,
        refs: Sequence[Ref],
        *,
        group: str | None = None,
        not_before: int | None = None,
        body_patch: Callable[[bytes], bytes] | None = None,
        labels: tuple[tuple[str, str], ...] | None = None,
    ) -> int:
        """See :meth:`TaskStore.bulk_set`."""
        try:
            return self.store.bulk_set(refs, group=group, not_before=not_before, body_patch=body_patch, labels=labels)
        finally:
            if self._durable is not None:
                await self._durable()

    async def debug(self, group: str, limit: int) -> tuple[list[StoredTask], int]:
        """See :meth:`TaskStore.debug`."""
        store = self.store
        if group:
            result = store.group_tasks(group, limit), store.group_size(group)
        else:
            result = store.all_tasks(limit), len(store)
        if self._durable is not None:
            await self._durable()
        return result

    async def group_stats(self, now: int) -> tuple[GroupStats, int]:
        """See :meth:`TaskStore.group_stats`."""
        store = self.store
        return {group: (size, store.visible_count(group, now)) for group, size in store.groups()}, len(store)

    async def size(self) -> int:
        """See :meth:`TaskStore.size`."""
        return len(self.store)

    async def bootstrap(self, group: str) -> bool:
        """Only on a data directory's very first start: after a restart, an empty group means the job consumed it."""
        fresh = self.persistence is None or self.persistence.fresh
        if not fresh or self.store.group_size(group):
            return False
        await self.update([TaskSpec(group, None)])
        return True

    def on_availability(self, callback: Callable[[str | None], Awaitable[None]]) -> None:
        """Never called: memory is always there, and a lost data directory is final (:meth:`failed`)."""

    async def failed(self) -> str:
        """When a log write or fsync fails (never without a data directory)."""
        if self.persistence is None:
            never: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            return await never
        failure = await self.persistence.lost()
        return f"durability was lost ({failure}); data directory {self.persistence.directory}"

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """With a data directory: fsync latency, snapshot duration, log size, durability state."""
        if self.persistence is not None:
            self.persistence.register_metrics(registry)

    def release_waiters(self) -> None:
        """See :meth:`TaskStore.release_waiters`."""
        self.waiters.release_all()

    async def check(self) -> None:
        """Every invariant of the store, its waiters and the data directory."""
        self.store._check()
        self.waiters._check()
        if self.persistence is not None:
            self.persistence._check()

    async def close(self) -> None:
        """Sync and close the data directory, if any."""
        if self.persistence is not None:
            await self.persistence.close()
