"""The ``masstasker`` command end to end: a real server, the command as a subprocess, its output and exit codes."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from masstasker import Client, new_task
from masstasker._pb import masstasker_pb2 as pb
from masstasker.server import BackgroundServer
from masstasker.testing import run_server

pytest.importorskip("click")
pytest.importorskip("rich")

TEST_TYPE = "type.googleapis.com/masstasker.Test"
# Each command is a fresh Python process: generous on a loaded machine.
pytestmark = pytest.mark.timeout(240)


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASSTASKER_")}
    env.update({"COLUMNS": "160", "NO_COLOR": "1", **(extra or {})})
    return env


def masstasker(
    target: str, *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``masstasker --target TARGET ARGS`` and return what it did."""
    return subprocess.run(
        [sys.executable, "-m", "masstasker.cli", "--target", target, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=_env(env),
        timeout=60,
    )


def ok_json(target: str, *args: str) -> Any:
    done = masstasker(target, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def server(make_server: Callable[..., BackgroundServer]) -> BackgroundServer:
    return make_server()


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[Client]:
    with Client(server.target) as c:
        yield c


def _make(client: Client, group: str, n: int, **kw: Any) -> list[pb.Task]:
    tasks = [new_task(group, pb.Test(foo=f"{group}-{i}"), **kw) for i in range(n)]
    client.create(*tasks)
    return tasks


# -- reading -------------------------------------------------------------------------------------------------


def test_groups_lists_every_group_with_its_counts(server: BackgroundServer, client: Client) -> None:
    _make(client, "work", 3)
    client.create(*(pb.Task(group="failed", error="boom") for _ in range(2)))
    client.query("work", 60)  # one leased

    groups = {g["group"]: g for g in ok_json(server.target, "groups")}
    assert groups["work"]["total"] == 3
    assert groups["work"]["leased"] == 1
    assert groups["work"]["visible"] == 2
    assert groups["failed"]["errors"] == 2

    table = masstasker(server.target, "groups")
    assert table.returncode == 0, table.stderr
    lines = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:] if line.strip()}
    assert lines["work"][1:5] == ["3", "2", "1", "0"]  # total visible leased scheduled
    assert lines["failed"][5] == "2"  # errors
    assert "GROUP" in table.stdout and "ETA" in table.stdout


def test_ls_shows_queue_order_and_filters(server: BackgroundServer, client: Client) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    tasks = _make(client, "q", 4, labels={"kind": "a"})
    other = _make(client, "q", 2, labels={"kind": "b"})
    scheduled = _make(client, "q", 1, not_before=later)
    leased = client.query("q", 300)  # the head, re-created with a new ID and a lease

    listed = ok_json(server.target, "ls", "q", "--limit", "0")
    expected = [t.id for t in tasks[1:]] + [t.id for t in other] + [leased.id, scheduled[0].id]
    assert [t["id"] for t in listed] == expected
    assert {t["id"]: t["state"] for t in listed}[leased.id] == "leased"
    assert {t["id"]: t["state"] for t in listed}[scheduled[0].id] == "scheduled"

    assert [t["id"] for t in ok_json(server.target, "ls", "q", "--label", "kind=b")] == [t.id for t in other]
    assert [t["id"] for t in ok_json(server.target, "ls", "q", "--state", "leased")] == [leased.id]
    assert [t["id"] for t in ok_json(server.target, "ls", "q", "--state", "scheduled")] == [scheduled[0].id]
    assert len(ok_json(server.target, "ls", "q", "--limit", "2")) == 2

    table = masstasker(server.target, "ls", "q")
    assert table.returncode == 0, table.stderr
    assert str(tasks[1].id) in table.stdout and "kind=a" in table.stdout and "masstasker.Test" in table.stdout

    bad = masstasker(server.target, "ls", "q", "--label", "nokey")
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr


def test_show_decodes_known_payloads_and_falls_back_to_bytes(server: BackgroundServer, client: Client) -> None:
    known = new_task("s", pb.Test(foo="hello"), labels={"k": "v"})
    unknown = pb.Task(group="s")
    unknown.data.type_url = "type.googleapis.com/nobody.Knows"
    unknown.data.value = b"\x01\x02\xff"
    client.create(known, unknown)

    shown = ok_json(server.target, "show", str(known.id))
    assert shown["data"] == {"type_url": TEST_TYPE, "fields": {"foo": "hello"}, "base64": "CgVoZWxsbw=="}
    assert shown["labels"] == {"k": "v"} and shown["group"] == "s" and shown["state"] == "visible"

    raw = ok_json(server.target, "show", str(unknown.id))
    assert raw["data"]["fields"] is None and raw["data"]["base64"] == "AQL/"

    table = masstasker(server.target, "show", str(known.id))
    assert table.returncode == 0 and '"foo": "hello"' in table.stdout

    missing = masstasker(server.target, "show", "999999")
    assert missing.returncode == 5, missing.stderr
    assert "999999" in missing.stderr and "Traceback" not in missing.stderr


def test_show_decodes_types_from_imported_modules(server: BackgroundServer, client: Client) -> None:
    from google.protobuf import api_pb2  # a type the command does not load by itself

    task = pb.Task(group="imp")
    task.data.Pack(api_pb2.Api(name="example.Service", version="v2"))
    client.create(task)
    plain = ok_json(server.target, "show", str(task.id))
    assert plain["data"]["fields"] is None and plain["data"]["type_url"].endswith("google.protobuf.Api")
    decoded = masstasker(server.target, "--import", "google.protobuf.api_pb2", "show", str(task.id), "--json")
    assert decoded.returncode == 0, decoded.stderr
    assert json.loads(decoded.stdout)["data"]["fields"] == {"name": "example.Service", "version": "v2"}


# -- changing ------------------------------------------------------------------------------------------------


def test_put_creates_tasks_from_json_a_file_and_stdin(server: BackgroundServer, client: Client, tmp_path: Path) -> None:
    one = ok_json(
        server.target,
        "put",
        "p",
        json.dumps({"data": {"@type": TEST_TYPE, "foo": "x"}, "labels": {"a": "1"}}),
        "--label",
        "b=2",
    )
    (tmp_path / "tasks.json").write_text(json.dumps([{"data": {"@type": TEST_TYPE, "foo": "y"}}, {}]))
    two = ok_json(server.target, "put", "p", "--file", str(tmp_path / "tasks.json"))
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    piped = masstasker(server.target, "put", "p", "--file", "-", "--json", stdin=json.dumps({"not_before": later}))
    assert piped.returncode == 0, piped.stderr
    raw = ok_json(server.target, "put", "p", json.dumps({"data": {"@type": "x.y/Unknown", "base64": "AQI="}}))

    tasks = {t["id"]: t for t in ok_json(server.target, "ls", "p", "--limit", "0")}
    assert len(tasks) == 5
    assert tasks[one["ids"][0]]["labels"] == {"a": "1", "b": "2"}
    assert tasks[one["ids"][0]]["data"]["fields"] == {"foo": "x"}
    assert tasks[two["ids"][0]]["data"]["fields"] == {"foo": "y"}
    assert tasks[two["ids"][1]]["data"] is None
    assert tasks[json.loads(piped.stdout)["ids"][0]]["state"] == "scheduled"
    assert tasks[raw["ids"][0]]["data"]["base64"] == "AQI="

    bad = masstasker(server.target, "put", "p", "{not json")
    assert bad.returncode == 2 and "bad task JSON" in bad.stderr
    wrong = masstasker(server.target, "put", "p", json.dumps({"group": "other"}))
    assert wrong.returncode == 2
    assert len(ok_json(server.target, "ls", "p", "--limit", "0")) == 5  # nothing half-created


def test_mv_moves_by_id_and_whole_groups_atomically(server: BackgroundServer, client: Client) -> None:
    a = _make(client, "from", 3)
    assert ok_json(server.target, "mv", str(a[0].id), str(a[1].id), "--to", "to") == {"moved": 2}
    assert [t["data"]["fields"]["foo"] for t in ok_json(server.target, "ls", "to")] == ["from-0", "from-1"]

    missing = masstasker(server.target, "mv", str(a[2].id), "999999", "--to", "to")
    assert missing.returncode == 5, missing.stderr
    assert len(ok_json(server.target, "ls", "from")) == 1  # all or nothing

    assert ok_json(server.target, "mv", "--from", "from", "--to", "to") == {"moved": 1}
    assert ok_json(server.target, "ls", "from") == []
    assert masstasker(server.target, "mv", "--to", "x").returncode == 2


def test_rm_deletes_by_id_all_or_none_and_whole_groups(server: BackgroundServer, client: Client) -> None:
    a = _make(client, "r", 3)
    missing = masstasker(server.target, "rm", str(a[0].id), "999999")
    assert missing.returncode == 5
    assert len(ok_json(server.target, "ls", "r")) == 3
    assert ok_json(server.target, "rm", str(a[0].id)) == {"deleted": [a[0].id]}
    assert len(ok_json(server.target, "ls", "r")) == 2

    refused = masstasker(server.target, "rm", "--group", "r", stdin="n\n")
    assert refused.returncode == 1 and len(ok_json(server.target, "ls", "r")) == 2
    done = masstasker(server.target, "rm", "--group", "r", "--yes")
    assert done.returncode == 0, done.stderr
    assert ok_json(server.target, "ls", "r") == []


def test_retry_moves_failed_tasks_back_with_error_cleared(server: BackgroundServer, client: Client) -> None:
    failed = [new_task("failed", pb.Test(foo=str(i)), labels={"n": str(i)}) for i in range(5)]
    for task in failed:
        task.error = "worker crashed"
        task.attempts = 3
    client.create(*failed)
    client.create(new_task("failed", pb.Test(foo="keep"), labels={"n": "keep"}))

    assert ok_json(server.target, "retry", "failed", "--to", "main", "--label", "n=0") == {"retried": 1}
    assert ok_json(server.target, "retry", "failed", "--to", "main", "--batch", "2", "--limit", "3") == {"retried": 3}
    back = ok_json(server.target, "ls", "main", "--limit", "0")
    assert sorted(t["labels"]["n"] for t in back) == ["0", "1", "2", "3"]
    assert all(t["error"] == "" and t["state"] == "visible" for t in back)
    assert all(t["attempts"] == 0 for t in back)
    left = ok_json(server.target, "ls", "failed", "--limit", "0")
    assert sorted(t["labels"]["n"] for t in left) == ["4", "keep"]

    same = masstasker(server.target, "retry", "failed", "--to", "failed")
    assert same.returncode == 2


# -- waiting and watching ----------------------------------------------------------------------------------------


def _drain(target: str, group: str, count: int, pause: float) -> threading.Thread:
    """A worker in a thread that owns and deletes ``count`` tasks of ``group``, one per ``pause``."""

    def work() -> None:
        with Client(target) as worker:
            for _ in range(count):
                task = worker.query(group, 30, timeout=30)
                time.sleep(pause)
                worker.delete(task)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_wait_empty_exits_0_when_empty_and_6_on_timeout(server: BackgroundServer, client: Client) -> None:
    assert masstasker(server.target, "wait-empty", "nothing", "--timeout", "5").returncode == 0
    _make(client, "busy", 1)
    late = masstasker(server.target, "wait-empty", "busy", "--timeout", "0.5")
    assert late.returncode == 6 and "still holds 1 task" in late.stderr

    _make(client, "busy", 4)
    worker = _drain(server.target, "busy", 5, 0.05)
    done = masstasker(server.target, "wait-empty", "busy", "--timeout", "30", "--interval", "0.1")
    assert done.returncode == 0, done.stderr
    worker.join(30)


def test_watch_draws_bars_with_rate_and_eta_in_a_terminal_until_empty(server: BackgroundServer, client: Client) -> None:
    _make(client, "watched", 40)
    worker = _drain(server.target, "watched", 40, 0.05)
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "masstasker.cli", "--target", server.target, "watch", "watched", "--interval", "0.2"],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env=_env({"TERM": "xterm-256color", "COLUMNS": "150", "LINES": "20"}) | {"NO_COLOR": ""},
        close_fds=True,
    )
    os.close(secondary)
    screen = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:  # the terminal closed: the command exited
                    break
                if not chunk:
                    break
                screen += chunk
            elif process.poll() is not None:
                break
        code = process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
        os.close(primary)
    worker.join(30)
    text = screen.decode("utf-8", "replace")
    assert code == 0, text
    assert "watched" in text
    assert "━" in text  # rich's bar
    assert "ETA" in text and "leased" in text
    assert "/s" in text or "/min" in text  # the departure rate
    # The last frame: everything that was there when the watch began has departed.
    assert re.search(r"watched \S* (\d+)/\1 .*ETA done", text), text
    assert "\x1b[" in text  # drawn as a live terminal display, not plain lines


# -- connection problems -----------------------------------------------------------------------------------------


def test_unreachable_server_exits_3_with_a_clear_message() -> None:
    with run_server() as srv:
        target = srv.target
    done = masstasker(target, "groups")
    assert done.returncode == 3, done.stderr
    assert f"cannot reach a MassTasker server at {target}" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture
def token_server(tmp_path: Path, make_server: Callable[..., BackgroundServer]) -> BackgroundServer:
    (tmp_path / "tokens").write_text("right-token\n")
    return make_server(auth_token_file=str(tmp_path / "tokens"))


@pytest.mark.parametrize("command", [["groups"], ["put", "g"], ["wait-empty", "g", "--timeout", "1"]])
def test_missing_or_wrong_token_exits_4(token_server: BackgroundServer, command: list[str]) -> None:
    missing = masstasker(token_server.target, *command)
    assert missing.returncode == 4, missing.stderr
    assert "missing authorization" in missing.stderr and "MASSTASKER_TOKEN" in missing.stderr
    wrong = masstasker(token_server.target, *command, env={"MASSTASKER_TOKEN": "wrong-token"})
    assert wrong.returncode == 4 and "not accepted" in wrong.stderr
    assert "wrong-token" not in wrong.stderr
    right = masstasker(token_server.target, *command, env={"MASSTASKER_TOKEN": "right-token"})
    assert right.returncode == 0, right.stderr


def test_target_and_token_come_from_the_environment(token_server: BackgroundServer, tmp_path: Path) -> None:
    with Client(token_server.target, token="right-token") as client:
        client.create(new_task("from-env"))
    (tmp_path / "token").write_text("right-token\n")
    done = subprocess.run(
        [sys.executable, "-m", "masstasker.cli", "--token-file", str(tmp_path / "token"), "groups", "--json"],
        capture_output=True,
        text=True,
        env=_env({"MASSTASKER_TARGET": token_server.target}),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert [g["group"] for g in json.loads(done.stdout)] == ["from-env"]


def test_console_script_is_installed() -> None:
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "masstasker"]
    assert script.value == "masstasker.cli.main:entry_point"
