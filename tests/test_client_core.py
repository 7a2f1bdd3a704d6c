"""The client's I/O-free core: request building, write-back, errors, time, and the query flow's decisions.

These drive the flows by hand (sending responses, throwing errors) — the same thing the drivers do —
so the retry and deadline logic is pinned down without a network; test_client.py runs it for real.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import grpc
import pytest

from masstasker import (
    Create,
    Delete,
    Disown,
    Move,
    PreconditionFailed,
    Pred,
    Reown,
    SavedError,
    TaskNotFound,
    Update,
    delete_or_move,
    is_saved_error,
    new_task,
    pack_data,
    unpack_data,
)
from masstasker._pb import masstasker_pb2 as pb
from masstasker.client._core import Call, Pause, commit_or_move_ops, query_flow
from masstasker.client._ops import build_update, error_text
from masstasker.client._time import to_duration, to_seconds, to_timestamp
from masstasker.client.errors import DeadlineExceeded, LeaseLost, MassTaskerError, StatusError, from_rpc_error
from masstasker.testing import FakeClock

T0 = datetime(2030, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)


def stored(group: str, task_id: int, foo: str = "") -> pb.Task:
    """A task as if the server had it: with an ID and a not_before."""
    task = new_task(group, pb.Test(foo=foo) if foo else None, not_before=T0)
    task.id = task_id
    return task


def test_new_task_packs_payload_labels_and_not_before() -> None:
    task = new_task("g", pb.Test(foo="bar"), labels={"k": "v"}, not_before=T0)
    assert task.group == "g"
    assert task.id == 0
    assert dict(task.labels) == {"k": "v"}
    assert task.not_before.ToDatetime(tzinfo=UTC) == T0
    assert unpack_data(task, pb.Test).foo == "bar"
    into = pb.Test()
    assert unpack_data(task, into) is into and into.foo == "bar"
    assert not new_task("g").HasField("not_before")


def test_pack_replaces_and_unpack_rejects_another_type() -> None:
    task = new_task("g")
    with pytest.raises(TypeError, match="no payload"):
        unpack_data(task, pb.Test)
    pack_data(task, pb.Test(foo="a"))
    pack_data(task, pb.Test(foo="b"))
    assert unpack_data(task, pb.Test).foo == "b"
    with pytest.raises(TypeError, match=r"masstasker\.Test, not masstasker\.Task"):
        unpack_data(task, pb.Task)


def test_build_update_combines_ops_in_order_and_stamps_now() -> None:
    fresh = new_task("a")
    old, config, moved, leased, dropped = (stored("g", i) for i in (10, 11, 12, 13, 14))
    plan = build_update(
        [Create(fresh), Update(old), Pred(config), Move("elsewhere", moved), Reown(30, leased), Delete(dropped)],
        now=T0,
    )
    request = plan.request
    assert [ref.id for ref in request.deleted] == [10, 12, 13, 14]
    assert list(request.predicates) == [11]
    assert [(t.group, t.id) for t in request.created] == [("a", 0), ("g", 0), ("elsewhere", 0), ("g", 0)]
    # A task without not_before gets the client's now; others keep theirs or get the op's.
    not_befores = [t.not_before.ToDatetime(tzinfo=UTC) for t in request.created]
    assert not_befores == [T0, T0, T0, T0 + timedelta(seconds=30)]


def test_build_update_does_not_touch_the_callers_tasks() -> None:
    task = stored("g", 7)
    before = task.SerializeToString()
    build_update([Move("x", task, error="boom")], now=T0)
    assert task.SerializeToString() == before


def test_apply_writes_the_sent_copies_and_new_ids_back() -> None:
    fresh, moved, disowned = new_task("a"), stored("g", 5), stored("g", 6)
    disowned.not_before.CopyFrom(to_timestamp(T0 + timedelta(hours=1)))
    plan = build_update([Create(fresh), Move("h", moved, error="bad"), Disown(disowned)], now=T0)
    plan.apply(pb.UpdateResponse(created_ids=[100, 101, 102]))
    assert (fresh.id, fresh.not_before.ToDatetime(tzinfo=UTC)) == (100, T0)
    assert (moved.id, moved.group, moved.error) == (101, "h", "bad")
    assert (disowned.id, disowned.not_before.ToDatetime(tzinfo=UTC)) == (102, T0)


def test_apply_rejects_a_response_with_the_wrong_number_of_ids() -> None:
    task = new_task("a")
    plan = build_update([Create(task)], now=T0)
    with pytest.raises(MassTaskerError, match="2 IDs for 1"):
        plan.apply(pb.UpdateResponse(created_ids=[1, 2]))
    assert task.id == 0


def test_build_update_rejects_tasks_without_ids_and_double_creation() -> None:
    with pytest.raises(ValueError, match="never created"):
        build_update([Delete(new_task("g"))], now=T0)
    with pytest.raises(ValueError, match="never created"):
        build_update([Pred(new_task("g"))], now=T0)
    task = stored("g", 3)
    with pytest.raises(ValueError, match="created twice"):
        build_update([Update(task), Move("h", task)], now=T0)
    with pytest.raises(TypeError, match="ops such as"):
        build_update([task], now=T0)  # type: ignore[list-item]


def test_reown_rejects_negative_durations() -> None:
    with pytest.raises(ValueError, match="own_for"):
        Reown(-1, stored("g", 1))
    assert Reown(timedelta(minutes=1), stored("g", 1)).own_for == timedelta(minutes=1)


def test_saved_errors_are_found_through_cause_and_context_chains() -> None:
    assert is_saved_error(SavedError("bad input"))
    assert not is_saved_error(ValueError("x"))
    assert not is_saved_error(None)
    try:
        try:
            raise SavedError(KeyError("missing"))
        except SavedError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert is_saved_error(outer)
    try:
        try:
            raise SavedError("first")
        except SavedError:
            raise OSError("while handling")  # noqa: B904  # the implicit __context__ chain is the point
    except OSError as implicit:
        assert is_saved_error(implicit)
    # A cycle must not hang the search.
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a
    assert not is_saved_error(a)
    wrapped = SavedError(KeyError("k"))
    assert isinstance(wrapped.__cause__, KeyError) and wrapped.error is wrapped.__cause__


def test_delete_or_move_picks_the_op_and_cleans_the_message() -> None:
    task = stored("work", 9)
    assert isinstance(delete_or_move("errors", task)(None), Delete)
    assert isinstance(delete_or_move("errors", task)(ValueError("transient")), Delete)
    op = delete_or_move("errors", task)(SavedError("bad \udcff byte"))
    assert isinstance(op, Move)
    assert (op.group, op.error) == ("errors", "bad \ufffd byte")
    assert error_text(SavedError(ValueError())) == "SavedError"


def test_commit_or_move_follows_go() -> None:
    task = stored("work", 9)
    op, reraise = commit_or_move_ops(task, None, "errors")
    assert isinstance(op, Delete) and reraise is None
    saved = SavedError("for good")
    op, reraise = commit_or_move_ops(task, saved, "errors")
    assert isinstance(op, Move) and op.error == "for good" and reraise is None
    op, reraise = commit_or_move_ops(task, saved, "")  # no error group: treated as any other error
    assert isinstance(op, Disown) and reraise is saved
    transient = OSError("later")
    op, reraise = commit_or_move_ops(task, transient, "errors")
    assert isinstance(op, Disown) and reraise is transient


class FakeRpcError(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """A failed-call error as grpc raises it, for the mapping table only."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> None: ...
    def trailing_metadata(self) -> None: ...
    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> None: ...
    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: object) -> bool:
        return False


@pytest.mark.parametrize(
    ("code", "kind", "also"),
    [
        (grpc.StatusCode.NOT_FOUND, TaskNotFound, None),
        (grpc.StatusCode.FAILED_PRECONDITION, PreconditionFailed, None),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded, TimeoutError),
        (grpc.StatusCode.UNAVAILABLE, StatusError, ConnectionError),
        (grpc.StatusCode.PERMISSION_DENIED, StatusError, None),
    ],
)
def test_status_codes_map_to_exceptions_that_keep_the_code(
    code: grpc.StatusCode, kind: type[StatusError], also: type[Exception] | None
) -> None:
    original = FakeRpcError(code, "why")
    mapped = from_rpc_error(original)
    assert isinstance(mapped, kind) and isinstance(mapped, MassTaskerError)
    assert also is None or isinstance(mapped, also)
    assert mapped.code is code and mapped.details == "why"
    assert mapped.__cause__ is original
    assert str(mapped) == f"{code.name}: why"


def test_lease_lost_is_a_client_error_with_the_code() -> None:
    error = LeaseLost(42)
    assert isinstance(error, MassTaskerError) and error.code is grpc.StatusCode.NOT_FOUND
    assert "42" in str(error)


def test_time_conversions() -> None:
    assert to_seconds(timedelta(milliseconds=1500)) == 1.5
    assert to_seconds(2) == 2.0
    for bad in (-1, float("nan"), timedelta(seconds=-1)):
        with pytest.raises(ValueError, match="non-negative"):
            to_seconds(bad)
    assert to_duration(1.25).ToTimedelta() == timedelta(seconds=1.25)
    tokyo = datetime(2030, 1, 1, 9, tzinfo=timezone(timedelta(hours=9)))
    assert to_timestamp(tokyo).ToDatetime(tzinfo=UTC) == datetime(2030, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="not_before must be a timezone-aware datetime"):
        to_timestamp(datetime(2030, 1, 1), name="not_before")
    for bad in (None, "30", True):
        with pytest.raises(TypeError, match="own_for must be seconds"):
            to_seconds(bad, name="own_for")  # type: ignore[arg-type]


class Monotonic:
    """A hand-moved monotonic clock for the query flow's deadline bookkeeping."""

    def __init__(self) -> None:
        self.value = 1000.0

    def __call__(self) -> float:
        return self.value


def test_waiting_query_retries_not_found_until_it_gets_a_task() -> None:
    clock, mono = FakeClock(T0), Monotonic()
    flow = query_flow(
        "g", 30, wait=True, max_tasks=1, many=False, timeout=None, clock=clock, retry_pause=5, monotonic=mono
    )
    step = next(flow)
    assert isinstance(step, Call) and step.method == "Query" and step.timeout is None
    request = step.request
    assert isinstance(request, pb.QueryRequest)
    assert (request.group, request.wait, request.max_tasks) == ("g", True, 0)
    assert request.own_for.ToTimedelta() == timedelta(seconds=30)
    assert request.now.ToDatetime(tzinfo=UTC) == T0
    assert flow.throw(TaskNotFound(grpc.StatusCode.NOT_FOUND, "empty")) == Pause(5)
    clock.advance(5)
    retry = flow.send(None)
    assert isinstance(retry, Call) and isinstance(retry.request, pb.QueryRequest)
    assert retry.request.now.ToDatetime(tzinfo=UTC) == T0 + timedelta(seconds=5)  # re-stamped
    with pytest.raises(StopIteration) as done:
        flow.send(pb.QueryResponse(task=stored("g", 3)))
    assert [t.id for t in done.value.value] == [3]


def test_waiting_query_gives_up_at_the_callers_timeout() -> None:
    mono = Monotonic()
    flow = query_flow(
        "g", 0, wait=True, max_tasks=1, many=False, timeout=2.0, clock=FakeClock(T0), retry_pause=5, monotonic=mono
    )
    step = next(flow)
    assert isinstance(step, Call) and step.timeout == 2.0
    mono.value += 0.5
    # A Go server gives up at once: retry, but never pause beyond the caller's deadline.
    assert flow.throw(DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED, "go")) == Pause(1.5)
    mono.value += 1.5
    with pytest.raises(DeadlineExceeded, match=r"within 2\.0s"):
        flow.send(None)


def test_waiting_query_does_not_retry_its_own_deadline() -> None:
    mono = Monotonic()
    flow = query_flow(
        "g", 0, wait=True, max_tasks=1, many=False, timeout=1.0, clock=FakeClock(T0), retry_pause=5, monotonic=mono
    )
    next(flow)
    mono.value += 1.0
    own = DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED, "ours")
    with pytest.raises(DeadlineExceeded) as raised:
        flow.throw(own)
    assert raised.value is own


def test_non_waiting_query_fails_at_once_and_query_many_returns_empty() -> None:
    args = {"wait": False, "max_tasks": 1, "timeout": None, "clock": FakeClock(T0), "retry_pause": 5}
    flow = query_flow("g", 0, many=False, **args)  # type: ignore[arg-type]
    next(flow)
    with pytest.raises(TaskNotFound):
        flow.throw(TaskNotFound(grpc.StatusCode.NOT_FOUND, "empty"))
    flow = query_flow("g", 0, many=True, **args)  # type: ignore[arg-type]
    next(flow)
    with pytest.raises(StopIteration) as done:
        flow.throw(TaskNotFound(grpc.StatusCode.NOT_FOUND, "empty"))
    assert done.value.value == []


def test_query_many_reads_tasks_or_falls_back_to_task() -> None:
    def run(response: pb.QueryResponse) -> list[int]:
        flow = query_flow("g", 0, wait=True, max_tasks=3, many=True, timeout=None, clock=FakeClock(T0), retry_pause=1)
        step = next(flow)
        assert isinstance(step, Call) and isinstance(step.request, pb.QueryRequest)
        assert step.request.max_tasks == 3
        with pytest.raises(StopIteration) as done:
            flow.send(response)
        return [t.id for t in done.value.value]

    both = pb.QueryResponse(task=stored("g", 1), tasks=[stored("g", 1), stored("g", 2)])
    assert run(both) == [1, 2]
    assert run(pb.QueryResponse(task=stored("g", 1))) == [1]  # a server that ignores max_tasks
    with pytest.raises(ValueError, match="max_tasks"):
        next(query_flow("g", 0, wait=True, max_tasks=0, many=True, timeout=None, clock=FakeClock(), retry_pause=1))
