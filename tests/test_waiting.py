"""Waiting Queries (wait=true): woken by events, FIFO, one task per waiter, deadlines, cancellation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from masstasker._pb import masstasker_pb2 as pb
from masstasker._pb import masstasker_pb2_grpc as pb_grpc
from masstasker.server import BackgroundServer, Server
from masstasker.testing import run_server_process

Code = grpc.StatusCode
R = TypeVar("R")
OWN = Duration(seconds=60)


def ts_ns(nanos: int) -> Timestamp:
    out = Timestamp()
    out.FromNanoseconds(nanos)
    return out


def run(server: BackgroundServer, body: Callable[[pb_grpc.MassTaskerStub], Awaitable[R]]) -> R:
    """Run ``body(stub)`` with an asyncio stub connected to ``server``."""

    async def main() -> R:
        async with grpc.aio.insecure_channel(server.target) as channel:
            return await asyncio.wait_for(body(pb_grpc.MassTaskerStub(channel)), 30)

    result = asyncio.run(main())
    if server.server is not None:  # still running
        check_waiters(server)
    return result


def check_waiters(server: BackgroundServer) -> None:
    """Assert the invariants of the server's waiting Queries (they hold between any two event-loop steps)."""

    def check(s: Server) -> None:
        s.waiters._check()
        s.admission._check()
        assert s.admission.total == s.waiters.count, "every waiting Query was admitted, and holds one slot"

    server.call(check)


async def until_waiting(server: BackgroundServer, count: int) -> None:
    """Return once the server holds exactly ``count`` waiting Queries (polled, bounded); check the invariants."""
    deadline = time.monotonic() + 10
    while server.call(lambda s: s.waiters.count) != count:
        assert time.monotonic() < deadline, f"never reached {count} waiters"
        await asyncio.sleep(0.005)
    check_waiters(server)


def wakeups(server: BackgroundServer) -> int:
    return int(server.call(lambda s: s.waiters.wakeups))


def create(stub: pb_grpc.MassTaskerStub, group: str, **fields: object) -> Awaitable[pb.UpdateResponse]:
    return stub.Update(pb.UpdateRequest(created=[pb.Task(group=group, **fields)]))  # type: ignore[arg-type]


def test_waiter_is_woken_by_a_create(server: BackgroundServer) -> None:
    async def body(stub: pb_grpc.MassTaskerStub) -> float:
        waiter = asyncio.ensure_future(stub.Query(pb.QueryRequest(group="g", wait=True, own_for=OWN)))
        await until_waiting(server, 1)
        start = time.monotonic()
        [task_id] = (await create(stub, "g")).created_ids
        response = await waiter
        assert response.task.id == task_id + 1, "the waiter owns the task it was woken for"
        return time.monotonic() - start

    assert run(server, body) < 1.0


def test_empty_and_unknown_groups_wait_rather_than_fail(server: BackgroundServer) -> None:
    async def body(stub: pb_grpc.MassTaskerStub) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Query(pb.QueryRequest(group="never-seen", wait=True), timeout=0.3)
        assert info.value.code() == Code.DEADLINE_EXCEEDED
        await until_waiting(server, 0)

    run(server, body)


def test_waiter_is_woken_when_not_before_arrives(server: BackgroundServer) -> None:
    async def body(stub: pb_grpc.MassTaskerStub) -> float:
        due = time.time_ns() + 300_000_000
        await create(stub, "g", not_before=ts_ns(due))
        response = await stub.Query(pb.QueryRequest(group="g", wait=True))
        assert response.task.id == 1
        return (time.time_ns() - due) / 1e9

    late = run(server, body)
    assert 0 <= late < 1.0


def test_waiter_follows_its_own_clock(server: BackgroundServer) -> None:
    """A client with a fake clock (far from the server's) keeps its own timeline while it waits."""
    fake_now = 1_000_000_000_000_000_000  # 2001, in ns

    async def body(stub: pb_grpc.MassTaskerStub) -> None:
        await create(stub, "g", not_before=ts_ns(fake_now + 200_000_000))
        start = time.monotonic()
        response = await stub.Query(pb.QueryRequest(group="g", wait=True, now=ts_ns(fake_now), own_for=OWN))
        assert time.monotonic() - start >= 0.15
        owned_until = response.task.not_before.ToNanoseconds()
        assert fake_now + 60 * 10**9 + 150_000_000 < owned_until < fake_now + 61 * 10**9

    run(server, body)


def test_a_waiter_whose_clock_is_behind_does_not_hold_up_the_group(server: BackgroundServer) -> None:
    """First in line with a clock an hour behind: it cannot see new tasks yet, the waiters after it can."""
    hour = 3600 * 10**9

    async def body(stub: pb_grpc.MassTaskerStub) -> None:
        behind = stub.Query(pb.QueryRequest(group="g", wait=True, own_for=OWN, now=ts_ns(time.time_ns() - hour)))
        skewed = asyncio.ensure_future(behind)
        await until_waiting(server, 1)
        prompt = asyncio.ensure_future(stub.Query(pb.QueryRequest(group="g", wait=True, own_for=OWN)))
        await until_waiting(server, 2)
        await create(stub, "g", error="now")
        assert (await prompt).task.error == "now"
        # A task due in 0.3 s wakes the next prompt waiter by timer, not the skewed one.
        later = asyncio.ensure_future(stub.Query(pb.QueryRequest(group="g", wait=True, own_for=OWN)))
        await until_waiting(server, 2)
        start = time.monotonic()
        await create(stub, "g", error="soon", not_before=ts_ns(time.time_ns() + 300_000_000))
        assert (await later).task.error == "soon"
        assert 0.2 < time.monotonic() - start < 2.0
        assert not skewed.done(), "the skewed waiter saw a task that is an hour in its future"
        behind.cancel()
        await until_waiting(server, 0)

    run(server, body)


def test_task_in_another_group_does_not_wake(server: BackgroundServer) -> None:
    async def body(stub: pb_grpc.MassTaskerStub) -> None:
        waiter = asyncio.ensure_future(stub.Query(pb.QueryRequest(group="a", wait=True, own_for=OWN)))
        await until_waiting(server, 1)
        await create(stub, "b")
        await create(stub, "a")
        response = await waiter
        assert response.task.group == "a"
        untouched = await stub.Debug(pb.DebugRequest(group="b"))
        assert [t.id for t in untouched.tasks] == [1]

    run(server, body)
    assert wakeups(server) == 1


def test_waiters_are_served_first_come_first_served(server: BackgroundServer) -> None:
    async def body(stub: pb_grpc.MassTaskerStub) -> None:
        waiters = []
        for i in range(5):
            waiters.append(asyncio.ensure_future(stub.Query(pb.QueryRequest(group="g", wait=True, own_for=OWN))))
            await until_waiting(server, i + 1)
        for i in range(5):
            await create(stub, "g", error=str(i))
        results = [(await w).task.error for w in waiters]
        assert results == ["0", "1", "2", "3", "4"]

    run(server, body)


def test_one_task_wakes_one_waiter(server: BackgroundServer) -> None:
    async def body(stub: pb_grpc.MassTaskerStub) -> None:
        waiters = [
            asyncio.ensure_future(stub.Query(pb.QueryRequest(group="g", wait=True, own_for=OWN))) for _ in range(10)
        ]
        await until_waiting(server, 10)
        await create(stub, "g")
        done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1
        await until_waiting(server, 9)
        assert wakeups(server) == 1, "no thundering herd: the nine others were never woken"
        await stub.Update(pb.UpdateRequest(created=[pb.Task(group="g") for _ in range(9)]))
        await asyncio.gather(*pending)
        assert wakeups(server) == 10

    run(server, body)


def test_two_hundred_waiters_two_hundred_tasks(server: BackgroundServer) -> None:
    async def body(stub: pb_grpc.MassTaskerStub) -> None:
        waiters = [
            asyncio.ensure_future(stub.Query(pb.QueryRequest(group="g", wait=True, own_for=OWN))) for _ in range(200)
        ]
        await until_waiting(server, 200)
        started = time.time()
        for i in range(200):
            await create(stub, "g", error=str(i))
        got = sorted(int(r.task.error) for r in await asyncio.gather(*waiters))
        assert got == list(range(200)), "each task went to exactly one waiter"
        debug = await stub.Debug(pb.DebugRequest(group="g"))
        # Each one owned (for OWN), not peeked: measured from the start, so a loaded machine cannot fail it.
        assert debug.num_tasks == 200 and all(t.not_before.seconds > started + 50 for t in debug.tasks)

    run(server, body)


def test_cancelled_waiter_takes_nothing(server: BackgroundServer) -> None:
    async def body(stub: pb_grpc.MassTaskerStub) -> None:
        call = stub.Query(pb.QueryRequest(group="g", wait=True, own_for=OWN))
        task = asyncio.ensure_future(call)
        await until_waiting(server, 1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until_waiting(server, 0)
        [task_id] = (await create(stub, "g")).created_ids
        debug = await stub.Debug(pb.DebugRequest(group="g"))
        assert [t.id for t in debug.tasks] == [task_id], "the departed waiter must not own the task"
        response = await stub.Query(pb.QueryRequest(group="g", wait=True, own_for=OWN))
        assert response.task.id == task_id + 1

    run(server, body)


def test_deadline_gives_deadline_exceeded(server: BackgroundServer) -> None:
    async def body(stub: pb_grpc.MassTaskerStub) -> None:
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Query(pb.QueryRequest(group="g", wait=True, own_for=OWN), timeout=0.2)
        assert info.value.code() == Code.DEADLINE_EXCEEDED
        assert time.monotonic() - start < 5
        await until_waiting(server, 0)
        await create(stub, "g")
        assert (await stub.Debug(pb.DebugRequest(group="g"))).tasks[0].id == 1

    run(server, body)


def test_peek_waiters_all_see_the_task(server: BackgroundServer) -> None:
    async def body(stub: pb_grpc.MassTaskerStub) -> None:
        waiters = [asyncio.ensure_future(stub.Query(pb.QueryRequest(group="g", wait=True))) for _ in range(3)]
        await until_waiting(server, 3)
        await create(stub, "g")
        assert [(await w).task.id for w in waiters] == [1, 1, 1]

    run(server, body)


def test_batch_waiter_returns_once_one_task_is_visible(server: BackgroundServer) -> None:
    async def body(stub: pb_grpc.MassTaskerStub) -> None:
        waiter = asyncio.ensure_future(
            stub.Query(pb.QueryRequest(group="g", wait=True, own_for=OWN, max_tasks=50)),
        )
        await until_waiting(server, 1)
        await stub.Update(pb.UpdateRequest(created=[pb.Task(group="g"), pb.Task(group="g")]))
        response = await waiter
        assert [t.id for t in response.tasks] == [3, 4]

    run(server, body)


def test_task_moved_into_a_group_wakes_its_waiter(server: BackgroundServer) -> None:
    async def body(stub: pb_grpc.MassTaskerStub) -> None:
        await create(stub, "errors")
        waiter = asyncio.ensure_future(stub.Query(pb.QueryRequest(group="main", wait=True, own_for=OWN)))
        await until_waiting(server, 1)
        await stub.BulkSet(pb.BulkSetRequest(ref=[pb.TaskRef(group="errors")], prototype=pb.Task(group="main")))
        assert (await waiter).task.group == "main"

    run(server, body)


def test_shutdown_releases_waiters_with_unavailable(make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server()

    async def body(stub: pb_grpc.MassTaskerStub) -> None:
        waiter = asyncio.ensure_future(stub.Query(pb.QueryRequest(group="g", wait=True)))
        await until_waiting(server, 1)
        stopping = asyncio.get_running_loop().run_in_executor(None, server.stop, 5.0)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await waiter
        assert info.value.code() == Code.UNAVAILABLE
        await stopping

    run(server, body)


def test_a_burst_of_waiting_queries_is_held_not_dropped() -> None:
    """3,000 workers asking at once all wait: gRPC core must not shed the calls grpc.aio has not taken yet.

    With gRPC's default pending-call limits (1,000 soft, 3,000 hard) core drops part of such a burst
    with CANCELLED before any handler runs; the server raises them to its waiting-Query limit.
    """
    count = 3000

    async def burst(target: str) -> None:
        # Four real connections (channels to one target share one by default): 750 waits each.
        local = [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.aio.insecure_channel(target, options=local) for _ in range(4)]
        try:
            stubs = [pb_grpc.MassTaskerStub(ch) for ch in channels]
            calls = [
                stubs[i % 4].Query(pb.QueryRequest(group="g", wait=True, own_for=OWN), timeout=60) for i in range(count)
            ]
            waiters = [asyncio.ensure_future(call) for call in calls]
            await asyncio.sleep(0)  # let every call start before the tasks exist
            created = await stubs[0].Update(pb.UpdateRequest(created=[pb.Task(group="g")] * count), timeout=60)
            results = await asyncio.gather(*waiters, return_exceptions=True)
            failures = [r for r in results if isinstance(r, BaseException)]
            assert not failures, f"{len(failures)} of {count} failed, e.g. {failures[0]!r}"
            owned = {r.task.id for r in results}  # type: ignore[union-attr]
            assert len(owned) == count and min(owned) > max(created.created_ids)
        finally:
            for ch in channels:
                await ch.close()

    with run_server_process() as server:
        asyncio.run(asyncio.wait_for(burst(server.target), 90))
