"""A group's counter history and smoothed rates, fed one closed second at a time. Pure and store-independent.

A :class:`CounterHistory` is told, once per second or less often, the three
cumulative counters of its group (tasks created into it, owned from it,
departed from it) as they stand at the end of a second. It keeps:

- the per-second increments for the last :data:`SECONDS_KEPT` seconds and the
  per-minute increments for the last :data:`MINUTES_KEPT` minutes, in two
  ring buffers of 32-bit integers (60 KB per group once it has been busy;
  nothing for a group that never changed);
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
    "RateEstimator",
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


def _clear(ring: array[int], start: int, stop: int, size: int) -> None:
    """Zero the slots of periods start..stop-1 (at most the whole ring)."""
    if stop - start >= size:
        ring[:] = array("I", bytes(4 * _COUNTERS * size))
        return
    for period in range(start, stop):
        base = (period % size) * _COUNTERS
        ring[base] = ring[base + 1] = ring[base + 2] = 0


def _add(ring: array[int], base: int, deltas: tuple[int, int, int]) -> None:
    for i in range(_COUNTERS):
        ring[base + i] = min(ring[base + i] + deltas[i], _SLOT_MAX)


class CounterHistory:
    """Per-second and per-minute increments of a group's three counters, and their smoothed rates."""

    __slots__ = ("_closed", "_first", "_last", "_minutes", "_seconds", "rates")

    def __init__(self) -> None:
        self._closed = (0, 0, 0)  # the counters at the end of second _last
        self._first: int | None = None  # the first second recorded
        self._last: int | None = None  # the newest second recorded
        self._seconds: array[int] | None = None
        self._minutes: array[int] | None = None
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
        if last is not None and second < last:
            second = last  # a clock that stepped back: keep the history monotonic
        seconds, minutes = self._seconds, self._minutes
        if seconds is None or minutes is None or last is None:
            seconds = self._seconds = array("I", bytes(4 * _COUNTERS * SECONDS_KEPT))
            minutes = self._minutes = array("I", bytes(4 * _COUNTERS * MINUTES_KEPT))
            self._first = second
        else:
            _clear(seconds, last + 1, second + 1, SECONDS_KEPT)
            _clear(minutes, last // 60 + 1, second // 60 + 1, MINUTES_KEPT)
        self._last = second
        _add(seconds, (second % SECONDS_KEPT) * _COUNTERS, deltas)
        _add(minutes, (second // 60 % MINUTES_KEPT) * _COUNTERS, deltas)
        for estimator, delta in zip(self.rates, deltas, strict=True):
            estimator.add(second, delta)

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
        last, first, seconds, minutes = self._last, self._first, self._seconds, self._minutes
        if last is None or first is None or seconds is None or minutes is None or span <= 0:
            return []
        upto = max(upto, last)
        step = max(step, 1)
        created, owned, departed = self._closed
        points: list[CounterPoint] = []
        if span <= SECONDS_KEPT and step < 60:
            oldest = max(upto - span + 1, first, last - SECONDS_KEPT + 1)
            end = upto
            period = last  # nothing was recorded after it
            while end >= oldest:
                points.append(_point(end + 1, created, owned, departed, base))
                end -= step
                while period > end:  # undo the increments of the seconds after the next point
                    i = (period % SECONDS_KEPT) * _COUNTERS
                    created -= seconds[i]
                    owned -= seconds[i + 1]
                    departed -= seconds[i + 2]
                    period -= 1
        else:
            step = -(-step // 60)  # in minutes
            oldest = max((upto - span + 1) // 60, first // 60, last // 60 - MINUTES_KEPT + 1)
            points.append(_point(upto + 1, created, owned, departed, base))
            minute = last // 60
            end = upto // 60 - 1  # the newest whole minute before upto's
            while end >= oldest:
                while minute > end:
                    i = (minute % MINUTES_KEPT) * _COUNTERS
                    created -= minutes[i]
                    owned -= minutes[i + 1]
                    departed -= minutes[i + 2]
                    minute -= 1
                points.append(_point((end + 1) * 60, created, owned, departed, base))
                end -= step
        points.reverse()
        return points

    def state(
        self,
    ) -> tuple[tuple[int, int, int], int | None, int | None, bytes, bytes, list[tuple[float, float, int | None]]]:
        """Everything, for a snapshot."""
        return (
            self._closed,
            self._first,
            self._last,
            self._seconds.tobytes() if self._seconds is not None else b"",
            self._minutes.tobytes() if self._minutes is not None else b"",
            [r.state() for r in self.rates],
        )

    def restore(
        self,
        state: tuple[tuple[int, int, int], int | None, int | None, bytes, bytes, list[tuple[float, float, int | None]]],
    ) -> None:
        """Undo :meth:`state`; ValueError if the rings do not have the expected size."""
        closed, first, last, seconds, minutes, rates = state
        if seconds or minutes:
            if len(seconds) != 4 * _COUNTERS * SECONDS_KEPT or len(minutes) != 4 * _COUNTERS * MINUTES_KEPT:
                raise ValueError("counter history rings of the wrong size")
            self._seconds, self._minutes = array("I", seconds), array("I", minutes)
        self._closed, self._first, self._last = closed, first, last
        for estimator, rate in zip(self.rates, rates, strict=True):
            estimator.restore(rate)


def _point(second_end: int, created: int, owned: int, departed: int, base: int) -> CounterPoint:
    return CounterPoint(second_end * NANOS_PER_SECOND, created, owned, departed, max(base + created - departed, 0))
