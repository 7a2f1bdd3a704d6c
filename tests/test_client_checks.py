"""The client refuses bad arguments up front, with errors that name them — before anything reaches the wire.

Each check is made against a real server, and the server is asked afterwards whether anything arrived:
a refused call must change nothing, and must not hang (a ``None`` group used to wait forever on ``""``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from masstasker import AsyncClient, Client, Create, Delete, Move, SystemClock, new_task, pack_data, unpack_data
from masstasker._pb import masstasker_pb2 as pb
from masstasker.client._core import TARGET_ENV


def stored_tasks(client: Client) -> int:
    return int(client.rpc.Debug(pb.DebugRequest(), timeout=10).num_tasks)


# -- wrong types --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: new_task("g", "text"), "data must be a protobuf message"),
        (lambda: new_task("g", not_before="tomorrow"), "not_before must be a datetime"),
        (lambda: pack_data(new_task("g"), {"foo": "bar"}), "data must be a protobuf message"),
        (lambda: pack_data("task", pb.Test()), "task must be a Task"),
        (lambda: unpack_data(new_task("g", pb.Test()), "Test"), "into must be a protobuf message class"),
        (lambda: unpack_data(None, pb.Test), "task must be a Task"),
        (lambda: Create("x"), "Create\\(\\) argument must be a Task"),
        (lambda: Delete(None), "Delete\\(\\) argument must be a Task"),
        (lambda: Move("g", 42), "Move\\(\\) argument must be a Task"),
    ],
)
def test_wrong_types_raise_type_error_naming_the_argument(call: Callable[[], object], message: str) -> None:
    with pytest.raises(TypeError, match=message):
        call()


def test_a_wrong_type_in_a_call_reaches_nothing(masstasker_client: Client) -> None:
    task = new_task("g")
    masstasker_client.create(task)
    with pytest.raises(TypeError, match="own_for must be seconds"):
        masstasker_client.query("g", "30")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="max_tasks must be an int"):
        masstasker_client.query_many("g", "3", 30)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="timeout must be seconds"):
        masstasker_client.create(new_task("g"), timeout="soon")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="exc must be an exception"):
        masstasker_client.commit_or_move(task, "failed", "errors")  # type: ignore[arg-type]
    assert masstasker_client.peek_many("g", 10, wait=False) == [task]  # untouched


# -- None as a group ---------------------------------------------------------------------------------------------


def test_none_as_a_group_is_refused_not_read_as_the_empty_group(masstasker_client: Client) -> None:
    masstasker_client.create(new_task(""))  # so a query on "" would not even have to wait
    task = new_task("g")
    masstasker_client.create(task)
    for call in (
        lambda: new_task(None),  # type: ignore[arg-type]
        lambda: masstasker_client.move(None, task),  # type: ignore[arg-type]
        lambda: masstasker_client.query(None, own_for=30),  # type: ignore[arg-type]
        lambda: masstasker_client.query_many(None, 5, own_for=30),  # type: ignore[arg-type]
        lambda: masstasker_client.peek(None),  # type: ignore[arg-type]
        lambda: masstasker_client.commit_or_move(task, ValueError(), None),  # type: ignore[arg-type]
    ):
        with pytest.raises(TypeError, match=r"must be a str \(a group name\), got None"):
            call()
    assert masstasker_client.peek_many("", 10, wait=False)[0].group == ""
    assert masstasker_client.peek_many("g", 10, wait=False) == [task]  # not moved, not leased
    assert stored_tasks(masstasker_client) == 2


def test_async_client_refuses_none_as_a_group(masstasker_async_client: AsyncClient) -> None:
    async def main() -> None:
        with pytest.raises(TypeError, match="group"):
            await masstasker_async_client.query(None, own_for=30)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="group"):
            await masstasker_async_client.query_many(None, 2, own_for=30)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="group"):
            await masstasker_async_client.move(None, new_task("g"))  # type: ignore[arg-type]

    asyncio.run(asyncio.wait_for(main(), 30))


# -- own_for is required -------------------------------------------------------------------------------------------


def test_own_for_is_required_and_peek_is_the_way_to_look(masstasker_client: Client) -> None:
    first, second = new_task("work"), new_task("work")
    masstasker_client.create(first, second)
    with pytest.raises(TypeError, match="own_for"):
        masstasker_client.query("work")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="own_for"):
        masstasker_client.query_many("work", 30)  # type: ignore[call-arg]  # meant 30 seconds: refused
    assert masstasker_client.peek("work") == first  # same ID: not leased
    assert masstasker_client.peek_many("work", 5) == [first, second]
    assert masstasker_client.query("work", own_for=0) == first  # an explicit 0 still peeks, as in Go
    leased = masstasker_client.query_many("work", 5, own_for=30)
    assert [t.id for t in leased] != [first.id, second.id]
    assert masstasker_client.peek_many("work", 5, wait=False) == []  # both leased now


def test_async_own_for_is_required_and_peek_does_not_lease(masstasker_async_client: AsyncClient) -> None:
    async def main() -> None:
        task = new_task("work")
        await masstasker_async_client.create(task)
        with pytest.raises(TypeError, match="own_for"):
            await masstasker_async_client.query("work")  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="own_for"):
            await masstasker_async_client.query_many("work", 30)  # type: ignore[call-arg]
        assert await masstasker_async_client.peek("work") == task
        assert await masstasker_async_client.peek_many("work", 3) == [task]
        assert (await masstasker_async_client.query("work", 30)).id != task.id
        assert await masstasker_async_client.peek_many("work", 3, wait=False) == []

    asyncio.run(asyncio.wait_for(main(), 30))


# -- naive datetimes, in a zone that is not UTC ------------------------------------------------------------------


class NaiveClock(SystemClock):
    def now(self) -> datetime:
        return datetime.now()  # the mistake under test


@pytest.fixture
def in_tokyo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local zone is Asia/Tokyo (UTC+9, no daylight saving) for this test."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    assert datetime.now().astimezone().utcoffset() == timedelta(hours=9)
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("in_tokyo")
def test_a_naive_not_before_is_refused_and_an_aware_one_is_the_instant_it_names(
    masstasker_client: Client, masstasker_client_factory: Callable[..., Client]
) -> None:
    with pytest.raises(ValueError, match="not_before must be a timezone-aware datetime"):
        new_task("g", not_before=datetime.now() + timedelta(minutes=1))
    with pytest.raises(ValueError, match="the clock's now\\(\\) must be a timezone-aware"):
        masstasker_client_factory(clock=NaiveClock()).create(new_task("g"))  # a custom clock's mistake
    task = new_task("g", not_before=datetime.now().astimezone() + timedelta(minutes=1))
    masstasker_client.create(task)
    (stored,) = masstasker_client.rpc.Debug(pb.DebugRequest(group="g"), timeout=10).tasks
    delay = stored.not_before.ToDatetime(tzinfo=UTC) - datetime.now(UTC)
    assert timedelta(seconds=30) < delay <= timedelta(minutes=1)  # one minute from now, not nine hours
    with pytest.raises(ValueError, match="timezone-aware"):
        from masstasker.testing import FakeClock

        FakeClock(datetime.now())


# -- the target -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [Client, AsyncClient], ids=["sync", "async"])
def test_a_bad_target_fails_at_construction_without_grpc_noise(
    make: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(TARGET_ENV, raising=False)
    with pytest.raises(TypeError, match=f"no server to dial.*{TARGET_ENV}"):
        make(None)
    with pytest.raises(TypeError, match=f"no server to dial.*{TARGET_ENV}"):
        make()
    with pytest.raises(TypeError, match="target must be a str"):
        make(50053)
    with pytest.raises(ValueError, match="target must name a server"):
        make("")
    with pytest.raises(ValueError, match="target must name a server"):
        make("  ")
    assert capfd.readouterr().err == ""  # no gRPC log lines


def test_no_target_dials_masstasker_target(masstasker_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TARGET_ENV, masstasker_server.target)
    with Client() as client:
        client.create(new_task("g"))

    async def main() -> int:
        async with AsyncClient() as client:
            return len(await client.peek_many("g", 5, wait=False))

    assert asyncio.run(main()) == 1
