"""A full or failing disk: health goes NOT_SERVING, nothing undurable is acknowledged, the server exits
non-zero, and a restart recovers every acknowledged change. Also the durability metrics.

The disk is real: a small tmpfs that fills up (mounted when the tests run as
root), and an fsync that fails with EIO in a server subprocess
(``tests/faults/sitecustomize.py`` wraps ``os.fsync`` before the server is
imported, so the log writer's own path meets the error).
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from masstasker._pb import masstasker_pb2 as pb
from masstasker._pb import masstasker_pb2_grpc as pb_grpc
from masstasker.server import BackgroundServer, Server, Settings
from masstasker.server.durability.files import SEGMENT_HEADER_SIZE, list_segments
from masstasker.testing import ServerProcess, run_server_process

FAULTS = Path(__file__).resolve().parent / "faults"
SERVICES = ("", "masstasker.MassTasker")
DEADLINE = 60.0  # seconds: generous, the machine is shared
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def _payload(size: int) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(pb.Test(foo="x" * size))
    return packed


def _wait_for(condition: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class HealthWatch:
    """Every status the health service's Watch stream sends for one service name, collected in a thread."""

    def __init__(self, channel: grpc.Channel, service: str) -> None:
        self.statuses: list[int] = []
        self._stream = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE * 3
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for response in self._stream:
                self.statuses.append(response.status)
        except grpc.RpcError:
            pass  # the server went away: the statuses so far are the answer

    def close(self) -> None:
        self._stream.cancel()
        self._thread.join(DEADLINE)


def _metrics_port(server: ServerProcess) -> int:
    for line in server.log:
        match = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", line)
        if match:
            return int(match.group(1))
    raise AssertionError("no metrics line in the server log:\n" + "\n".join(server.log))


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text: str = response.read().decode()
    return text


def _sample(text: str, name: str) -> float:
    """The value of one sample (``name`` with its labels, as exposed)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in the scrape:\n{text}")


def _create(stub: pb_grpc.MassTaskerStub, size: int) -> int:
    (task_id,) = stub.Update(
        pb.UpdateRequest(created=[pb.Task(group="g", data=_payload(size))]), timeout=DEADLINE
    ).created_ids
    return int(task_id)


def _break_and_check(
    server: ServerProcess, stub: pb_grpc.MassTaskerStub, channel: grpc.Channel, size: int, attempts: int, error: str
) -> tuple[list[int], int]:
    """Create tasks until one fails; check health, metrics, that nothing more is answered, and the exit.

    Returns the acknowledged IDs and how many creates failed.
    """
    watches = [HealthWatch(channel, service) for service in SERVICES]
    try:
        _wait_for(lambda: all(w.statuses == [SERVING] for w in watches), "health SERVING on every name")
        acknowledged: list[int] = []
        codes: list[grpc.StatusCode] = []
        for _ in range(attempts):
            try:
                acknowledged.append(_create(stub, size))
            except grpc.RpcError as exc:
                codes.append(exc.code())
                break
        assert codes == [grpc.StatusCode.DATA_LOSS], f"no failure in {attempts} creates of {size} bytes"
        # The moment durability is lost, health says so for both names...
        _wait_for(lambda: all(NOT_SERVING in w.statuses for w in watches), "health NOT_SERVING")
        assert all(w.statuses == [SERVING, NOT_SERVING] for w in watches), [w.statuses for w in watches]
        # ... and a metric says why. (The open Watch streams keep the server in its grace period.)
        scrape = _scrape(_metrics_port(server))
        assert _sample(scrape, "masstasker_durability_ok") == 0
        assert _sample(scrape, f'masstasker_durability_lost{{error="{error}"}}') == 1
        # Nothing that is not durable is revealed or acknowledged any more: reads fail too.
        for call in (
            lambda: stub.Query(pb.QueryRequest(group="g"), timeout=DEADLINE),
            lambda: _create(stub, 1),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNAVAILABLE)
    finally:
        for watch in watches:
            watch.close()
    # Then the server exits non-zero, so that a supervisor restarts it and recovery runs.
    assert server.process.wait(DEADLINE) == 1
    log = "\n".join(server.log)
    assert "durability lost" in log
    assert "health is NOT_SERVING" in log
    assert "exiting because durability was lost" in log
    return acknowledged, len(codes)


def _recovered_ids(data: Path, *, then_create: bool = False) -> set[int]:
    """Recover ``data`` in this process: the IDs of its tasks (with one more created after, if asked)."""
    with BackgroundServer(Settings(port=0, listen_http="", data_dir=str(data))) as server:

        def read(s: Server) -> set[int]:
            memory = s.store.store  # type: ignore[attr-defined]  # the in-memory Store behind the seam
            memory._check()
            return {t.id for t in memory.all_tasks()}

        ids: set[int] = server.call(read)
        if then_create:
            with grpc.insecure_channel(server.target) as channel:
                ids.add(_create(pb_grpc.MassTaskerStub(channel), 10))
    return ids


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted at ``tmp_path/disk`` (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (the full-disk test runs as root in CI)")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"root, but cannot mount a tmpfs here (no CAP_SYS_ADMIN?): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def _fill(path: Path) -> None:
    """Write zeros to ``path`` until the file system is full."""
    with open(path, "wb", buffering=0) as out:
        try:
            while True:
                out.write(bytes(64 * 1024))
        except OSError as exc:
            assert exc.errno == 28, exc  # ENOSPC


def test_a_full_disk_stops_the_server_and_a_restart_recovers_every_acknowledged_change(small_disk: Path) -> None:
    ballast = small_disk / "ballast"
    ballast.write_bytes(bytes(1 << 20))  # freed later, as an operator would free space
    data = small_disk / "data"
    args = ("--data-dir", str(data), "--listen-http", "127.0.0.1:0", "--shutdown-grace", "30")
    with run_server_process(*args) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.MassTaskerStub(channel)
        # 3 MiB are left: about 50 tasks of 64 KiB fill it.
        acknowledged, failed = _break_and_check(server, stub, channel, 64 * 1024, 200, "ENOSPC")
    assert len(acknowledged) > 10
    assert "No space left on device" in "\n".join(server.log)

    ballast.unlink()
    recovered = _recovered_ids(data, then_create=True)
    assert set(acknowledged) <= recovered  # nothing acknowledged is lost
    assert len(recovered) <= len(acknowledged) + failed + 1  # and nothing appears that was never asked for

    # Restarting on a disk that is still full fails, saying why, and loses nothing.
    _fill(small_disk / "squeeze")
    with pytest.raises(RuntimeError, match="is the disk full"), run_server_process("--data-dir", str(data)):
        pass
    (small_disk / "squeeze").unlink()
    assert _recovered_ids(data) == recovered


def test_a_failed_fsync_stops_the_server_and_a_restart_recovers_every_acknowledged_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flag = tmp_path / "fail-fsync"
    data = tmp_path / "data"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(FAULTS), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("FAULTY_FSYNC_FLAG", str(flag))
    args = ("--data-dir", str(data), "--listen-http", "127.0.0.1:0", "--shutdown-grace", "30")
    with run_server_process(*args) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.MassTaskerStub(channel)
        before = [_create(stub, 10) for _ in range(5)]
        flag.touch()  # from now on every fsync of the server fails with EIO
        acknowledged, failed = _break_and_check(server, stub, channel, 10, 1, "EIO")
    assert acknowledged == []  # the first create after the failure is already refused
    assert "Input/output error" in "\n".join(server.log)

    recovered = _recovered_ids(data)  # in this process: no fault injected
    assert set(before) <= recovered
    assert len(recovered) <= len(before) + failed


def test_durability_metrics_on_a_real_server(tmp_path: Path) -> None:
    data = tmp_path / "data"
    settings = Settings(port=0, listen_http="127.0.0.1:0", data_dir=str(data), snapshot_min_log_bytes=1 << 30)
    with BackgroundServer(settings) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.MassTaskerStub(channel)
        for _ in range(20):
            _create(stub, 100)
        assert server.server is not None and server.server.http_port is not None
        scrape = _scrape(server.server.http_port)
        (_, segment), *_ = list_segments(data)
        log_bytes = segment.stat().st_size - SEGMENT_HEADER_SIZE
        assert _sample(scrape, "masstasker_wal_bytes_since_snapshot") == log_bytes
        assert _sample(scrape, "masstasker_wal_fsync_seconds_count") >= 20  # --fsync always: one per answer at most
        assert _sample(scrape, "masstasker_snapshot_duration_seconds_count") == 0
        assert _sample(scrape, "masstasker_durability_ok") == 1
        assert "masstasker_durability_lost{" not in scrape

    # Restarted with snapshots due at once: the first change takes one, and the log count starts over.
    settings = Settings(port=0, listen_http="127.0.0.1:0", data_dir=str(data), snapshot_min_log_bytes=1)
    with BackgroundServer(settings) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.MassTaskerStub(channel)
        assert server.server is not None and server.server.http_port is not None
        port = server.server.http_port
        _create(stub, 100)
        _wait_for(lambda: _sample(_scrape(port), "masstasker_snapshot_duration_seconds_count") >= 1, "a snapshot")
        scrape = _scrape(port)
        assert _sample(scrape, "masstasker_snapshot_duration_seconds_sum") > 0
        assert _sample(scrape, "masstasker_wal_bytes_since_snapshot") < log_bytes
