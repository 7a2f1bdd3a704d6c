"""Every client method against a real server on 127.0.0.1, for ``Client`` and ``AsyncClient`` alike.

The ``connect`` fixture is parametrized: "sync" gives a ``Client``; "async" gives an ``AsyncClient``
whose coroutines run on an event loop in a helper thread, so one test body checks that both classes
behave the same. A small Go-like server (it forwards to ours but cannot wait and ignores max_tasks)
checks the client's compatibility behaviour.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from grpc import aio

from masstasker import (
    AsyncClient,
    Client,
    Create,
    DeadlineExceeded,
    Delete,
    MassTaskerError,
    Move,
    PreconditionFailed,
    Pred,
    SavedError,
    TaskNotFound,
    Unavailable,
    Update,
    delete_or_move,
    new_task,
    pack_data,
    unpack_data,
)
from masstasker._pb import masstasker_pb2 as pb
from masstasker._pb import masstasker_pb2_grpc as pb_grpc
from masstasker.testing import FakeClock, run_server

T0 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
CALL_TIMEOUT = 30.0  # real seconds any single bridged call may take before the test fails


class AsyncBridge:
    """An ``AsyncClient`` driven from synchronous test code: each coroutine method runs on one event loop
    in a helper thread (the same loop every time, as a real asyncio program would)."""

    def __init__(self, target: str, **options: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="async-bridge", daemon=True)
        self.thread.start()
        self.client = AsyncClient(target, **options)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.client, name)
        if not asyncio.iscoroutinefunction(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(attribute(*args, **kwargs), self.loop).result(CALL_TIMEOUT)

        return call

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.client.close(), self.loop).result(CALL_TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(CALL_TIMEOUT)
        self.loop.close()


Connect = Callable[..., Any]  # connect(target=..., **client options) -> Client | AsyncBridge


@pytest.fixture(params=["sync", "async"])
def connect(request: pytest.FixtureRequest, masstasker_server: Any) -> Iterator[Connect]:
    """Factory for clients of the parametrized kind, to ``masstasker_server`` unless ``target`` is given."""
    made: list[Any] = []

    def make(target: str | None = None, **options: Any) -> Any:
        target = target or masstasker_server.target
        client = Client(target, **options) if request.param == "sync" else AsyncBridge(target, **options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def debug(masstasker_client: Client) -> Callable[[str], list[pb.Task]]:
    """``debug(group)``: the server's tasks in that group, in queue order (read with the raw stub)."""

    def read(group: str) -> list[pb.Task]:
        return list(masstasker_client.rpc.Debug(pb.DebugRequest(group=group)).tasks)

    return read


def ids(tasks: list[pb.Task]) -> list[int]:
    return [t.id for t in tasks]


def test_create_writes_ids_back_and_stamps_the_client_clock(connect: Connect, debug: Any) -> None:
    client = connect(clock=FakeClock(T0))
    first = new_task("g", pb.Test(foo="a"), labels={"kind": "x"})
    second = new_task("g")
    client.create(first, second)
    assert (first.id, second.id) == (1, 2)
    assert first.not_before.ToDatetime(tzinfo=UTC) == T0
    assert debug("g") == [first, second]  # the caller's objects are exactly what the server holds
    assert unpack_data(debug("g")[0], pb.Test).foo == "a"


def test_do_applies_every_op_in_one_update_and_writes_ids_back(connect: Connect, debug: Any) -> None:
    client = connect()
    updated, moved, deleted, config = (new_task("g", pb.Test(foo=str(i))) for i in range(4))
    client.create(updated, moved, deleted, config)
    fresh = new_task("g", pb.Test(foo="new"))
    pack_data(updated, pb.Test(foo="changed"))
    client.do(Create(fresh), Update(updated), Move("other", moved), Delete(deleted), Pred(config))
    assert (fresh.id, updated.id, moved.id) == (5, 6, 7)  # fresh IDs in request order
    assert moved.group == "other"
    assert sorted(ids(debug("g"))) == [config.id, fresh.id, updated.id]
    assert debug("other") == [moved]
    assert unpack_data(next(t for t in debug("g") if t.id == updated.id), pb.Test).foo == "changed"


def test_a_failed_do_changes_nothing_the_caller_holds_nor_the_server(connect: Connect, debug: Any) -> None:
    client = connect()
    kept, gone = new_task("g"), new_task("g")
    client.create(kept, gone)
    stale = pb.Task()
    stale.CopyFrom(gone)
    client.delete(gone)
    fresh = new_task("g")
    before = [t.SerializeToString() for t in (kept, stale, fresh)]
    with pytest.raises(TaskNotFound) as raised:
        client.do(Create(fresh), Move("elsewhere", kept), Delete(stale))
    assert raised.value.code is grpc.StatusCode.NOT_FOUND
    assert isinstance(raised.value.__cause__, grpc.RpcError)  # raised from the original
    assert [t.SerializeToString() for t in (kept, stale, fresh)] == before
    assert debug("g") == [kept]
    assert debug("elsewhere") == []


def test_a_config_change_makes_a_stale_commit_fail(connect: Connect, debug: Any) -> None:
    admin, worker = connect(), connect()
    config = new_task("config", pb.Test(foo="v1"))
    admin.create(config, new_task("work"))
    seen_config = worker.peek("config")  # read, not owned
    assert seen_config.id == config.id
    work = worker.query("work", 30)
    pack_data(config, pb.Test(foo="v2"))
    admin.update(config)  # the config's ID changes: work done under v1 must not commit
    with pytest.raises(PreconditionFailed) as raised:
        worker.do(Pred(seen_config), Delete(work))
    assert raised.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert ids(debug("work")) == [work.id]
    seen_config = worker.peek("config")
    assert unpack_data(seen_config, pb.Test).foo == "v2"
    worker.do(Pred(seen_config), Delete(work))
    assert debug("work") == []


def test_query_peeks_or_leases_and_a_lease_hides_the_task_until_it_expires(connect: Connect) -> None:
    clock = FakeClock(T0)
    client = connect(clock=clock)
    task = new_task("g")
    client.create(task)
    assert client.peek("g") == task  # a peek changes nothing
    owned = client.query("g", timedelta(seconds=30))
    assert owned.id > task.id
    assert owned.not_before.ToDatetime(tzinfo=UTC) == T0 + timedelta(seconds=30)
    with pytest.raises(TaskNotFound):
        client.peek("g", wait=False)
    with pytest.raises(TaskNotFound):
        client.delete(task)  # the pre-lease ID is dead
    clock.advance(31)
    again = client.query("g", 10, wait=False)  # the lease expired: someone else may take it
    assert again.id > owned.id
    with pytest.raises(TaskNotFound):
        client.delete(owned)


def test_a_waiting_query_returns_when_a_task_is_created(connect: Connect) -> None:
    waiter, producer = connect(), connect()
    got: list[pb.Task] = []
    thread = threading.Thread(target=lambda: got.append(waiter.query("g", 30, timeout=CALL_TIMEOUT)))
    thread.start()
    task = new_task("g", pb.Test(foo="hello"))
    producer.create(task)
    thread.join(CALL_TIMEOUT)
    assert not thread.is_alive()
    assert unpack_data(got[0], pb.Test).foo == "hello"
    assert got[0].id > task.id  # owned: a new ID


def test_a_waiting_query_gives_up_at_its_timeout(connect: Connect) -> None:
    client = connect()
    with pytest.raises(DeadlineExceeded) as raised:
        client.query("empty", 30, timeout=0.2)
    assert isinstance(raised.value, TimeoutError)
    with pytest.raises(TaskNotFound):
        client.query("empty", 30, wait=False)


def test_query_many_leases_several_tasks_at_once(connect: Connect) -> None:
    client = connect(clock=FakeClock(T0))
    tasks = [new_task("g", pb.Test(foo=str(i))) for i in range(5)]
    client.create(*tasks)
    owned = client.query_many("g", 3, 30)
    assert [unpack_data(t, pb.Test).foo for t in owned] == ["0", "1", "2"]
    assert all(t.not_before.ToDatetime(tzinfo=UTC) == T0 + timedelta(seconds=30) for t in owned)
    assert all(t.id > tasks[-1].id for t in owned)
    rest = client.peek_many("g", 10, wait=False)
    assert ids(rest) == ids(tasks[3:])
    assert client.query_many("empty", 4, 30, wait=False) == []


def test_the_convenience_methods(connect: Connect, debug: Any) -> None:
    clock = FakeClock(T0)
    client = connect(clock=clock)
    a, b, c = new_task("g"), new_task("g"), new_task("g")
    client.create(a, b)
    client.update(a)
    assert a.id == 3
    client.move("h", b)
    assert (b.group, debug("h")) == ("h", [b])
    client.reown(60, b)
    assert b.not_before.ToDatetime(tzinfo=UTC) == T0 + timedelta(seconds=60)
    clock.advance(1)
    client.disown(b)
    assert b.not_before.ToDatetime(tzinfo=UTC) == T0 + timedelta(seconds=1)
    client.complex_update(create=[c], delete=[a], predicates=[b])
    assert debug("g") == [c]
    client.delete(b, c)
    assert debug("g") == debug("h") == []


def test_commit_or_move_deletes_parks_or_disowns_and_reraises(connect: Connect, debug: Any) -> None:
    clock = FakeClock(T0)
    client = connect(clock=clock)
    done, bad, flaky = new_task("work"), new_task("work"), new_task("work")
    client.create(done, bad, flaky)
    client.reown(30, done, bad, flaky)
    client.commit_or_move(done, None, "errors")
    client.commit_or_move(bad, SavedError("cannot parse"), "errors")
    transient = OSError("network blip")
    with pytest.raises(OSError) as raised:
        client.commit_or_move(flaky, transient, "errors")
    assert raised.value is transient
    assert [(t.id, t.error) for t in debug("errors")] == [(bad.id, "cannot parse")]
    assert debug("work") == [flaky]
    assert flaky.not_before.ToDatetime(tzinfo=UTC) == T0  # disowned: visible again at once
    assert client.peek("work", wait=False) == flaky


def test_delete_or_move_commits_by_outcome(connect: Connect, debug: Any) -> None:
    client = connect()
    good, bad = new_task("work"), new_task("work")
    client.create(good, bad)
    client.do(delete_or_move("errors", good)(None))
    try:
        raise SavedError(ValueError("bad \udcff bytes"))
    except SavedError as exc:
        client.do(delete_or_move("errors", bad)(exc))
    assert debug("work") == []
    assert [(t.id, t.error) for t in debug("errors")] == [(bad.id, "bad \ufffd bytes")]


def test_the_barrier_pattern_records_every_contribution_exactly_once(connect: Connect) -> None:
    workers, items_each = 6, 4
    setup = connect()
    shared = new_task("barrier", pb.Test(foo=""))
    setup.create(shared)
    clients = [connect() for _ in range(workers)]
    retries: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(workers)

    def contribute(worker: int) -> None:
        client = clients[worker]
        start.wait(CALL_TIMEOUT)  # all at once, so they really race
        for item in range(items_each):
            for attempt in range(1000):  # bounded: a livelock fails the test instead of hanging it
                state = client.peek("barrier")
                parts = [p for p in unpack_data(state, pb.Test).foo.split(",") if p]
                pack_data(state, pb.Test(foo=",".join([*parts, f"{worker}.{item}"])))
                try:
                    client.do(Pred(state), Update(state))
                except PreconditionFailed:
                    continue
                retries.append(attempt)
                break
            else:
                raise AssertionError(f"worker {worker} never got item {item} in")

    def run(worker: int) -> None:
        try:
            contribute(worker)
        except BaseException as exc:  # surfaced below: a thread's exception would be lost
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CALL_TIMEOUT)
    assert not errors, errors
    final = unpack_data(setup.peek("barrier"), pb.Test).foo.split(",")
    assert sorted(final) == sorted(f"{w}.{i}" for w in range(workers) for i in range(items_each))
    assert len(retries) == workers * items_each


def test_the_barrier_pattern_with_asyncio_workers(masstasker_server: Any) -> None:
    async def main() -> list[str]:
        async with AsyncClient(masstasker_server.target) as client:
            await client.create(new_task("barrier", pb.Test(foo="")))

            async def contribute(worker: int) -> None:
                for _ in range(1000):  # bounded: a livelock fails the test instead of hanging it
                    state = await client.peek("barrier")
                    parts = [p for p in unpack_data(state, pb.Test).foo.split(",") if p]
                    pack_data(state, pb.Test(foo=",".join([*parts, str(worker)])))
                    try:
                        await client.do(Pred(state), Update(state))
                        return
                    except PreconditionFailed:
                        await asyncio.sleep(0)
                raise AssertionError(f"worker {worker} starved")

            await asyncio.gather(*(contribute(w) for w in range(20)))
            return unpack_data(await client.peek("barrier"), pb.Test).foo.split(",")

    assert sorted(asyncio.run(main()), key=int) == [str(w) for w in range(20)]


def test_clients_from_existing_channels_leave_them_open(masstasker_server: Any) -> None:
    channel = grpc.insecure_channel(masstasker_server.target)
    with Client.from_channel(channel) as client:
        client.create(new_task("g"))
    # The channel is still the caller's and still works.
    assert pb_grpc.MassTaskerStub(channel).Debug(pb.DebugRequest()).num_tasks == 1
    channel.close()

    async def main() -> int:
        async with aio.insecure_channel(masstasker_server.target) as aio_channel:
            async with AsyncClient.from_channel(aio_channel) as async_client:
                await async_client.create(new_task("g"))
            response = await pb_grpc.MassTaskerStub(aio_channel).Debug(pb.DebugRequest())
            return response.num_tasks

    assert asyncio.run(main()) == 2


def test_rpc_is_the_raw_stub(masstasker_client: Client, masstasker_async_client: AsyncClient) -> None:
    masstasker_client.create(new_task("g"), new_task("g"))
    request = pb.BulkSetRequest(ref=[pb.TaskRef(group="g")], prototype=pb.Task(group="h"))
    response = masstasker_client.rpc.BulkSet(request)
    assert response.num_updated == 2

    async def main() -> int:
        debug = await masstasker_async_client.rpc.Debug(pb.DebugRequest(group="h"))
        return debug.num_tasks

    assert asyncio.run(main()) == 2


def test_an_unreachable_server_is_unavailable(connect: Connect) -> None:
    with run_server() as server:
        target = server.target
    client = connect(target=target)  # nothing listens there any more
    with pytest.raises(Unavailable) as raised:
        client.create(new_task("g"))
    assert isinstance(raised.value, ConnectionError) and isinstance(raised.value, MassTaskerError)


def test_wait_for_ready_waits_for_a_server_instead_of_failing(connect: Connect) -> None:
    with run_server() as server:
        target = server.target
    client = connect(target=target, wait_for_ready=True)
    with pytest.raises(DeadlineExceeded):  # it waited (for nothing), up to the call's timeout
        client.do(Create(new_task("g")), timeout=0.2)


# -- against a server that behaves like Go's -------------------------------------------------------------------


class GoLikeServer(pb_grpc.MassTaskerServicer):
    """Forwards to a real server, but like the Go server: a Query never waits (NOT_FOUND at once when
    nothing is visible) and ``max_tasks`` is ignored (only ``task`` is filled in)."""

    def __init__(self, upstream: str) -> None:
        self.channel = grpc.insecure_channel(upstream)
        self.stub = pb_grpc.MassTaskerStub(self.channel)
        self.queries = 0
        self.changed = threading.Condition()
        # The Go server answers OK with no task when a task's not_before equals the request's now.
        self.empty_ok = False

    def _forward(self, call: Callable[[], Any], context: grpc.ServicerContext) -> Any:
        try:
            return call()
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details())

    def Query(self, request: pb.QueryRequest, context: grpc.ServicerContext) -> pb.QueryResponse:
        with self.changed:
            self.queries += 1
            self.changed.notify_all()
        go_request = pb.QueryRequest()
        go_request.CopyFrom(request)
        go_request.wait = False
        go_request.max_tasks = 0
        if self.empty_ok:
            try:
                response = self.stub.Query(go_request)
            except grpc.RpcError as exc:
                if exc.code() is not grpc.StatusCode.NOT_FOUND:
                    context.abort(exc.code(), exc.details())
                return pb.QueryResponse()
        else:
            response = self._forward(lambda: self.stub.Query(go_request), context)
        return pb.QueryResponse(task=response.task)

    def Update(self, request: pb.UpdateRequest, context: grpc.ServicerContext) -> pb.UpdateResponse:
        result: pb.UpdateResponse = self._forward(lambda: self.stub.Update(request), context)
        return result

    def wait_for_queries(self, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.queries >= count, CALL_TIMEOUT)


# The client against a Go-like proxy: the store behind the proxy plays no part.
_GO_LIKE = pytest.mark.memory_only("the client against a Go-like proxy; the store behind it plays no part")


@pytest.fixture
def go_server(masstasker_server: Any) -> Iterator[tuple[str, GoLikeServer]]:
    """A Go-like server on a free loopback port, in front of ``masstasker_server``."""
    servicer = GoLikeServer(masstasker_server.target)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_MassTaskerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None).wait()
    servicer.channel.close()


@_GO_LIKE
def test_a_waiting_query_retries_a_server_that_cannot_wait(
    connect: Connect, go_server: tuple[str, GoLikeServer], masstasker_client: Client
) -> None:
    target, go = go_server
    client = connect(target=target, query_retry_pause=0.01)
    got: list[pb.Task] = []
    thread = threading.Thread(target=lambda: got.append(client.query("g", 30, timeout=CALL_TIMEOUT)))
    thread.start()
    go.wait_for_queries(3)  # it was told NOT_FOUND and asked again, more than once
    masstasker_client.create(new_task("g", pb.Test(foo="finally")))
    thread.join(CALL_TIMEOUT)
    assert unpack_data(got[0], pb.Test).foo == "finally"


@_GO_LIKE
def test_retrying_a_server_that_cannot_wait_honours_the_timeout(
    connect: Connect, go_server: tuple[str, GoLikeServer]
) -> None:
    target, go = go_server
    client = connect(target=target, query_retry_pause=0.02)
    with pytest.raises(DeadlineExceeded):  # long enough for a loaded machine to ask more than once
        client.query("empty", 30, timeout=2.0)
    assert go.queries >= 2
    go.queries = 0
    with pytest.raises(TaskNotFound):  # not waiting: no retry
        client.query("empty", 30, wait=False)
    assert go.queries == 1


@_GO_LIKE
def test_query_many_against_a_server_that_ignores_max_tasks(
    connect: Connect, go_server: tuple[str, GoLikeServer], masstasker_client: Client
) -> None:
    masstasker_client.create(*(new_task("g", pb.Test(foo=str(i))) for i in range(3)))
    client = connect(target=go_server[0])
    got = client.query_many("g", 3, 30)
    assert [unpack_data(t, pb.Test).foo for t in got] == ["0"]
    assert client.query_many("empty", 3, 30, wait=False) == []


@_GO_LIKE
def test_a_waiting_query_retries_an_ok_answer_with_no_task(
    connect: Connect, go_server: tuple[str, GoLikeServer], masstasker_client: Client
) -> None:
    target, go = go_server
    go.empty_ok = True
    client = connect(target=target, query_retry_pause=0.01)
    with pytest.raises(TaskNotFound):  # not waiting: at once, one call
        client.query("g", 30, wait=False)
    assert go.queries == 1
    assert client.query_many("g", 3, 30, wait=False) == []
    got: list[pb.Task] = []
    thread = threading.Thread(target=lambda: got.append(client.query("g", 30, timeout=CALL_TIMEOUT)))
    thread.start()
    go.wait_for_queries(5)  # told OK-but-nothing, and asked again, more than once
    masstasker_client.create(new_task("g", pb.Test(foo="at last")))
    thread.join(CALL_TIMEOUT)
    assert not thread.is_alive()
    assert unpack_data(got[0], pb.Test).foo == "at last"


# -- a waiting query on a fake clock --------------------------------------------------------------------------


def wait_for_server_waiters(server: Any, count: int) -> None:
    """Block until ``count`` Queries are waiting inside the server (real time, with a deadline)."""
    deadline = time.monotonic() + CALL_TIMEOUT
    while server.call(lambda s: s.waiters.count) < count:
        assert time.monotonic() < deadline, f"never saw {count} waiting queries on the server"
        time.sleep(0.01)


def test_a_waiting_query_wakes_when_the_fake_clock_passes_the_lease(connect: Connect, masstasker_server: Any) -> None:
    clock = FakeClock(T0)
    holder, waiter = connect(clock=clock), connect(clock=clock)
    task = new_task("g", pb.Test(foo="shared"))
    holder.create(task)
    leased = holder.query("g", own_for=3600)  # an hour: a real-time wake-up would time the test out
    got: list[pb.Task] = []
    thread = threading.Thread(target=lambda: got.append(waiter.query("g", 30, timeout=CALL_TIMEOUT)))
    thread.start()
    wait_for_server_waiters(masstasker_server, 1)  # the waiter is asleep on the server, at T0
    clock.advance(3601)
    thread.join(CALL_TIMEOUT)
    assert not thread.is_alive(), "the waiting query did not follow the fake clock"
    assert unpack_data(got[0], pb.Test).foo == "shared"
    assert got[0].id > leased.id  # the expired lease was taken over, and leased at the fake time
    assert got[0].not_before.ToDatetime(tzinfo=UTC) == T0 + timedelta(seconds=3601 + 30)
    # The Query the client cancelled to re-ask leaves the server too (on PostgreSQL once its cancelled
    # statement returns).
    deadline = time.monotonic() + CALL_TIMEOUT
    while masstasker_server.call(lambda s: s.waiters.count) != 0:
        assert time.monotonic() < deadline, "a cancelled waiting query stayed on the server"
        time.sleep(0.01)


def test_a_fake_clock_that_moves_too_little_keeps_the_query_waiting(connect: Connect, masstasker_server: Any) -> None:
    clock = FakeClock(T0)
    holder, waiter = connect(clock=clock), connect(clock=clock)
    holder.create(new_task("g"))
    holder.query("g", own_for=3600)
    got: list[pb.Task] = []
    thread = threading.Thread(target=lambda: got.append(waiter.query("g", 30, timeout=CALL_TIMEOUT)))
    thread.start()
    wait_for_server_waiters(masstasker_server, 1)
    clock.advance(60)  # the lease still has 59 minutes: ask again, and wait again
    wait_for_server_waiters(masstasker_server, 1)
    assert thread.is_alive() and not got
    holder.create(new_task("g", pb.Test(foo="new")))  # and a create still wakes the re-asked query
    thread.join(CALL_TIMEOUT)
    assert unpack_data(got[0], pb.Test).foo == "new"
    # Leased from the re-asked query's now (the server adds the real time it then waited).
    lease_start = got[0].not_before.ToDatetime(tzinfo=UTC) - timedelta(seconds=30)
    assert T0 + timedelta(seconds=60) <= lease_start < T0 + timedelta(seconds=60 + CALL_TIMEOUT)


# -- timeout= on the one-line helpers -------------------------------------------------------------------------


def _known(group: str = "g", task_id: int = 7) -> pb.Task:
    return pb.Task(id=task_id, group=group)


HELPERS: dict[str, Callable[[Any], Any]] = {
    "create": lambda c: c.create(new_task("g"), timeout=0.2),
    "update": lambda c: c.update(_known(), timeout=0.2),
    "delete": lambda c: c.delete(_known(), timeout=0.2),
    "move": lambda c: c.move("h", _known(), timeout=0.2),
    "disown": lambda c: c.disown(_known(), timeout=0.2),
    "reown": lambda c: c.reown(30, _known(), timeout=0.2),
    "complex_update": lambda c: c.complex_update(create=[new_task("g")], delete=[_known()], timeout=0.2),
    "commit_or_move": lambda c: c.commit_or_move(_known(), None, "errors", timeout=0.2),
}


@pytest.mark.parametrize("helper", sorted(HELPERS))
def test_the_one_line_helpers_take_a_timeout(connect: Connect, helper: str) -> None:
    with run_server() as server:
        target = server.target
    # Nothing listens there and the client waits for a server to come: only the timeout ends the call.
    client = connect(target=target, wait_for_ready=True)
    with pytest.raises(DeadlineExceeded):
        HELPERS[helper](client)
