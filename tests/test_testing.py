"""The test helpers users get: FakeClock, the server runners, and the fixtures of the pytest plugin."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from masstasker import AsyncClient, Client, new_task, unpack_data
from masstasker._pb import masstasker_pb2 as pb
from masstasker.testing import FakeClock, run_server_process

T0 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
README = Path(__file__).resolve().parent.parent / "README.md"


def readme_examples() -> list[str]:
    """The Python code blocks of the README's client section, so the documentation cannot rot."""
    text = README.read_text()
    section = text[text.index("## The Python client") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


# -- FakeClock -------------------------------------------------------------------------------------------------


def test_fake_clock_moves_only_when_advanced() -> None:
    clock = FakeClock(T0)
    assert clock.now() == T0 == clock.now()
    assert clock.advance(timedelta(minutes=1)) == T0 + timedelta(minutes=1)
    assert clock.advance(0.5) == clock.now() == T0 + timedelta(seconds=60.5)
    with pytest.raises(ValueError, match="non-negative"):
        clock.advance(-1)
    assert FakeClock().now().tzinfo is UTC


def test_fake_clock_wakes_a_thread_waiting_on_it_when_its_time_comes() -> None:
    clock = FakeClock(T0)
    cond = threading.Condition()
    outcome: list[bool] = []

    def sleeper() -> None:
        with cond:
            outcome.append(clock.wait_for(cond, lambda: False, 10))

    thread = threading.Thread(target=sleeper)
    thread.start()
    clock.wait_for_sleepers()
    clock.advance(9)  # not yet
    assert clock.sleepers == 1
    clock.advance(1)
    thread.join(30)
    assert outcome == [False]  # timed out on the fake clock, predicate still false
    assert clock.sleepers == 0


def test_fake_clock_wait_ends_early_when_the_predicate_holds() -> None:
    clock = FakeClock(T0)
    cond = threading.Condition()
    released = False
    outcome: list[bool] = []

    def sleeper() -> None:
        with cond:
            outcome.append(clock.wait_for(cond, lambda: released, 3600))

    thread = threading.Thread(target=sleeper)
    thread.start()
    clock.wait_for_sleepers()
    with cond:
        released = True
        cond.notify_all()
    thread.join(30)
    assert outcome == [True]
    assert clock.now() == T0


def test_fake_clock_async_sleep() -> None:
    clock = FakeClock(T0)

    async def main() -> None:
        await clock.sleep(0)  # no time to wait: returns at once
        sleeping = asyncio.ensure_future(clock.sleep(5))
        await clock.wait_for_sleepers_async()
        clock.advance(4)
        await asyncio.sleep(0)
        assert not sleeping.done()
        # Advancing from another thread wakes it too.
        await asyncio.to_thread(clock.advance, 1)
        await asyncio.wait_for(sleeping, 30)
        cancelled = asyncio.ensure_future(clock.sleep(5))
        await clock.wait_for_sleepers_async()
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert clock.sleepers == 0

    asyncio.run(main())


def test_waiting_for_sleepers_times_out() -> None:
    with pytest.raises(TimeoutError, match="1 sleeper"):
        FakeClock().wait_for_sleepers(timeout=0.01)


# -- fixtures and runners -------------------------------------------------------------------------------------


def test_server_and_client_fixtures(masstasker_server: Any, masstasker_client: Client) -> None:
    assert masstasker_server.target.startswith("127.0.0.1:")
    task = new_task("g", pb.Test(foo="x"))
    masstasker_client.create(task)
    assert task.id == 1  # a fresh server for every test


def test_async_client_fixture_works_across_event_loops(masstasker_async_client: AsyncClient) -> None:
    async def create() -> int:
        task = new_task("g")
        await masstasker_async_client.create(task)
        return task.id

    # Each asyncio.run is a new loop; the client makes a channel for each.
    assert asyncio.run(create()) == 1
    assert asyncio.run(create()) == 2


def test_client_factory_fixtures_take_options(
    masstasker_client_factory: Any, masstasker_async_client_factory: Any, masstasker_clock: FakeClock
) -> None:
    client = masstasker_client_factory(clock=masstasker_clock)
    task = new_task("g")
    client.create(task)
    assert task.not_before.ToDatetime(tzinfo=UTC) == masstasker_clock.now()
    async_client = masstasker_async_client_factory(clock=masstasker_clock)
    assert async_client.clock is masstasker_clock
    assert asyncio.run(async_client.peek("g")) == task


def test_server_process_fixture_serves_end_to_end(masstasker_server_process: Any) -> None:
    assert masstasker_server_process.process.poll() is None
    with Client(masstasker_server_process.target) as client:
        client.create(new_task("g", pb.Test(foo="over a real socket")))
        task = client.query("g", 30)
        assert unpack_data(task, pb.Test).foo == "over a real socket"
    assert any("listening on" in line for line in masstasker_server_process.log)


def test_a_server_process_is_stopped_gracefully() -> None:
    with run_server_process() as server:
        with Client(server.target) as client:
            client.create(new_task("g"))
        process = server.process
    assert process.returncode == 0  # SIGTERM is a clean shutdown, not a kill


def test_a_server_process_that_cannot_start_fails_fast() -> None:
    with pytest.raises(RuntimeError, match="did not start"), run_server_process("--max-msg-size", "-5"):
        pass


def test_the_plugin_is_registered_for_any_project(tmp_path: Path) -> None:
    """The README's example test, in a project with no conftest, gets the fixtures from the entry point."""
    (example,) = (block for block in readme_examples() if "def test_" in block)
    (tmp_path / "test_worker.py").write_text(example)
    finished = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "1 passed" in finished.stdout


def test_the_readme_worker_loop_does_what_it_says(masstasker_client: Client, masstasker_server: Any) -> None:
    (example,) = (block for block in readme_examples() if "while True:" in block)
    # The same code, against this test's server, for as many rounds as there are tasks.
    example = example.replace("127.0.0.1:50053", masstasker_server.target).replace("while True:", "for _ in range(2):")
    masstasker_client.create(new_task("work", pb.Test(foo="42")), new_task("work", pb.Test(foo="forty-two")))
    exec(compile(example, "README.md", "exec"), {})
    done = masstasker_client.rpc.Debug(pb.DebugRequest(group="done")).tasks
    assert [unpack_data(t, pb.Test).foo for t in done] == ["1764"]
    errors = masstasker_client.rpc.Debug(pb.DebugRequest(group="errors")).tasks
    assert [t.error for t in errors] == ["invalid literal for int() with base 10: 'forty-two'"]
    assert masstasker_client.peek_many("work", 10, wait=False) == []


# A user's project with its own bindings of the Go project's masstasker.proto: the same proto package and
# message names as ours, so loading both into one process fails with "duplicate symbol".
USER_PROTO = """
syntax = "proto3";
package masstasker;
message Task {
  uint64 id = 1;
  string group = 2;
}
"""

USER_TEST = """
import masstasker_pb2


def test_own_bindings_work():
    assert masstasker_pb2.Task(id=7, group="g").SerializeToString()


def test_the_plugin_is_loaded(request):
    assert request.config.pluginmanager.has_plugin("masstasker")
"""


def test_the_plugin_leaves_a_projects_own_masstasker_bindings_alone(tmp_path: Path) -> None:
    """Registered for every test run, the plugin must not load our protobuf descriptors until a fixture asks."""
    from grpc_tools import protoc

    (tmp_path / "masstasker.proto").write_text(USER_PROTO)
    assert protoc.main(["protoc", f"-I{tmp_path}", f"--python_out={tmp_path}", str(tmp_path / "masstasker.proto")]) == 0
    (tmp_path / "test_user.py").write_text(USER_TEST)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=50, check=False
        )

    # The clash is real: with our bindings loaded, the user's cannot be.
    clash = run("-c", "import masstasker.client, masstasker_pb2")
    assert clash.returncode != 0 and "duplicate" in clash.stderr.lower(), clash.stderr
    finished = run("-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error", str(tmp_path))
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "2 passed" in finished.stdout


def test_importing_the_package_or_the_plugin_loads_no_bindings() -> None:
    probe = (
        "import sys, masstasker, masstasker.pytest_plugin\n"
        "print(sorted(m for m in sys.modules if m.startswith(('masstasker.', 'grpc'))))\n"
        "from masstasker import Client, pb\n"  # the public names still work, loaded on first use
        "print(Client.__name__, pb.Task.DESCRIPTOR.full_name)\n"
    )
    finished = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=50, check=True)
    assert finished.stdout.splitlines() == ["['masstasker.pytest_plugin']", "Client masstasker.Task"]
