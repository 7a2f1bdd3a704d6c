"""Waiting Queries: per-group FIFO queues, woken as tasks become visible.

A waiting Query registers a :class:`_Waiter` in its group's queue and
sleeps on a future. :meth:`Waiters.dispatch` wakes waiters from the front,
only as many as there are visible tasks not already promised to a woken
waiter (``pending``), so one created task wakes one waiter, not all of
them. A woken waiter takes its task itself, in the step it resumes in: if
its caller went away (the RPC was cancelled) it never resumes, and the task
stays for the next waiter. A waiter that finds nothing (someone else took
the task first) goes back to the front of the queue.

Tasks that are not visible yet are covered by one timer per group, set for
the moment the front waiter would see the next task.

Each waiter sees time as the server clock plus the offset its request's
``now`` had when it arrived, so a client with a fake clock keeps its own
timeline while it waits.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from itertools import islice
from typing import TypeVar

from masstasker.server.stores.base import StoreUnavailable
from masstasker.server.stores.memory.store import Store, StoredTask

__all__ = ["ShuttingDown", "Waiters"]

T = TypeVar("T")

# Rebuild a queue once this many departed waiters (cancelled, timed out) sit in it.
_COMPACT_AFTER = 64
# Waiters whose request clocks differ by less than this are served strictly in order: one that
# cannot see a task yet holds the others back by at most this long.
_SKEW_NS = 10_000_000
# How far past the front dispatch looks when clocks differ by more.
_LOOK_AHEAD = 64


class ShuttingDown(StoreUnavailable):
    """The server is stopping; the waiter was released without a task (UNAVAILABLE)."""


class _Waiter:
    __slots__ = ("departed", "future", "offset")

    def __init__(self, future: asyncio.Future[bool], offset: int) -> None:
        self.future = future
        self.offset = offset
        # Set when wait() has returned while the entry is still queued: it is dead, counted in _Group.dead.
        # A cancelled future alone is not enough: wait() may not have run its ``finally`` yet.
        self.departed = False


class _Group:
    __slots__ = ("dead", "pending", "queue", "skewed", "timer", "timer_at")

    def __init__(self) -> None:
        self.queue: deque[_Waiter] = deque()
        self.pending = 0  # woken waiters that have not resumed yet
        self.dead = 0  # departed waiters still in the queue
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0
        # Set once waiters with clocks further apart than _SKEW_NS have queued; lasts while the group waits.
        self.skewed = False


class Waiters:
    """Every waiting Query of one server. Use from the server's event loop only."""

    def __init__(self, store: Store, clock: Callable[[], int]) -> None:
        self._store = store
        self._clock = clock
        self._groups: dict[str, _Group] = {}
        self._closed = False
        self.count = 0  # waiting calls, for metrics
        self.wakeups = 0  # waiters woken by dispatch, ever (tests check there is no thundering herd)
        store.listeners.append(self._on_change)

    def __len__(self) -> int:
        return self.count

    async def wait(self, group: str, offset: int, take: Callable[[int], T | None], timeout: float | None) -> T:
        """Wait until ``take(now)`` returns a result; ``now`` is the server clock plus ``offset``.

        Raises TimeoutError after ``timeout`` seconds (None: never) and
        :class:`ShuttingDown` when the server releases its waiters.
        """
        if self._closed:
            raise ShuttingDown
        state = self._groups.get(group)
        if state is None:
            state = self._groups[group] = _Group()
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), offset)
        if state.queue and abs(offset - state.queue[0].offset) > _SKEW_NS:
            state.skewed = True
        state.queue.append(waiter)
        self.count += 1
        try:
            async with asyncio.timeout(timeout):
                self.dispatch(group)
                while True:
                    try:
                        woken = await waiter.future
                    finally:
                        if waiter.future.done() and not waiter.future.cancelled():
                            state.pending -= 1
                    if not woken:
                        raise ShuttingDown
                    result = take(self._clock() + offset)
                    if result:
                        return result
                    if self._closed:  # woken just before release_all: do not queue again
                        raise ShuttingDown
                    # Someone else was faster: keep our place at the front.
                    waiter.future = loop.create_future()
                    state.queue.appendleft(waiter)
                    self.dispatch(group)
        finally:
            self.count -= 1
            if not waiter.future.done():
                waiter.future.cancel()
            if waiter.future.cancelled():  # still queued: dispatch will drop it
                waiter.departed = True
                state.dead += 1
                if state.dead > _COMPACT_AFTER and state.dead * 2 > len(state.queue):
                    state.queue = deque(w for w in state.queue if not w.departed)
                    state.dead = 0
            # Whatever we leave visible (a peeked task, a wake-up we could not
            # use) goes to the next in line.
            self.dispatch(group)

    def dispatch(self, group: str) -> None:
        """Wake as many waiters of the group as there are unclaimed visible tasks. O(log n) + O(woken)."""
        state = self._groups.get(group)
        if state is None:
            return
        queue = state.queue
        store = self._store
        now = self._clock()
        # In arrival order. A waiter whose clock is behind may not see a task the others see yet: it
        # keeps its place, and (only when clocks differ that much) the next few are looked at, so one
        # client with a skewed clock cannot hold up a whole group.
        look_ahead = _LOOK_AHEAD if state.skewed else 1
        i = passed = 0
        while i < len(queue) and passed < look_ahead:
            waiter = queue[i]
            if waiter.future.done():
                if waiter.departed:
                    del queue[i]
                    state.dead -= 1
                else:  # cancelled, and its wait() has yet to run its ``finally``, which dispatches again
                    i += 1
                continue
            if store.visible_count(group, now + waiter.offset) <= state.pending:
                i += 1
                passed += 1
                continue
            del queue[i]
            state.pending += 1
            self.wakeups += 1
            waiter.future.set_result(True)
        if queue:
            self._arm_timer(group, state, now, look_ahead)
        elif not state.pending:
            if state.timer is not None:
                state.timer.cancel()
            del self._groups[group]

    def release_all(self) -> None:
        """Wake every waiter with no task (shutdown); new waits are refused."""
        self._closed = True
        for state in self._groups.values():
            if state.timer is not None:
                state.timer.cancel()
                state.timer = None
            for waiter in state.queue:
                if not waiter.future.done():
                    waiter.future.set_result(False)
                    state.pending += 1  # each resumes once, and counts itself off
            # Waiters cancelled but not yet departed still count themselves dead when they leave.
            state.queue = deque(w for w in state.queue if w.future.cancelled() and not w.departed)
            state.dead = 0

    def _arm_timer(self, group: str, state: _Group, now: int, look_ahead: int) -> None:
        """Make sure dispatch runs when one of the first waiters would see the next hidden task."""
        store = self._store
        size = store.group_size(group)
        due: int | None = None
        for waiter in islice(state.queue, look_ahead):
            if waiter.future.done():
                continue
            visible = store.visible_count(group, now + waiter.offset)
            if visible < size:  # else nothing is hidden from it: only a create or a resuming waiter can help
                seen_at = store.task_at(group, visible).not_before - waiter.offset  # on the server clock
                due = seen_at if due is None else min(due, seen_at)
        if due is None:
            return
        if state.timer is not None:
            if state.timer_at <= due:
                return
            state.timer.cancel()
        state.timer_at = due
        state.timer = asyncio.get_running_loop().call_later(max(due - now, 0) / 1e9, self._on_timer, group)

    def _on_timer(self, group: str) -> None:
        state = self._groups.get(group)
        if state is not None:
            state.timer = None
            self.dispatch(group)

    def _on_change(self, removed: list[int], created: list[StoredTask]) -> None:
        groups = self._groups
        if not groups:
            return
        touched = {task.group for task in created if task.group in groups}
        for group in touched:
            self.dispatch(group)

    def _check(self) -> None:
        """Assert every invariant; they hold between any two steps of the event loop, where tests call this.

        Every group kept has a queued waiter, a woken one that has not resumed,
        or a timer; ``pending`` is never negative; ``dead`` counts the departed
        entries in the queue; :attr:`count` is every queued, not departed
        waiter plus every woken one.
        """
        live = 0
        for group, state in self._groups.items():
            assert state.pending >= 0, (group, state.pending)
            departed = sum(1 for w in state.queue if w.departed)
            assert state.dead == departed, (group, state.dead, departed)
            assert all(w.future.done() for w in state.queue if w.departed), group
            waiting = len(state.queue) - departed
            assert waiting or state.pending or state.timer is not None, f"empty group {group!r} kept"
            if self._closed:
                assert not any(not w.future.done() for w in state.queue), f"{group!r} still waits after release_all"
            live += waiting + state.pending
        assert self.count == live, (self.count, live)
