"""A server on the PostgreSQL store as operators run it: flags, a masked DSN, health that follows the database."""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc

from masstasker._pb import masstasker_pb2 as pb
from masstasker._pb import masstasker_pb2_grpc as pb_grpc
from masstasker.server import BackgroundServer, Settings
from masstasker.server.config import parse_args
from masstasker.testing import ServerProcess, store_args, store_settings
from masstasker.testing_postgres import PostgresCluster

pytest.importorskip("psycopg")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DEADLINE = 30.0


@pytest.fixture
def pg_settings(postgresql_dsn: str) -> Iterator[dict[str, Any]]:
    """Settings for a server on a fresh schema of the session's cluster."""
    with store_settings(postgresql_dsn) as settings:
        yield settings


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"timed out waiting for: {what}"
        time.sleep(0.02)
    return time.monotonic()


def test_flags_environment_and_the_data_dir_conflict(capsys: pytest.CaptureFixture[str]) -> None:
    dsn = "postgresql://tasks@db.internal/tasks"
    settings = parse_args([], {"MASSTASKER_STORE": dsn, "MASSTASKER_STORE_POOL_SIZE": "3"}, "x")
    assert (settings.store, settings.store_pool_size, settings.store_schema) == (dsn, 3, "masstasker")
    settings = parse_args(["--store", "host=/run/pg dbname=t", "--store-poll-only", "--store-schema", "q"], {}, "x")
    assert settings.store_poll_only and settings.store_schema == "q"
    with pytest.raises(SystemExit):
        parse_args(["--store", dsn, "--data-dir", "/tmp/x"], {}, "x")
    assert "--data-dir is the in-memory store's write-ahead log" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--store", "redis://nope"], {}, "x")
    assert "expected 'memory' or a PostgreSQL URI" in capsys.readouterr().err


def test_a_server_process_on_postgresql_masks_its_password(postgresql_dsn: str, pg_settings: dict[str, Any]) -> None:
    """End to end through the CLI; the cluster trusts local connections, so any password gets in."""
    args = store_args(pg_settings)
    args[1] = postgresql_dsn + " password=s3cret-pw"
    server = ServerProcess(*args, "--listen-http", "127.0.0.1:0", "--bootstrap-task-group", "boot")
    try:
        metrics_url = server.expect(r"metrics on (http://\S+)").group(1)
        with grpc.insecure_channel(server.wait_serving()) as channel:
            stub = pb_grpc.MassTaskerStub(channel)
            [boot] = stub.Debug(pb.DebugRequest(group="boot")).tasks
            (created,) = stub.Update(pb.UpdateRequest(created=[pb.Task(group="g")])).created_ids
            assert created > boot.id
            owned = stub.Query(pb.QueryRequest(group="g", own_for=Duration(seconds=60))).task
            stub.Update(pb.UpdateRequest(deleted=[pb.TaskRef(id=owned.id)]))
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            page = response.read().decode()
        assert 'masstasker_num_tasks{group="boot"} 1.0' in page
        assert "masstasker_store_available 1.0" in page
        assert "masstasker_store_ping_failures_total 0.0" in page
        assert any(re.search(r"PostgreSQL store at .*password=\*\*\*", line) for line in server.log), server.log
        assert server.stop() == 0
    finally:
        server.stop()
    assert not any("s3cret-pw" in line for line in server.log), "the password reached the log"


def _health(channel: grpc.Channel) -> set[int]:
    stub = health_pb2_grpc.HealthStub(channel)
    return {
        stub.Check(health_pb2.HealthCheckRequest(service=s), timeout=5).status for s in ("", "masstasker.MassTasker")
    }


def test_a_lost_database_is_unavailable_and_not_serving_then_recovers(
    postgresql_cluster: PostgresCluster, pg_settings: dict[str, Any]
) -> None:
    with (
        BackgroundServer(Settings(port=0, listen_http="", **pg_settings)) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.MassTaskerStub(channel)
        (kept,) = stub.Update(pb.UpdateRequest(created=[pb.Task(group="kept")])).created_ids
        waiting = stub.Query.future(pb.QueryRequest(group="empty", wait=True), timeout=60)
        _wait_for(lambda: server.call(lambda s: s.waiters.count) == 1, "the Query to wait")
        postgresql_cluster.stop("fast")
        try:
            stopped = time.monotonic()
            noticed = _wait_for(lambda: _health(channel) == {NOT_SERVING}, "health NOT_SERVING for both names")
            assert noticed - stopped < 2.0, f"health said SERVING {noticed - stopped:.1f} s after the database went"
            with pytest.raises(grpc.RpcError) as released:
                waiting.result(timeout=10)
            assert released.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.RpcError) as refused:
                stub.Update(pb.UpdateRequest(created=[pb.Task(group="lost")]), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "PostgreSQL store" in (refused.value.details() or "")
        finally:
            postgresql_cluster.start()
        _wait_for(lambda: _health(channel) == {SERVING}, "health SERVING again")
        assert [t.id for t in stub.Debug(pb.DebugRequest(group="kept")).tasks] == [kept]
        assert list(stub.Debug(pb.DebugRequest(group="lost")).tasks) == []
        assert stub.Update(pb.UpdateRequest(created=[pb.Task(group="after")])).created_ids[0] > kept


def _listener(server: BackgroundServer, attribute: str) -> Any:
    return server.call(lambda s: getattr(s.store.listener, attribute))


def test_one_stalled_ping_does_not_flip_health(pg_settings: dict[str, Any]) -> None:
    """The listener's backend paused past the ping deadline: a new connection works, so health stays SERVING."""
    with (
        BackgroundServer(Settings(port=0, listen_http="", **pg_settings)) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.MassTaskerStub(channel)
        paused = _listener(server, "backend_pid")
        failures = _listener(server, "ping_failures")
        os.kill(paused, signal.SIGSTOP)
        try:
            seen: set[int] = set()
            start = time.monotonic()
            while _listener(server, "ping_failures") == failures and seen <= {SERVING}:
                seen |= _health(channel)
                assert time.monotonic() - start < DEADLINE, "no ping failed while the listener's backend was paused"
                time.sleep(0.02)
            seen |= _health(channel)
            assert seen == {SERVING}, "health flipped on one stalled ping"
            assert server.call(lambda s: s.store.available)
            assert _listener(server, "backend_pid") != paused
            # Notifications arrive on the new connection: a waiter is woken by one, not by the poll.
            waiting = stub.Query.future(pb.QueryRequest(group="after", wait=True), timeout=DEADLINE)
            _wait_for(lambda: server.call(lambda s: s.waiters.count) == 1, "the Query to wait")
            wakeups = server.call(lambda s: s.waiters.wakeups)
            (created,) = stub.Update(pb.UpdateRequest(created=[pb.Task(group="after")])).created_ids
            assert waiting.result(timeout=DEADLINE).task.id == created
            assert server.call(lambda s: s.waiters.wakeups) > wakeups
        finally:
            os.kill(paused, signal.SIGCONT)
        assert _health(channel) == {SERVING}


def test_ended_connections_are_replaced_while_health_stays_serving(
    postgresql_cluster: PostgresCluster, pg_settings: dict[str, Any]
) -> None:
    """Every connection of the server ended by the database (as pg_terminate_backend does), the database
    still up: the listener's new connection works, so health stays SERVING, and the pool is rechecked,
    so no call fails on a dead pooled connection."""
    name = "pgperf_ended"
    settings = {**pg_settings, "store": pg_settings["store"] + f" application_name={name}"}
    with (
        BackgroundServer(Settings(port=0, listen_http="", **settings)) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.MassTaskerStub(channel)
        stub.Update(pb.UpdateRequest(created=[pb.Task(group="before")]))
        ended = postgresql_cluster.psql(
            f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = '{name}'"
        )
        assert int(ended) >= 2, "the listener's and the pool's connections should all have been ended"
        seen: set[int] = set()
        start = time.monotonic()
        while server.call(lambda s: s.store.pool_rechecks) == 0:
            seen |= _health(channel)
            assert time.monotonic() - start < DEADLINE, "the pool was never rechecked"
            time.sleep(0.02)
        assert seen <= {SERVING}, "health flipped although the database never went away"
        assert _listener(server, "ping_failures") == 1
        for _ in range(20):  # more calls than the pool has connections: each would meet a dead one
            stub.Update(pb.UpdateRequest(created=[pb.Task(group="after")]), timeout=DEADLINE)
        assert len(stub.Debug(pb.DebugRequest(group="after")).tasks) == 20


def test_a_hung_database_is_noticed_within_seconds(
    postgresql_cluster: PostgresCluster, pg_settings: dict[str, Any]
) -> None:
    """Every PostgreSQL process paused: the ping fails and so does a new connection, so health says NOT_SERVING."""
    with (
        BackgroundServer(Settings(port=0, listen_http="", **pg_settings)) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        assert _health(channel) == {SERVING}
        paused = postgresql_cluster.pids()
        for pid in paused:
            os.kill(pid, signal.SIGSTOP)
        try:
            hung = time.monotonic()
            noticed = _wait_for(lambda: _health(channel) == {NOT_SERVING}, "health NOT_SERVING for both names")
            # One ping interval, the ping's deadline, and the new connection's: about three seconds.
            assert noticed - hung < 5.0, f"health said SERVING {noticed - hung:.1f} s after the database hung"
        finally:
            for pid in paused:
                os.kill(pid, signal.SIGCONT)
        _wait_for(lambda: _health(channel) == {SERVING}, "health SERVING again")
        stub = pb_grpc.MassTaskerStub(channel)
        (created,) = stub.Update(pb.UpdateRequest(created=[pb.Task(group="after")])).created_ids
        assert [t.id for t in stub.Debug(pb.DebugRequest(group="after")).tasks] == [created]
