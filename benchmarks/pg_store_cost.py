"""CPU per operation of the PostgreSQL store's hot paths, without gRPC: for an A/B of two checkouts.

    python -m benchmarks.pg_store_cost            # from the checkout to measure (its masstasker is imported)

Starts a throwaway cluster, opens the store on one schema (pool of 2), and runs bounded loops on
the event loop: ``--creates`` Updates of 1,000 tasks, then ``--cycles`` lease cycles (an owning Query
of one task, then an Update deleting it). Per operation it prints this process's CPU (the store's
Python side) and the cluster's (every PostgreSQL process, background work such as compaction and
autovacuum included, read from /proc), which a loaded machine disturbs far less than wall-clock
rates. Run it from two checkouts alternately to compare them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable

from masstasker.server.stores.base import IdRef, TaskSpec
from masstasker.server.stores.postgres.options import PgOptions
from masstasker.server.stores.postgres.store import PostgresStore
from masstasker.testing_postgres import PostgresCluster

__all__ = ["main"]

_TICK = os.sysconf("SC_CLK_TCK")
_SECOND = 1_000_000_000


def _ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


async def _run(cluster: PostgresCluster, creates: int, cycles: int) -> None:
    store = await PostgresStore.open(PgOptions(dsn=cluster.dsn, schema="cost", pool_size=2), time.time_ns)
    specs = [TaskSpec("g", None, b"\x0a\x03abc", None, False) for _ in range(1000)]

    async def measure(name: str, count: int, op: Callable[[], Awaitable[object]]) -> None:
        pg_before = sum(_ticks(pid) for pid in cluster.pids())
        cpu_before, wall_before = time.process_time(), time.perf_counter()
        for _ in range(count):
            await op()
        wall = time.perf_counter() - wall_before
        cpu = time.process_time() - cpu_before
        pg = (sum(_ticks(pid) for pid in cluster.pids()) - pg_before) / _TICK
        per_op = f"python {cpu / count * 1e6:,.0f} us/op, postgres {pg / count * 1e6:,.0f} us/op"
        print(f"{name}: {count / wall:,.0f}/s, {per_op}")

    async def create() -> None:
        await store.update(specs)

    async def lease() -> None:
        [task] = await store.query("g", time.time_ns(), 60 * _SECOND, 1)
        await store.update([], [IdRef(task.id)])

    try:
        for _ in range(20):  # warm-up: plans prepared, caches filled
            await create()
        await measure("create, 1,000 tasks per Update", creates, create)
        for _ in range(300):
            await lease()
        await measure("lease cycle (own one, delete it)", cycles, lease)
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    """Measure once and print the figures."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pg_store_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--creates", type=int, default=150)
    parser.add_argument("--cycles", type=int, default=3000)
    args = parser.parse_args(argv)
    import masstasker.server.stores.postgres.store as measured

    print(f"store: {measured.__file__}")
    with PostgresCluster() as cluster:
        asyncio.run(_run(cluster, args.creates, args.cycles))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
