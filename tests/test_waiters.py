"""The wait queues on their own: Waiters over a Store, a clock moved by hand, no gRPC.

Each test runs one event loop; the waiters' invariants (``Waiters._check``) are
asserted after every step that changes them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
from clocks import HandClock

from masstasker.server.body import error_of
from masstasker.server.stores.memory.store import NANOS_PER_SECOND, Store, StoredTask, TaskSpec
from masstasker.server.stores.memory.waiters import ShuttingDown, Waiters

R = TypeVar("R")
NOW = 1_000 * NANOS_PER_SECOND
OWN = 60 * NANOS_PER_SECOND
HOUR = 3600 * NANOS_PER_SECOND
STEP = 5.0  # seconds any single await here may take, on a loaded machine


class Bench:
    """A store, its waiters and the clock they share."""

    def __init__(self) -> None:
        self.clock = HandClock(NOW)
        self.store = Store(self.clock)
        self.waiters = Waiters(self.store, self.clock)
        self.taken: list[str] = []  # which waiter took what, in order

    def create(self, group: str = "g", not_before: int | None = None, body: bytes = b"") -> int:
        [task_id] = self.store.update([TaskSpec(group, not_before, body, None, error_of(body) != "")])
        return task_id

    def wait(
        self, name: str, group: str = "g", *, offset: int = 0, own_for: int = OWN, timeout: float | None = STEP
    ) -> asyncio.Task[list[StoredTask]]:
        """Start a waiting Query as an asyncio task; ``name`` is recorded when it takes a task."""

        def take(now: int) -> list[StoredTask]:
            tasks = self.store.query(group, now, own_for)
            if tasks:
                self.taken.append(name)
            return tasks

        return asyncio.ensure_future(self.waiters.wait(group, offset, take, timeout))

    async def settle(self) -> None:
        """Let every ready callback run (woken waiters resume), then check the invariants."""
        for _ in range(5):
            await asyncio.sleep(0)
        self.check()

    async def until_waiting(self, count: int) -> None:
        for _ in range(100):
            if self.waiters.count == count:
                break
            await asyncio.sleep(0)
        assert self.waiters.count == count
        self.check()

    def check(self) -> None:
        self.waiters._check()
        self.store._check()


def run(body: Callable[[Bench], Awaitable[R]]) -> R:
    async def main() -> R:
        bench = Bench()
        result = await asyncio.wait_for(body(bench), 30)
        await bench.settle()
        return result

    return asyncio.run(main())


def test_waiters_are_served_in_arrival_order() -> None:
    async def body(bench: Bench) -> None:
        waiting = [bench.wait(name) for name in "abc"]
        await bench.until_waiting(3)
        for i in range(3):
            bench.create(body=bytes([0x32, 1, ord("0") + i]))  # a body whose error is "0", "1", "2"
            await bench.settle()
        results = [error_of((await asyncio.wait_for(w, STEP))[0].body) for w in waiting]
        assert bench.taken == ["a", "b", "c"] and results == ["0", "1", "2"]
        assert bench.waiters.count == 0

    run(body)


def test_one_task_wakes_one_waiter() -> None:
    async def body(bench: Bench) -> None:
        waiting = [bench.wait(str(i)) for i in range(5)]
        await bench.until_waiting(5)
        bench.create()
        await bench.settle()
        assert bench.waiters.wakeups == 1, "no thundering herd"
        assert [w.done() for w in waiting] == [True, False, False, False, False]
        bench.store.update([TaskSpec("g", None)] * 4)
        await asyncio.wait_for(asyncio.gather(*waiting), STEP)
        assert bench.waiters.wakeups == 5 and bench.taken == ["0", "1", "2", "3", "4"]

    run(body)


def test_a_cancelled_waiter_never_takes_a_task() -> None:
    async def body(bench: Bench) -> None:
        gone, stays = bench.wait("gone"), bench.wait("stays")
        await bench.until_waiting(2)
        gone.cancel()
        bench.check()  # cancelled, its wait() not unwound yet: still counted, not yet dead
        task_id = bench.create()  # dispatched in the same step, before the cancelled waiter unwinds
        await bench.settle()
        [owned] = await asyncio.wait_for(stays, STEP)
        assert bench.taken == ["stays"] and owned.id == task_id + 1
        assert gone.cancelled()

    run(body)


def test_a_waiter_that_finds_nothing_keeps_its_place() -> None:
    async def body(bench: Bench) -> None:
        first, second = bench.wait("first"), bench.wait("second")
        await bench.until_waiting(2)
        bench.create()
        # Someone outside the queue (a non-waiting Query) owns the task before the woken waiter resumes.
        assert bench.store.query("g", NOW, OWN)
        await bench.settle()
        assert bench.waiters.count == 2 and not first.done()
        bench.create()
        await bench.settle()
        assert bench.taken == ["first"] and not second.done()
        second.cancel()

    run(body)


def test_a_timer_wakes_a_waiter_when_not_before_arrives() -> None:
    async def body(bench: Bench) -> None:
        due = NOW + NANOS_PER_SECOND // 20
        bench.create(not_before=due)
        waiter = bench.wait("w")
        await bench.until_waiting(1)
        state = bench.waiters._groups["g"]
        assert state.timer is not None and state.timer_at == due, "armed for the moment the task turns visible"
        bench.clock.now = due  # the timer fires ~50 ms of real time later and reads this clock
        [owned] = await asyncio.wait_for(waiter, STEP)
        assert owned.not_before == due + OWN
        assert "g" not in bench.waiters._groups, "the group's wait state is gone with its last waiter"

    run(body)


def test_a_timer_set_too_early_is_set_again() -> None:
    async def body(bench: Bench) -> None:
        due = NOW + NANOS_PER_SECOND // 50
        bench.create(not_before=due)
        waiter = bench.wait("w")
        await bench.until_waiting(1)
        await asyncio.sleep(0.1)  # the timer fired, but the hand-moved clock has not reached ``due``
        bench.check()
        assert not waiter.done() and bench.waiters._groups["g"].timer is not None
        bench.clock.now = due
        await asyncio.wait_for(waiter, STEP)

    run(body)


def test_a_waiter_whose_clock_is_behind_does_not_hold_up_the_group() -> None:
    async def body(bench: Bench) -> None:
        behind = bench.wait("behind", offset=-HOUR)
        prompt = bench.wait("prompt")
        await bench.until_waiting(2)
        bench.create()  # visible now on the server's clock, an hour in the future of the first waiter's
        await bench.settle()
        await asyncio.wait_for(prompt, STEP)
        assert bench.taken == ["prompt"] and not behind.done()
        assert bench.waiters._groups["g"].timer is not None, "armed for when the late waiter sees a task"
        bench.clock.now += HOUR + OWN
        bench.create()  # any change dispatches: the late waiter now sees the lease that ended
        [owned] = await asyncio.wait_for(behind, STEP)
        assert bench.taken == ["prompt", "behind"] and owned.not_before == NOW + OWN + OWN

    run(body)


def test_a_peek_leaves_the_task_for_the_next_waiter() -> None:
    async def body(bench: Bench) -> None:
        peeks = [bench.wait(str(i), own_for=0) for i in range(3)]
        await bench.until_waiting(3)
        bench.create()
        results = await asyncio.wait_for(asyncio.gather(*peeks), STEP)
        assert [r[0].id for r in results] == [1, 1, 1]

    run(body)


def test_a_timeout_leaves_a_dead_entry_that_is_dropped() -> None:
    async def body(bench: Bench) -> None:
        keeps = bench.wait("keeps")
        await bench.until_waiting(1)
        leaves = bench.wait("leaves", timeout=0.01)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(leaves, STEP)
        bench.check()
        assert bench.waiters.count == 1
        bench.create()
        await asyncio.wait_for(keeps, STEP)
        assert bench.taken == ["keeps"]

    run(body)


def test_release_all_wakes_every_waiter_with_nothing() -> None:
    async def body(bench: Bench) -> None:
        waiting = [bench.wait(group) for group in ("a", "a", "b")]
        bench.create("a", not_before=NOW + HOUR)  # a timer is armed for "a"
        await bench.until_waiting(3)
        bench.waiters.release_all()
        bench.check()
        for waiter in waiting:
            with pytest.raises(ShuttingDown):
                await asyncio.wait_for(waiter, STEP)
        bench.check()
        assert bench.waiters.count == 0 and not bench.waiters._groups
        with pytest.raises(ShuttingDown):
            await bench.wait("late")
        assert bench.taken == []

    run(body)


def test_a_waiter_woken_just_before_release_all_does_not_wait_again() -> None:
    async def body(bench: Bench) -> None:
        waiter = bench.wait("w")
        await bench.until_waiting(1)
        bench.create()  # wakes it; it has not resumed yet
        assert bench.store.query("g", NOW, OWN)  # and the task is gone when it does
        bench.waiters.release_all()
        with pytest.raises(ShuttingDown):
            await asyncio.wait_for(waiter, STEP)
        assert bench.waiters.count == 0 and not bench.waiters._groups

    run(body)
