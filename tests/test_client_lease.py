"""``run_with_lease`` against a real server: renewals on a fake clock, a stolen lease, write-back on error.

Heartbeats are driven by ``FakeClock``: a test waits until the heartbeat is asleep on the clock, then
advances it, so every renewal happens exactly when the test says, with no real sleeping. Stealing is
done the way it happens in production: a second worker whose clock is past the lease's expiry.
"""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from masstasker import (
    AsyncClient,
    Client,
    LeaseLost,
    SavedError,
    TaskNotFound,
    delete_or_move,
    is_saved_error,
    new_task,
    pack_data,
    unpack_data,
)
from masstasker._pb import masstasker_pb2 as pb
from masstasker.testing import FakeClock

T0 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
BEAT, OWN = 10, 30


def server_tasks(client: Client, group: str) -> list[pb.Task]:
    return list(client.rpc.Debug(pb.DebugRequest(group=group)).tasks)


def leased_task(client: Client, group: str = "work") -> pb.Task:
    """Create a task and lease it (at the client clock's now), as a worker's query would."""
    client.create(new_task(group, pb.Test(foo="payload")))
    return client.query(group, OWN)


# -- Client (threads) --------------------------------------------------------------------------------------------


def test_heartbeats_renew_the_lease_and_the_task_ends_with_the_current_id(masstasker_server: Any) -> None:
    clock = FakeClock(T0)
    with Client(masstasker_server.target, clock=clock) as client:
        task = leased_task(client)
        leased_id = task.id
        seen_ids: list[int] = []

        def work(job: pb.Task, lost: threading.Event) -> str:
            for _ in range(3):
                clock.wait_for_sleepers()  # the heartbeat is waiting for its next beat...
                clock.advance(BEAT)  # ...which is now
                seen_ids.append(job.id)
            clock.wait_for_sleepers()  # the third renewal is done: the heartbeat sleeps again
            assert not lost.is_set()
            return unpack_data(job, pb.Test).foo

        assert client.run_with_lease(task, work, heartbeat=BEAT, own_for=OWN) == "payload"
        assert seen_ids == [leased_id] * 3  # the work's view of the ID never moved under it
        assert task.id == leased_id + 3  # three renewals, three new IDs, the last one written back
        assert task.not_before.ToDatetime(tzinfo=UTC) == T0 + timedelta(seconds=3 * BEAT + OWN)
        assert server_tasks(client, "work") == [task]
        client.delete(task)  # the caller can commit with the ID it now holds
        assert server_tasks(client, "work") == []


def test_a_stolen_lease_tells_the_work_and_raises_lease_lost(masstasker_server: Any) -> None:
    clock = FakeClock(T0)
    later = FakeClock(T0 + timedelta(seconds=OWN + 1))  # a worker that sees the lease expired
    with Client(masstasker_server.target, clock=clock) as mine, Client(masstasker_server.target, clock=later) as thief:
        task = leased_task(mine)
        leased_id = task.id
        stolen: list[pb.Task] = []

        def work(job: pb.Task, lost: threading.Event) -> str:
            stolen.append(thief.query("work", OWN, wait=False))
            clock.wait_for_sleepers()
            clock.advance(BEAT)  # the renewal finds the ID gone
            assert lost.wait(timeout=30), "the work was not told"
            return "finished anyway"

        with pytest.raises(LeaseLost) as raised:
            mine.run_with_lease(task, work, heartbeat=BEAT, own_for=OWN)
        assert raised.value.task_id == leased_id
        assert isinstance(raised.value.__cause__, TaskNotFound)
        assert task.id == leased_id  # nothing new to write back
        assert server_tasks(mine, "work") == stolen  # the thief holds it, untouched by us
        with pytest.raises(TaskNotFound):
            mine.delete(task)  # and we cannot commit: the work is not done twice


def test_work_that_raises_still_gets_the_current_id_to_commit_with(masstasker_server: Any) -> None:
    clock = FakeClock(T0)
    with Client(masstasker_server.target, clock=clock) as client:
        task = leased_task(client)

        def work(job: pb.Task, lost: threading.Event) -> None:
            clock.wait_for_sleepers()
            clock.advance(BEAT)
            clock.wait_for_sleepers()
            raise SavedError(ValueError("malformed input"))

        with pytest.raises(SavedError) as raised:
            client.run_with_lease(task, work, heartbeat=BEAT, own_for=OWN)
        assert is_saved_error(raised.value)
        client.do(delete_or_move("errors", task)(raised.value))  # works only with the renewed ID
        assert server_tasks(client, "work") == []
        assert [t.error for t in server_tasks(client, "errors")] == ["malformed input"]


def test_the_heartbeat_keeps_a_lease_alive_on_the_real_clock(masstasker_client: Client) -> None:
    task = leased_task(masstasker_client)
    first = task.id

    def work(job: pb.Task, lost: threading.Event) -> int:
        # Wait (bounded) until the server shows two renewals; what the heartbeat interval is doesn't matter.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            current = server_tasks(masstasker_client, "work")[0].id
            if current >= first + 2:
                return current
            lost.wait(0.01)
        raise AssertionError("no renewals within 30s")

    seen = masstasker_client.run_with_lease(task, work, heartbeat=0.02, own_for=5)
    assert task.id >= seen
    assert server_tasks(masstasker_client, "work") == [task]


def test_lease_options_are_checked(masstasker_client: Client) -> None:
    task = leased_task(masstasker_client)
    with pytest.raises(ValueError, match="heartbeat"):
        masstasker_client.run_with_lease(task, lambda job, lost: None, heartbeat=30, own_for=30)
    with pytest.raises(ValueError, match="no ID"):
        masstasker_client.run_with_lease(new_task("g"), lambda job, lost: None)


# -- AsyncClient (tasks) -----------------------------------------------------------------------------------------


def test_async_heartbeats_renew_the_lease(masstasker_server: Any) -> None:
    clock = FakeClock(T0)

    async def main() -> None:
        async with AsyncClient(masstasker_server.target, clock=clock) as client:
            await client.create(new_task("work", pb.Test(foo="payload")))
            task = await client.query("work", OWN)
            leased_id = task.id

            async def work(job: pb.Task, lost: asyncio.Event) -> str:
                for _ in range(2):
                    await clock.wait_for_sleepers_async()
                    clock.advance(BEAT)
                await clock.wait_for_sleepers_async()
                assert job.id == leased_id
                return unpack_data(job, pb.Test).foo

            assert await client.run_with_lease(task, work, heartbeat=BEAT, own_for=OWN) == "payload"
            assert task.id == leased_id + 2
            assert task.not_before.ToDatetime(tzinfo=UTC) == T0 + timedelta(seconds=2 * BEAT + OWN)
            debug = await client.rpc.Debug(pb.DebugRequest(group="work"))
            assert list(debug.tasks) == [task]

    asyncio.run(main())


def test_async_stolen_lease_cancels_the_work(masstasker_server: Any) -> None:
    clock = FakeClock(T0)
    later = FakeClock(T0 + timedelta(seconds=OWN + 1))

    async def main() -> None:
        async with (
            AsyncClient(masstasker_server.target, clock=clock) as mine,
            AsyncClient(masstasker_server.target, clock=later) as thief,
        ):
            await mine.create(new_task("work"))
            task = await mine.query("work", OWN)
            leased_id = task.id
            cancelled = asyncio.Event()

            async def work(job: pb.Task, lost: asyncio.Event) -> None:
                await thief.query("work", OWN, wait=False)
                await clock.wait_for_sleepers_async()
                assert not lost.is_set()
                clock.advance(BEAT)
                try:
                    await asyncio.Event().wait()  # "long work": only cancellation ends it
                except asyncio.CancelledError:
                    if lost.is_set():  # told why, as the sync client's work is
                        cancelled.set()
                    raise

            with pytest.raises(LeaseLost):
                await mine.run_with_lease(task, work, heartbeat=BEAT, own_for=OWN)
            assert cancelled.is_set()
            assert task.id == leased_id
            with pytest.raises(TaskNotFound):
                await mine.delete(task)

    asyncio.run(main())


def test_async_work_errors_and_cancellation_leave_the_current_id(masstasker_server: Any) -> None:
    clock = FakeClock(T0)

    async def main() -> None:
        async with AsyncClient(masstasker_server.target, clock=clock) as client:
            await client.create(new_task("work"), new_task("work"))

            task = await client.query("work", OWN)
            first = task.id

            async def failing(job: pb.Task, lost: asyncio.Event) -> None:
                await clock.wait_for_sleepers_async()
                clock.advance(BEAT)
                await clock.wait_for_sleepers_async()
                raise SavedError("bad")

            with pytest.raises(SavedError):
                await client.run_with_lease(task, failing, heartbeat=BEAT, own_for=OWN)
            assert task.id > first
            await client.delete(task)  # the written-back ID is live

            other = await client.query("work", OWN)
            started = asyncio.Event()

            async def endless(job: pb.Task, lost: asyncio.Event) -> None:
                started.set()
                await asyncio.Event().wait()

            running = asyncio.ensure_future(client.run_with_lease(other, endless, heartbeat=BEAT, own_for=OWN))
            await started.wait()
            await clock.wait_for_sleepers_async()
            clock.advance(BEAT)
            await clock.wait_for_sleepers_async()  # renewed once; now cancel the whole thing
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
            pack_data(other, pb.Test(foo="still mine"))
            await client.update(other)  # the ID written back on cancellation is the live one

    asyncio.run(main())
