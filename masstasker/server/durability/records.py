"""The on-disk encoding shared by the write-ahead log and snapshots. Pure: bytes in, bytes out.

No file I/O here, and only one error, :class:`BadFrame`; the readers in
:mod:`.files` turn it into a :class:`~.files.CorruptFile` naming the file
and the offset.

Every unit on disk is a *frame*::

    u32 payload length | u32 crc32(payload) | u32 crc32(first 8 bytes) | payload

The header checksum makes the length trustworthy before the payload is read,
so a damaged length in the middle of a file is reported as corruption instead
of being mistaken for a short (torn) tail.

A task is encoded as::

    u64 id | i64 not_before seconds | u32 not_before nanos | u32 len(group)
    | u32 len(body) | u32 label pairs | group | body | (u32 len, key, u32 len, value)*

``not_before`` is split because nanoseconds up to the year 9999 do not fit
in 64 bits. A change record (one per committed store change) is::

    u64 seq | u32 removed | u32 created | removed IDs as u64 | created tasks

All integers are little-endian.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Sequence

from masstasker.server.stores.memory.store import NANOS_PER_SECOND, StoredTask

__all__ = [
    "FRAME_HEADER_SIZE",
    "BadFrame",
    "check_payload",
    "decode_change",
    "decode_tasks",
    "encode_change",
    "encode_tasks",
    "frame",
    "parse_frame_header",
]

_FRAME = struct.Struct("<III")
_LENGTH_CRC = struct.Struct("<II")
FRAME_HEADER_SIZE = _FRAME.size
_CHANGE = struct.Struct("<QII")
_TASK = struct.Struct("<QqIIII")
_U32 = struct.Struct("<I")

_crc32 = zlib.crc32


class BadFrame(ValueError):
    """A frame or payload that does not decode; the message says what is wrong."""


def frame(payload: bytes) -> bytes:
    """``payload`` with its length and checksums in front."""
    head = _LENGTH_CRC.pack(len(payload), _crc32(payload))
    return head + _U32.pack(_crc32(head)) + payload


def parse_frame_header(header: bytes) -> tuple[int, int]:
    """``(payload length, payload crc)`` from a frame header; BadFrame if its checksum fails."""
    length, crc, head_crc = _FRAME.unpack(header)
    if _crc32(header[:8]) != head_crc:
        raise BadFrame("frame header checksum mismatch")
    return length, crc


def check_payload(payload: bytes, crc: int) -> None:
    """BadFrame unless ``payload`` has checksum ``crc``."""
    if _crc32(payload) != crc:
        raise BadFrame("payload checksum mismatch")


def _encode_task(out: list[bytes], task: StoredTask) -> None:
    group = task.group.encode()
    labels = task.labels
    seconds, nanos = divmod(task.not_before, NANOS_PER_SECOND)
    out.append(_TASK.pack(task.id, seconds, nanos, len(group), len(task.body), len(labels) if labels else 0))
    out.append(group)
    out.append(task.body)
    if labels:
        pack = _U32.pack
        for key, value in labels:
            k, v = key.encode(), value.encode()
            out.append(pack(len(k)))
            out.append(k)
            out.append(pack(len(v)))
            out.append(v)


def encode_tasks(tasks: Iterable[StoredTask]) -> bytes:
    """Tasks back to back, with their count in front (a snapshot chunk)."""
    out: list[bytes] = [b""]
    count = 0
    for task in tasks:
        _encode_task(out, task)
        count += 1
    out[0] = _U32.pack(count)
    return b"".join(out)


def encode_change(seq: int, removed: Sequence[int], created: Sequence[StoredTask]) -> bytes:
    """One framed change record: the IDs removed and the tasks created by one commit."""
    out = [_CHANGE.pack(seq, len(removed), len(created))]
    if removed:
        out.append(struct.pack(f"<{len(removed)}Q", *removed))
    for task in created:
        _encode_task(out, task)
    return frame(b"".join(out))


def _decode_tasks(data: bytes, pos: int, count: int) -> tuple[list[StoredTask], int]:
    unpack_task = _TASK.unpack_from
    unpack_u32 = _U32.unpack_from
    task_size = _TASK.size
    tasks: list[StoredTask] = []
    append = tasks.append
    # Tasks share a few group names: one str per name, not per task (50 bytes each).
    groups: dict[bytes, str] = {}
    for _ in range(count):
        task_id, seconds, nanos, group_len, body_len, label_count = unpack_task(data, pos)
        pos += task_size
        raw = data[pos : pos + group_len]
        group = groups.get(raw)
        if group is None:
            group = groups[raw] = raw.decode()
        pos += group_len
        body = data[pos : pos + body_len]
        pos += body_len
        labels: tuple[tuple[str, str], ...] | None = None
        if label_count:
            pairs = []
            for _ in range(label_count):
                (n,) = unpack_u32(data, pos)
                key = data[pos + 4 : pos + 4 + n].decode()
                pos += 4 + n
                (n,) = unpack_u32(data, pos)
                value = data[pos + 4 : pos + 4 + n].decode()
                pos += 4 + n
                pairs.append((key, value))
            labels = tuple(pairs)
        if nanos >= NANOS_PER_SECOND:
            raise BadFrame(f"task {task_id}: nanos {nanos} out of range")
        append(StoredTask(task_id, group, seconds * NANOS_PER_SECOND + nanos, body, labels))
    return tasks, pos


def _check_end(what: str, pos: int, size: int) -> None:
    # Slicing past the end does not fail in Python: a short field shows up here.
    if pos > size:
        raise BadFrame(f"malformed {what}: {pos - size} bytes missing")
    if pos < size:
        raise BadFrame(f"{what} has {size - pos} stray bytes")


def decode_tasks(data: bytes) -> list[StoredTask]:
    """The tasks of a chunk made by :func:`encode_tasks`."""
    try:
        (count,) = _U32.unpack_from(data, 0)
        tasks, pos = _decode_tasks(data, 4, count)
    except (struct.error, UnicodeDecodeError) as exc:
        raise BadFrame(f"malformed task chunk: {exc}") from None
    _check_end("task chunk", pos, len(data))
    return tasks


def decode_change(payload: bytes) -> tuple[int, tuple[int, ...], list[StoredTask]]:
    """``(seq, removed IDs, created tasks)`` from a change record's payload."""
    try:
        seq, n_removed, n_created = _CHANGE.unpack_from(payload, 0)
        pos = _CHANGE.size
        removed = struct.unpack_from(f"<{n_removed}Q", payload, pos)
        pos += 8 * n_removed
        created, pos = _decode_tasks(payload, pos, n_created)
    except (struct.error, UnicodeDecodeError) as exc:
        raise BadFrame(f"malformed change record: {exc}") from None
    _check_end("change record", pos, len(payload))
    return seq, removed, created
