"""Recovery: load the newest snapshot, replay the log after it, cut off a torn tail.

Runs once, at start, before the server serves. Every check that tells a
crash's harmless leftovers (a torn tail, a half-written segment header, a
``.tmp`` snapshot) from real damage (:class:`~.files.CorruptFile`) is here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from masstasker.server.durability.files import (
    SEGMENT_HEADER_SIZE,
    CorruptFile,
    FrameReader,
    PersistenceError,
    fsync_dir,
    list_segments,
    read_segment_base,
)
from masstasker.server.durability.records import BadFrame, decode_change
from masstasker.server.durability.snapshot import list_snapshots, load_snapshot
from masstasker.server.stores.memory.store import MAX_ID, BadRequest, NotFound, Store, StoredTask, StoreError

__all__ = ["Recovered", "recover"]

log = logging.getLogger(__name__)


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
