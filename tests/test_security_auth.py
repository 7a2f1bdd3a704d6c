"""Bearer-token authentication: refusals, rotation on SIGHUP, open health checks, protected metrics."""

from __future__ import annotations

import logging
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from masstasker._pb import masstasker_pb2 as pb
from masstasker._pb import masstasker_pb2_grpc as pb_grpc
from masstasker.server import BackgroundServer
from masstasker.server.auth import TokenSet, bearer_problem, load_tokens
from masstasker.testing import run_server_process

TIMEOUT = 10.0
OLD, NEW = "old-token-0123456789", "new-token-9876543210"

Metadata = list[tuple[str, str]]


def bearer(token: str) -> Metadata:
    return [("authorization", f"Bearer {token}")]


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# the workers' tokens\n{OLD}\n\n  other-token  \n")
    return path


@pytest.fixture
def auth_server(make_server: Callable[..., BackgroundServer], token_file: Path) -> BackgroundServer:
    return make_server(auth_token_file=str(token_file))


@pytest.fixture
def auth_channel(auth_server: BackgroundServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(auth_server.target) as channel:
        yield channel


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


# -- the token file and the check, without a server ------------------------------------------------------------


def test_token_file_skips_blanks_and_comments(token_file: Path) -> None:
    assert len(load_tokens(str(token_file))) == 2


def test_empty_token_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match="holds no token"):
        load_tokens(str(path))


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (None, "missing authorization"),
        ("Basic dXNlcjpwYXNz", "not a bearer token"),
        ("Bearer", "not a bearer token"),
        ("Bearer   ", "not a bearer token"),
        ("Bearer wrong", "not accepted"),
        (f"Bearer {OLD}x", "not accepted"),
        (f"Bearer {OLD[:-1]}", "not accepted"),
        (f"Bearer {OLD}", None),
        (f"bearer {OLD}", None),  # the scheme is case-insensitive (RFC 6750)
        (f"BEARER  {OLD} ", None),
        ("Bearer other-token", None),
    ],
)
def test_check(token_file: Path, value: str | None, problem: str | None) -> None:
    result = TokenSet(str(token_file)).check(value)
    if problem is None:
        assert result is None
    else:
        assert result is not None and problem in result
        assert OLD not in result


def test_first_authorization_entry_counts(token_file: Path) -> None:
    tokens = TokenSet(str(token_file))
    assert bearer_problem(tokens, [("x-other", "1"), ("authorization", f"Bearer {OLD}")]) is None
    assert bearer_problem(tokens, []) is not None
    assert bearer_problem(tokens, None) is not None


# -- over the wire -------------------------------------------------------------------------------------------


def test_missing_wrong_and_right_token(auth_server: BackgroundServer, auth_channel: grpc.Channel) -> None:
    stub = pb_grpc.MassTaskerStub(auth_channel)
    request = pb.UpdateRequest(created=[pb.Task(group="g")])
    code, details = _code(lambda: stub.Update(request, timeout=TIMEOUT))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "missing authorization" in details and "Bearer <token>" in details
    code, details = _code(lambda: stub.Update(request, timeout=TIMEOUT, metadata=[("authorization", "Basic x")]))
    assert (code, "not a bearer token" in details) == (grpc.StatusCode.UNAUTHENTICATED, True)
    code, details = _code(lambda: stub.Update(request, timeout=TIMEOUT, metadata=bearer("guess")))
    assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not accepted")
    assert auth_server.call(lambda s: s.store.size()) == 0
    assert list(stub.Update(request, timeout=TIMEOUT, metadata=bearer(OLD)).created_ids) == [1]


def test_call_credentials_work(auth_server: BackgroundServer) -> None:
    # gRPC refuses call credentials on an insecure channel unless told the channel is local.
    credentials = grpc.composite_channel_credentials(
        grpc.local_channel_credentials(), grpc.access_token_call_credentials(OLD)
    )
    with grpc.secure_channel(auth_server.target, credentials) as channel:
        stub = pb_grpc.MassTaskerStub(channel)
        assert list(stub.Update(pb.UpdateRequest(created=[pb.Task()]), timeout=TIMEOUT).created_ids) == [1]


@pytest.mark.parametrize("method", ["Update", "Query", "BulkSet", "Debug", "NoSuchMethod"])
def test_every_method_needs_the_token(auth_channel: grpc.Channel, method: str) -> None:
    call = auth_channel.unary_unary(f"/masstasker.MassTasker/{method}")
    code, _ = _code(lambda: call(b"", timeout=TIMEOUT))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = _code(lambda: call(b"", timeout=TIMEOUT, metadata=bearer(OLD)))
    assert code != grpc.StatusCode.UNAUTHENTICATED


def test_reflection_needs_the_token(auth_channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(auth_channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")

    def services(metadata: Metadata | None) -> list[str]:
        responses = stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT, metadata=metadata)
        return [s.name for r in responses for s in r.list_services_response.service]

    code, _ = _code(lambda: services(None))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "masstasker.MassTasker" in services(bearer(OLD))


def test_health_needs_no_token(auth_channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(auth_channel)
    for service in ("", "masstasker.MassTasker"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_tokens_never_logged(
    make_server: Callable[..., BackgroundServer], token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = make_server(auth_token_file=str(token_file))
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.MassTaskerStub(channel)
        for metadata in (bearer(OLD), bearer(OLD + "typo"), [("authorization", OLD)]):
            _code(lambda metadata=metadata: stub.Update(pb.UpdateRequest(), timeout=TIMEOUT, metadata=metadata))
    token_file.write_text("")
    assert not server.reload_tokens()  # logs an error, keeps the tokens
    assert server.call(lambda s: len(s.tokens))
    assert caplog.records
    assert OLD not in caplog.text and "other-token" not in caplog.text


def test_reload_tokens_in_process(auth_server: BackgroundServer, auth_channel: grpc.Channel, token_file: Path) -> None:
    stub = pb_grpc.MassTaskerStub(auth_channel)
    token_file.write_text(f"{NEW}\n")
    assert auth_server.reload_tokens()
    code, _ = _code(lambda: stub.Debug(pb.DebugRequest(), timeout=TIMEOUT, metadata=bearer(OLD)))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    stub.Debug(pb.DebugRequest(), timeout=TIMEOUT, metadata=bearer(NEW))
    token_file.unlink()
    assert not auth_server.reload_tokens()  # a vanished file keeps the last good tokens
    stub.Debug(pb.DebugRequest(), timeout=TIMEOUT, metadata=bearer(NEW))


def test_reload_without_token_file_is_harmless(server: BackgroundServer) -> None:
    assert not server.reload_tokens()


def _wait_until(condition: Callable[[], bool], log: list[str]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "\n".join(log)
        time.sleep(0.02)


def test_sighup_rotates_tokens_without_dropping_calls(token_file: Path) -> None:
    with (
        run_server_process("--auth-token-file", str(token_file), "--listen-http", "127.0.0.1:0") as proc,
        grpc.insecure_channel(proc.target) as channel,
    ):
        stub = pb_grpc.MassTaskerStub(channel)
        # A call in flight under the old token: a Query waiting for a task.
        waiting = stub.Query.future(pb.QueryRequest(group="jobs", wait=True), timeout=30, metadata=bearer(OLD))
        metrics = next(m.group(0) for line in proc.log if (m := re.search(r"http://\S+/metrics", line)))
        _wait_until(lambda: b"masstasker_waiting_queries 1.0" in _get(metrics)[1], proc.log)

        token_file.write_text(f"{NEW}\n")
        proc.process.send_signal(signal.SIGHUP)
        _wait_until(lambda: any("reloaded" in line for line in proc.log), proc.log)

        code, _ = _code(lambda: stub.Debug(pb.DebugRequest(), timeout=TIMEOUT, metadata=bearer(OLD)))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        stub.Update(pb.UpdateRequest(created=[pb.Task(group="jobs")]), timeout=TIMEOUT, metadata=bearer(NEW))
        assert waiting.result(TIMEOUT).task.group == "jobs"  # the old-token call finished normally
        assert proc.process.poll() is None
        assert not any(OLD in line or NEW in line for line in proc.log)


# -- metrics ---------------------------------------------------------------------------------------------------


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_metrics_protected_by_the_token(make_server: Callable[..., BackgroundServer], token_file: Path) -> None:
    server = make_server(listen_http="127.0.0.1:0", auth_token_file=str(token_file), metrics_auth=True)
    url = f"http://127.0.0.1:{server.call(lambda s: s.http_port)}/metrics"
    status, body = _get(url)
    assert status == 401 and b"missing authorization" in body
    assert _get(url, "wrong")[0] == 401
    status, body = _get(url, OLD)
    assert status == 200 and b"masstasker_tasks" in body


def test_metrics_open_unless_asked(make_server: Callable[..., BackgroundServer], token_file: Path) -> None:
    server = make_server(listen_http="127.0.0.1:0", auth_token_file=str(token_file))
    status, body = _get(f"http://127.0.0.1:{server.call(lambda s: s.http_port)}/metrics")
    assert status == 200 and b"masstasker_tasks" in body
