"""Server CPU per operation of real server processes, checkouts alternating: a load-proof A/B.

``python benchmarks/server_cpu.py --tree A --tree B [--rounds 3]`` starts, per round and tree, a fresh
server (``python -m masstasker.server`` with ``PYTHONPATH=TREE``) and sends it a fixed number of
operations over gRPC: 1,000-task creates (8 in flight) and lease cycles (Query own + Update delete,
64 in flight on one channel). It reads the server's CPU time from ``/proc/PID/stat`` around the
measured calls and prints CPU per operation, median over the rounds. Throughput is not measured:
another process taking the core slows the calls but does not add to the server's CPU time, so the
figures survive a shared machine better than ``python -m benchmarks`` ratios (``/proc`` counts in
clock ticks: 10 ms over hundreds of operations). Every loop is bounded by its count and a deadline.

``--statistics-cost`` adds the last tree once more, started with the in-memory store's statistics
switched off: the difference is what keeping them costs inside a real server (issue 12's budget).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from google.protobuf import any_pb2
from google.protobuf.duration_pb2 import Duration

from masstasker._pb import masstasker_pb2 as pb

_START_TIMEOUT = 30.0
_CALL_TIMEOUT = 60.0
_PAYLOAD = any_pb2.Any(type_url="type.googleapis.com/masstasker.Test", value=b"x" * 20)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _creates(count: int) -> bytes:
    return pb.UpdateRequest(created=[pb.Task(group="g", data=_PAYLOAD) for _ in range(count)]).SerializeToString()


async def _run(workers: int, count: int, op: Callable[[], Awaitable[None]]) -> None:
    left = [count]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            await op()

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(workers))), timeout=10 * _CALL_TIMEOUT)


async def _measure(port: int, pid: int, creates: int, cycles: int) -> dict[str, float]:
    """CPU seconds per operation of the server with this pid."""
    figures = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        update = channel.unary_unary("/masstasker.MassTasker/Update")
        query = channel.unary_unary("/masstasker.MassTasker/Query")
        create = _creates(1_000)

        async def create_op() -> None:
            await update(create, timeout=_CALL_TIMEOUT)

        async def lease_op() -> None:
            answer = pb.QueryResponse.FromString(await query(own, timeout=_CALL_TIMEOUT))
            delete = pb.UpdateRequest(deleted=[pb.TaskRef(id=answer.task.id)])
            await update(delete.SerializeToString(), timeout=_CALL_TIMEOUT)

        own = pb.QueryRequest(group="g", own_for=Duration(seconds=600)).SerializeToString()
        for name, op, workers, count in (("create-1000", create_op, 8, creates), ("lease", lease_op, 64, cycles)):
            if name == "lease":  # a group to lease from: what the creates left, topped up
                for _ in range(cycles // 1_000 + 2):
                    await create_op()
            await _run(workers, max(count // 10, 1), op)  # warm-up
            before = _cpu_seconds(pid)
            await _run(workers, count, op)
            figures[name] = (_cpu_seconds(pid) - before) / count
    return figures


# The diagnostic variant: the store's statistics told nothing, then the server's own main. Never a
# server mode; nothing on these paths reads the statistics, so the answers are the same.
_WITHOUT_STATISTICS = (
    "import runpy, sys;"
    "from masstasker.server.stores.memory import stats;"
    "stats.StoreStatistics.committed = lambda self, *args: None;"
    "sys.argv[0] = 'masstasker.server';"
    "runpy.run_module('masstasker.server', run_name='__main__', alter_sys=True)"
)


def _serve(tree: str, statistics_off: bool = False) -> tuple[subprocess.Popen[str], int]:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
    start = ["-c", _WITHOUT_STATISTICS] if statistics_off else ["-m", "masstasker.server"]
    argv = [sys.executable, *start, "--port", "0", "--listen-http", ""]
    server = subprocess.Popen(argv, cwd=tree, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + _START_TIMEOUT
    assert server.stderr is not None
    while time.monotonic() < deadline:
        match = re.search(r"listening on \S*:(\d+)", server.stderr.readline())
        if match:
            return server, int(match.group(1))
    server.kill()
    raise RuntimeError(f"the server of {tree} did not start")


def main(argv: list[str] | None = None) -> int:
    """Alternate the trees, print each one's median CPU per operation."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tree", action="append", required=True, help="a checkout (repeat to compare)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--creates", type=int, default=400, help="1,000-task creates measured per round")
    parser.add_argument("--cycles", type=int, default=6_000, help="lease cycles measured per round")
    parser.add_argument(
        "--statistics-cost",
        action="store_true",
        help="also run the last tree with its store's statistics switched off (a diagnostic variant)",
    )
    args = parser.parse_args(argv)
    trees = args.tree + ([args.tree[-1] + ":no-statistics"] if args.statistics_cost else [])
    results: dict[str, dict[str, list[float]]] = {tree: {} for tree in trees}
    for round_ in range(args.rounds):
        for tree in trees:
            server, port = _serve(tree.removesuffix(":no-statistics"), tree.endswith(":no-statistics"))
            try:
                figures = asyncio.run(_measure(port, server.pid, args.creates, args.cycles))
            finally:
                server.terminate()
                server.wait(_START_TIMEOUT)
            for name, value in figures.items():
                results[tree].setdefault(name, []).append(value * 1e6)
            print(f"round {round_ + 1} {tree}: {figures}", file=sys.stderr, flush=True)
    first = trees[0]
    for name in results[first]:
        base = statistics.median(results[first][name])
        for tree in trees:
            values = results[tree][name]
            median = statistics.median(values)
            spread = ", ".join(f"{v:.0f}" for v in sorted(values))
            print(f"{name:12s} {median:8.0f} us server CPU/op ({spread})  {median / base:5.3f}x of {first}  {tree}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
