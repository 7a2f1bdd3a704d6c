"""The server as operators run it: a subprocess, flags and environment, health, reflection, metrics, signals."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from masstasker import __version__
from masstasker._pb import masstasker_pb2 as pb
from masstasker._pb import masstasker_pb2_grpc as pb_grpc
from masstasker.server import BackgroundServer
from masstasker.server.__main__ import main
from masstasker.server.config import Settings, parse_address, parse_args
from masstasker.testing import ServerProcess

STARTUP_TIMEOUT = 20.0


@pytest.fixture
def spawn() -> Iterator[Callable[..., ServerProcess]]:
    """``spawn(*args, **options)``: a server process (see ``ServerProcess``), stopped after the test."""
    started: list[ServerProcess] = []

    def start(*args: str, **options: Any) -> ServerProcess:
        started.append(ServerProcess(*args, **options))
        return started[-1]

    yield start
    for proc in started:
        proc.stop()


def test_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "masstasker.server", "--version"], capture_output=True, text=True, check=True
    )
    assert __version__ in out.stdout


def test_flags_and_environment() -> None:
    settings = parse_args([], {"MASSTASKER_LISTEN_RPC": "[::1]:7000", "MASSTASKER_MAX_MSG_SIZE": "1000"}, "x")
    assert settings.rpc_address == "[::1]:7000"
    assert settings.max_msg_size == 1000
    settings = parse_args(["--port", "9", "--log-format", "json"], {"MASSTASKER_PORT": "8"}, "x")
    assert (settings.port, settings.log_format, settings.rpc_address) == (9, "json", "127.0.0.1:9")
    assert parse_args([], {}, "x") == Settings()
    assert parse_address(":50053") == ("::", 50053)
    for argv, env in (
        (["--listen-rpc", "nonsense"], {}),
        ([], {"MASSTASKER_PORT": "x"}),
        ([], {"MASSTASKER_LOG_FORMAT": "xml"}),
    ):
        with pytest.raises(SystemExit):
            parse_args(argv, env, "x")


def test_serves_logs_its_port_and_exits_cleanly_on_sigterm(spawn: Callable[..., ServerProcess]) -> None:
    server = spawn("--log-level", "debug")
    target = server.wait_serving()
    assert target.startswith("127.0.0.1:") and not target.endswith(":0")
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.MassTaskerStub(channel)
        assert list(stub.Update(pb.UpdateRequest(created=[pb.Task(group="g")])).created_ids) == [1]
    server.expect(r"Update -> OK")  # per-request logging, debug level only
    assert server.stop() == 0


def test_environment_configures_the_process(spawn: Callable[..., ServerProcess]) -> None:
    server = spawn(
        env={"MASSTASKER_LISTEN_RPC": "127.0.0.1:0", "MASSTASKER_LISTEN_HTTP": "", "MASSTASKER_LOG_FORMAT": "json"},
        loopback=False,  # no flags at all: the environment alone
    )
    line = server.expect(r'"message": "listening on (\S+)"')
    assert line.group(1).startswith("127.0.0.1:")


def test_bootstrap_group_gets_one_task(spawn: Callable[..., ServerProcess]) -> None:
    server = spawn("--bootstrap-task-group", "boot")
    with grpc.insecure_channel(server.wait_serving()) as channel:
        stub = pb_grpc.MassTaskerStub(channel)
        [task] = stub.Debug(pb.DebugRequest(group="boot")).tasks
        assert task.id == 1 and not task.HasField("data")


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def test_sigterm_releases_waiters_and_exits_zero(spawn: Callable[..., ServerProcess]) -> None:
    server = spawn("--listen-http", "127.0.0.1:0", "--shutdown-grace", "5")
    metrics_url = server.expect(r"metrics on (http://\S+)").group(1)
    with grpc.insecure_channel(server.wait_serving()) as channel:
        stub = pb_grpc.MassTaskerStub(channel)
        waiting = stub.Query.future(pb.QueryRequest(group="g", wait=True), timeout=30)
        deadline = time.monotonic() + 10
        while "masstasker_waiting_queries 1.0" not in scrape(metrics_url):
            assert time.monotonic() < deadline, "the Query never started waiting"
            time.sleep(0.01)
        server.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as info:
            waiting.result(timeout=20)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.wait(timeout=20) == 0
    server.expect("stopped")


def test_health_and_reflection(spawn: Callable[..., ServerProcess]) -> None:
    server = spawn()
    with grpc.insecure_channel(server.wait_serving()) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "masstasker.MassTasker"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        [response] = list(reflection.ServerReflectionInfo(iter([request])))
        names = {s.name for s in response.list_services_response.service}
        assert {"masstasker.MassTasker", "grpc.health.v1.Health"} <= names
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="masstasker.MassTasker")
        [response] = list(reflection.ServerReflectionInfo(iter([request])))
        assert response.file_descriptor_response.file_descriptor_proto


def test_metrics_page(spawn: Callable[..., ServerProcess]) -> None:
    server = spawn("--listen-http", "127.0.0.1:0")
    metrics_url = server.expect(r"metrics on (http://\S+)").group(1)
    with grpc.insecure_channel(server.wait_serving()) as channel:
        stub = pb_grpc.MassTaskerStub(channel)
        future = time.time() + 3600
        stub.Update(
            pb.UpdateRequest(
                created=[
                    pb.Task(group="a"),
                    pb.Task(group="a"),
                    pb.Task(group="b"),
                    pb.Task(group="a", not_before={"seconds": int(future)}),
                ]
            )
        )
        with pytest.raises(grpc.RpcError):
            stub.Query(pb.QueryRequest(group="empty"))
    page = scrape(metrics_url)
    assert 'masstasker_num_tasks{group="a"} 3.0' in page
    assert 'masstasker_num_tasks{group="b"} 1.0' in page
    assert 'masstasker_visible_tasks{group="a"} 2.0' in page
    assert "masstasker_tasks 4.0" in page
    assert 'masstasker_rpc_requests_total{code="OK",method="Update"} 1.0' in page
    assert 'masstasker_rpc_requests_total{code="NOT_FOUND",method="Query"} 1.0' in page
    assert 'masstasker_rpc_duration_seconds_count{code="OK",method="Update"} 1.0' in page


def test_port_in_use_is_a_clear_error(spawn: Callable[..., ServerProcess]) -> None:
    first = spawn()
    target = first.wait_serving()
    second = spawn("--listen-rpc", target)
    second.expect(r"cannot listen on")
    assert second.wait(timeout=STARTUP_TIMEOUT) == 1


def test_console_script_runs_main() -> None:
    [script] = [ep for ep in entry_points(group="console_scripts") if ep.name == "masstasker-server"]
    assert script.load() is main


def test_health_turns_not_serving_on_shutdown(make_server: Callable[..., BackgroundServer]) -> None:
    server = make_server()
    with grpc.insecure_channel(server.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stopper = threading.Thread(target=server.stop, args=(1.0,))
        stopper.start()
        try:
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            stopper.join(30)


def test_the_launcher_copies_the_log_to_a_file_and_kills(tmp_path: Path) -> None:
    log_file = tmp_path / "server.log"
    log_file.write_text("from an earlier run\n")
    with ServerProcess("--log-level", "debug", log_file=log_file, prefix=("env", "EXTRA=1")) as server:
        target = server.wait_serving()
        with grpc.insecure_channel(target) as channel:
            pb_grpc.MassTaskerStub(channel).Debug(pb.DebugRequest(), timeout=10)
        server.expect(r"Debug -> OK")
        assert server.kill() == -signal.SIGKILL
    lines = log_file.read_text().splitlines()
    assert lines[0] == "from an earlier run"  # appended, not overwritten
    assert lines[1:] == server.log and any(f"listening on {target}" in line for line in lines)
    assert server.stop() == -signal.SIGKILL  # stopping a dead process only reports how it ended
