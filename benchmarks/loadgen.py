"""The load generator: a pool of processes, each running grpc.aio calls on its own loop.

The parent never makes a gRPC call from a process it forks: workers are
started with the ``spawn`` method, once per run, pinned to the load CPUs,
and take jobs over a pipe. A job names a workload (see :mod:`workloads`),
a target, how many concurrent callers to run, and absolute wall-clock
times: callers start at ``t_start`` (warm-up), and only calls that
complete inside ``[t_measure, t_end)`` are counted, so every process
measures the same window. A job also stops early when the parent sends
``"stop"``, and never runs past ``t_end``.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["Pool", "percentile"]

_JOB_SLACK = 30.0  # seconds a job may overrun its own t_end before the parent gives up on it


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (NaN when empty)."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def _worker_main(conn: Connection, cpus: set[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    from benchmarks import workloads  # imported here: grpc is loaded only in the spawned child

    while True:
        job = conn.recv()
        if job is None:
            return
        if job == "stop":  # arrived after its job had already finished
            continue
        started = time.process_time()
        try:
            result = asyncio.run(workloads.run(job, conn))
        except Exception as exc:
            result = {"failed": f"{type(exc).__name__}: {exc}"}
        result["cpu_s"] = time.process_time() - started
        conn.send(result)


class Pool:
    """``size`` spawned load-generator processes, reused for every job of a run."""

    def __init__(self, size: int, cpus: set[int] | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for i in range(size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, cpus), name=f"loadgen-{i}", daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    @property
    def size(self) -> int:
        """How many processes the pool has."""
        return len(self._conns)

    def submit(self, jobs: Sequence[dict[str, Any]], first: int = 0) -> list[int]:
        """Send one job to each of processes ``first, first+1, …``; returns their indexes."""
        assert first + len(jobs) <= self.size, (first, len(jobs), self.size)
        slots = list(range(first, first + len(jobs)))
        for slot, job in zip(slots, jobs, strict=True):
            self._conns[slot].send(job)
        return slots

    def stop(self, slots: Sequence[int]) -> None:
        """Ask running jobs to wind down now."""
        for slot in slots:
            self._conns[slot].send("stop")

    def collect(self, slots: Sequence[int], deadline: float) -> list[dict[str, Any]]:
        """Each job's result; a job that misses the wall-clock ``deadline`` is an error."""
        results = []
        for slot in slots:
            conn = self._conns[slot]
            if not conn.poll(max(0.0, deadline + _JOB_SLACK - time.time())):
                raise TimeoutError(f"load generator {slot} did not finish in time")
            results.append(conn.recv())
        for result in results:
            if "failed" in result:
                raise RuntimeError(f"load generator job failed: {result['failed']}")
        return results

    def run(self, jobs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run jobs on the first processes and wait for all of them."""
        slots = self.submit(jobs)
        return self.collect(slots, max(job["t_end"] for job in jobs))

    def close(self) -> None:
        """Stop every process."""
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
