"""The live side of the write-ahead log: appending change records with group commit.

Records go to segment files (see :mod:`.files` for their names and header).
A new segment starts at every start of the server and at every snapshot, so
a segment is only ever appended to by one process, once.

:class:`LogWriter` is driven from the event loop, which alone touches its
buffer and counters: :meth:`LogWriter.append` only buffers. A single
writer thread takes everything buffered, writes it, and (per the fsync
policy) syncs it; while it does, new records pile up in the buffer, and the
next write takes all of them at once (group commit: one fsync covers every
record that arrived while the previous one ran). When a write completes,
the loop advances :attr:`LogWriter.durable` and wakes whoever waits for it.

A failed write or fsync is final: the writer never writes to or syncs that
file again (after a failed fsync Linux may have dropped the dirty pages and
report the next fsync as a success), fails everyone waiting, and tells
:attr:`LogWriter.on_failure`. The server then stops serving and exits so
that recovery, which reads only what is really in the files, runs again
(docs/durability.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from masstasker.server.durability.files import create_segment, write_all

__all__ = ["BATCH_SYNC_INTERVAL", "FSYNC_POLICIES", "DurabilityLost", "LogWriter"]

log = logging.getLogger(__name__)

#: The fsync policies (``--fsync``): ``always``: answer after fsync.
#: ``batch``: answer after the write reaches the OS, fsync at most
#: BATCH_SYNC_INTERVAL after the write. ``never``: answer after the write,
#: let the OS flush when it likes.
FSYNC_POLICIES = ("always", "batch", "never")
BATCH_SYNC_INTERVAL = 0.005  # seconds


class DurabilityLost(Exception):
    """A write or fsync of the log failed: nothing from then on can be acknowledged (DATA_LOSS)."""

    status_code = grpc.StatusCode.DATA_LOSS


_datasync = getattr(os, "fdatasync", os.fsync)


class _Rotate:
    """A buffer entry: close the current segment and continue in a new one."""

    __slots__ = ("base", "done")

    def __init__(self, base: int, done: asyncio.Future[None]) -> None:
        self.base = base
        self.done = done


class LogWriter:
    """Appends framed records to the current segment; tracks what is durable.

    ``seq`` is the number of the last record appended, ``durable`` the last
    one the fsync policy counts as safe (synced for ``always``, handed to
    the OS otherwise). Use from the event loop only, except for the writer
    thread it owns.
    """

    def __init__(self, directory: Path, base: int, fd: int, fsync: str) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy {fsync!r}: choose from {', '.join(FSYNC_POLICIES)}")
        self.directory = directory
        self.seq = base
        self.durable = base
        self._fd = fd
        self._always = fsync == "always"
        self._batch = fsync == "batch"
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="masstasker-wal")
        self._buffer: list[bytes | _Rotate] = []
        self._busy = False  # a write is running or a flush is scheduled
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._unsynced = False  # batch: written since the last fsync
        self._last_sync = time.monotonic()
        self._sync_timer: asyncio.TimerHandle | None = None
        self._failed: BaseException | None = None
        self._closed = False
        #: Called on the loop, once, when a write or fsync fails.
        self.on_failure: Callable[[BaseException], None] | None = None
        #: Called in the writer thread with the seconds each successful fsync of the log took.
        self.observe_sync: Callable[[float], None] | None = None

    @property
    def failure(self) -> BaseException | None:
        """The error that ended the log (None while it works); nothing is acknowledged after one."""
        return self._failed

    def _check(self) -> None:
        """Assert the invariants of the counters and queues (tests call this on the loop)."""
        assert self.durable <= self.seq, (self.durable, self.seq)
        previous = self.durable
        for seq, _ in self._waiting:  # in the order they will be woken, each still pending
            assert previous <= seq <= self.seq, (previous, seq, self.seq)
            previous = seq
        if self._failed is not None:
            assert not self._waiting, "a failed log leaves no one waiting"
        elif not self._busy:
            # Idle: everything appended has been written, and nothing is left to write or wake.
            assert not self._buffer, len(self._buffer)
            assert self.durable == self.seq, (self.durable, self.seq)
            assert not self._waiting, len(self._waiting)
            assert self._sync_timer is None

    # -- the loop side -------------------------------------------------------

    def append(self, record: bytes) -> None:
        """Buffer the next record (numbered ``seq + 1``; the caller encoded it so)."""
        self.seq += 1
        self._buffer.append(record)
        if not self._busy:
            self._busy = True
            # Not now: let every commit of this loop iteration join the batch.
            self._loop.call_soon(self._flush)

    def rotate(self, base: int) -> asyncio.Future[None]:
        """Records after ``base`` go to a new segment; the future resolves once it exists durably."""
        assert base == self.seq, (base, self.seq)
        done = self._loop.create_future()
        self._buffer.append(_Rotate(base, done))
        if not self._busy:
            self._busy = True
            self._loop.call_soon(self._flush)
        return done

    def wait(self) -> asyncio.Future[None] | None:
        """None if every appended record is durable, else a future for the current ``seq``."""
        if self._failed is not None:
            raise DurabilityLost(f"the write-ahead log failed: {self._failed}") from self._failed
        seq = self.seq
        if self.durable >= seq:
            return None
        # One future per caller, not shared: a cancelled RPC cancels the future it awaits.
        future = self._loop.create_future()
        self._waiting.append((seq, future))
        return future

    async def close(self) -> None:
        """Write and sync everything buffered, then close the segment and the thread."""
        if self._closed:
            return
        self._closed = True
        while self._failed is None and (pending := self.wait()) is not None:
            await pending
        if self._sync_timer is not None:  # _finish syncs instead
            self._sync_timer.cancel()
        try:
            # One thread, in order: this runs after any write still in flight.
            await self._loop.run_in_executor(self._executor, self._finish)
        finally:
            self._executor.shutdown(wait=True)

    def _flush(self, force_sync: bool = False) -> None:
        items = self._buffer
        if self._failed is not None:  # the file can no longer be trusted: write nothing more
            self._buffer = []
            self._busy = False
            return
        if not items and not (force_sync and self._unsynced):
            self._busy = False
            return
        self._buffer = []
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_timer = None
        now = time.monotonic()
        sync = self._always or force_sync or (self._batch and now - self._last_sync >= BATCH_SYNC_INTERVAL)
        if sync:
            self._last_sync = now
        seq = self.seq
        future = self._loop.run_in_executor(self._executor, self._write, items, sync)
        future.add_done_callback(lambda f: self._written(f, seq, items, sync))

    def _written(self, future: asyncio.Future[None], seq: int, items: list[bytes | _Rotate], synced: bool) -> None:
        exc = future.exception()
        rotations = [item.done for item in items if isinstance(item, _Rotate)]
        if exc is not None:
            log.critical(
                "durability lost: a write-ahead log write or fsync failed (%s); records after %d are not durable, "
                "no further change can be acknowledged, and the failed file is never synced again",
                exc,
                self.durable,
            )
            self._failed = exc
            lost = DurabilityLost(f"the write-ahead log failed: {exc}")
            for _, waiter in self._waiting:
                if not waiter.done():
                    waiter.set_exception(lost)
            self._waiting.clear()
            for done in rotations:
                if not done.done():
                    done.set_exception(lost)
            self._busy = False
            if self.on_failure is not None:
                self.on_failure(exc)
            return
        for done in rotations:
            if not done.done():
                done.set_result(None)
        self.durable = seq
        if synced:
            self._unsynced = False
        elif any(type(item) is bytes for item in items):
            self._unsynced = True
        waiting = self._waiting
        while waiting and waiting[0][0] <= seq:
            _, waiter = waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
        if self._buffer:
            self._flush()  # what arrived during the write: the next group
        elif self._batch and self._unsynced:
            delay = max(0.0, self._last_sync + BATCH_SYNC_INTERVAL - time.monotonic())
            self._sync_timer = self._loop.call_later(delay, self._flush, True)
        else:
            self._busy = False

    # -- the writer thread ---------------------------------------------------

    def _write(self, items: list[bytes | _Rotate], sync: bool) -> None:
        chunk: list[bytes] = []
        for item in items:
            if isinstance(item, _Rotate):
                self._write_chunk(chunk)
                chunk = []
                self._sync(os.fsync)
                old, self._fd = self._fd, create_segment(self.directory, item.base)
                os.close(old)
            else:
                chunk.append(item)
        self._write_chunk(chunk)
        if sync:
            self._sync(_datasync)

    def _sync(self, sync: Callable[[int], None]) -> None:
        started = time.perf_counter()
        sync(self._fd)
        observe = self.observe_sync
        if observe is not None:
            observe(time.perf_counter() - started)

    def _write_chunk(self, chunk: list[bytes]) -> None:
        if chunk:
            write_all(self._fd, chunk[0] if len(chunk) == 1 else b"".join(chunk))

    def _finish(self) -> None:
        try:
            if self._failed is None:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)
