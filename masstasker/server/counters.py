"""A group's counter history and smoothed rates, fed one closed second at a time. Pure and store-independent.

A :class:`CounterHistory` is told, once per second or less often, the three
cumulative counters of its group (tasks created into it, owned from it,
departed from it) as they stand at the end of a second. It keeps:

- the per-second increments for the last :data:`SECONDS_KEPT` seconds and the
  per-minute increments for the last :data:`MINUTES_KEPT` minutes, in two
  ring buffers of 32-bit integers that grow with the time the group has
  been busy: 12 bytes per second and per minute, at most 60 KB per group;
  the per-second ring is freed after an hour without change, the
  per-minute one after a day (:meth:`CounterHistory.trim`);
- for each counter an exponentially weighted moving average of the
  per-second increments (time constant :data:`RATE_TAU_SECONDS`), bias
  corrected: the average is taken over the seconds since activity began, so
  a drain that started ten seconds ago is measured over those ten seconds,
  not diluted by the idle hour before it.

Feeding costs O(1) per call plus O(seconds skipped) to clear ring slots
(bounded by the ring sizes); reading a rate is O(1); reading history is
O(points returned + the seconds or minutes they span).
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass

__all__ = [
    "MINUTES_KEPT",
    "RATE_IDLE_RESET_SECONDS",
    "RATE_TAU_SECONDS",
    "SECONDS_KEPT",
    "CounterHistory",
    "CounterPoint",
    "HistoryState",
    "RateEstimator",
    "Ring",
]

NANOS_PER_SECOND = 1_000_000_000
#: One point per second this far back, then one per minute.
SECONDS_KEPT = 3600
MINUTES_KEPT = 1440
#: Time constant of the smoothed rates: older seconds weigh e^-age/tau.
RATE_TAU_SECONDS = 60.0
#: After this long without any increment a rate starts afresh at the next one.
RATE_IDLE_RESET_SECONDS = 300

_COUNTERS = 3  # created, owned, departed
_SLOT_MAX = 0xFFFF_FFFF
_BETA = math.exp(-1.0 / RATE_TAU_SECONDS)


@dataclass(frozen=True, slots=True)
class CounterPoint:
    """The counters at the end of one second (or minute); ``total`` is the group's size then."""

    time_ns: int
    created: int
    owned: int
    departed: int
    total: int


class RateEstimator:
    """A bias-corrected exponentially weighted average of per-second increments.

    rate = sum(beta^age * d) / sum(beta^age) over the seconds since the
    activity began (``age`` in seconds before the newest one), which is the
    plain average for a window shorter than tau and tends to an ordinary
    EWMA for longer ones. Seconds without increments count as zeros, so a
    stalled drain shows a falling rate.
    """

    __slots__ = ("_den", "_last", "_num")

    def __init__(self) -> None:
        self._num = 0.0
        self._den = 0.0
        self._last: int | None = None  # the newest second fed; None: idle

    def add(self, second: int, increment: int) -> None:
        """Feed the increment of ``second`` (not older than the newest second fed)."""
        last = self._last
        if last is None or second - last > RATE_IDLE_RESET_SECONDS:
            if increment:
                self._num, self._den, self._last = float(increment), 1.0, second
            else:
                self._last = None
            return
        gap = second - last
        if gap <= 0:  # the same second again: more of its increment
            self._num += increment
            return
        decay = _BETA**gap
        self._num = self._num * decay + increment
        self._den = self._den * decay + (1.0 - decay) / (1.0 - _BETA)
        self._last = second

    def rate(self, second: int) -> float:
        """The smoothed increments per second as of the end of ``second``; 0.0 when idle."""
        last = self._last
        if last is None:
            return 0.0
        gap = max(second - last, 0)
        if gap > RATE_IDLE_RESET_SECONDS:
            return 0.0
        decay = _BETA**gap
        return self._num * decay / (self._den * decay + (1.0 - decay) / (1.0 - _BETA))

    def state(self) -> tuple[float, float, int | None]:
        """What to persist."""
        return self._num, self._den, self._last

    def restore(self, state: tuple[float, float, int | None]) -> None:
        """Undo :meth:`state`."""
        self._num, self._den, self._last = state


class Ring:
    """Increments of the three counters per period (second or minute), for the last ``size`` periods.

    The slots grow with the span recorded (a group busy for five minutes
    holds five minutes of seconds, not an hour) up to ``size``, then wrap.
    Slot of period p: ``(p - origin) % size``.
    """

    __slots__ = ("data", "origin", "size")

    def __init__(self, size: int, origin: int, data: array[int] | None = None) -> None:
        self.size = size
        self.origin = origin
        self.data: array[int] = data if data is not None else array("I")

    def slot(self, period: int, last: int | None) -> int:
        """The index of ``period``'s first counter, after clearing the periods between ``last`` and it.

        ``period`` is not older than ``last`` (the newest period written).
        """
        size, data = self.size, self.data
        offset = period - self.origin
        filled = len(data) // _COUNTERS
        if filled < size:
            if offset < filled:  # the newest period again
                return offset * _COUNTERS
            data.extend(_ZEROS[: _COUNTERS * (min(offset + 1, size) - filled)])
            if offset < size:  # the new periods are the zeros just added
                return offset * _COUNTERS
        if last is not None:
            if period - last >= size:
                data[:] = _ZEROS[: _COUNTERS * size]
            else:
                for skipped in range(last + 1, period):
                    i = ((skipped - self.origin) % size) * _COUNTERS
                    data[i] = data[i + 1] = data[i + 2] = 0
                if period > last:
                    i = (offset % size) * _COUNTERS
                    data[i] = data[i + 1] = data[i + 2] = 0
        return (offset % size) * _COUNTERS

    def add(self, period: int, last: int | None, deltas: tuple[int, int, int]) -> None:
        """Add ``deltas`` to ``period``'s slot (saturating at 2**32 - 1)."""
        data = self.data
        i = self.slot(period, last)
        data[i] = min(data[i] + deltas[0], _SLOT_MAX)
        data[i + 1] = min(data[i + 1] + deltas[1], _SLOT_MAX)
        data[i + 2] = min(data[i + 2] + deltas[2], _SLOT_MAX)

    def get(self, period: int) -> tuple[int, int, int]:
        """The increments of ``period`` (zeros outside what is kept: callers bound the range)."""
        i = ((period - self.origin) % self.size) * _COUNTERS
        data = self.data
        if period < self.origin or i >= len(data):
            return 0, 0, 0
        return data[i], data[i + 1], data[i + 2]


_ZEROS = array("I", bytes(4 * _COUNTERS * SECONDS_KEPT))

HistoryState = tuple[
    tuple[int, int, int], int | None, int | None, int, bytes, int, bytes, list[tuple[float, float, int | None]]
]


class CounterHistory:
    """Per-second and per-minute increments of a group's three counters, and their smoothed rates."""

    __slots__ = ("_closed", "_first", "_last", "_minutes", "_seconds", "rates")

    def __init__(self) -> None:
        self._closed = (0, 0, 0)  # the counters at the end of second _last
        self._first: int | None = None  # the first second recorded
        self._last: int | None = None  # the newest second recorded
        self._seconds: Ring | None = None  # None: nothing recorded within SECONDS_KEPT
        self._minutes: Ring | None = None
        #: created, owned, departed
        self.rates = (RateEstimator(), RateEstimator(), RateEstimator())

    @property
    def last_second(self) -> int | None:
        """The newest second recorded, or None before the first change."""
        return self._last

    def start(self, counters: tuple[int, int, int]) -> None:
        """Take ``counters`` as the baseline without recording them as increments (after a restore)."""
        self._closed = counters

    def close(self, second: int, counters: tuple[int, int, int]) -> None:
        """Record the counters as they stand at the end of ``second``.

        ``second`` must not be older than the newest one recorded; the same
        second again adds what changed since. A call where nothing changed
        costs O(1) and records nothing.
        """
        closed = self._closed
        if counters == closed:
            return
        deltas = (counters[0] - closed[0], counters[1] - closed[1], counters[2] - closed[2])
        self._closed = counters
        last = self._last
        if last is None:
            self._first = second
        elif second < last:
            second = last  # a clock that stepped back: keep the history monotonic
        seconds, minutes = self._seconds, self._minutes
        if seconds is None:
            seconds = self._seconds = Ring(SECONDS_KEPT, second)
            last_second = None
        else:
            last_second = last
        if minutes is None:
            minutes = self._minutes = Ring(MINUTES_KEPT, second // 60)
            last_minute = None
        else:
            last_minute = None if last is None else last // 60
        self._last = second
        seconds.add(second, last_second, deltas)
        minutes.add(second // 60, last_minute, deltas)
        for estimator, delta in zip(self.rates, deltas, strict=True):
            estimator.add(second, delta)

    def trim(self, second: int) -> None:
        """Free the rings that hold nothing newer than what is kept at ``second`` (an idle group)."""
        last = self._last
        if last is None:
            return
        if self._seconds is not None and second - last >= SECONDS_KEPT:
            self._seconds = None
        if self._minutes is not None and second // 60 - last // 60 >= MINUTES_KEPT:
            self._minutes = None

    def memory(self) -> int:
        """Bytes held by the rings."""
        return sum(4 * len(r.data) for r in (self._seconds, self._minutes) if r is not None)

    def idle_since(self, second: int) -> bool:
        """Nothing recorded after ``second`` (true for a history never fed)."""
        return self._last is None or self._last <= second

    def points(self, upto: int, span: int, step: int, base: int) -> list[CounterPoint]:
        """Cumulative counters every ``step`` seconds over the ``span`` seconds ending with ``upto``, oldest first.

        ``upto`` is the newest complete second (not older than any recorded).
        Per-second data is used when the span fits in it and ``step`` is
        under a minute; otherwise per-minute data, with ``step`` rounded up
        to whole minutes. Points start no earlier than the first second
        recorded. ``base`` is the group's size minus created plus departed
        (constant over the group's life), from which each point's ``total``
        follows.
        """
        last, first = self._last, self._first
        if last is None or first is None or span <= 0:
            return []
        upto = max(upto, last)
        step = max(step, 1)
        created, owned, departed = self._closed
        points: list[CounterPoint] = []
        if span <= SECONDS_KEPT and step < 60:
            ring = self._seconds
            oldest = max(upto - span + 1, first, last - SECONDS_KEPT + 1)
            end = upto
            period = last  # nothing was recorded after it
            while end >= oldest:
                points.append(_point(end + 1, created, owned, departed, base))
                end -= step
                while period > end:  # undo the increments of the seconds after the next point
                    if ring is not None:
                        c, o, d = ring.get(period)
                        created, owned, departed = created - c, owned - o, departed - d
                    period -= 1
        else:
            ring = self._minutes
            step = -(-step // 60)  # in minutes
            oldest = max((upto - span + 1) // 60, first // 60, last // 60 - MINUTES_KEPT + 1)
            points.append(_point(upto + 1, created, owned, departed, base))
            minute = last // 60
            end = upto // 60 - 1  # the newest whole minute before upto's
            while end >= oldest:
                while minute > end:
                    if ring is not None:
                        c, o, d = ring.get(minute)
                        created, owned, departed = created - c, owned - o, departed - d
                    minute -= 1
                points.append(_point((end + 1) * 60, created, owned, departed, base))
                end -= step
        points.reverse()
        return points

    def state(self) -> HistoryState:
        """Everything, for a snapshot."""
        seconds, minutes = self._seconds, self._minutes
        return (
            self._closed,
            self._first,
            self._last,
            seconds.origin if seconds is not None else 0,
            seconds.data.tobytes() if seconds is not None else b"",
            minutes.origin if minutes is not None else 0,
            minutes.data.tobytes() if minutes is not None else b"",
            [r.state() for r in self.rates],
        )

    def restore(self, state: HistoryState) -> None:
        """Undo :meth:`state`; ValueError if a ring does not fit."""
        closed, first, last, second_origin, seconds, minute_origin, minutes, rates = state
        for raw, size in ((seconds, SECONDS_KEPT), (minutes, MINUTES_KEPT)):
            if len(raw) % (4 * _COUNTERS) or len(raw) > 4 * _COUNTERS * size:
                raise ValueError(f"a counter history ring of {len(raw)} bytes")
        self._seconds = Ring(SECONDS_KEPT, second_origin, array("I", seconds)) if seconds else None
        self._minutes = Ring(MINUTES_KEPT, minute_origin, array("I", minutes)) if minutes else None
        self._closed, self._first, self._last = closed, first, last
        for estimator, rate in zip(self.rates, rates, strict=True):
            estimator.restore(rate)


def _point(second_end: int, created: int, owned: int, departed: int, base: int) -> CounterPoint:
    return CounterPoint(second_end * NANOS_PER_SECOND, created, owned, departed, max(base + created - departed, 0))
