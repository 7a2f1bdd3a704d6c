"""Group statistics with --data-dir: counters, leases, errors and history survive a restart and a SIGKILL."""

from __future__ import annotations

import random
import signal
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from clocks import HandClock
from google.protobuf.duration_pb2 import Duration

from masstasker._pb import masstasker_admin_pb2 as apb
from masstasker._pb import masstasker_admin_pb2_grpc as apb_grpc
from masstasker._pb import masstasker_pb2 as pb
from masstasker._pb import masstasker_pb2_grpc as pb_grpc
from masstasker.server import BackgroundServer, Settings
from masstasker.server.durability.files import segment_path
from masstasker.server.durability.records import encode_change_v1, frame
from masstasker.server.durability.snapshot import list_snapshots
from masstasker.server.stores.memory.store import StoredTask
from masstasker.testing import run_server_process

S = 1_000_000_000
TIMEOUT = 10.0


@pytest.fixture
def clock() -> HandClock:
    return HandClock(1_800_000_000 * S + S // 3)


@pytest.fixture
def durable(tmp_path: Path, clock: HandClock) -> Iterator[Callable[..., BackgroundServer]]:
    """Factory: a server on ``tmp_path/data`` with the test's clock; stop one before starting the next."""
    started: list[BackgroundServer] = []

    def make(**overrides: Any) -> BackgroundServer:
        settings = Settings(port=0, listen_http="", data_dir=str(tmp_path / "data"), **overrides)
        server = BackgroundServer(settings, clock=clock)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop(grace=0)


def own(mt: pb_grpc.MassTaskerStub, clock: HandClock, group: str, seconds: int, max_tasks: int = 1) -> list[pb.Task]:
    request = pb.QueryRequest(group=group, own_for={"seconds": seconds}, max_tasks=max_tasks)
    request.now.FromNanoseconds(clock())
    response = mt.Query(request, timeout=TIMEOUT)
    return list(response.tasks) or [response.task]


def workload(mt: pb_grpc.MassTaskerStub, clock: HandClock) -> None:
    """Several seconds of a job: creates, leases, renewals, completions, failures, a BulkSet move."""
    rng = random.Random(3)
    mt.Update(pb.UpdateRequest(created=[pb.Task(group="work", labels={"n": str(i)}) for i in range(40)]))
    for second in range(12):
        clock.advance(S)
        for task in own(mt, clock, "work", 30, max_tasks=rng.randint(1, 4)):
            outcome = rng.random()
            if outcome < 0.5:
                mt.Update(pb.UpdateRequest(deleted=[pb.TaskRef(id=task.id)]))
            elif outcome < 0.7:  # failed: moved to the error group with a reason
                task.error = f"attempt {second} failed"
                task.group = "failed"
                mt.Update(pb.UpdateRequest(deleted=[pb.TaskRef(id=task.id)], created=[task]))
            else:  # still working: a heartbeat renews the lease (delete + copy in the future)
                renewed = pb.Task(group=task.group, labels=task.labels)
                renewed.not_before.FromNanoseconds(clock() + 60 * S)
                mt.Update(pb.UpdateRequest(deleted=[pb.TaskRef(id=task.id)], created=[renewed]))
        if second == 6:
            mt.BulkSet(pb.BulkSetRequest(ref=[pb.TaskRef(group="failed")], prototype=pb.Task(group="parked")))
    mt.Update(pb.UpdateRequest(created=[pb.Task(group="later", not_before={"seconds": clock() // S + 3600})]))


def observe(server: BackgroundServer) -> dict[str, Any]:
    """Everything the admin API says, history included, plus the store's own invariant check."""
    server.call(lambda s: s.store.check())
    with grpc.insecure_channel(server.target) as channel:
        admin = apb_grpc.AdminStub(channel)
        groups = admin.ListGroups(apb.ListGroupsRequest(history=Duration(seconds=600)), timeout=TIMEOUT)
        seen: dict[str, Any] = {"groups": [g.SerializeToString(deterministic=True) for g in groups.groups]}
        for name in ("work", "parked", "later"):
            listing = admin.ListTasks(apb.ListTasksRequest(group=name, page_size=1000), timeout=TIMEOUT)
            seen[name] = [(t.id, s) for t, s in zip(listing.tasks, listing.states, strict=True)]
    return seen


@pytest.mark.parametrize("snapshots", [False, True], ids=["log-only", "snapshots"])
def test_statistics_survive_a_restart(
    durable: Callable[..., BackgroundServer], tmp_path: Path, clock: HandClock, snapshots: bool
) -> None:
    options = {"snapshot_min_log_bytes": 1 if snapshots else 1 << 30}
    first = durable(**options)
    with grpc.insecure_channel(first.target) as channel:
        workload(pb_grpc.MassTaskerStub(channel), clock)
    before = observe(first)
    assert any(state == apb.TASK_STATE_LEASED for _, state in before["work"]), "the workload leaves leases"
    first.stop()
    assert bool(list_snapshots(tmp_path / "data")) == snapshots

    second = durable(**options)
    assert observe(second) == before
    # The history goes on from where it was: the next second's changes land after the recovered ones.
    clock.advance(S)
    with grpc.insecure_channel(second.target) as channel:
        own(pb_grpc.MassTaskerStub(channel), clock, "work", 30)
        clock.advance(S)
        stats = apb_grpc.AdminStub(channel).GetGroup(apb.GetGroupRequest(group="work"), timeout=TIMEOUT).group
    owned = [p.owned for p in stats.history]
    assert owned == sorted(owned) and owned[-1] == stats.owned
    after = observe(second)
    second.stop()
    assert observe(durable(**options)) == after


def test_an_old_log_without_kinds_or_times_is_still_read(
    durable: Callable[..., BackgroundServer], tmp_path: Path
) -> None:
    """A data directory written before statistics: its records count as Updates, nothing is lost."""
    data = tmp_path / "data"
    data.mkdir()
    body = pb.Task(error="old failure").SerializeToString()
    old_tasks = [StoredTask(1, "old", 5 * S, body, None), StoredTask(2, "old", 5 * S, b"", None)]
    # A version-1 segment, as servers before statistics wrote it: magic, base 0, records without kind or time.
    segment_path(data, 0).write_bytes(
        b"MTWAL\x00\x01\n"
        + frame(struct.pack("<Q", 0))
        + encode_change_v1(1, [], old_tasks)
        + encode_change_v1(2, [2], [])
    )
    server = durable()
    with grpc.insecure_channel(server.target) as channel:
        stats = apb_grpc.AdminStub(channel).GetGroup(apb.GetGroupRequest(group="old"), timeout=TIMEOUT).group
    assert (stats.total, stats.errors, stats.created, stats.departed) == (1, 1, 2, 1)
    server.call(lambda s: s.store.check())


def test_counts_of_acknowledged_operations_are_exact_after_sigkill(tmp_path: Path) -> None:
    """A real server process killed with SIGKILL mid-job: every acknowledged change is counted once."""
    data = str(tmp_path / "data")
    expected = {"created": 0, "owned": 0, "departed": 0}
    done_created = {"done": 0}
    with run_server_process("--data-dir", data, "--snapshot-min-log-bytes", "20000") as proc:
        with grpc.insecure_channel(proc.target) as channel:
            mt = pb_grpc.MassTaskerStub(channel)
            rng = random.Random(11)
            for _ in range(300):  # bounded: a few hundred acknowledged calls
                action = rng.random()
                if action < 0.35:
                    n = rng.randint(1, 20)
                    mt.Update(pb.UpdateRequest(created=[pb.Task(group="job") for _ in range(n)]), timeout=TIMEOUT)
                    expected["created"] += n
                    continue
                try:
                    response = mt.Query(
                        pb.QueryRequest(group="job", own_for={"seconds": 300}, max_tasks=rng.randint(1, 5)),
                        timeout=TIMEOUT,
                    )
                    tasks = list(response.tasks) or [response.task]  # `tasks` is filled for max_tasks > 1 only
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.NOT_FOUND
                    continue
                expected["owned"] += len(tasks)
                if action < 0.8:
                    mt.Update(pb.UpdateRequest(deleted=[pb.TaskRef(id=t.id) for t in tasks]), timeout=TIMEOUT)
                    expected["departed"] += len(tasks)
                else:  # moved to "done": departs "job", is created in "done"
                    moved = [pb.Task(group="done") for _ in tasks]
                    mt.Update(
                        pb.UpdateRequest(deleted=[pb.TaskRef(id=t.id) for t in tasks], created=moved),
                        timeout=TIMEOUT,
                    )
                    expected["departed"] += len(tasks)
                    done_created["done"] += len(tasks)
        proc.process.send_signal(signal.SIGKILL)
        proc.process.wait(timeout=TIMEOUT)
    assert list_snapshots(tmp_path / "data"), "the job was long enough to snapshot: counts come from both"
    with run_server_process("--data-dir", data) as proc, grpc.insecure_channel(proc.target) as channel:
        admin = apb_grpc.AdminStub(channel)
        job = admin.GetGroup(apb.GetGroupRequest(group="job"), timeout=TIMEOUT).group
        done = admin.GetGroup(apb.GetGroupRequest(group="done"), timeout=TIMEOUT).group
    assert {"created": job.created, "owned": job.owned, "departed": job.departed} == expected
    assert (done.created, done.total) == (done_created["done"], done_created["done"])
    assert job.total == expected["created"] - expected["departed"]
