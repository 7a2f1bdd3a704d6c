"""Snapshots: the whole store in one file, written atomically.

``snap-<seq>.snap`` holds the state after log record ``seq``: an 8-byte
magic, a header frame ``(seq, next_id, task count)``, then frames of up to
:data:`CHUNK_TASKS` tasks in ID order (see :mod:`.records`). It is written
to ``.tmp``, fsynced, renamed into place and the directory fsynced, so a
snapshot file either is complete or does not exist under its final name.
"""

from __future__ import annotations

import os
import re
import struct
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from masstasker.server.durability.files import CorruptFile, FrameReader, fsync_dir, numbered_files
from masstasker.server.durability.records import BadFrame, decode_tasks, encode_tasks, frame
from masstasker.server.stores.memory.store import BadRequest, Store, StoredTask

__all__ = ["CHUNK_TASKS", "list_snapshots", "load_snapshot", "snapshot_path", "write_snapshot"]

SNAPSHOT_MAGIC = b"MTSNAP\x01\n"
CHUNK_TASKS = 1024
_HEADER = struct.Struct("<QQQ")
_SNAPSHOT_NAME = re.compile(r"snap-(\d{20})\.snap")


def snapshot_path(directory: Path, seq: int) -> Path:
    """Where the snapshot after record ``seq`` lives."""
    return directory / f"snap-{seq:020d}.snap"


def list_snapshots(directory: Path) -> list[tuple[int, Path]]:
    """``(seq, path)`` of every complete snapshot, oldest first."""
    return numbered_files(directory, _SNAPSHOT_NAME)


def write_snapshot(directory: Path, seq: int, next_id: int, tasks: Sequence[StoredTask]) -> int:
    """Write the snapshot durably (temp file, fsync, rename, directory fsync); return its size.

    Runs in a worker thread. ``tasks`` is a list of references taken on the
    event loop; the tasks are immutable, so the store may change meanwhile.
    Between chunks the thread yields the interpreter so the loop's pauses
    stay short.
    """
    final = snapshot_path(directory, seq)
    tmp = final.with_name(final.name + ".tmp")
    try:
        with open(tmp, "wb") as out:
            out.write(SNAPSHOT_MAGIC)
            out.write(frame(_HEADER.pack(seq, next_id, len(tasks))))
            for start in range(0, len(tasks), CHUNK_TASKS):
                out.write(frame(encode_tasks(tasks[start : start + CHUNK_TASKS])))
                time.sleep(0)
            out.flush()
            os.fsync(out.fileno())
            size = out.tell()
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)
    return size


def load_snapshot(path: Path, store: Store) -> tuple[int, int]:
    """Restore every task of the snapshot into an empty store; return ``(seq, file size)``.

    Raises :class:`CorruptFile` naming the offset of the first bad frame;
    the store is then partly filled and must be discarded.
    """
    name = str(path)
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if file.read(len(SNAPSHOT_MAGIC)) != SNAPSHOT_MAGIC:
            raise CorruptFile(name, 0, "not a MassTasker snapshot (bad magic)")
        frames = iter(FrameReader(file, name, len(SNAPSHOT_MAGIC), size, tolerate_torn_tail=False))
        header = next(frames, None)
        if header is None or len(header[1]) != _HEADER.size:
            raise CorruptFile(name, len(SNAPSHOT_MAGIC), "missing or malformed snapshot header")
        seq, next_id, count = _HEADER.unpack(header[1])
        offset = header[0]

        def tasks() -> Iterator[StoredTask]:
            nonlocal offset
            for frame_offset, payload in frames:
                offset = frame_offset  # for the error message
                yield from decode_tasks(payload)

        try:
            store.restore_all(tasks())
        except (BadFrame, BadRequest) as exc:
            raise CorruptFile(name, offset, str(exc)) from None
        if len(store) != count:
            raise CorruptFile(name, size, f"{len(store)} tasks where the header announces {count}")
        store.set_next_id(next_id)
    return seq, size
