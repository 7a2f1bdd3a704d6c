"""Each limit, just under and just over: the rejected request names the limit and changes nothing."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from masstasker import Client, new_task
from masstasker._pb import masstasker_pb2 as pb
from masstasker._pb import masstasker_pb2_grpc as pb_grpc
from masstasker._wire import RETRY_AFTER_MS
from masstasker.server import BackgroundServer

TIMEOUT = 10.0
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

StubFor = Callable[[BackgroundServer], pb_grpc.MassTaskerStub]


@pytest.fixture
def stub_for() -> Iterator[StubFor]:
    """``stub_for(server)``: a raw stub on a connection of its own (waiting limits count per connection)."""
    channels: list[grpc.Channel] = []

    def make(server: BackgroundServer) -> pb_grpc.MassTaskerStub:
        channel = grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)])
        channels.append(channel)
        return pb_grpc.MassTaskerStub(channel)

    yield make
    for channel in channels:
        channel.close()


def rejected(call: Callable[[], object], code: grpc.StatusCode, *words: str) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    details = err.value.details() or ""
    for word in words:
        assert word in details
    return details


def task_of_size(size: int, **fields: object) -> pb.Task:
    """A task whose serialized size is exactly ``size`` bytes (padding goes into the payload)."""
    task = pb.Task(**fields)  # type: ignore[arg-type]
    task.data.type_url = "type.example/x"
    pad = size - task.ByteSize()
    while task.ByteSize() != size:
        assert pad >= 0, "the fixed fields alone are over the size"
        task.data.value = b"x" * pad
        pad -= task.ByteSize() - size
    return task


def update_of_size(size: int) -> pb.UpdateRequest:
    request = pb.UpdateRequest(created=[pb.Task(group="g")])
    task = request.created[0]
    pad = size - request.ByteSize()
    while request.ByteSize() != size:
        task.data.value = b"x" * pad
        pad -= request.ByteSize() - size
    return request


def store_size(server: BackgroundServer) -> int:
    return int(server.call(lambda s: s.store.size()))


# -- message size (gRPC's own limit) ------------------------------------------------------------------------------


def test_message_size(make_server: Callable[..., BackgroundServer], stub_for: StubFor) -> None:
    limit = 64 * 1024
    server = make_server(max_msg_size=limit)
    stub = stub_for(server)
    stub.Update(update_of_size(limit), timeout=TIMEOUT)
    rejected(lambda: stub.Update(update_of_size(limit + 1), timeout=TIMEOUT), EXHAUSTED, str(limit))
    assert store_size(server) == 1


# -- tasks per request --------------------------------------------------------------------------------------------


def test_created_tasks_per_update(make_server: Callable[..., BackgroundServer], stub_for: StubFor) -> None:
    server = make_server(max_update_tasks=5)
    stub = stub_for(server)
    assert len(stub.Update(pb.UpdateRequest(created=[pb.Task()] * 5), timeout=TIMEOUT).created_ids) == 5
    request = pb.UpdateRequest(created=[pb.Task()] * 6)
    rejected(lambda: stub.Update(request, timeout=TIMEOUT), INVALID, "created tasks", "6", "--max-update-tasks")
    assert store_size(server) == 5


def test_deleted_refs_and_predicates_per_update(
    make_server: Callable[..., BackgroundServer], stub_for: StubFor
) -> None:
    server = make_server(max_update_tasks=5)
    stub = stub_for(server)
    ids = list(stub.Update(pb.UpdateRequest(created=[pb.Task(group="g")] * 5), timeout=TIMEOUT).created_ids)
    refs = [pb.TaskRef(group=f"none{i}") for i in range(6)]
    stub.Update(pb.UpdateRequest(deleted=refs[:5], predicates=ids), timeout=TIMEOUT)
    rejected(lambda: stub.Update(pb.UpdateRequest(deleted=refs), timeout=TIMEOUT), INVALID, "deleted refs", "6")
    request = pb.UpdateRequest(predicates=[*ids, ids[0]])
    rejected(lambda: stub.Update(request, timeout=TIMEOUT), INVALID, "predicates", "--max-update-tasks")


def test_refs_per_bulk_set(make_server: Callable[..., BackgroundServer], stub_for: StubFor) -> None:
    server = make_server(max_update_tasks=3)
    stub = stub_for(server)
    refs = [pb.TaskRef(group=f"none{i}") for i in range(4)]
    stub.BulkSet(pb.BulkSetRequest(ref=refs[:3]), timeout=TIMEOUT)
    rejected(lambda: stub.BulkSet(pb.BulkSetRequest(ref=refs), timeout=TIMEOUT), INVALID, "refs", "--max-update-tasks")


# -- one task -----------------------------------------------------------------------------------------------------


def test_payload_bytes(make_server: Callable[..., BackgroundServer], stub_for: StubFor) -> None:
    server = make_server(max_payload_bytes=300)
    stub = stub_for(server)
    # The group and not_before are not payload: only data, labels and error count.
    stub.Update(pb.UpdateRequest(created=[task_of_size(300)]), timeout=TIMEOUT)
    grouped = task_of_size(300)
    grouped.group = "a group name"
    grouped.not_before.seconds = 1_700_000_000
    stub.Update(pb.UpdateRequest(created=[grouped]), timeout=TIMEOUT)
    request = pb.UpdateRequest(created=[pb.Task(), task_of_size(301)])
    rejected(lambda: stub.Update(request, timeout=TIMEOUT), INVALID, "created[1]", "301", "--max-payload-bytes")
    assert store_size(server) == 2


def test_bulk_set_payload(make_server: Callable[..., BackgroundServer], stub_for: StubFor) -> None:
    server = make_server(max_payload_bytes=300)
    stub = stub_for(server)
    stub.Update(pb.UpdateRequest(created=[task_of_size(250, group="g")]), timeout=TIMEOUT)
    everything = [pb.TaskRef(group="g")]
    big = pb.BulkSetRequest(ref=everything, prototype=task_of_size(301))
    rejected(lambda: stub.BulkSet(big, timeout=TIMEOUT), INVALID, "301 bytes", "--max-payload-bytes")
    # Each part fits, but the rewritten task (old payload + new error) would not.
    grow = pb.BulkSetRequest(ref=everything, prototype=pb.Task(error="e" * 100))
    rejected(lambda: stub.BulkSet(grow, timeout=TIMEOUT), INVALID, "rewritten task", "--max-payload-bytes")
    fits = pb.BulkSetRequest(ref=everything, prototype=pb.Task(error="e" * 20))
    assert stub.BulkSet(fits, timeout=TIMEOUT).num_updated == 1
    assert store_size(server) == 1


@pytest.mark.parametrize(
    ("ok", "over"), [("g" * 16, "g" * 17), ("é" * 8, "é" * 8 + "g"), ("€" * 5 + "g", "€" * 5 + "gg")]
)
def test_group_name_bytes(make_server: Callable[..., BackgroundServer], stub_for: StubFor, ok: str, over: str) -> None:
    server = make_server(max_group_bytes=16)
    stub = stub_for(server)
    stub.Update(pb.UpdateRequest(created=[pb.Task(group=ok)]), timeout=TIMEOUT)
    request = pb.UpdateRequest(created=[pb.Task(group=over)])
    rejected(
        lambda: stub.Update(request, timeout=TIMEOUT), INVALID, "created[0].group", "17 bytes", "--max-group-bytes"
    )
    stub.Query(pb.QueryRequest(group=ok), timeout=TIMEOUT)
    rejected(lambda: stub.Query(pb.QueryRequest(group=over, wait=True), timeout=TIMEOUT), INVALID, "--max-group-bytes")
    move = pb.BulkSetRequest(ref=[pb.TaskRef(group=ok)], prototype=pb.Task(group=over))
    rejected(lambda: stub.BulkSet(move, timeout=TIMEOUT), INVALID, "prototype.group", "--max-group-bytes")
    assert store_size(server) == 1


def test_labels_per_task(make_server: Callable[..., BackgroundServer], stub_for: StubFor) -> None:
    server = make_server(max_labels=3)
    stub = stub_for(server)
    labels = {f"k{i}": "v" for i in range(4)}
    stub.Update(pb.UpdateRequest(created=[pb.Task(labels=dict(list(labels.items())[:3]))]), timeout=TIMEOUT)
    request = pb.UpdateRequest(created=[pb.Task(labels=labels)])
    rejected(lambda: stub.Update(request, timeout=TIMEOUT), INVALID, "created[0].labels", "4 labels", "--max-labels")
    relabel = pb.BulkSetRequest(ref=[pb.TaskRef(group="")], prototype=pb.Task(labels=labels))
    rejected(lambda: stub.BulkSet(relabel, timeout=TIMEOUT), INVALID, "prototype.labels", "--max-labels")
    assert store_size(server) == 1


def test_label_key_and_value_bytes(make_server: Callable[..., BackgroundServer], stub_for: StubFor) -> None:
    server = make_server(max_label_key_bytes=8, max_label_value_bytes=12)
    stub = stub_for(server)
    stub.Update(pb.UpdateRequest(created=[pb.Task(labels={"k" * 8: "v" * 12, "ü" * 4: "ü" * 6})]), timeout=TIMEOUT)
    long_key = pb.UpdateRequest(created=[pb.Task(labels={"ü" * 4 + "k": "v"})])
    rejected(lambda: stub.Update(long_key, timeout=TIMEOUT), INVALID, "9 bytes", "--max-label-key-bytes")
    long_value = pb.UpdateRequest(created=[pb.Task(labels={"k": "v" * 13})])
    rejected(lambda: stub.Update(long_value, timeout=TIMEOUT), INVALID, "13 bytes", "--max-label-value-bytes")
    assert store_size(server) == 1


def test_small_requests_skip_no_check(make_server: Callable[..., BackgroundServer], stub_for: StubFor) -> None:
    # Tiny limits make the shortcut threshold tiny: every just-over case is still caught.
    server = make_server(max_labels=1, max_group_bytes=2, max_label_key_bytes=2, max_label_value_bytes=2)
    stub = stub_for(server)
    for task in (pb.Task(group="ggg"), pb.Task(labels={"a": "", "b": ""}), pb.Task(labels={"kkk": ""})):
        rejected(lambda task=task: stub.Update(pb.UpdateRequest(created=[task]), timeout=TIMEOUT), INVALID, "--max-")
    stub.Update(pb.UpdateRequest(created=[pb.Task(group="gg", labels={"kk": "vv"})]), timeout=TIMEOUT)
    assert store_size(server) == 1


# -- waiting Queries ----------------------------------------------------------------------------------------------


def _waiting(server: BackgroundServer, count: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while server.call(lambda s: s.waiters.count) != count:
        assert time.monotonic() < deadline, f"expected {count} waiting Queries"
        time.sleep(0.01)
    server.call(lambda s: (s.waiters._check(), s.admission._check()))


def test_waiting_queries_per_connection_and_in_total(
    make_server: Callable[..., BackgroundServer], stub_for: StubFor
) -> None:
    server = make_server(max_waiting_per_connection=2, max_waiting_queries=3)
    first, second = stub_for(server), stub_for(server)
    wait = pb.QueryRequest(group="jobs", wait=True)
    wait.own_for.seconds = 60  # a peek would let every waiter see the one task we create below
    calls = [first.Query.future(wait, timeout=30), first.Query.future(wait, timeout=30)]
    _waiting(server, 2)
    rejected(lambda: first.Query(wait, timeout=TIMEOUT), EXHAUSTED, "--max-waiting-per-connection")
    calls.append(second.Query.future(wait, timeout=30))  # another connection still has room
    _waiting(server, 3)
    rejected(lambda: second.Query(wait, timeout=TIMEOUT), EXHAUSTED, "--max-waiting-queries")
    with pytest.raises(grpc.RpcError):  # a peek never waits, so it is not limited
        first.Query(pb.QueryRequest(group="jobs"), timeout=TIMEOUT)

    # Slots come back when waits end, by a task or by cancellation.
    first.Update(pb.UpdateRequest(created=[pb.Task(group="jobs")]), timeout=TIMEOUT)
    _waiting(server, 2)
    deadline = time.monotonic() + TIMEOUT
    while not any(call.done() for call in calls):  # the answer may still be on its way to us
        assert time.monotonic() < deadline
        time.sleep(0.01)
    (served,) = [call for call in calls if call.done()]
    assert served.result().task.group == "jobs"
    freed = first if calls.index(served) < 2 else second  # the connection whose slot came back
    calls.remove(served)
    calls.append(freed.Query.future(wait, timeout=30))
    _waiting(server, 3)
    for call in calls:
        call.cancel()
    _waiting(server, 0)
    # Every slot is back: the full quota is available again on both connections.
    calls = [stub.Query.future(wait, timeout=30) for stub in (first, first, second)]
    _waiting(server, 3)
    for call in calls:
        call.cancel()
    _waiting(server, 0)


def test_a_full_waiting_limit_tells_when_to_ask_again(
    make_server: Callable[..., BackgroundServer], stub_for: StubFor
) -> None:
    server = make_server(max_waiting_queries=1)
    stub = stub_for(server)
    wait = pb.QueryRequest(group="jobs", wait=True)
    holder = stub.Query.future(wait, timeout=30)
    _waiting(server, 1)
    with pytest.raises(grpc.RpcError) as err:
        stub.Query(wait, timeout=TIMEOUT)
    assert err.value.code() == EXHAUSTED
    assert (RETRY_AFTER_MS, "1000") in tuple(err.value.trailing_metadata())  # type: ignore[attr-defined]
    # A size limit is not something to come back for: no hint there.
    small = make_server(max_group_bytes=4)
    with pytest.raises(grpc.RpcError) as err:
        stub_for(small).Query(pb.QueryRequest(group="too long"), timeout=TIMEOUT)
    assert err.value.code() == INVALID
    assert not [k for k, _ in err.value.trailing_metadata() if k == RETRY_AFTER_MS]  # type: ignore[attr-defined]
    holder.cancel()
    _waiting(server, 0)


def _refusals(server: BackgroundServer) -> float:
    """Queries the server refused with RESOURCE_EXHAUSTED so far, from its own metrics."""
    labels = {"method": "Query", "code": "RESOURCE_EXHAUSTED"}
    return float(server.call(lambda s: s.registry.get_sample_value("masstasker_rpc_requests_total", labels)) or 0)


def test_a_waiting_client_query_comes_back_when_the_limit_frees(make_server: Callable[..., BackgroundServer]) -> None:
    """Client B is refused while A holds the only waiting slot; it retries by itself and gets the second task."""
    server = make_server(max_waiting_queries=1)
    with Client(server.target) as first, Client(server.target) as second, ThreadPoolExecutor(2) as pool:
        a = pool.submit(first.query, "jobs", 60, timeout=30)
        _waiting(server, 1)
        b = pool.submit(second.query, "jobs", 60, timeout=30)
        deadline = time.monotonic() + TIMEOUT
        while _refusals(server) < 1:  # B has been told to come back at least once
            assert time.monotonic() < deadline, "the second query was never refused"
            time.sleep(0.01)
        first.create(new_task("jobs"), new_task("jobs"))
        tasks = {a.result(timeout=30).id, b.result(timeout=30).id}
        assert len(tasks) == 2, "each query got its own task"
