"""The data directory's files: their names, the segment header, frame reading, and the errors.

Everything here touches the file system; the bytes themselves are encoded
and decoded by :mod:`.records`. The log writer, recovery and snapshots all
use these helpers, so each file-format rule lives in one place.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from masstasker.server.durability.records import FRAME_HEADER_SIZE, BadFrame, check_payload, frame, parse_frame_header

__all__ = [
    "LOCK_NAME",
    "SEGMENT_HEADER_SIZE",
    "SEGMENT_MAGIC",
    "CorruptFile",
    "FrameReader",
    "PersistenceError",
    "check_directory",
    "create_segment",
    "fsync_dir",
    "list_segments",
    "lock_directory",
    "numbered_files",
    "read_segment_base",
    "segment_path",
    "write_all",
]

LOCK_NAME = "LOCK"
SEGMENT_MAGIC = b"MTWAL\x00\x01\n"
_BASE = struct.Struct("<Q")
SEGMENT_HEADER_SIZE = len(SEGMENT_MAGIC) + len(frame(_BASE.pack(0)))
_SEGMENT_NAME = re.compile(r"wal-(\d{20})\.log")


class PersistenceError(OSError):
    """The data directory cannot be used: locked, unreadable, or corrupt.

    An ``OSError`` so that the CLI reports it like any other start failure
    (a port in use) and exits non-zero.
    """


class CorruptFile(PersistenceError):
    """A file in the data directory is damaged somewhere other than a torn tail."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"{path}: corrupt at byte offset {offset}: {reason}")
        self.path = path
        self.offset = offset


# -- the directory ---------------------------------------------------------------------------------------------


def check_directory(directory: Path) -> None:
    """PersistenceError unless ``directory`` is (or can be made) a writable directory."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PersistenceError(f"cannot create data directory {directory}: {exc}") from exc
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PersistenceError(f"data directory {directory} is not writable")


def lock_directory(directory: Path) -> int:
    """flock ``LOCK`` so that one server alone uses the directory; return its fd (close it to release)."""
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


def fsync_dir(directory: Path) -> None:
    """Make the directory's entries (created, renamed, removed files) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def numbered_files(directory: Path, name: re.Pattern[str]) -> list[tuple[int, Path]]:
    """``(number, path)`` of the files whose whole name matches ``name`` (one number group), in order."""
    found = []
    for path in directory.iterdir():
        match = name.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (a write may be short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# -- log segments ----------------------------------------------------------------------------------------------


def segment_path(directory: Path, base: int) -> Path:
    """Where the segment starting after record ``base`` lives."""
    return directory / f"wal-{base:020d}.log"


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """``(base, path)`` of every segment, oldest first."""
    return numbered_files(directory, _SEGMENT_NAME)


def create_segment(directory: Path, base: int) -> int:
    """Create (or empty) segment ``base`` with its header, durably; return an fd open for appending."""
    path = segment_path(directory, base)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        write_all(fd, SEGMENT_MAGIC + frame(_BASE.pack(base)))
        os.fsync(fd)
        fsync_dir(directory)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_segment_base(data: bytes, path: Path) -> int:
    """The base recorded in a segment header; CorruptFile if it is damaged."""
    if data[: len(SEGMENT_MAGIC)] != SEGMENT_MAGIC:
        raise CorruptFile(str(path), 0, "not a MassTasker log segment (bad magic)")
    try:
        length, _ = parse_frame_header(data[len(SEGMENT_MAGIC) : len(SEGMENT_MAGIC) + FRAME_HEADER_SIZE])
        if length != _BASE.size:
            raise BadFrame(f"header frame of {length} bytes, expected {_BASE.size}")
        body = data[len(SEGMENT_MAGIC) + FRAME_HEADER_SIZE : SEGMENT_HEADER_SIZE]
        if frame(body) != data[len(SEGMENT_MAGIC) : SEGMENT_HEADER_SIZE]:
            raise BadFrame("header checksum mismatch")
    except BadFrame as exc:
        raise CorruptFile(str(path), len(SEGMENT_MAGIC), str(exc)) from None
    (base,) = _BASE.unpack(body)
    return int(base)


# -- reading frames --------------------------------------------------------------------------------------------


class FrameReader:
    """Iterate ``(offset, payload)`` over the frames of a file, checking every checksum.

    With ``tolerate_torn_tail`` (the newest log segment), damage that a crash
    in the middle of a write can leave at the very end is not an error: the
    iteration stops there and :attr:`torn_at` holds the offset where the
    valid part ends. The tail counts as torn when the last frame is short
    (its header or payload runs past the end of the file), when the last
    frame's payload checksum fails, or when a bad header is followed by
    nothing but zero bytes (space the file system allocated but never
    wrote). Anything else is :class:`CorruptFile`.
    """

    def __init__(self, file: BinaryIO, path: str, start: int, size: int, *, tolerate_torn_tail: bool) -> None:
        self._file = file
        self._path = path
        self._start = start
        self._size = size
        self._tolerate = tolerate_torn_tail
        self.torn_at: int | None = None

    def _torn_or_corrupt(self, offset: int, reason: str, torn: bool) -> None:
        if not (torn and self._tolerate):
            raise CorruptFile(self._path, offset, reason)
        self.torn_at = offset

    def _zeros_from(self, offset: int) -> bool:
        self._file.seek(offset)
        while block := self._file.read(1 << 16):
            if block.count(0) != len(block):
                return False
        return True

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        file, size = self._file, self._size
        pos = self._start
        file.seek(pos)
        while pos < size:
            if size - pos < FRAME_HEADER_SIZE:
                self._torn_or_corrupt(pos, "truncated frame header", torn=True)
                return
            header = file.read(FRAME_HEADER_SIZE)
            try:
                length, crc = parse_frame_header(header)
            except BadFrame as exc:
                self._torn_or_corrupt(pos, str(exc), torn=self._zeros_from(pos))
                return
            end = pos + FRAME_HEADER_SIZE + length
            if end > size:
                self._torn_or_corrupt(pos, f"frame of {length} bytes runs past the end of the file", torn=True)
                return
            payload = file.read(length)
            try:
                check_payload(payload, crc)
            except BadFrame as exc:
                self._torn_or_corrupt(pos, str(exc), torn=end == size)
                return
            yield pos, payload
            pos = end
