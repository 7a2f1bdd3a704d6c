"""Waiting Queries on the PostgreSQL store: per group, first come first served, one taker at a time.

Tasks can appear through any server, so a waiter cannot be told "here is
your task" the way the in-memory store does: it has to try to take one from
the database. Per group, the waiters of this server queue in arrival order
and only the front one tries (``take``), so one task goes to one waiter and
waiters are served in order. What makes the front one try again (a *signal*):

- a notification for the group (any server created or moved a task into it),
- this server's fallback poll (every second or so: a lost notification, or a
  pooler that drops them, can delay a waiter but never strand it),
- the group's timer, set for when the next hidden task becomes visible to it,
- the front waiter got tasks (there may be more for the next one) or left.

A waiter takes its tasks itself, inside its own call: if the call is
cancelled before the take commits, the take rolls back and the task stays.
Each waiter sees time as the server clock plus the offset its request's
``now`` had, as in memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

from masstasker.server.stores.base import StoreUnavailable

__all__ = ["PgWaiters"]

T = TypeVar("T")

#: take(group, now) -> the tasks taken, or an empty list.
Take = Callable[[str, int], Awaitable[list[T]]]
#: next_hidden(group, now) -> not_before of the first task not visible at ``now``, or None.
NextHidden = Callable[[str, int], Awaitable[int | None]]


class _Waiter:
    __slots__ = ("offset", "turn")

    def __init__(self, turn: asyncio.Future[None], offset: int) -> None:
        self.turn = turn  # resolved when it is this waiter's turn to try
        self.offset = offset


class _Group:
    __slots__ = ("busy", "queue", "signalled", "timer", "timer_at")

    def __init__(self) -> None:
        self.queue: deque[_Waiter] = deque()
        self.busy = False  # a waiter of this group is trying right now
        self.signalled = False  # a signal came while it was: try again after it
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0


class PgWaiters:
    """Every waiting Query of one server on the PostgreSQL store. Use from the server's event loop only."""

    def __init__(self, clock: Callable[[], int], poll_interval: float) -> None:
        self._clock = clock
        self._poll_interval = poll_interval
        self._groups: dict[str, _Group] = {}
        self._closed: StoreUnavailable | None = None
        self._poller: asyncio.Task[None] | None = None
        self.count = 0  # waiting calls, for metrics and limits

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
        self,
        group: str,
        offset: int,
        take: Callable[[int], Awaitable[list[T]]],
        next_hidden: NextHidden,
        timeout: float | None,
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
        state.queue.append(waiter)
        self.count += 1
        trying = False
        try:
            async with asyncio.timeout(timeout):
                # Try at once: a task may have arrived between the caller's own try and now.
                self.signal(group)
                while True:
                    await waiter.turn
                    trying = True
                    state.signalled = False
                    now = self._clock() + offset
                    tasks = await take(now)
                    if tasks:
                        return tasks
                    due = await next_hidden(group, now)
                    if self._closed is not None:  # released while we looked: our group state is gone
                        raise self._closed
                    if due is not None:
                        self._arm_timer(group, state, due - offset)
                    trying = False
                    state.busy = False
                    waiter.turn = loop.create_future()
                    state.queue.appendleft(waiter)  # keep our place at the front
                    if state.signalled:  # something happened while we looked: look again
                        self.signal(group)
        finally:
            self.count -= 1
            if trying:
                state.busy = False
            elif not waiter.turn.done():
                waiter.turn.cancel()  # still queued: signal() drops it
            elif not waiter.turn.cancelled() and waiter.turn.exception() is None:
                state.busy = False  # given the turn but left before using it
            # Whatever is left (more tasks, a turn we did not use) goes to the next in line.
            self.signal(group)

    def signal(self, group: str | None) -> None:
        """Let the front waiter of ``group`` (None: of every group) try again."""
        if group is None:
            for name in list(self._groups):
                self.signal(name)
            return
        state = self._groups.get(group)
        if state is None:
            return
        if state.busy:
            state.signalled = True
            return
        queue = state.queue
        while queue:
            waiter = queue.popleft()
            if waiter.turn.done():  # departed
                continue
            state.busy = True
            waiter.turn.set_result(None)
            return
        if state.timer is not None:
            state.timer.cancel()
        del self._groups[group]

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
            self.signal(group)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            self.signal(None)
