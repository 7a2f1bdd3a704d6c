"""Poison tasks end to end: attempts counted by owning Queries, tasks past max_attempts parked in a dead-letter group.

Real servers on 127.0.0.1, each test on both stores: in memory and on a real (throwaway) PostgreSQL
cluster. The first test runs real worker processes that are killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from masstasker import AsyncClient, Client, Disown, TaskNotFound, new_task, unpack_data
from masstasker._pb import masstasker_pb2 as pb
from masstasker._pb import masstasker_pb2_grpc as pb_grpc
from masstasker.server import BackgroundServer, Settings
from masstasker.server.durability.snapshot import list_snapshots

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "poison_worker.py"
DEADLINE = 60.0  # real seconds any waited-for condition may take on a loaded machine
KILL_TEST_DEADLINE = 150.0


@pytest.fixture(params=["memory", "postgres"])
def store_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The settings that put a server on the parametrized store (a fresh PostgreSQL schema per test)."""
    if request.param == "memory":
        return {}
    return {
        "store": request.getfixturevalue("postgresql_dsn"),
        "store_schema": request.getfixturevalue("postgresql_schema"),
    }


@pytest.fixture
def masstasker_server_settings(store_settings: dict[str, Any]) -> dict[str, Any]:
    """The plugin's server fixtures, on the parametrized store."""
    return store_settings


def debug(client: Client, group: str) -> list[pb.Task]:
    return list(client.rpc.Debug(pb.DebugRequest(group=group)).tasks)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# -- a task that kills its workers ------------------------------------------------------------------------------


@pytest.mark.timeout(180)  # four worker processes start, one after another, on a possibly loaded machine
def test_a_task_that_kills_every_worker_is_dead_lettered_and_the_rest_done_once(
    masstasker_server: Any, masstasker_client: Client
) -> None:
    client = masstasker_client
    names = [f"job-{i}" for i in range(12)]
    tasks = [new_task("work", pb.Test(foo=name)) for name in names[:6]]
    tasks.append(new_task("work", pb.Test(foo="poison"), labels={"customer": "acme"}))
    tasks += [new_task("work", pb.Test(foo=name)) for name in names[6:]]
    client.create(*tasks)

    kills = 0
    deadline = time.monotonic() + KILL_TEST_DEADLINE
    worker: subprocess.Popen[bytes] | None = None
    try:
        while True:
            if worker is None or worker.poll() is not None:
                if worker is not None:
                    assert worker.returncode == -signal.SIGKILL, f"worker ended with {worker.returncode}"
                    kills += 1
                worker = subprocess.Popen([sys.executable, str(WORKER), masstasker_server.target], cwd=REPO)
            if not debug(client, "work") and debug(client, "dead"):
                break
            assert time.monotonic() < deadline, "the poison task was never dead-lettered"
            time.sleep(0.05)
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait(DEADLINE)

    assert kills == 3, "one worker died per lease the poison task was given: max_attempts = 3"
    [dead] = debug(client, "dead")
    assert unpack_data(dead, pb.Test).foo == "poison"
    assert dict(dead.labels) == {"customer": "acme"}
    assert dead.attempts == 3
    assert "owned 3 times without completing" in dead.error
    done = Counter(unpack_data(t, pb.Test).foo for t in debug(client, "done"))
    assert done == Counter(names), "every other task processed exactly once"
    assert all(t.attempts == 1 for t in debug(client, "done"))
    assert client.rpc.Debug(pb.DebugRequest()).num_tasks == len(names) + 1, "nothing lost, nothing doubled"


# -- attempts: what counts and what does not ---------------------------------------------------------------------


def test_heartbeats_over_a_long_lease_do_not_raise_attempts(masstasker_client: Client) -> None:
    client = masstasker_client
    client.create(new_task("work", pb.Test(foo="long")))
    task = client.query("work", 5, max_attempts=2, dead_letter="dead")
    assert task.attempts == 1
    first = task.id

    def work(job: pb.Task, lost: threading.Event) -> None:
        # Until the server shows several renewals (each one a new ID), bounded in time.
        wait_until(lambda: debug(client, "work")[0].id >= first + 4, "four heartbeat renewals")
        assert [t.attempts for t in debug(client, "work")] == [1]

    client.run_with_lease(task, work, heartbeat=0.02, own_for=5)
    assert task.id >= first + 4 and task.attempts == 1
    assert debug(client, "work") == [task]
    client.do(Disown(task))  # give it back: the next owner is the second attempt, not the sixth
    again = client.query("work", 5, max_attempts=2, dead_letter="dead")
    assert (again.attempts, unpack_data(again, pb.Test).foo) == (2, "long")


def test_async_heartbeats_do_not_raise_attempts_either(masstasker_server: Any, masstasker_client: Client) -> None:
    masstasker_client.create(new_task("work"))

    async def main() -> pb.Task:
        async with AsyncClient(masstasker_server.target, max_attempts=2, dead_letter="dead") as client:
            task = await client.query("work", 5)
            first = task.id

            async def work(job: pb.Task, lost: asyncio.Event) -> None:
                deadline = time.monotonic() + DEADLINE
                while (await client.rpc.Debug(pb.DebugRequest(group="work"))).tasks[0].id < first + 4:
                    assert time.monotonic() < deadline, "no four renewals"
                    await asyncio.sleep(0.02)

            await client.run_with_lease(task, work, heartbeat=0.02, own_for=5)
            assert task.id >= first + 4
            return task

    task = asyncio.run(main())
    assert task.attempts == 1
    assert debug(masstasker_client, "work") == [task]


def test_a_peek_changes_nothing(masstasker_client: Client) -> None:
    client = masstasker_client
    client.create(new_task("work"))
    client.query("work", 0.001)  # attempts 1, visible again a millisecond later
    before = debug(client, "work")
    # No own_for: a peek. With max_attempts=1 an owning Query would park this task.
    request = pb.QueryRequest(group="work", wait=True, max_attempts=1, dead_letter_group="dead")
    for _ in range(2):
        assert client.rpc.Query(request, timeout=DEADLINE).task == before[0]
    assert debug(client, "work") == before and debug(client, "dead") == []


def test_a_batch_query_dead_letters_and_returns_the_right_tasks_atomically(masstasker_client: Client) -> None:
    client = masstasker_client
    attempts = [2, 0, 2, 1, 2, 0]
    tasks = []
    for i, count in enumerate(attempts):
        task = new_task("work", pb.Test(foo=str(i)))
        task.attempts = count  # as if owned before
        tasks.append(task)
    client.create(*tasks)
    assert [t.attempts for t in debug(client, "work")] == attempts

    got = client.query_many("work", 2, 30, max_attempts=2, dead_letter="dead")
    # Tasks 0 and 2 sit before the second owned one: parked, and not counted toward max_tasks=2.
    assert [(unpack_data(t, pb.Test).foo, t.attempts) for t in got] == [("1", 1), ("3", 2)]
    dead = debug(client, "dead")
    assert [(unpack_data(t, pb.Test).foo, t.attempts) for t in dead] == [("0", 2), ("2", 2)]
    assert all("owned 2 times" in t.error for t in dead)
    visible = [t for t in debug(client, "work") if t.id not in {g.id for g in got}]
    assert [unpack_data(t, pb.Test).foo for t in visible] == ["4", "5"], "task 4 is not touched: the batch was full"
    assert client.rpc.Debug(pb.DebugRequest()).num_tasks == len(attempts)


def test_a_waiter_on_the_dead_letter_group_wakes(masstasker_server: Any, masstasker_client: Client) -> None:
    client = masstasker_client
    parked: list[pb.Task] = []
    waiter = threading.Thread(target=lambda: parked.append(client.query("dead", 30, timeout=DEADLINE)))
    waiter.start()
    wait_until(lambda: masstasker_server.call(lambda s: s.waiters.count) == 1, "the dead-letter waiter")
    poison = new_task("work", pb.Test(foo="poison"))
    poison.attempts = 1
    client.create(poison)
    with pytest.raises(TaskNotFound):  # the only visible task was parked: nothing to return
        client.query("work", 30, wait=False, max_attempts=1, dead_letter="dead")
    waiter.join(DEADLINE)
    assert not waiter.is_alive()
    assert unpack_data(parked[0], pb.Test).foo == "poison"
    assert parked[0].attempts == 2  # the dead-letter worker owned it: a new group, counting on
    assert "owned 1 times" in parked[0].error


@pytest.mark.parametrize("kept", ["log", "snapshot", "postgres"])
def test_the_count_and_the_parked_task_survive_a_restart(
    tmp_path: Path, kept: str, request: pytest.FixtureRequest
) -> None:
    data = tmp_path / "data"
    snapshots = kept == "snapshot"
    settings: dict[str, Any] = {"data_dir": str(data)}
    if snapshots:
        # A tiny threshold: a snapshot as soon as the log outgrows twice the live state, so recovery loads one.
        settings["snapshot_min_log_bytes"] = 1
    elif kept == "postgres":  # a new server on the same schema
        settings = {
            "store": request.getfixturevalue("postgresql_dsn"),
            "store_schema": request.getfixturevalue("postgresql_schema"),
        }

    def start() -> BackgroundServer:
        return BackgroundServer(Settings(port=0, listen_http="", **settings)).start()

    server = start()
    try:
        with Client(server.target, max_attempts=3, dead_letter="dead") as client:
            client.create(new_task("work", pb.Test(foo="x")), new_task("work", pb.Test(foo="poison")))
            first = client.query("work", 0.001)
            assert first.attempts == 1
            client.delete(first)
            for expected in (1, 2):  # owned twice; the second lease is left to expire
                task = client.query("work", 0.001)
                assert task.attempts == expected
    finally:
        server.stop()
    server = start()
    try:
        with Client(server.target, max_attempts=3, dead_letter="dead") as client:
            assert [t.attempts for t in debug(client, "work")] == [2]
            assert client.query("work", 0.001).attempts == 3
            wait_until(lambda: bool(client.query_many("work", 1, 30, wait=False) or debug(client, "dead")), "parking")
            [dead] = debug(client, "dead")
            assert (dead.attempts, unpack_data(dead, pb.Test).foo) == (3, "poison")
            if snapshots:
                wait_until(lambda: bool(list_snapshots(data)), "a snapshot")
    finally:
        server.stop()
    server = start()
    try:
        with Client(server.target) as client:
            [dead] = debug(client, "dead")
            assert dead.attempts == 3 and "owned 3 times" in dead.error
            assert debug(client, "work") == []
    finally:
        server.stop()


# -- bad input --------------------------------------------------------------------------------------------------


@pytest.fixture
def stub(masstasker_server: Any) -> Iterator[pb_grpc.MassTaskerStub]:
    with grpc.insecure_channel(masstasker_server.target) as channel:
        yield pb_grpc.MassTaskerStub(channel)


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        pytest.param({"max_attempts": 3}, "dead_letter_group", id="max-attempts-without-a-group"),
        pytest.param({"max_attempts": 3, "dead_letter_group": "work"}, "dead_letter_group", id="same-group"),
        pytest.param({"max_attempts": 3, "dead_letter_group": "d" * 5000}, "dead_letter_group", id="long-group"),
        pytest.param({"dead_letter_group": "d" * 5000}, "dead_letter_group", id="long-group-alone"),
    ],
)
def test_bad_poison_options_are_invalid_argument_and_change_nothing(
    stub: pb_grpc.MassTaskerStub, request_fields: dict[str, Any], message: str
) -> None:
    stub.Update(pb.UpdateRequest(created=[pb.Task(group="work", attempts=9)]))
    before = stub.Debug(pb.DebugRequest())
    for wait in (False, True):
        request = pb.QueryRequest(group="work", own_for={"seconds": 30}, wait=wait, **request_fields)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Query(request, timeout=DEADLINE)
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert message in (raised.value.details() or "")
    assert stub.Debug(pb.DebugRequest()) == before
