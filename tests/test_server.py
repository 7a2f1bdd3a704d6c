"""Every rule and status code of docs/api.md, end to end over gRPC on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.protobuf.any_pb2 import Any
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from masstasker._pb import masstasker_pb2 as pb
from masstasker._pb import masstasker_pb2_grpc as pb_grpc
from masstasker.server import BackgroundServer, Settings

Code = grpc.StatusCode
T0 = 1_700_000_000  # a fixed "now" in seconds, passed in requests


def ts(seconds: float) -> Timestamp:
    out = Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def dur(seconds: float) -> Duration:
    out = Duration()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def payload(text: str) -> Any:
    out = Any()
    out.Pack(pb.Test(foo=text))
    return out


def create(stub: pb_grpc.MassTaskerStub, *tasks: pb.Task) -> list[int]:
    return list(stub.Update(pb.UpdateRequest(created=tasks)).created_ids)


def query(stub: pb_grpc.MassTaskerStub, group: str, *, now: float = T0, own_for: float = 0, **kw: object) -> pb.Task:
    request = pb.QueryRequest(group=group, now=ts(now), **kw)  # type: ignore[arg-type]
    if own_for:
        request.own_for.CopyFrom(dur(own_for))
    return stub.Query(request).task


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def ids_in(stub: pb_grpc.MassTaskerStub, group: str = "") -> list[int]:
    return [t.id for t in stub.Debug(pb.DebugRequest(group=group)).tasks]


def test_create_assigns_increasing_ids_and_ignores_client_ids(stub: pb_grpc.MassTaskerStub) -> None:
    assert create(stub, pb.Task(group="g", id=77), pb.Task(group="g")) == [1, 2]
    assert create(stub, pb.Task(group="")) == [3]


def test_task_round_trips_every_field(stub: pb_grpc.MassTaskerStub, check_store: Callable[[], None]) -> None:
    [task_id] = create(
        stub,
        pb.Task(group="g", data=payload("bar"), labels={"a": "1", "ü": "∞"}, not_before=ts(T0 - 1), error="boom"),
    )
    got = query(stub, "g")
    assert got.id == task_id
    assert got.group == "g"
    assert got.labels == {"a": "1", "ü": "∞"}
    assert got.not_before == ts(T0 - 1)
    assert got.error == "boom"
    data = pb.Test()
    assert got.data.Unpack(data) and data.foo == "bar"


def test_unset_not_before_is_the_server_now(stub: pb_grpc.MassTaskerStub) -> None:
    create(stub, pb.Task(group="g"))
    [task] = stub.Debug(pb.DebugRequest(group="g")).tasks
    # The server clock is real: the task is visible now, not in the future.
    assert stub.Query(pb.QueryRequest(group="g")).task.id == task.id
    assert task.not_before.seconds > T0


def test_one_clock_for_the_store_and_queries() -> None:
    """A server whose clock is an hour ahead of the system's: a Query without ``now`` reads the server's clock.

    The store stamps a new task with that clock; a Query that read the system clock instead saw nothing.
    """
    hour = 3600 * 10**9
    server = BackgroundServer(Settings(port=0, listen_http=""), clock=lambda: time.time_ns() + hour)
    with server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.MassTaskerStub(channel)
        [task_id] = create(stub, pb.Task(group="g"))
        assert stub.Query(pb.QueryRequest(group="g")).task.id == task_id
        owned = stub.Query(pb.QueryRequest(group="g", own_for=dur(60))).task
        assert owned.not_before.ToNanoseconds() > time.time_ns() + hour + 59 * 10**9, "leased on the server's clock"


def test_a_failed_start_releases_what_it_had_started(tmp_path: Path) -> None:
    """Metrics cannot bind after the data directory was opened: the start fails and gives the directory back."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        failed = BackgroundServer(Settings(port=0, listen_http=busy, data_dir=str(tmp_path)))
        try:
            with pytest.raises(OSError, match="cannot serve metrics"):
                failed.start()
        finally:
            failed.stop()
    # The directory's lock was released: another server can use it.
    with BackgroundServer(Settings(port=0, listen_http="", data_dir=str(tmp_path))) as server:
        assert server.call(lambda s: s.store.persistence is not None)


def test_predicate_is_checked_before_delete(stub: pb_grpc.MassTaskerStub) -> None:
    err = rpc_error(lambda: stub.Update(pb.UpdateRequest(deleted=[pb.TaskRef(id=5)], predicates=[5])))
    assert err.code() == Code.FAILED_PRECONDITION
    assert "5" in err.details()
    err = rpc_error(lambda: stub.Update(pb.UpdateRequest(deleted=[pb.TaskRef(id=5)])))
    assert err.code() == Code.NOT_FOUND


def test_failing_update_changes_nothing(stub: pb_grpc.MassTaskerStub, check_store: Callable[[], None]) -> None:
    create(stub, pb.Task(group="g", labels={"x": "1"}), pb.Task(group="h"))
    before = stub.Debug(pb.DebugRequest())
    bad_requests = [
        pb.UpdateRequest(created=[pb.Task(group="new")], deleted=[pb.TaskRef(id=1), pb.TaskRef(id=99)]),
        pb.UpdateRequest(created=[pb.Task(group="new")], deleted=[pb.TaskRef(group="g")], predicates=[2, 99]),
        pb.UpdateRequest(created=[pb.Task(group="new")], deleted=[pb.TaskRef(group="h"), pb.TaskRef()]),
        pb.UpdateRequest(created=[pb.Task(group="new"), pb.Task(not_before=Timestamp(seconds=-(10**12)))]),
    ]
    for request in bad_requests:
        rpc_error(lambda r=request: stub.Update(r))  # type: ignore[misc]
        assert stub.Debug(pb.DebugRequest()) == before
    assert create(stub, pb.Task()) == [3], "a failed Update must not consume IDs"


def test_delete_by_group_and_selector(stub: pb_grpc.MassTaskerStub, check_store: Callable[[], None]) -> None:
    create(
        stub,
        pb.Task(group="a", labels={"k": "1", "j": "2"}),
        pb.Task(group="a", labels={"k": "1"}),
        pb.Task(group="b", labels={"k": "1", "j": "2"}),
        pb.Task(group="c"),
    )
    stub.Update(pb.UpdateRequest(deleted=[pb.TaskRef(selector=pb.LabelSelector(labels={"k": "1", "j": "2"}))]))
    assert ids_in(stub) == [2, 4]
    stub.Update(pb.UpdateRequest(deleted=[pb.TaskRef(group="a"), pb.TaskRef(id=2), pb.TaskRef(group="empty")]))
    assert ids_in(stub) == [4]


def test_malformed_refs_are_invalid_argument(stub: pb_grpc.MassTaskerStub) -> None:
    create(stub, pb.Task(group="a"))
    for ref in (pb.TaskRef(), pb.TaskRef(selector=pb.LabelSelector())):
        err = rpc_error(lambda ref=ref: stub.Update(pb.UpdateRequest(deleted=[ref])))  # type: ignore[misc]
        assert err.code() == Code.INVALID_ARGUMENT
        assert "selector" in err.details()
    assert ids_in(stub) == [1]


def test_peek_changes_nothing(stub: pb_grpc.MassTaskerStub) -> None:
    create(stub, pb.Task(group="g", not_before=ts(T0 - 2)), pb.Task(group="g", not_before=ts(T0 - 1)))
    before = stub.Debug(pb.DebugRequest())
    assert query(stub, "g").id == 1
    assert query(stub, "g", own_for=0).id == 1
    assert stub.Debug(pb.DebugRequest()) == before


def test_own_gives_a_new_id_and_kills_the_old_one(
    stub: pb_grpc.MassTaskerStub, check_store: Callable[[], None]
) -> None:
    create(stub, pb.Task(group="g", not_before=ts(T0 - 1), data=payload("x")))
    owned = query(stub, "g", own_for=30)
    assert owned.id == 2
    assert owned.not_before == ts(T0 + 30)
    assert owned.data == payload("x")
    err = rpc_error(lambda: stub.Update(pb.UpdateRequest(deleted=[pb.TaskRef(id=1)])))
    assert err.code() == Code.NOT_FOUND
    err = rpc_error(lambda: stub.Update(pb.UpdateRequest(predicates=[1])))
    assert err.code() == Code.FAILED_PRECONDITION
    # The lease hides it until it expires; then it can be owned again.
    assert rpc_error(lambda: query(stub, "g", now=T0 + 29)).code() == Code.NOT_FOUND
    assert query(stub, "g", now=T0 + 30, own_for=30).id == 3
    stub.Update(pb.UpdateRequest(deleted=[pb.TaskRef(id=3)]))
    assert ids_in(stub) == []


def test_not_before_in_the_future_hides_a_task(stub: pb_grpc.MassTaskerStub) -> None:
    create(stub, pb.Task(group="g", not_before=ts(T0 + 10)))
    err = rpc_error(lambda: query(stub, "g"))
    assert err.code() == Code.NOT_FOUND
    assert "'g'" in err.details()
    assert query(stub, "g", now=T0 + 10).id == 1


def test_head_is_smallest_not_before_then_id(stub: pb_grpc.MassTaskerStub) -> None:
    create(
        stub,
        pb.Task(group="g", not_before=ts(T0 - 1)),
        pb.Task(group="g", not_before=ts(T0 - 5)),
        pb.Task(group="g", not_before=ts(T0 - 5)),
    )
    assert [query(stub, "g", own_for=100).id for _ in range(3)] == [4, 5, 6]
    assert [t.id for t in stub.Debug(pb.DebugRequest(group="g")).tasks] == [4, 5, 6]


def test_query_validation(stub: pb_grpc.MassTaskerStub) -> None:
    create(stub, pb.Task(group="g"))
    cases = [
        pb.QueryRequest(group="g", own_for=Duration(seconds=-1)),
        pb.QueryRequest(group="g", own_for=Duration(seconds=1, nanos=-5)),
        pb.QueryRequest(group="g", own_for=Duration(seconds=10**15)),
        pb.QueryRequest(group="g", now=Timestamp(seconds=10**13)),
        pb.QueryRequest(group="g", now=Timestamp(seconds=1, nanos=-1)),
        pb.QueryRequest(group="g", now=Timestamp(seconds=253_402_300_000), own_for=Duration(seconds=10**9)),
        pb.QueryRequest(group="g", max_tasks=1001),
    ]
    for request in cases:
        err = rpc_error(lambda r=request: stub.Query(r))  # type: ignore[misc]
        assert err.code() == Code.INVALID_ARGUMENT, request
        assert err.details()
    assert ids_in(stub) == [1]


def test_undecodable_request_is_invalid_argument(channel: grpc.Channel) -> None:
    call = channel.unary_unary("/masstasker.MassTasker/Update")
    err = rpc_error(lambda: call(b"\xff\xff\xff"))
    assert err.code() == Code.INVALID_ARGUMENT
    assert "masstasker.UpdateRequest" in err.details()


def test_oversize_message_is_resource_exhausted(make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server(max_msg_size=64 * 1024)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.MassTaskerStub(channel)
        big = pb.Task(group="g", error="x" * 70_000)
        err = rpc_error(lambda: stub.Update(pb.UpdateRequest(created=[big])))
        assert err.code() == Code.RESOURCE_EXHAUSTED
        assert create(stub, pb.Task(group="g", error="x" * 1000)) == [1]


def test_query_many_owns_up_to_n_in_order(stub: pb_grpc.MassTaskerStub, check_store: Callable[[], None]) -> None:
    create(stub, *[pb.Task(group="g", not_before=ts(T0 - 10 + i)) for i in range(5)])
    response = stub.Query(pb.QueryRequest(group="g", now=ts(T0), own_for=dur(60), max_tasks=3))
    assert [t.id for t in response.tasks] == [6, 7, 8]
    assert response.task == response.tasks[0]
    assert all(t.not_before == ts(T0 + 60) for t in response.tasks)
    assert ids_in(stub, "g") == [4, 5, 6, 7, 8]
    single = stub.Query(pb.QueryRequest(group="g", now=ts(T0), max_tasks=1))
    assert single.task.id == 4 and not single.tasks, "max_tasks 1 answers exactly as Go"


def test_bulk_set_moves_a_group_and_resets_not_before(
    stub: pb_grpc.MassTaskerStub, check_store: Callable[[], None]
) -> None:
    create(
        stub,
        pb.Task(group="err", error="bad", not_before=ts(T0 + 100), labels={"a": "1"}, data=payload("p")),
        pb.Task(group="err", error="bad", not_before=ts(T0 + 50)),
        pb.Task(group="main", not_before=ts(T0 - 1)),
    )
    response = stub.BulkSet(
        pb.BulkSetRequest(ref=[pb.TaskRef(group="err")], prototype=pb.Task(group="main", not_before=ts(T0 - 5)))
    )
    assert response.num_updated == 2
    tasks = stub.Debug(pb.DebugRequest(group="main")).tasks
    # Queue order is kept: the task that was due first gets the smaller new ID.
    assert [(t.id, t.not_before.seconds) for t in tasks] == [(4, T0 - 5), (5, T0 - 5), (3, T0 - 1)]
    assert tasks[1].labels == {"a": "1"} and tasks[1].data == payload("p") and tasks[1].error == "bad"
    assert stub.Debug(pb.DebugRequest(group="err")).num_tasks == 0


def test_bulk_set_overwrites_data_labels_error(stub: pb_grpc.MassTaskerStub, check_store: Callable[[], None]) -> None:
    create(stub, pb.Task(group="g", labels={"a": "1"}, data=payload("old"), not_before=ts(T0)))
    prototype = pb.Task(id=999, data=payload("new"), labels={"b": "2"}, error="why")
    assert stub.BulkSet(pb.BulkSetRequest(ref=[pb.TaskRef(id=1)], prototype=prototype)).num_updated == 1
    [task] = stub.Debug(pb.DebugRequest()).tasks
    assert (task.id, task.group, task.not_before, task.error) == (2, "g", ts(T0), "why")
    assert task.labels == {"b": "2"} and task.data == payload("new")
    selector = pb.TaskRef(selector=pb.LabelSelector(labels={"b": "2"}))
    assert stub.BulkSet(pb.BulkSetRequest(ref=[selector], prototype=pb.Task(group="h"))).num_updated == 1
    err = rpc_error(lambda: stub.BulkSet(pb.BulkSetRequest(ref=[pb.TaskRef(id=1)], prototype=pb.Task(group="x"))))
    assert err.code() == Code.NOT_FOUND


def test_debug_orders_and_limits(stub: pb_grpc.MassTaskerStub) -> None:
    create(
        stub,
        pb.Task(group="g", not_before=ts(T0 + 3)),
        pb.Task(group="h"),
        pb.Task(group="g", not_before=ts(T0 + 1)),
        pb.Task(group="g", not_before=ts(T0 + 2)),
    )
    response = stub.Debug(pb.DebugRequest(group="g", limit=2))
    assert [t.id for t in response.tasks] == [3, 4]
    assert response.num_tasks == 3
    everything = stub.Debug(pb.DebugRequest())
    assert [t.id for t in everything.tasks] == [1, 2, 3, 4] and everything.num_tasks == 4
    assert [t.id for t in stub.Debug(pb.DebugRequest(limit=1)).tasks] == [1]
    assert stub.Debug(pb.DebugRequest(group="nothing")).num_tasks == 0


def test_contention_every_task_processed_exactly_once(
    stub: pb_grpc.MassTaskerStub, check_store: Callable[[], None]
) -> None:
    """50 workers lease and delete 1,000 tasks: each is committed once, none lost."""
    total = 1000
    ids = stub.Update(pb.UpdateRequest(created=[pb.Task(group="work", error=str(i)) for i in range(total)]))
    assert len(ids.created_ids) == total
    done: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(total):  # bounded: never more attempts than tasks
            try:
                task = stub.Query(pb.QueryRequest(group="work", own_for=dur(60)), timeout=10).task
            except grpc.RpcError as exc:
                assert exc.code() == Code.NOT_FOUND
                return
            stub.Update(pb.UpdateRequest(deleted=[pb.TaskRef(id=task.id)]), timeout=10)
            with lock:
                done.append(task.error)

    with ThreadPoolExecutor(50) as pool:
        for future in [pool.submit(worker) for _ in range(50)]:
            future.result(timeout=60)
    assert sorted(done, key=int) == [str(i) for i in range(total)]
    assert stub.Debug(pb.DebugRequest()).num_tasks == 0
