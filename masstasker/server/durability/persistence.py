"""The live side of durability: the open data directory, acknowledgement, and snapshot-taking.

The store stays the only place where state lives and is read; this module
only follows it. Every committed change reaches :meth:`Persistence._on_change`
(a store listener, on the event loop, in commit order), which encodes it as
one log record and hands it to the :class:`~.writer.LogWriter`.
The servicer wraps each RPC with :meth:`Persistence.acknowledging`: once the
handler has its answer, the answer waits until every record appended so
far is durable. That one rule gives both guarantees: an RPC that changed
state answers only after its change is on disk, and no answer reveals a
change that is not (a peek that sees a task created a moment ago by another
RPC waits for that RPC's record). Answers when nothing is pending go out at
once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry

from masstasker.server.durability.files import (
    PersistenceError,
    check_directory,
    create_segment,
    fsync_dir,
    list_segments,
    lock_directory,
)
from masstasker.server.durability.metrics import DurabilityMetrics
from masstasker.server.durability.records import encode_change
from masstasker.server.durability.recovery import Recovered, recover
from masstasker.server.durability.snapshot import list_snapshots, write_snapshot
from masstasker.server.durability.writer import DurabilityLost, LogWriter
from masstasker.server.stores.memory.store import Store, StoredTask

__all__ = ["DEFAULT_SNAPSHOT_MIN_LOG_BYTES", "SNAPSHOT_LOG_RATIO", "Persistence", "SnapshotStats"]

log = logging.getLogger(__name__)

#: Snapshot once the log since the last snapshot is this many times the size
#: of the live state (estimated), and at least --snapshot-min-log-bytes.
SNAPSHOT_LOG_RATIO = 2
DEFAULT_SNAPSHOT_MIN_LOG_BYTES = 64 * 1024 * 1024
_DEFAULT_TASK_BYTES = 64  # size estimate per task before the first snapshot

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class SnapshotStats:
    """One snapshot, for logs and benchmarks."""

    seq: int
    tasks: int
    bytes: int
    capture_seconds: float  # on the event loop: the only part that blocks it
    write_seconds: float  # in a thread


class Persistence:
    """One server's data directory: lock, log writer, snapshots. Made by :meth:`open`."""

    def __init__(
        self, directory: Path, store: Store, wal: LogWriter, lock_fd: int, recovered: Recovered, min_log_bytes: int
    ) -> None:
        self.directory = directory
        self.recovered = recovered
        self._store = store
        self._wal = wal
        self._lock_fd = lock_fd
        self._min_log_bytes = min_log_bytes
        self._log_bytes = recovered.log_bytes
        self._task_bytes = (
            recovered.snapshot_bytes / len(store) if recovered.snapshot_bytes and len(store) else _DEFAULT_TASK_BYTES
        )
        self._check_at = 0  # look at the snapshot threshold once the log reaches this size
        self._segment_base = recovered.seq  # the base of the segment being written
        self._snapshot_task: asyncio.Task[SnapshotStats | None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="masstasker-snapshot")
        self._closed = False
        self._metrics: DurabilityMetrics | None = None
        self._lost: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        wal.on_failure = self._on_failure
        store.listeners.append(self._on_change)

    @classmethod
    async def open(
        cls,
        directory: str | os.PathLike[str],
        store: Store,
        *,
        fsync: str = "always",
        snapshot_min_log_bytes: int = DEFAULT_SNAPSHOT_MIN_LOG_BYTES,
    ) -> Persistence:
        """Lock the directory, recover it into the (empty) store, and start a new log segment.

        Call on the server's event loop before it serves. Raises
        :class:`PersistenceError` when the directory is in use, unusable or
        corrupt.
        """
        path = Path(directory)
        check_directory(path)
        lock_fd = lock_directory(path)
        try:
            started = time.perf_counter()
            recovered = recover(path, store)
            log.info(
                "recovered %d tasks (next ID %d) from %s in %.2f s: snapshot at record %d, %d log records replayed",
                len(store),
                store.next_id,
                path,
                time.perf_counter() - started,
                recovered.snapshot_seq,
                recovered.log_records,
            )
            try:
                fd = create_segment(path, recovered.seq)
            except OSError as exc:
                raise PersistenceError(
                    f"recovered {path}, but cannot start a new log segment there: {exc} "
                    "(is the disk full? free space, then start again: nothing acknowledged is lost)"
                ) from exc
            wal = LogWriter(path, recovered.seq, fd, fsync)
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(path, store, wal, lock_fd, recovered, snapshot_min_log_bytes)

    @property
    def fresh(self) -> bool:
        """The directory held no committed change when the server started (bootstrap tasks go here)."""
        return self.recovered.fresh

    @property
    def failure(self) -> BaseException | None:
        """Why durability was lost (a failed log write or fsync), or None while it holds."""
        return self._wal.failure

    async def lost(self) -> BaseException:
        """Wait until durability is lost (it never comes back in this process); return why."""
        return await asyncio.shield(self._lost)

    def _on_failure(self, exc: BaseException) -> None:
        if not self._lost.done():
            self._lost.set_result(exc)

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Export fsync latency, snapshot duration, log bytes since the snapshot and the state on ``registry``."""
        self._metrics = DurabilityMetrics(registry, lambda: (self._wal.failure, self._log_bytes))
        self._wal.observe_sync = self._metrics.fsync_seconds.observe

    def _check(self) -> None:
        """Assert the invariants of the log writer and the snapshot trigger (tests call this on the loop)."""
        self._wal._check()
        assert self._log_bytes >= 0, self._log_bytes
        assert self._segment_base <= self._wal.seq, (self._segment_base, self._wal.seq)

    def acknowledging(self, handler: Callable[[bytes, Any], Awaitable[R]]) -> Callable[[bytes, Any], Awaitable[R]]:
        """Wrap an RPC handler so that its answer (or error) waits until everything committed so far is durable."""
        wait = self._wal.wait

        async def durable(request: bytes, context: Any) -> R:
            try:
                response = await handler(request, context)
            except Exception:
                # Errors reveal state too (NOT_FOUND for a task deleted a moment ago).
                pending = wait()
                if pending is not None:
                    await pending
                raise
            pending = wait()
            if pending is not None:
                await pending
            return response

        return durable

    async def sync(self) -> None:
        """Return once every change committed so far is durable."""
        pending = self._wal.wait()
        if pending is not None:
            await pending

    def _on_change(self, removed: list[int], created: list[StoredTask]) -> None:
        wal = self._wal
        record = encode_change(wal.seq + 1, removed, created)
        wal.append(record)
        self._log_bytes += len(record)
        if (
            self._log_bytes >= self._check_at
            and self._snapshot_task is None
            and not self._closed
            and wal.failure is None
        ):
            threshold = max(self._min_log_bytes, int(SNAPSHOT_LOG_RATIO * len(self._store) * self._task_bytes))
            if self._log_bytes >= threshold:
                self._snapshot_task = asyncio.get_running_loop().create_task(self._snapshot())
            else:
                self._check_at = threshold

    def _may_snapshot(self) -> bool:
        # Not after durability was lost: a snapshot then would make changes durable that were refused.
        return not self._closed and self._wal.failure is None

    async def snapshot(self) -> SnapshotStats | None:
        """Write a snapshot now (after any one in progress); None if it failed (the log is kept).

        None at once after durability was lost: a snapshot then would write state never acknowledged.
        """
        while self._snapshot_task is not None:
            await asyncio.shield(self._snapshot_task)
        if self._wal.failure is not None:
            return None
        self._snapshot_task = asyncio.get_running_loop().create_task(self._snapshot())
        return await asyncio.shield(self._snapshot_task)

    async def _snapshot(self) -> SnapshotStats | None:
        loop = asyncio.get_running_loop()
        wal, store = self._wal, self._store
        try:
            # The capture is the only part on the loop: a list of references
            # to immutable tasks, the counters, and a new log segment for
            # everything after this point.
            started = time.perf_counter()
            tasks = store.all_tasks()
            seq, next_id = wal.seq, store.next_id
            # A segment with no record yet needs no successor (and must not be recreated under its own name).
            rotated = wal.rotate(seq) if seq != self._segment_base else None
            self._segment_base = seq
            log_bytes, self._log_bytes, self._check_at = self._log_bytes, 0, 0
            captured = time.perf_counter()
            try:
                size = await loop.run_in_executor(self._executor, write_snapshot, self.directory, seq, next_id, tasks)
                if rotated is not None:
                    await rotated
            except (OSError, DurabilityLost) as exc:
                self._log_bytes += log_bytes
                self._check_at = self._log_bytes + self._min_log_bytes  # no retry on every change
                log.error("snapshot at record %d failed, keeping the log instead: %s", seq, exc)
                return None
            written = time.perf_counter()
            await loop.run_in_executor(self._executor, self._remove_before, seq)
            stats = SnapshotStats(seq, len(tasks), size, captured - started, written - captured)
            if tasks:
                self._task_bytes = size / len(tasks)
            if self._metrics is not None:
                self._metrics.snapshot_seconds.observe(written - started)
            log.info(
                "snapshot at record %d: %d tasks, %d bytes; loop paused %.1f ms, written in %.2f s",
                seq,
                len(tasks),
                size,
                stats.capture_seconds * 1e3,
                stats.write_seconds,
            )
            return stats
        finally:
            self._snapshot_task = None

    def _remove_before(self, seq: int) -> None:
        """Remove snapshots and segments the snapshot at ``seq`` makes redundant (worker thread)."""
        removed = False
        for snap_seq, path in list_snapshots(self.directory):
            if snap_seq < seq:
                path.unlink(missing_ok=True)
                removed = True
        for base, path in list_segments(self.directory):
            if base < seq:
                path.unlink(missing_ok=True)
                removed = True
        if removed:
            fsync_dir(self.directory)

    async def close(self) -> None:
        """Finish any snapshot, sync and close the log, release the directory."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._snapshot_task is not None:
                await asyncio.shield(self._snapshot_task)
            await self._wal.close()
        finally:
            self._executor.shutdown(wait=True)
            if self._on_change in self._store.listeners:
                self._store.listeners.remove(self._on_change)
            os.close(self._lock_fd)
