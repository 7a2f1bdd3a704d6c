"""Durability for the in-memory store: a data directory with a write-ahead log and snapshots.

The store stays the only place where state lives and is read; this module
only follows it. Every committed change reaches :meth:`Persistence._on_change`
(a store listener, on the event loop, in commit order), which encodes it as
one log record and hands it to the :class:`~masstasker.server.wal.LogWriter`.
The servicer wraps each RPC with :meth:`Persistence.acknowledging`: once the
handler has its answer, the answer waits until every record appended so
far is durable. That one rule gives both guarantees: an RPC that changed
state answers only after its change is on disk, and no answer reveals a
change that is not (a peek that sees a task created a moment ago by another
RPC waits for that RPC's record). Answers when nothing is pending go out at
once.

The data directory holds::

    LOCK                  flock'ed by the one server using the directory
    snap-<seq>.snap       the whole state after record <seq> (the newest one counts)
    wal-<base>.log        records base+1, base+2, ... (see wal.py)

Recovery loads the newest snapshot and replays the log after it; see
:func:`recover`.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from masstasker.server.config import DEFAULT_SNAPSHOT_MIN_LOG_BYTES
from masstasker.server.records import BadFrame, CorruptFile, FrameReader, PersistenceError, decode_change, encode_change
from masstasker.server.snapshot import list_snapshots, load_snapshot, write_snapshot
from masstasker.server.store import MAX_ID, BadRequest, NotFound, Store, StoredTask, StoreError
from masstasker.server.wal import (
    SEGMENT_HEADER_SIZE,
    DurabilityLost,
    LogWriter,
    check_directory,
    create_segment,
    fsync_dir,
    list_segments,
    read_segment_base,
)

__all__ = [
    "DEFAULT_SNAPSHOT_MIN_LOG_BYTES",
    "SNAPSHOT_LOG_RATIO",
    "CorruptFile",
    "DurabilityLost",
    "Persistence",
    "PersistenceError",
    "Recovered",
    "SnapshotStats",
    "recover",
]

log = logging.getLogger("masstasker.server.persistence")

#: Snapshot once the log since the last snapshot is this many times the size
#: of the live state (estimated), and at least --snapshot-min-log-bytes.
SNAPSHOT_LOG_RATIO = 2
_DEFAULT_TASK_BYTES = 64  # size estimate per task before the first snapshot
LOCK_NAME = "LOCK"

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Recovered:
    """What :func:`recover` found."""

    seq: int  # the last record applied
    snapshot_seq: int  # 0 when there was no snapshot
    snapshot_bytes: int
    log_records: int  # replayed after the snapshot
    log_bytes: int  # bytes of log to replay, snapshot excluded

    @property
    def fresh(self) -> bool:
        """The directory held no committed change at all."""
        return self.seq == 0


@dataclass(frozen=True, slots=True)
class SnapshotStats:
    """One snapshot, for logs and benchmarks."""

    seq: int
    tasks: int
    bytes: int
    capture_seconds: float  # on the event loop: the only part that blocks it
    write_seconds: float  # in a thread


class _Replay:
    """The net effect of log records on a store, applied in one go at the end.

    Most tasks a busy log creates are deleted again further on (every lease
    is a delete and a create); keeping only the survivors and inserting them
    with one sort per group makes replay several times faster than applying
    each record, with the same checks: every removed ID exists at that
    point, created IDs only grow.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.created: dict[int, StoredTask] = {}  # by ID, in ID order
        self.removed: set[int] = set()  # tasks of the store (the snapshot) that are gone
        self.next_id = store.next_id

    def apply(self, removed: tuple[int, ...], created: list[StoredTask]) -> None:
        """Account for one record; StoreError if it cannot apply to the state so far."""
        for task_id in removed:
            if self.created.pop(task_id, None) is None:
                if task_id in self.removed or task_id not in self.store:
                    raise NotFound(f"task {task_id} does not exist")
                self.removed.add(task_id)
        for task in created:
            if not self.next_id <= task.id <= MAX_ID:
                raise BadRequest(f"task {task.id} is not above the ID counter {self.next_id}")
            self.next_id = task.id + 1
            self.created[task.id] = task

    def finish(self) -> None:
        """Apply everything to the store."""
        for task_id in self.removed:
            self.store.restore_removal(task_id)
        self.store.restore_all(self.created.values())
        self.store.set_next_id(self.next_id)


def _replay_segment(path: Path, base: int, seq: int, replay: _Replay, *, last: bool) -> tuple[int, int, int]:
    """Apply the segment's records after ``seq``; return ``(new seq, records applied, bytes)``."""
    name = str(path)
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        header = file.read(SEGMENT_HEADER_SIZE)
        if len(header) < SEGMENT_HEADER_SIZE:
            if not last:
                raise CorruptFile(name, len(header), "truncated segment header")
            log.warning("%s: discarding a segment whose header was cut short by a crash (it held no record)", name)
            path.unlink()
            fsync_dir(path.parent)
            return seq, 0, 0
        if read_segment_base(header, path) != base:
            raise CorruptFile(name, 0, "the base in the header does not match the file name")
        reader = FrameReader(file, name, SEGMENT_HEADER_SIZE, size, tolerate_torn_tail=last)
        expected = base + 1
        applied = 0
        for offset, payload in reader:
            try:
                record_seq, removed, created = decode_change(payload)
            except BadFrame as exc:
                raise CorruptFile(name, offset, str(exc)) from None
            if record_seq != expected:
                raise CorruptFile(name, offset, f"record {record_seq} where record {expected} was expected")
            expected += 1
            if record_seq <= seq:
                continue  # already in the snapshot
            try:
                replay.apply(removed, created)
            except StoreError as exc:
                raise CorruptFile(name, offset, f"record {record_seq} does not apply to the state: {exc}") from None
            seq = record_seq
            applied += 1
    if reader.torn_at is not None:
        log.warning(
            "%s: discarding a torn tail of %d bytes at offset %d (a write cut short by a crash; never acknowledged)",
            name,
            size - reader.torn_at,
            reader.torn_at,
        )
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, reader.torn_at)
            os.fsync(fd)
        finally:
            os.close(fd)
        size = reader.torn_at
    return seq, applied, size


def recover(directory: Path, store: Store) -> Recovered:
    """Load the newest snapshot, then replay the log after it, into an empty store.

    A torn tail of the newest segment is cut off with a warning: it was
    never acknowledged. Any other damage raises :class:`CorruptFile` naming
    the file and the offset, and nothing is served from a partial load.
    """
    for leftover in directory.glob("snap-*.snap.tmp"):  # a snapshot cut short: never became valid
        leftover.unlink()
    seq = snapshot_seq = snapshot_bytes = 0
    snapshots = list_snapshots(directory)
    if snapshots:
        snapshot_seq, path = snapshots[-1]
        seq, snapshot_bytes = load_snapshot(path, store)
        if seq != snapshot_seq:
            raise CorruptFile(str(path), 0, f"the header says record {seq}, the file name {snapshot_seq}")
    segments = list_segments(directory)
    records = log_bytes = 0
    replay = _Replay(store)
    for i, (base, path) in enumerate(segments):
        last = i == len(segments) - 1
        if not last and segments[i + 1][0] <= seq:
            continue  # wholly covered by the snapshot; removal was cut short
        if base > seq:
            raise PersistenceError(
                f"{path}: the log resumes after record {base} but the state recovered so far ends at record {seq}: "
                "a log segment or snapshot is missing"
            )
        seq, applied, size = _replay_segment(path, base, seq, replay, last=last)
        records += applied
        log_bytes += size
    replay.finish()
    return Recovered(seq, snapshot_seq, snapshot_bytes, records, log_bytes)


def _lock(directory: Path) -> int:
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise PersistenceError(
                f"data directory {directory} is in use by another MassTasker server (pid {holder} holds {path}); "
                "only one server may use a data directory"
            ) from None
        raise PersistenceError(f"cannot lock {path}: {exc}") from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Persistence:
    """One server's data directory: lock, log writer, snapshots. Made by :meth:`open`."""

    def __init__(
        self, directory: Path, store: Store, wal: LogWriter, lock_fd: int, recovered: Recovered, min_log_bytes: int
    ) -> None:
        self.directory = directory
        self.recovered = recovered
        self.last_snapshot: SnapshotStats | None = None
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
        lock_fd = _lock(path)
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
            wal = LogWriter(path, recovered.seq, create_segment(path, recovered.seq), fsync)
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(path, store, wal, lock_fd, recovered, snapshot_min_log_bytes)

    @property
    def fresh(self) -> bool:
        """The directory held no committed change when the server started (bootstrap tasks go here)."""
        return self.recovered.fresh

    @property
    def seq(self) -> int:
        """The last record appended to the log."""
        return self._wal.seq

    @property
    def durable_seq(self) -> int:
        """The last record that is durable under the fsync policy."""
        return self._wal.durable

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
        if self._log_bytes >= self._check_at and self._snapshot_task is None and not self._closed:
            threshold = max(self._min_log_bytes, int(SNAPSHOT_LOG_RATIO * len(self._store) * self._task_bytes))
            if self._log_bytes >= threshold:
                self._snapshot_task = asyncio.get_running_loop().create_task(self._snapshot())
            else:
                self._check_at = threshold

    async def snapshot(self) -> SnapshotStats | None:
        """Write a snapshot now (after any one in progress); None if it failed (the log is kept)."""
        while self._snapshot_task is not None:
            await asyncio.shield(self._snapshot_task)
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
            self.last_snapshot = stats
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
