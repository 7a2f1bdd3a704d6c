"""The statistics section of a snapshot: each group's counters, history and leases. Pure: bytes in, bytes out.

A version-2 snapshot carries, between its header and its tasks, one frame
``i64 since | i64 open second | u32 groups`` and then one frame per group::

    u32 len(name) | name | u64 created, owned, departed
    | u64 closed created, owned, departed | u8 flags | i64 first second | i64 last second
    | i64 seconds ring origin | i64 minutes ring origin
    | 3 x (f64 num | f64 den | u8 set | i64 last second)      (the created, owned, departed rates)
    | u32 len(seconds ring) | u32 len(minutes ring) | rings (u32 triples)
    | u32 leased | leased task IDs as u64 | u32 in error | IDs of tasks with an error as u64

The error IDs spare recovery a look into every task body.
Everything is captured on the event loop with the tasks, so it matches
the snapshot's record number exactly; the log after it is counted again
by recovery (:meth:`~masstasker.server.stores.memory.stats.StoreStatistics.replayed`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from masstasker.server.durability.records import BadFrame
from masstasker.server.stores.memory.stats import StoreStatistics

__all__ = ["GroupState", "StatisticsState", "apply_statistics", "decode_statistics", "encode_statistics"]

_HEAD = struct.Struct("<qqI")
_NAME = struct.Struct("<I")
_COUNTS = struct.Struct("<QQQQQQBqqqq")
_RATE = struct.Struct("<ddBq")
_RINGS = struct.Struct("<II")
_ID_MASK = (1 << 64) - 1

RateState = tuple[float, float, int | None]


@dataclass(frozen=True, slots=True)
class GroupState:
    """One group's statistics as stored."""

    name: str
    counters: tuple[int, int, int]
    closed: tuple[int, int, int]
    first: int | None
    last: int | None
    rates: list[RateState]
    second_origin: int
    seconds: bytes
    minute_origin: int
    minutes: bytes
    leased_ids: list[int]
    error_ids: list[int]


@dataclass(frozen=True, slots=True)
class StatisticsState:
    """The whole statistics section."""

    since: int
    open_second: int
    groups: list[GroupState]

    def error_ids(self) -> set[int]:
        """The IDs of every task with an error."""
        return {task_id for group in self.groups for task_id in group.error_ids}


def encode_statistics(stats: StoreStatistics) -> list[bytes]:
    """The section's frame payloads, header first. On the event loop: O(groups + leases + ring bytes)."""
    payloads = [_HEAD.pack(stats.since, stats.open_second, len(stats.groups))]
    for name, record in stats.groups.items():
        closed, first, last, second_origin, seconds, minute_origin, minutes, rates = record.history.state()
        raw = name.encode()
        out = [_NAME.pack(len(raw)), raw]
        flags = (first is not None) | (last is not None) << 1
        out.append(
            _COUNTS.pack(*record.counters(), *closed, flags, first or 0, last or 0, second_origin, minute_origin)
        )
        for num, den, rate_last in rates:
            out.append(_RATE.pack(num, den, rate_last is not None, rate_last or 0))
        out.append(_RINGS.pack(len(seconds), len(minutes)))
        out.append(seconds)
        out.append(minutes)
        leased = [key & _ID_MASK for key in record.leased or ()]
        out.append(_NAME.pack(len(leased)))
        out.append(struct.pack(f"<{len(leased)}Q", *leased))
        errors = [key & _ID_MASK for key in record.errors or ()]
        out.append(_NAME.pack(len(errors)))
        out.append(struct.pack(f"<{len(errors)}Q", *errors))
        payloads.append(b"".join(out))
    return payloads


def decode_statistics(head: bytes, groups: list[bytes]) -> StatisticsState:
    """The section from its header payload and its group payloads; BadFrame if malformed."""
    try:
        since, open_second, count = _HEAD.unpack(head)
        if count != len(groups):
            raise BadFrame(f"{len(groups)} group frames where the header announces {count}")
        return StatisticsState(since, open_second, [_decode_group(g) for g in groups])
    except (struct.error, UnicodeDecodeError) as exc:
        raise BadFrame(f"malformed statistics: {exc}") from None


def _decode_group(data: bytes) -> GroupState:
    (n,) = _NAME.unpack_from(data, 0)
    pos = _NAME.size
    name = data[pos : pos + n].decode()
    pos += n
    c, o, d, cc, co, cd, flags, first, last, second_origin, minute_origin = _COUNTS.unpack_from(data, pos)
    pos += _COUNTS.size
    rates: list[RateState] = []
    for _ in range(3):
        num, den, has_last, rate_last = _RATE.unpack_from(data, pos)
        pos += _RATE.size
        rates.append((num, den, rate_last if has_last else None))
    n_seconds, n_minutes = _RINGS.unpack_from(data, pos)
    pos += _RINGS.size
    seconds = data[pos : pos + n_seconds]
    pos += n_seconds
    minutes = data[pos : pos + n_minutes]
    pos += n_minutes
    (n_leased,) = _NAME.unpack_from(data, pos)
    pos += _NAME.size
    leased = list(struct.unpack_from(f"<{n_leased}Q", data, pos))
    pos += 8 * n_leased
    (n_errors,) = _NAME.unpack_from(data, pos)
    pos += _NAME.size
    errors = list(struct.unpack_from(f"<{n_errors}Q", data, pos))
    pos += 8 * n_errors
    if pos != len(data) or len(seconds) != n_seconds or len(minutes) != n_minutes:
        raise BadFrame(f"statistics of group {name[:64]!r}: {len(data) - pos} bytes left over or missing")
    return GroupState(
        name,
        (c, o, d),
        (cc, co, cd),
        first if flags & 1 else None,
        last if flags & 2 else None,
        rates,
        second_origin,
        seconds,
        minute_origin,
        minutes,
        leased,
        errors,
    )


def apply_statistics(state: StatisticsState, stats: StoreStatistics) -> set[int]:
    """Load the section into a store's statistics (before replay); return the IDs that carry a lease."""
    stats.load(state.since, state.open_second)
    leased: set[int] = set()
    for group in state.groups:
        record = stats.record(group.name)
        record.created, record.owned, record.departed = group.counters
        try:
            record.history.restore(
                (
                    group.closed,
                    group.first,
                    group.last,
                    group.second_origin,
                    group.seconds,
                    group.minute_origin,
                    group.minutes,
                    group.rates,
                )
            )
        except ValueError as exc:
            raise BadFrame(f"statistics of group {group.name[:64]!r}: {exc}") from None
        leased.update(group.leased_ids)
    return leased
