"""Time: the injectable clock, and conversions between Python and protobuf time types."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol, TypeAlias, runtime_checkable

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

__all__ = [
    "Clock",
    "Seconds",
    "SystemClock",
    "from_timestamp",
    "to_duration",
    "to_seconds",
    "to_timestamp",
]

Seconds: TypeAlias = float | int | timedelta
"""A duration: a ``timedelta`` or a number of seconds."""


@runtime_checkable
class Clock(Protocol):
    """Where the client gets the time from, and how its lease heartbeat waits.

    The client stamps ``QueryRequest.now``, the default ``not_before`` of created tasks, ``Disown`` and
    ``Reown`` from ``now()``; the server honours those, so a fake clock drives the server's notion of
    time too. The two waits mirror ``threading.Condition.wait_for`` and ``asyncio.sleep`` with the time
    measured on this clock, which is what lets ``masstasker.testing.FakeClock`` fire a heartbeat on
    ``advance()`` instead of after a real sleep.
    """

    def now(self) -> datetime:
        """The current time, timezone-aware (UTC)."""
        ...

    def wait_for(self, cond: threading.Condition, predicate: Callable[[], bool], timeout: float) -> bool:
        """Like ``cond.wait_for(predicate, timeout)`` (the caller holds ``cond``), timed on this clock."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Like ``asyncio.sleep(seconds)``, timed on this clock. Cancellable."""
        ...


class SystemClock:
    """The real clock: wall time for timestamps, real waiting."""

    def now(self) -> datetime:
        """``datetime.now(UTC)``."""
        return datetime.now(UTC)

    def wait_for(self, cond: threading.Condition, predicate: Callable[[], bool], timeout: float) -> bool:
        """``cond.wait_for(predicate, timeout)``."""
        return cond.wait_for(predicate, timeout)

    async def sleep(self, seconds: float) -> None:
        """``asyncio.sleep(seconds)``."""
        await asyncio.sleep(seconds)

    def __repr__(self) -> str:
        return "SystemClock()"


def to_seconds(value: Seconds, *, name: str = "duration") -> float:
    """``value`` in seconds; rejects negative durations, which mean nothing to the server."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not seconds >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be a non-negative duration, got {value!r}")
    return seconds


def to_duration(value: Seconds, *, name: str = "duration") -> Duration:
    """A protobuf Duration for ``value`` (microsecond precision, as timedelta)."""
    duration = Duration()
    duration.FromTimedelta(timedelta(seconds=to_seconds(value, name=name)))
    return duration


def to_timestamp(value: datetime) -> Timestamp:
    """A protobuf Timestamp; a naive datetime is taken as UTC, as protobuf does."""
    timestamp = Timestamp()
    timestamp.FromDatetime(value)
    return timestamp


def from_timestamp(value: Timestamp) -> datetime:
    """A timezone-aware UTC datetime for a protobuf Timestamp."""
    return value.ToDatetime(tzinfo=UTC)
