"""A group's lease index: the index keys of its tasks that carry a lease, and how many are after a time.

The statistics need three things of it: add and remove a key on every lease
and completion (the request path), ``key in index`` (a renewal keeps its
lease; a task's state), and at read time how many keys are after ``now``
(the leased count; the rest are expired leases, whose tasks are visible).
A ``SortedList`` answers all three in O(log n), but with a large constant:
two of its insertions or removals per lease cycle cost more than the rest
of the statistics together (the batch-lease benchmark). Here:

- ``_keys``, a set: add, remove and ``in`` in O(1);
- ``_pending``, a binary heap of the keys not yet passed by ``_frontier`` (the
  limit of the latest count), with lazy deletion: a removed key stays in it
  until a count pops it, or until the heap is more than twice the set and is
  rebuilt (amortized O(1) per removal); a key indexed again meanwhile is in it
  twice, and counted once;
- ``_expired``: how many keys of ``_keys`` are below ``_frontier``.

Counting keys at or after ``limit`` pops what the time passed since the
previous count and answers ``len(_keys) - _expired``: amortized O(log n)
per key, each popped once, since time moves forward. A count at an earlier
limit than the previous one (a clock that stepped back) rebuilds the heap
once, O(n). New leases end in the future, so their keys mostly arrive in
increasing order and a push stops at its parent.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from heapq import heapify, heappop, heappush

__all__ = ["LeaseIndex"]

# The heap is rebuilt when it holds more than twice the live keys plus this many stale ones.
_SLACK = 1024


class LeaseIndex:
    """Index keys carrying a lease (expired or not), with :meth:`after` counting the unexpired ones."""

    __slots__ = ("_expired", "_frontier", "_keys", "_pending")

    def __init__(self) -> None:
        self._keys: set[int] = set()
        self._pending: list[int] = []  # a heap: every key of _keys at or after _frontier, and stale keys
        self._frontier = 0  # keys below it are settled: counted in _expired, absent from _pending
        self._expired = 0

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[int]:
        """The keys in increasing order (snapshots, tests): O(n log n)."""
        return iter(sorted(self._keys))

    def add(self, key: int) -> None:
        """Index ``key`` (a no-op if it already is). O(1) for a key above the others, else O(log n)."""
        keys = self._keys
        size = len(keys)
        keys.add(key)
        if len(keys) == size:
            return
        if key < self._frontier:
            self._expired += 1
        else:
            heappush(self._pending, key)

    def replace(self, old: Sequence[int], new: Sequence[int]) -> None:
        """Unindex those of ``old`` that are indexed, then index ``new``, in one call.

        An owning Query's change (``new`` empty: a completion's).
        """
        own, pending = self._keys, self._pending
        frontier, expired = self._frontier, self._expired
        for key in old:  # tasks owned again, whose earlier lease expired
            if key in own:
                own.remove(key)
                if key < frontier:
                    expired -= 1
        for key in new:
            if key not in own:
                own.add(key)
                if key < frontier:
                    expired += 1
                else:
                    heappush(pending, key)
        self._expired = expired
        if len(pending) > 2 * len(own) + _SLACK:
            self._rebuild(frontier)

    def discard(self, key: int) -> bool:
        """Unindex ``key``; whether it was indexed. Amortized O(1)."""
        keys = self._keys
        try:
            keys.remove(key)
        except KeyError:
            return False
        if key < self._frontier:
            self._expired -= 1
        elif len(self._pending) > 2 * len(keys) + _SLACK:
            self._rebuild(self._frontier)
        return True

    def after(self, limit: int) -> int:
        """How many keys are at or after ``limit``. Amortized O(log n) per key passed since the last count."""
        if limit < self._frontier:
            self._rebuild(limit)
            return len(self._pending)
        pending, keys = self._pending, self._keys
        expired = self._expired
        last: int | None = None
        while pending and pending[0] < limit:
            # A key removed and indexed again before a count is in the heap twice; the copies pop one
            # after the other and count once.
            key = heappop(pending)
            if key != last and key in keys:
                expired += 1
            last = key
        self._expired = expired
        self._frontier = limit
        return len(keys) - expired

    def _rebuild(self, frontier: int) -> None:
        """The heap from the live keys at or after ``frontier`` only. O(n)."""
        pending = [key for key in self._keys if key >= frontier]
        heapify(pending)
        self._pending = pending
        self._frontier = frontier
        self._expired = len(self._keys) - len(pending)

    def _check(self) -> None:
        """Assert the invariants in the module docstring."""
        pending, frontier = self._pending, self._frontier
        for i in range(1, len(pending)):
            assert pending[(i - 1) // 2] <= pending[i], "lease heap out of order"
        assert all(key >= frontier for key in pending), "a settled key is still pending"
        live = {key for key in self._keys if key >= frontier}
        assert live <= set(pending), "a lease at or after the frontier is missing from the heap"
        assert self._expired == len(self._keys) - len(live), (self._expired, len(self._keys), len(live))
