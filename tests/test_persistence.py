"""Durability with --data-dir: restart, snapshots, bootstrap, the lock, torn and corrupt files, acknowledgement."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2

from masstasker._pb import masstasker_pb2 as pb
from masstasker._pb import masstasker_pb2_grpc as pb_grpc
from masstasker.server import BackgroundServer, Settings
from masstasker.server.config import parse_args
from masstasker.server.durability import PersistenceError
from masstasker.server.durability import persistence as persistence_module
from masstasker.server.durability import writer as wal_module
from masstasker.server.durability.files import SEGMENT_HEADER_SIZE, FrameReader, list_segments
from masstasker.server.durability.records import encode_change
from masstasker.server.durability.snapshot import list_snapshots
from masstasker.server.stores.memory.store import StoredTask

NANOS = 1_000_000_000
REPO = Path(__file__).resolve().parent.parent

State = tuple[list[tuple[int, str, int, bytes, Any]], int]


def _state(server: BackgroundServer) -> State:
    def read(s: Any) -> State:
        memory = s.store.store  # the in-memory Store behind the store seam
        memory._check()
        if s.store.persistence is not None:
            s.store.persistence._check()
        tasks = [(t.id, t.group, t.not_before, t.body, t.labels) for t in memory.all_tasks()]
        return tasks, memory.next_id

    result: State = server.call(read)
    return result


def _payload(text: str) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(pb.Test(foo=text))
    return packed


@pytest.fixture
def durable(tmp_path: Path) -> Iterator[Callable[..., BackgroundServer]]:
    """Factory: a server on ``tmp_path/data``; each call starts a new one (stop the previous first)."""
    started: list[BackgroundServer] = []

    def make(**overrides: Any) -> BackgroundServer:
        overrides.setdefault("data_dir", str(tmp_path / "data"))
        server = BackgroundServer(Settings(port=0, listen_http="", **overrides))
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop(grace=0)


def _stub(server: BackgroundServer) -> tuple[grpc.Channel, pb_grpc.MassTaskerStub]:
    channel = grpc.insecure_channel(server.target)
    return channel, pb_grpc.MassTaskerStub(channel)


def _workload(stub: pb_grpc.MassTaskerStub) -> None:
    """Create, own, delete, bulk-set, selector delete, and a deleted highest ID."""
    created = stub.Update(
        pb.UpdateRequest(
            created=[
                pb.Task(group="work", data=_payload("a"), labels={"k": "1", "kind": "x"}, not_before={"seconds": 100}),
                pb.Task(group="work", data=_payload("b"), labels={"k": "2"}, not_before={"seconds": 100, "nanos": 7}),
                pb.Task(group="work", data=_payload("c")),  # not_before: the server's now
                pb.Task(group="other", error="boom", labels={"kind": "x"}),
                pb.Task(group="", data=_payload("empty group")),
                pb.Task(group="ünïcødé", labels={"ключ": "значение"}, not_before={"seconds": 253_402_300_799}),
            ]
        )
    ).created_ids
    owned = stub.Query(pb.QueryRequest(group="work", own_for={"seconds": 30}, now={"seconds": 200})).task
    stub.Update(pb.UpdateRequest(deleted=[pb.TaskRef(id=created[1])], predicates=[owned.id]))
    stub.BulkSet(
        pb.BulkSetRequest(
            ref=[pb.TaskRef(group="work")],
            prototype=pb.Task(group="retry", error="again", labels={"moved": "yes"}, data=_payload("new")),
        )
    )
    stub.Update(pb.UpdateRequest(deleted=[pb.TaskRef(selector=pb.LabelSelector(labels={"kind": "x"}))]))
    (last,) = stub.Update(pb.UpdateRequest(created=[pb.Task(group="gone")])).created_ids
    stub.Update(pb.UpdateRequest(deleted=[pb.TaskRef(id=last)]))


@pytest.mark.parametrize("fsync", ["always", "batch", "never"])
@pytest.mark.parametrize("snapshots", [False, True], ids=["log-only", "snapshots"])
def test_restart_restores_identical_state(
    durable: Callable[..., BackgroundServer], tmp_path: Path, fsync: str, snapshots: bool
) -> None:
    # A minimum of 1 byte snapshots after almost every change.
    options: dict[str, Any] = {"fsync": fsync, "snapshot_min_log_bytes": 1 if snapshots else 1 << 30}
    first = durable(**options)
    channel, stub = _stub(first)
    with channel:
        _workload(stub)
    before = _state(first)
    first.stop()
    assert bool(list_snapshots(tmp_path / "data")) == snapshots

    second = durable(**options)
    assert _state(second) == before
    channel, stub = _stub(second)
    with channel:
        (new_id,) = stub.Update(pb.UpdateRequest(created=[pb.Task(group="after")])).created_ids
    assert new_id == before[1]  # the ID counter survived, though the highest task was deleted
    assert new_id > max(t[0] for t in before[0])
    after = _state(second)
    second.stop()
    third = durable(**options)
    assert _state(third) == after


def test_snapshot_replaces_old_files(durable: Callable[..., BackgroundServer], tmp_path: Path) -> None:
    server = durable(snapshot_min_log_bytes=1)
    channel, stub = _stub(server)
    with channel:
        stub.Update(pb.UpdateRequest(created=[pb.Task(group="keep", data=_payload("kept"))]))
        for i in range(20):  # lease cycles: the log grows, the state does not
            stub.Update(pb.UpdateRequest(created=[pb.Task(group="g", data=_payload(str(i)))]))
            owned = stub.Query(pb.QueryRequest(group="g", own_for={"seconds": 60})).task
            stub.Update(pb.UpdateRequest(deleted=[pb.TaskRef(id=owned.id)]))
    before = _state(server)
    server.stop()
    data = tmp_path / "data"
    (snap_seq, _), *older = reversed(list_snapshots(data))
    assert not older
    assert all(base >= snap_seq for base, _ in list_segments(data))
    assert not list(data.glob("*.tmp"))
    assert _state(durable()) == before


def test_bootstrap_task_only_on_first_start(durable: Callable[..., BackgroundServer]) -> None:
    first = durable(bootstrap_task_group="seed")
    (seed,) = _state(first)[0]
    first.stop()
    second = durable(bootstrap_task_group="seed")
    assert _state(second)[0] == [seed]  # not duplicated
    channel, stub = _stub(second)
    with channel:
        stub.Update(pb.UpdateRequest(deleted=[pb.TaskRef(id=seed[0])]))
    second.stop()
    third = durable(bootstrap_task_group="seed")
    assert _state(third)[0] == []  # consumed by the job: not created again


def test_second_server_on_the_same_directory_refuses(durable: Callable[..., BackgroundServer], tmp_path: Path) -> None:
    first = durable()
    second = BackgroundServer(Settings(port=0, listen_http="", data_dir=str(tmp_path / "data")))
    try:
        with pytest.raises(PersistenceError, match=r"in use by another MassTasker server \(pid \d+ holds .*LOCK\)"):
            second.start()
    finally:
        second.stop()
    first.stop()
    durable().stop()  # released on stop


def test_cli_refuses_a_locked_directory(durable: Callable[..., BackgroundServer], tmp_path: Path) -> None:
    durable()
    result = subprocess.run(
        [sys.executable, "-m", "masstasker.server", "--port", "0", "--listen-http", ""],
        env=dict(os.environ, PYTHONPATH=str(REPO), MASSTASKER_DATA_DIR=str(tmp_path / "data")),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "in use by another MassTasker server" in result.stderr


# -- torn tails and corruption ---------------------------------------------------------


def _records(path: Path) -> list[tuple[int, int]]:
    """``(offset, frame size)`` of every record of a segment."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        reader = FrameReader(file, str(path), SEGMENT_HEADER_SIZE, size, tolerate_torn_tail=False)
        offsets = [offset for offset, _ in reader]
    return [(o, (offsets[i + 1] if i + 1 < len(offsets) else size) - o) for i, o in enumerate(offsets)]


def _three_updates(durable: Callable[..., BackgroundServer]) -> tuple[list[State], Path]:
    """Three committed Updates; the state after each; the (only) segment holding them."""
    server = durable()
    states = []
    channel, stub = _stub(server)
    with channel:
        for name in ("one", "two", "three"):
            stub.Update(pb.UpdateRequest(created=[pb.Task(group=name, data=_payload(name))]))
            states.append(_state(server))
    server.stop()
    (_, segment), *_ = reversed(list_segments(Path(server.settings.data_dir)))
    return states, segment


def _extra_record() -> bytes:
    return encode_change(4, [1], [StoredTask(99, "torn", 5, b"x" * 50, (("a", "b"),))])


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(lambda rec: rec[:5], id="half-header"),
        pytest.param(lambda rec: rec[:30], id="half-payload"),
        pytest.param(lambda rec: rec[:-1] + bytes([rec[-1] ^ 1]), id="bad-checksum"),
        pytest.param(lambda rec: b"\0" * 4096, id="zeros"),
    ],
)
def test_torn_tail_is_discarded_with_a_warning(
    durable: Callable[..., BackgroundServer], caplog: pytest.LogCaptureFixture, tail: Callable[[bytes], bytes]
) -> None:
    states, segment = _three_updates(durable)
    size = segment.stat().st_size
    with open(segment, "ab") as file:
        file.write(tail(_extra_record()))
    with caplog.at_level(logging.WARNING, "masstasker.server.durability"):
        server = durable()
    assert _state(server) == states[-1]
    assert f"{segment}: discarding a torn tail" in caplog.text
    assert segment.stat().st_size == size  # cut off, so it is not mistaken for damage later


def test_cut_short_last_record_is_lost_but_nothing_else(durable: Callable[..., BackgroundServer]) -> None:
    states, segment = _three_updates(durable)
    offset, length = _records(segment)[-1]
    os.truncate(segment, offset + length - 3)
    assert _state(durable()) == states[1]


@pytest.mark.parametrize("where", ["payload", "length"])
def test_corrupt_record_before_the_tail_stops_the_server(
    durable: Callable[..., BackgroundServer], tmp_path: Path, where: str
) -> None:
    _, segment = _three_updates(durable)
    offset, _ = _records(segment)[1]
    position = offset + (20 if where == "payload" else 1)
    with open(segment, "r+b") as file:
        file.seek(position)
        byte = file.read(1)
        file.seek(position)
        file.write(bytes([byte[0] ^ 0x40]))
    server = BackgroundServer(Settings(port=0, listen_http="", data_dir=str(tmp_path / "data")))
    try:
        with pytest.raises(PersistenceError, match=rf"{segment}: corrupt at byte offset {offset}: .*checksum"):
            server.start()
    finally:
        server.stop()


def test_corrupt_snapshot_stops_the_server(durable: Callable[..., BackgroundServer], tmp_path: Path) -> None:
    server = durable(snapshot_min_log_bytes=1)
    channel, stub = _stub(server)
    with channel:
        stub.Update(pb.UpdateRequest(created=[pb.Task(group="g", data=_payload("x" * 100)) for _ in range(5)]))
    server.stop()
    (_, snap), *_ = reversed(list_snapshots(tmp_path / "data"))
    with open(snap, "r+b") as file:
        file.seek(-10, os.SEEK_END)
        file.write(b"\xff")
    result = subprocess.run(
        [sys.executable, "-m", "masstasker.server", "--port", "0", "--listen-http", "", "--data-dir", str(snap.parent)],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert f"{snap}: corrupt at byte offset" in result.stderr


def test_missing_segment_is_an_error(durable: Callable[..., BackgroundServer], tmp_path: Path) -> None:
    for i in range(3):  # three starts: three segments
        server = durable()
        channel, stub = _stub(server)
        with channel:
            stub.Update(pb.UpdateRequest(created=[pb.Task(group=str(i))]))
        server.stop()
    segments = list_segments(tmp_path / "data")
    segments[1][1].unlink()
    server = BackgroundServer(Settings(port=0, listen_http="", data_dir=str(tmp_path / "data")))
    try:
        with pytest.raises(PersistenceError, match="a log segment or snapshot is missing"):
            server.start()
    finally:
        server.stop()


# -- acknowledgement ------------------------------------------------------------------


@pytest.fixture
def gated_fsync(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, list[int]]]:
    """Make the log's data syncs wait until the event is set; count them."""
    gate = threading.Event()
    calls: list[int] = []
    real = wal_module._datasync

    def datasync(fd: int) -> None:
        calls.append(fd)
        gate.wait(10)
        real(fd)

    monkeypatch.setattr(wal_module, "_datasync", datasync)
    yield gate, calls
    gate.set()


def _wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_nothing_is_answered_before_its_record_is_synced(
    durable: Callable[..., BackgroundServer], gated_fsync: tuple[threading.Event, list[int]]
) -> None:
    gate, _ = gated_fsync
    server = durable()
    channel, stub = _stub(server)
    with channel:
        update = stub.Update.future(pb.UpdateRequest(created=[pb.Task(group="g")]), timeout=20)
        _wait_until(lambda: server.call(lambda s: s.store.size()) == 1)  # committed in memory, not yet synced
        # A peek and a Debug would reveal the new task: they wait for the same sync.
        peek = stub.Query.future(pb.QueryRequest(group="g"), timeout=20)
        debug = stub.Debug.future(pb.DebugRequest(), timeout=20)
        with pytest.raises(grpc.FutureTimeoutError):
            update.result(timeout=0.3)
        assert not peek.done() and not debug.done()
        gate.set()
        (task_id,) = update.result(timeout=10).created_ids
        assert peek.result(timeout=10).task.id == task_id
        assert debug.result(timeout=10).num_tasks == 1


def test_concurrent_updates_share_fsyncs(
    durable: Callable[..., BackgroundServer], gated_fsync: tuple[threading.Event, list[int]]
) -> None:
    gate, calls = gated_fsync
    server = durable()
    channel, stub = _stub(server)
    with channel:
        first = stub.Update.future(pb.UpdateRequest(created=[pb.Task(group="g")]), timeout=20)
        with pytest.raises(grpc.FutureTimeoutError):
            first.result(timeout=0.2)  # its sync is held at the gate
        rest = [stub.Update.future(pb.UpdateRequest(created=[pb.Task(group="g")]), timeout=20) for _ in range(30)]
        with pytest.raises(grpc.FutureTimeoutError):
            rest[-1].result(timeout=0.3)
        gate.set()
        ids = [i for f in [first, *rest] for i in f.result(timeout=10).created_ids]
    assert sorted(ids) == list(range(1, 32))
    assert len(calls) <= 3, calls  # one held at the gate, then the 30 that queued behind it together


def test_a_failed_sync_is_never_acknowledged(
    durable: Callable[..., BackgroundServer], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    server = durable()

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(wal_module, "_datasync", broken)
    channel, stub = _stub(server)
    with channel, caplog.at_level(logging.CRITICAL, "masstasker.server.durability.writer"):
        with pytest.raises(grpc.RpcError) as info:
            stub.Update(pb.UpdateRequest(created=[pb.Task(group="g")]), timeout=10)
        assert info.value.code() == grpc.StatusCode.DATA_LOSS
        with pytest.raises(grpc.RpcError) as info:
            stub.Debug(pb.DebugRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert "no further change can be acknowledged" in caplog.text


def test_memory_only_by_default(server: BackgroundServer) -> None:
    assert server.settings.data_dir == ""
    assert server.call(lambda s: s.store.persistence) is None


def test_flags_and_environment() -> None:
    settings = parse_args([], {"MASSTASKER_DATA_DIR": "/d", "MASSTASKER_FSYNC": "batch"}, "0")
    assert (settings.data_dir, settings.fsync) == ("/d", "batch")
    settings = parse_args(["--data-dir", "/e", "--fsync", "never", "--snapshot-min-log-bytes", "10"], {}, "0")
    assert (settings.data_dir, settings.fsync, settings.snapshot_min_log_bytes) == ("/e", "never", 10)
    assert parse_args([], {}, "0").fsync == "always"
    with pytest.raises(SystemExit):
        parse_args(["--fsync", "sometimes"], {}, "0")


def test_a_failed_snapshot_keeps_the_log(
    durable: Callable[..., BackgroundServer], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def disk_full(*args: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(persistence_module, "write_snapshot", disk_full)
    server = durable(snapshot_min_log_bytes=1)
    channel, stub = _stub(server)
    with channel, caplog.at_level(logging.ERROR, "masstasker.server.durability"):
        for i in range(20):  # the log grows, the state does not: snapshots are due
            (task_id,) = stub.Update(pb.UpdateRequest(created=[pb.Task(group="g", data=_payload(str(i)))])).created_ids
            if i % 2:
                stub.Update(pb.UpdateRequest(deleted=[pb.TaskRef(id=task_id)]))
    before = _state(server)
    server.stop()
    assert "failed, keeping the log instead: [Errno 28] No space left on device" in caplog.text
    monkeypatch.undo()
    assert _state(durable()) == before
