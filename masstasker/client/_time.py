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
    "AdvancingClock",
    "Clock",
    "Seconds",
    "SystemClock",
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


@runtime_checkable
class AdvancingClock(Protocol):
    """A clock that can jump forward, such as ``masstasker.testing.FakeClock``, and says when it does.

    The server times a waiting Query from the request's ``now``, in real time: a query that waits for a
    lease to expire at ``now + 30s`` would wait 30 real seconds even if the test moves the clock past that
    at once. A client whose clock has this method cancels such a wait when the clock moves and asks again
    with the new ``now``. The real clock does not need it: it never jumps.
    """

    def on_advance(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` (from the advancing thread, holding no lock) after each time the clock moves
        forward, until the returned function is called."""
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
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        # Caught here rather than by float(): "30" or None is a mistake to name, not to convert.
        raise TypeError(f"{name} must be seconds (a number or a timedelta), got {value!r}")
    if not seconds >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be a non-negative duration, got {value!r}")
    return seconds


def to_duration(value: Seconds, *, name: str = "duration") -> Duration:
    """A protobuf Duration for ``value`` (microsecond precision, as timedelta)."""
    duration = Duration()
    duration.FromTimedelta(timedelta(seconds=to_seconds(value, name=name)))
    return duration


def to_timestamp(value: datetime, *, name: str = "time") -> Timestamp:
    """A protobuf Timestamp for an aware ``datetime``.

    A naive datetime is refused with ``ValueError``: protobuf would read it as UTC, so
    ``datetime.now() + delta`` in Tokyo would land nine hours late, and reading it as local time instead
    would make the same code mean different instants on different machines. Pass an aware one, such as
    ``datetime.now(UTC)`` or ``datetime.now().astimezone()``.
    """
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            f"{name} must be a timezone-aware datetime (e.g. datetime.now(UTC) or "
            f"datetime.now().astimezone()), got the naive {value.isoformat()}"
        )
    timestamp = Timestamp()
    timestamp.FromDatetime(value)
    return timestamp
