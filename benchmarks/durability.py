"""Durability benchmarks: what --data-dir costs, and how big states snapshot and recover.

Run from the repository root::

    python -m benchmarks.durability throughput   # lease cycles, fsync always vs memory
    python -m benchmarks.durability snapshot     # longest event-loop pause at 1,000,000 tasks
    python -m benchmarks.durability recovery     # recovery time and peak memory, 1,000,000 tasks
    python -m benchmarks.durability all

``throughput`` runs two server subprocesses side by side (memory only and
``--data-dir --fsync always``) and one client process with N concurrent
workers doing lease cycles (own the head with Query, then delete it); the
servers take turns, with a warm-up and several repeats, and the ratio of the
medians is printed. The machine is shared, so only the ratio means much.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from masstasker._pb import masstasker_pb2 as pb
from masstasker._pb import masstasker_pb2_grpc as pb_grpc
from masstasker.server.durability import Persistence
from masstasker.server.stores.memory.store import IdRef, Store, TaskSpec
from masstasker.testing import run_server_process

SEED = 4
GROUP = "work"
BATCH = 1000  # tasks per Update when filling


# -- throughput -------------------------------------------------------------------------


async def _fill(stub: pb_grpc.MassTaskerStub, count: int) -> None:
    body = pb.Task(group=GROUP, labels={"kind": "bench"})
    for start in range(0, count, BATCH):
        await stub.Update(pb.UpdateRequest(created=[body] * min(BATCH, count - start)))


async def _lease_cycles(target: str, workers: int, seconds: float) -> int:
    """Cycles completed by ``workers`` concurrent own+delete loops in ``seconds``."""
    done = 0
    stop_at = time.monotonic() + seconds
    own = pb.QueryRequest(group=GROUP, own_for={"seconds": 600})

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.MassTaskerStub(channel)

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < stop_at:
                task = (await stub.Query(own)).task
                await stub.Update(pb.UpdateRequest(deleted=[pb.TaskRef(id=task.id)]))
                done += 1

        await asyncio.gather(*(worker() for _ in range(workers)))
    return done


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _throughput(workers: int, seconds: float, repeats: int, tasks: int) -> None:
    with tempfile.TemporaryDirectory(prefix="mt-bench-") as tmp, contextlib.ExitStack() as running:
        root = Path(tmp)
        durable = ("--data-dir", str(root / "data"), "--fsync", "always")
        servers = {
            "memory": running.enter_context(run_server_process(log_file=root / "memory.log")),
            "fsync=always": running.enter_context(run_server_process(*durable, log_file=root / "durable.log")),
        }
        for server in servers.values():
            async with grpc.aio.insecure_channel(server.target) as channel:
                await _fill(pb_grpc.MassTaskerStub(channel), tasks)
        rates: dict[str, list[float]] = {name: [] for name in servers}
        cpu: dict[str, list[float]] = {name: [] for name in servers}
        order = list(servers)
        rng = random.Random(SEED)
        for server in servers.values():  # warm-up
            await _lease_cycles(server.target, workers, min(1.0, seconds))
        for _ in range(repeats):
            rng.shuffle(order)
            for name in order:
                before = _cpu_seconds(servers[name].pid)
                cycles = await _lease_cycles(servers[name].target, workers, seconds)
                rates[name].append(cycles / seconds)
                cpu[name].append((_cpu_seconds(servers[name].pid) - before) / max(cycles, 1))
        for name, values in rates.items():
            runs = [round(v) for v in values]
            print(
                f"  {name:13s} median {statistics.median(values):8.0f} cycles/s, server CPU "
                f"{statistics.median(cpu[name]) * 1e6:.0f} us/cycle; runs {runs}"
            )
        # Each repeat runs both back to back, so its ratio is the least disturbed by other load.
        pairs = [d / m for d, m in zip(rates["fsync=always"], rates["memory"], strict=True)]
        print(
            f"  ratio fsync=always / memory at {workers} workers: median of per-repeat ratios "
            f"{statistics.median(pairs):.2f} (each {[round(p, 2) for p in pairs]}); ratio of medians "
            f"{statistics.median(rates['fsync=always']) / statistics.median(rates['memory']):.2f}"
        )


# -- a million tasks --------------------------------------------------------------------


def _fill_store(store: Store, count: int) -> None:
    spec = TaskSpec(GROUP, 1_700_000_000 * 1_000_000_000, b"")
    for start in range(0, count, BATCH):
        store.update([spec] * min(BATCH, count - start))


async def _snapshot_pause(count: int) -> None:
    with tempfile.TemporaryDirectory(prefix="mt-bench-") as tmp:
        store = Store(time.time_ns)
        persistence = await Persistence.open(tmp, store, fsync="always", snapshot_min_log_bytes=1 << 40)
        started = time.perf_counter()
        _fill_store(store, count)
        await persistence.sync()
        print(f"  filled {len(store):,} tasks in {time.perf_counter() - started:.1f} s")
        gaps: list[float] = []
        running = True

        async def ticker() -> None:
            # The loop's responsiveness: how late a 1 ms sleep wakes up.
            while running:
                before = time.perf_counter()
                await asyncio.sleep(0.001)
                gaps.append(time.perf_counter() - before - 0.001)

        for attempt in range(3):
            gaps.clear()
            running = True
            tick = asyncio.create_task(ticker())
            await asyncio.sleep(0.2)
            baseline = max(gaps)
            gaps.clear()
            stats = await persistence.snapshot()
            running = False
            await tick
            assert stats is not None
            print(
                f"  snapshot {attempt + 1}: {stats.tasks:,} tasks, {stats.bytes / 1e6:.1f} MB, "
                f"written in {stats.write_seconds:.2f} s; capture on the loop {stats.capture_seconds * 1e3:.1f} ms; "
                f"longest loop pause during the snapshot {max(gaps) * 1e3:.1f} ms "
                f"(idle baseline {baseline * 1e3:.1f} ms)"
            )
            _lease_cycles_in_store(store, 1000)  # so the next snapshot has something new
        await persistence.close()


def _lease_cycles_in_store(store: Store, cycles: int) -> None:
    """Own the head, then finish it by deleting it and queueing a follow-up task (two log records)."""
    now = 1_800_000_000 * 1_000_000_000
    for _ in range(cycles):
        (task,) = store.query(GROUP, now, 60 * 1_000_000_000)
        store.update([TaskSpec(GROUP, now)], [IdRef(task.id)])


def _make_data_dir(directory: Path, count: int, cycles: int) -> None:
    """A data directory with ``count`` tasks in a snapshot, then ``cycles`` lease cycles in the log."""

    async def build() -> None:
        store = Store(time.time_ns)
        persistence = await Persistence.open(directory, store, fsync="never", snapshot_min_log_bytes=1 << 40)
        _fill_store(store, count)
        await persistence.snapshot()
        _lease_cycles_in_store(store, cycles)
        await persistence.close()

    asyncio.run(build())


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it restarts at exec)."""
    return _status_mb("VmHWM")


def _recovery_child(directory: str) -> None:
    gc.collect()
    before = _peak_rss_mb()

    async def run() -> None:
        store = Store(time.time_ns)
        started = time.perf_counter()
        persistence = await Persistence.open(directory, store)
        elapsed = time.perf_counter() - started
        peak = _peak_rss_mb()
        gc.collect()
        rec = persistence.recovered
        print(
            f"  recovered {len(store):,} tasks (snapshot {rec.snapshot_bytes / 1e6:.1f} MB + "
            f"{rec.log_records:,} log records, {rec.log_bytes / 1e6:.1f} MB) in {elapsed:.2f} s; "
            f"peak RSS {peak:.0f} MB, {_status_mb('VmRSS'):.0f} MB once recovered "
            f"(process before recovery {before:.0f} MB)"
        )
        await persistence.close()

    asyncio.run(run())


def _memory_child(count: int) -> None:
    before = _peak_rss_mb()
    store = Store(time.time_ns)
    started = time.perf_counter()
    base = 1_700_000_000 * 1_000_000_000
    for start in range(0, count, BATCH):
        # A distinct not_before per task, as tasks created over time have (and as recovered ones do).
        store.update([TaskSpec(GROUP, base + i, b"") for i in range(start, min(start + BATCH, count))])
    peak = _peak_rss_mb()
    print(
        f"  for comparison, {len(store):,} tasks created in memory only: {time.perf_counter() - started:.2f} s, "
        f"peak RSS {peak:.0f} MB (before {before:.0f} MB)"
    )


def _recovery(count: int, cycles: int) -> None:
    with tempfile.TemporaryDirectory(prefix="mt-bench-") as tmp:
        started = time.perf_counter()
        _make_data_dir(Path(tmp), count, cycles)
        print(f"  built the data directory in {time.perf_counter() - started:.1f} s")
        for _ in range(2):  # a fresh process each time, so the peak is recovery's own
            subprocess.run([sys.executable, __file__, "_recover", tmp], check=True)
        subprocess.run([sys.executable, __file__, "_memory", str(count)], check=True)


def main() -> None:
    """Parse the command line and run the chosen benchmarks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["throughput", "snapshot", "recovery", "all", "_recover", "_memory"])
    parser.add_argument("arg", nargs="?")
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--tasks", type=int, default=1_000_000, help="state size for snapshot and recovery")
    parser.add_argument("--cycles", type=int, default=200_000, help="lease cycles in the log for recovery")
    args = parser.parse_args()
    if args.which == "_recover":
        return _recovery_child(args.arg)
    if args.which == "_memory":
        return _memory_child(int(args.arg))
    if args.which in ("throughput", "all"):
        print(f"lease-cycle throughput, {args.workers} workers, {args.seconds} s x {args.repeats} each:")
        fill = int(10_000 * args.seconds * (args.repeats + 1))  # more than the cycles the runs can take
        asyncio.run(_throughput(args.workers, args.seconds, args.repeats, fill))
    if args.which in ("snapshot", "all"):
        print(f"snapshot at {args.tasks:,} tasks:")
        asyncio.run(_snapshot_pause(args.tasks))
    if args.which in ("recovery", "all"):
        print(f"recovery of {args.tasks:,} tasks from snapshot + {args.cycles:,} lease cycles of log:")
        _recovery(args.tasks, args.cycles)


if __name__ == "__main__":
    main()
