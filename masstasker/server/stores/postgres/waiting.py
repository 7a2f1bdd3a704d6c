"""Waiting Queries on the PostgreSQL store: per group, first come first served, one taker at a time.

Tasks can appear through any server, so a waiter cannot be handed a task the
way the in-memory store does: it has to try to take one from the database.
Per group, the waiters of this server queue in arrival order and one at a
time gets a *turn* to try (``take``), so one task goes to one waiter and
waiters are served in order. What starts a round of turns (a *signal*):

- a notification for the group (any server created or moved a task into it),
- the group's timer, set for when the next hidden task becomes visible,
- a waiter took tasks and the database showed more visible behind them,
- this server's fallback poll (every second or so): a lost notification, or a
  pooler that drops them, can delay a waiter but never strand it.

A round starts at the front of the queue. A waiter that finds nothing keeps
its place and the turn passes to the next waiter whose clock is ahead of
every clock tried so far in the round (one whose clock is the same or behind
would find nothing either): a client whose clock is behind cannot hold up the
group, and waiters with the same clock cost one query per round.

A waiter takes its tasks itself, inside its own call: if the call is
cancelled before the take commits, the take rolls back and the task stays.
Each waiter sees time as the server clock plus the offset its request's
``now`` had, as in memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from itertools import islice
from typing import TypeVar

from masstasker.server.stores.base import StoreUnavailable

__all__ = ["PgWaiters"]

T = TypeVar("T")

#: take(now) -> (the tasks taken, whether more were visible behind them).
Take = Callable[[int], Awaitable[tuple[list[T], bool]]]
#: next_hidden(now) -> not_before of the group's first task not visible at ``now``, or None.
NextHidden = Callable[[int], Awaitable[int | None]]

# How far into the queue a round looks for a waiter whose clock is ahead.
_LOOK_AHEAD = 64
# What starts a round: an event (notification, timer, more tasks), the fallback poll, or a waiter
# arriving. A signal during a turn is kept for after it, the most telling cause first.
EVENT, POLL, ARRIVAL = "event", "poll", "arrival"
_PRIORITY = {POLL: 0, ARRIVAL: 1, EVENT: 2}


class _Waiter:
    __slots__ = ("offset", "turn")

    def __init__(self, turn: asyncio.Future[None], offset: int) -> None:
        self.turn = turn  # resolved when it is this waiter's turn to try
        self.offset = offset


class _Group:
    __slots__ = ("busy", "cause", "pending", "queue", "round_max", "timer", "timer_at")

    def __init__(self) -> None:
        self.queue: deque[_Waiter] = deque()
        self.busy = False  # a waiter of this group has the turn
        self.cause = EVENT  # what started the current round
        self.pending: str | None = None  # a signal that came during a turn: a new round after it
        self.round_max: int | None = None  # the largest clock offset that found nothing this round
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0


class PgWaiters:
    """Every waiting Query of one server on the PostgreSQL store. Use from the server's event loop only."""

    def __init__(self, clock: Callable[[], int], poll_interval: float) -> None:
        self._clock = clock
        self.poll_interval = poll_interval
        self._groups: dict[str, _Group] = {}
        self._closed: StoreUnavailable | None = None
        self._poller: asyncio.Task[None] | None = None
        self.count = 0  # waiting calls, for metrics and limits
        # Turns given, ever, by cause (tests check there is no thundering herd): a notification, a
        # timer or more tasks behind a taken one; and the fallback poll.
        self.wakeups = 0
        self.polls = 0

    def __len__(self) -> int:
        return self.count

    def start(self) -> None:
        """Start the fallback poll."""
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="masstasker-pg-poll")

    async def close(self) -> None:
        """Stop the poll; waiters still waiting are released."""
        self.release_all(StoreUnavailable("the server is shutting down"))
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None

    def reopen(self) -> None:
        """Accept waiters again after :meth:`release_all` (the database is back)."""
        self._closed = None

    async def wait(
        self, group: str, offset: int, take: Take[T], next_hidden: NextHidden, timeout: float | None
    ) -> list[T]:
        """Wait until ``take(now)`` returns tasks; ``now`` is the server clock plus ``offset``.

        Raises TimeoutError after ``timeout`` seconds (None: never) and
        :class:`StoreUnavailable` when the waiters are released.
        """
        if self._closed is not None:
            raise self._closed
        state = self._groups.get(group)
        if state is None:
            state = self._groups[group] = _Group()
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), offset)
        # The caller looked just before calling, but a notification that came meanwhile found no one
        # to wake. Look once more, unless a waiter already queued looks on our behalf: one whose clock
        # is as far ahead as ours sees at least what we would.
        look = all(w.offset < offset for w in islice(state.queue, _LOOK_AHEAD) if not w.turn.done())
        state.queue.append(waiter)
        self.count += 1
        holding = False  # we have the turn and have not passed it on
        used: asyncio.Future[None] | None = None  # the last turn we resumed with
        try:
            async with asyncio.timeout(timeout):
                if look:
                    self.signal(group, ARRIVAL)
                while True:
                    await waiter.turn
                    used = waiter.turn
                    holding = True
                    now = self._clock() + offset
                    tasks, more = await take(now)
                    if tasks:
                        holding = False
                        self._end_turn(group, state, EVENT if more else None, pass_on=False)
                        return tasks
                    due = await next_hidden(now)
                    if self._closed is not None:  # released while we looked: our group state is gone
                        raise self._closed
                    if due is not None:
                        self._arm_timer(group, state, due - offset)
                    # Keep our place at the front, and pass the turn on.
                    holding = False
                    waiter.turn = loop.create_future()
                    state.queue.appendleft(waiter)
                    state.round_max = offset if state.round_max is None else max(state.round_max, offset)
                    self._end_turn(group, state, None, pass_on=True)
        finally:
            self.count -= 1
            turn = waiter.turn
            if not turn.done():
                turn.cancel()  # still queued: the next round drops it
            elif turn is not used and not turn.cancelled() and turn.exception() is None:
                holding = True  # given the turn, but cancelled before we resumed to use it
            if holding:  # whatever we would have seen is still there: the next in line looks
                self._end_turn(group, state, EVENT, pass_on=False)

    def signal(self, group: str | None, cause: str = EVENT) -> None:
        """Start a round for ``group`` (None: every group), or one after the current turn."""
        if group is None:
            for name in list(self._groups):
                self.signal(name, cause)
            return
        state = self._groups.get(group)
        if state is None:
            return
        if state.busy:
            if state.pending is None or _PRIORITY[cause] > _PRIORITY[state.pending]:
                state.pending = cause
            return
        state.round_max = None
        state.cause = cause
        self._next_turn(group, state)

    def _end_turn(self, group: str, state: _Group, again: str | None, *, pass_on: bool) -> None:
        """The turn is over. ``again``: start a new round for this cause; else ``pass_on`` the turn in this round."""
        state.busy = False
        if state.pending is not None and (again is None or _PRIORITY[state.pending] > _PRIORITY[again]):
            again = state.pending
        state.pending = None
        if self._groups.get(group) is not state:  # released meanwhile
            return
        if again is not None:
            self.signal(group, again)
        elif pass_on:
            self._next_turn(group, state)
        elif not any(not w.turn.done() for w in state.queue):
            self._next_turn(group, state)  # nobody left: drops the group

    def _next_turn(self, group: str, state: _Group) -> None:
        """Give the turn to the first waiter whose clock is ahead of every failed one this round."""
        queue = state.queue
        while queue and queue[0].turn.done():  # departed
            queue.popleft()
        for i, waiter in enumerate(islice(queue, _LOOK_AHEAD)):
            if waiter.turn.done():
                continue
            if state.round_max is None or waiter.offset > state.round_max:
                del queue[i]
                state.busy = True
                if state.cause == EVENT:
                    self.wakeups += 1
                elif state.cause == POLL:
                    self.polls += 1
                waiter.turn.set_result(None)
                return
        if not queue and self._groups.get(group) is state:
            if state.timer is not None:
                state.timer.cancel()
            del self._groups[group]

    def _check(self) -> None:
        """Assert the invariants (tests call this on the loop)."""
        assert self.count >= 0, self.count
        for group, state in self._groups.items():
            live = sum(1 for w in state.queue if not w.turn.done())
            assert live <= self.count, (group, live, self.count)

    def release_all(self, error: StoreUnavailable) -> None:
        """Fail every waiter with ``error``; new waits fail too until :meth:`reopen`."""
        self._closed = error
        for state in self._groups.values():
            if state.timer is not None:
                state.timer.cancel()
                state.timer = None
            for waiter in state.queue:
                if not waiter.turn.done():
                    waiter.turn.set_exception(error)
            state.queue.clear()
        self._groups.clear()

    def _arm_timer(self, group: str, state: _Group, due: int) -> None:
        """Signal the group at ``due`` (server clock, ns), unless a timer fires earlier."""
        if state.timer is not None:
            if state.timer_at <= due:
                return
            state.timer.cancel()
        state.timer_at = due
        delay = max(due - self._clock(), 0) / 1e9
        state.timer = asyncio.get_running_loop().call_later(delay, self._on_timer, group)

    def _on_timer(self, group: str) -> None:
        state = self._groups.get(group)
        if state is not None:
            state.timer = None
            self.signal(group, EVENT)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            self.signal(None, POLL)
