"""Durability for the in-memory store (``--data-dir``): a write-ahead log and snapshots.

The modules, from the bytes up:

``records``
    The on-disk encoding of frames, tasks and change records. Pure: bytes
    in, bytes out, no file I/O.
``files``
    The data directory's files: names, the lock, the segment header,
    ``fsync_dir``, the :class:`~.files.FrameReader` and the errors
    (:class:`~.files.PersistenceError`, :class:`~.files.CorruptFile`).
``snapshot``
    Writing a snapshot atomically and loading one.
``recovery``
    At start: the newest snapshot, then the log after it, checking every
    record's number and cutting off a torn tail.
``writer``
    The :class:`~.writer.LogWriter`: appends records with group commit under
    an fsync policy and tracks what is durable.
``persistence``
    :class:`~.persistence.Persistence`, what the server holds: opens and
    recovers the directory, holds every answer until what it may reveal is
    durable, takes snapshots, and tells the server when durability is lost.
``metrics``
    The Prometheus metrics: fsync latency, snapshot duration, log bytes
    since the last snapshot, and the durability state.

A failed log write or fsync is final for the process: health goes
NOT_SERVING, every call fails, and the CLI server exits with status 1 so
that a supervisor restarts it and recovery runs (docs/durability.md).

The data directory holds::

    LOCK                  flock'ed by the one server using the directory (its pid inside)
    snap-<seq>.snap       the whole state after record <seq> (the newest one counts)
    snap-<seq>.snap.tmp   a snapshot being written (removed by recovery: never valid)
    wal-<base>.log        log records base+1, base+2, ... up to the next segment's base

A frame is ``u32 length | u32 crc32(payload) | u32 crc32(first 8 bytes) |
payload``, little-endian. A log segment is the magic ``MTWAL\\x00\\x01\\n``,
one frame holding ``u64 base``, then one frame per change record. A
snapshot is the magic ``MTSNAP\\x01\\n``, one frame holding ``(u64 seq, u64
next_id, u64 task count)``, then frames of up to 1024 tasks each. The
encodings of records and tasks are in :mod:`.records`.
"""

from masstasker.server.durability.files import CorruptFile, PersistenceError
from masstasker.server.durability.persistence import DEFAULT_SNAPSHOT_MIN_LOG_BYTES, Persistence, SnapshotStats
from masstasker.server.durability.recovery import Recovered
from masstasker.server.durability.writer import FSYNC_POLICIES, DurabilityLost

__all__ = [
    "DEFAULT_SNAPSHOT_MIN_LOG_BYTES",
    "FSYNC_POLICIES",
    "CorruptFile",
    "DurabilityLost",
    "Persistence",
    "PersistenceError",
    "Recovered",
    "SnapshotStats",
]
