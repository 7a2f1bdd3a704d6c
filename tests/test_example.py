"""The worked example (examples/job.py) runs end to end, so it cannot rot.

Small N and short durations; the heartbeat is shorter than the fake work, so renewals really happen
while tasks are being worked on.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from masstasker import Client, new_task
from masstasker._pb import masstasker_pb2 as pb

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "job.py"
FAST = ["--work-time", "0.05", "--heartbeat", "0.02", "--own-for", "5", "--poll", "0.1"]


@pytest.fixture(scope="module")
def job() -> ModuleType:
    spec = importlib.util.spec_from_file_location("masstasker_example_job", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def expected(job: Any, config: Any) -> tuple[list[str], list[str]]:
    good = [int(r) for r in job.job_inputs(config) if r.isdigit()]
    bad = [r for r in job.job_inputs(config) if not r.isdigit()]
    return sorted(f"{n}^2={n * n}" for n in good), sorted(f"invalid literal for int() with base 10: '{r}'" for r in bad)


def test_the_job_records_every_result_once_and_parks_bad_inputs(job: Any, masstasker_server: Any) -> None:
    config = job.JobConfig(tasks=12, workers=3, work_time=0.05, heartbeat=0.02, own_for=5, poll=0.1)
    result = job.run_job(masstasker_server.target, config)
    results, errors = expected(job, config)
    assert result.results == results  # each good input exactly once
    assert result.errors == errors  # each bad input parked, with why
    assert result.committed == config.tasks
    with Client(masstasker_server.target) as client:
        assert job.job_finished(client, config)


def test_a_seed_left_by_the_server_is_bootstrapped_once(job: Any, masstasker_server: Any) -> None:
    config = job.JobConfig(tasks=4, workers=2, work_time=0.01, heartbeat=0.005, own_for=5, poll=0.1, bad_every=100)
    with Client(masstasker_server.target) as client:
        client.create(new_task(config.seed_group, pb.Test(foo="seed")))  # as --bootstrap-task-group would
    result = job.run_job(masstasker_server.target, config, create_seed=False)
    assert result.results == ["0^2=0", "1^2=1", "2^2=4", "3^2=9"]
    assert result.errors == []


def test_the_script_runs_against_a_server_process(masstasker_server_process: Any) -> None:
    command = [sys.executable, str(EXAMPLE), "--target", masstasker_server_process.target, "--tasks", "6"]
    finished = subprocess.run([*command, "--workers", "2", *FAST], capture_output=True, text=True, timeout=50)
    assert finished.returncode == 0, finished.stderr
    assert "committed 6 tasks: 5 results, 1 parked" in finished.stdout
    with Client(masstasker_server_process.target) as client:
        done = client.rpc.Debug(pb.DebugRequest(group="done")).num_tasks
        assert done == 5
