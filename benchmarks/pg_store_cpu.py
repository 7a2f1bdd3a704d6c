"""The PostgreSQL store's own client CPU per lease cycle, without gRPC.

``python -m benchmarks.pg_store_cpu`` starts a throwaway cluster, opens the store directly, and runs
lease cycles (an owning Query, then an Update deleting the task) from ``--workers`` coroutines until
``--cycles`` are done, ``--rounds`` times. Per round it prints the CPU this process used per cycle
(the store, psycopg and its pool, the event loop: what the server pays on top of gRPC) and the CPU of
every PostgreSQL process per cycle. To compare two trees, run it alternately from each, for example
``PYTHONPATH=/path/to/other/tree python benchmarks/pg_store_cpu.py`` (the store is imported from the
first tree on the path; this file needs only the standard library and ``masstasker``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Sequence

from masstasker.server.stores.base import IdRef, TaskSpec
from masstasker.server.stores.postgres.options import PgOptions
from masstasker.server.stores.postgres.store import PostgresStore
from masstasker.testing_postgres import PostgresCluster, fresh_schema_name

__all__ = ["main"]

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_LEASE_NS = 600 * 10**9


def _pg_seconds(cluster: PostgresCluster) -> float:
    total = 0
    for pid in cluster.pids():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / _CLK_TCK


async def _rounds(cluster: PostgresCluster, cycles: int, workers: int, rounds: int) -> list[tuple[float, float]]:
    store = await PostgresStore.open(PgOptions(dsn=cluster.dsn, schema=fresh_schema_name("cpu")), time.time_ns)
    try:
        for _ in range((cycles * (rounds + 1)) // 1000 + 1):
            await store.update([TaskSpec("g", None, b"x" * 20)] * 1000)
        results = []
        for round_ in range(rounds + 1):  # round 0 warms up (prepared statements, pool)
            left = cycles

            async def worker() -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    tasks = await store.query("g", time.time_ns(), own_for=_LEASE_NS)
                    if tasks:
                        await store.update([], [IdRef(tasks[0].id)])

            pg0, cpu0 = _pg_seconds(cluster), time.process_time()
            await asyncio.gather(*(worker() for _ in range(workers)))
            pg1, cpu1 = _pg_seconds(cluster), time.process_time()
            if round_:
                results.append(((cpu1 - cpu0) / cycles * 1e6, (pg1 - pg0) / cycles * 1e6))
        return results
    finally:
        await store.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the rounds and print CPU per lease cycle, each round's and the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=3000, help="lease cycles per round (default 3000)")
    parser.add_argument("--workers", type=int, default=4, help="concurrent leasing coroutines (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (default 3)")
    args = parser.parse_args(argv)
    with PostgresCluster() as cluster:
        results = asyncio.run(_rounds(cluster, args.cycles, args.workers, args.rounds))
    for client, pg in results:
        print(f"client {client:6.0f} us/cycle   PostgreSQL {pg:6.0f} us/cycle")
    client_median = statistics.median(c for c, _ in results)
    pg_median = statistics.median(p for _, p in results)
    print(f"median: client {client_median:.0f} us/cycle, PostgreSQL {pg_median:.0f} us/cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
