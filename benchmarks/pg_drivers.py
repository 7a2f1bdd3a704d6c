"""psycopg 3 (pool, pipeline mode) against asyncpg on the PostgreSQL store's lease path.

``python -m benchmarks.pg_drivers`` starts a throwaway cluster (fsync and synchronous_commit on), makes the
store's tables, and for each driver runs 64 concurrent workers (coroutines in this one process, as in a
server) on one group. A lease cycle is what a worker's two RPCs cost the store:

1. own: the head of the group, ``FOR UPDATE SKIP LOCKED``, deleted and re-inserted with a new ID and a
   later ``not_before`` in one statement (the store's ``OWN_HEAD``);
2. delete: the leased task, either as one autocommit statement (``--delete plain``) or as the store's
   Update transaction (``--delete txn``: lock the predicate row, delete, commit; ``--delete notify``: the
   same plus a NOTIFY of the group, as an Update that creates tasks sends), which psycopg sends in one
   round trip in pipeline mode and asyncpg in one per statement.

It prints cycles/s, the latency of whole cycles (p50/p99, pool wait included) and this process's CPU per
cycle: on a small machine the driver's CPU is taken from the server that embeds it. Every run is bounded
by ``--seconds`` and ``--max-cycles``; drivers alternate over ``--rounds`` to share the machine's drift.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python benchmarks/pg_drivers.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.procs import cpu_seconds
from masstasker.testing_postgres import PostgresCluster

__all__ = ["main"]

GROUP = b"lease"
# A lease long enough that nothing comes back during a run.
LEASE_S = 600

# The store's tables (schema.py of the PostgreSQL store), without what a lease does not touch.
SCHEMA = """
DROP SCHEMA IF EXISTS bench CASCADE;
CREATE SCHEMA bench;
CREATE TABLE bench.tasks (
    id bigint PRIMARY KEY, grp bytea NOT NULL, nb_s bigint NOT NULL, nb_ns integer NOT NULL,
    body bytea NOT NULL, labels text[]);
CREATE INDEX tasks_queue ON bench.tasks (grp, nb_s, nb_ns, id);
CREATE SEQUENCE bench.task_ids AS bigint MINVALUE 1;
CREATE TABLE bench.group_counts (grp bytea NOT NULL, n bigint NOT NULL);
"""

FILL = """
TRUNCATE bench.tasks, bench.group_counts;
INSERT INTO bench.tasks (id, grp, nb_s, nb_ns, body)
SELECT nextval('bench.task_ids'), 'lease'::bytea, 1, 0, '\\x0a147061796c6f61642d6f662d32302d6279746573'::bytea
FROM generate_series(1, {count});
VACUUM ANALYZE bench.tasks;
CHECKPOINT;
"""

# Statements with positional %s parameters (psycopg); asyncpg gets them renumbered as $1, $2, ...
OWN = """
WITH head AS (
    SELECT id FROM bench.tasks
    WHERE grp = %s AND (nb_s, nb_ns) <= (%s::int8, %s::int4)
    ORDER BY grp, nb_s, nb_ns, id LIMIT 1
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM bench.tasks t USING head WHERE t.id = head.id
    RETURNING t.id, t.nb_s, t.nb_ns, t.body, t.labels
)
INSERT INTO bench.tasks (id, grp, nb_s, nb_ns, body, labels)
SELECT nextval('bench.task_ids'), %s, %s::int8, %s::int4, body, labels
FROM gone ORDER BY nb_s, nb_ns, id
RETURNING id, body
"""

LOCK = "SELECT id FROM bench.tasks WHERE id = ANY(%s::int8[]) FOR KEY SHARE"

DELETE = """
WITH gone AS (
    DELETE FROM bench.tasks WHERE id = ANY(%s::int8[]) RETURNING id, grp
), counted AS (
    INSERT INTO bench.group_counts (grp, n) SELECT grp, -count(*) FROM gone GROUP BY grp
)
SELECT id FROM gone
"""

NOTIFY = "SELECT pg_notify('masstasker', %s)"


def numbered(statement: str) -> str:
    """``%s`` placeholders as asyncpg's ``$1, $2, ...``."""
    parts = statement.split("%s")
    return "".join(part + (f"${i}" if i < len(parts) else "") for i, part in enumerate(parts, 1))


def own_params() -> tuple[Any, ...]:
    now = time.time()
    until = now + LEASE_S
    return (GROUP, int(now), int(now % 1 * 1e9), GROUP, int(until), int(until % 1 * 1e9))


Cycle = Callable[[], Awaitable[bool]]


async def psycopg_cycles(dsn: str, pool_size: int, delete: str) -> tuple[Cycle, Callable[[], Awaitable[None]]]:
    """A lease cycle through a psycopg ``AsyncConnectionPool``; returns (cycle, close)."""
    import psycopg_pool

    pool = psycopg_pool.AsyncConnectionPool(
        dsn, min_size=pool_size, max_size=pool_size, kwargs={"autocommit": True}, open=False
    )
    await pool.open(wait=True)

    async def cycle() -> bool:
        async with pool.connection() as conn:
            row = await (await conn.execute(OWN, own_params())).fetchone()
        if row is None:
            return False
        ids = [row[0]]
        async with pool.connection() as conn:
            if delete == "plain":
                await conn.execute(DELETE, (ids,))
            else:
                # One round trip: BEGIN, the three statements and COMMIT go out together.
                async with conn.pipeline(), conn.transaction():
                    await conn.execute(LOCK, (ids,))
                    await conn.execute(DELETE, (ids,))
                    if delete == "notify":
                        await conn.execute(NOTIFY, ("lease",))
        return True

    return cycle, pool.close


async def asyncpg_cycles(dsn: str, pool_size: int, delete: str) -> tuple[Cycle, Callable[[], Awaitable[None]]]:
    """The same cycle through an ``asyncpg`` pool; returns (cycle, close)."""
    import asyncpg

    pool = await asyncpg.create_pool(_asyncpg_dsn(dsn), min_size=pool_size, max_size=pool_size)
    own, lock, delete_sql, notify = (numbered(s) for s in (OWN, LOCK, DELETE, NOTIFY))

    async def cycle() -> bool:
        async with pool.acquire() as conn:
            row = await conn.fetchrow(own, *own_params())
        if row is None:
            return False
        ids = [row[0]]
        async with pool.acquire() as conn:
            if delete == "plain":
                await conn.fetch(delete_sql, ids)
            else:
                async with conn.transaction():
                    await conn.fetch(lock, ids)
                    await conn.fetch(delete_sql, ids)
                    if delete == "notify":
                        await conn.fetch(notify, "lease")
        return True

    return cycle, pool.close


def _asyncpg_dsn(dsn: str) -> str:
    # asyncpg takes URIs only; the socket directory goes in the query string.
    fields = dict(item.split("=", 1) for item in dsn.split())
    return f"postgresql://{fields['user']}@/{fields['dbname']}?host={fields['host']}&port={fields['port']}"


DRIVERS = {"psycopg": psycopg_cycles, "asyncpg": asyncpg_cycles}


def wal_lsn(cluster: PostgresCluster) -> int:
    """The current WAL insert position in bytes."""
    return int(cluster.psql("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").strip())


async def run(driver: str, cluster: PostgresCluster, args: argparse.Namespace) -> dict[str, float]:
    """One bounded run: ``args.workers`` coroutines cycling until time or cycles run out."""
    cycle, close = await DRIVERS[driver](cluster.dsn, args.pool, args.delete)
    latencies: list[float] = []
    dry = 0
    try:
        # Warm up: every connection prepares its statements before the window opens.
        await asyncio.gather(*(cycle() for _ in range(args.pool * 6)))
        deadline = time.perf_counter() + args.seconds
        budget = [args.max_cycles]
        # The pool's backends live for the whole run, so the cluster's processes now are the ones working.
        pg_pids = cluster.pids()
        lsn0, pg_cpu0 = wal_lsn(cluster), cpu_seconds(pg_pids)
        cpu0, t0 = time.process_time(), time.perf_counter()

        async def worker() -> None:
            nonlocal dry
            while budget[0] > 0 and time.perf_counter() < deadline:
                budget[0] -= 1
                started = time.perf_counter()
                if await cycle():
                    latencies.append(time.perf_counter() - started)
                else:
                    dry += 1

        await asyncio.gather(*(worker() for _ in range(args.workers)))
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        pg_cpu, wal = cpu_seconds(pg_pids) - pg_cpu0, wal_lsn(cluster) - lsn0
    finally:
        await close()
    if dry:
        raise RuntimeError(f"{driver}: the group ran dry {dry} times; fill more tasks")
    cuts = statistics.quantiles(latencies, n=100)
    return {
        "cycles_s": len(latencies) / elapsed,
        "p50_ms": cuts[49] * 1e3,
        "p99_ms": cuts[98] * 1e3,
        "cpu_us": cpu / len(latencies) * 1e6,
        "pg_cpu_us": pg_cpu / len(latencies) * 1e6,
        "wal_bytes": wal / len(latencies),
        "cycles": len(latencies),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, start the cluster, alternate the drivers, print a table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pg_drivers", description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=64, help="concurrent lease loops (default 64)")
    parser.add_argument("--pool", type=int, default=16, help="connections per driver pool (default 16)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement window per run (default 10)")
    parser.add_argument("--max-cycles", type=int, default=40_000, help="cycles per run at most (default 40,000)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per driver, alternating (default 2)")
    parser.add_argument(
        "--delete", choices=["plain", "txn", "notify", "all"], default="all", help="how the delete is sent"
    )
    parser.add_argument("--driver", action="append", choices=list(DRIVERS), help="repeatable (default: both)")
    parser.add_argument("--synchronous-commit", default="on", help="the cluster's synchronous_commit (default on)")
    args = parser.parse_args(argv)
    drivers = args.driver or list(DRIVERS)
    modes = ["plain", "txn", "notify"] if args.delete == "all" else [args.delete]

    print(
        f"# {args.workers} workers, pool {args.pool}, one group, window {args.seconds:g} s or {args.max_cycles} cycles,"
        f" synchronous_commit={args.synchronous_commit}, fsync=on, {os.cpu_count()} CPUs"
    )
    print(
        f"{'driver':9} {'delete':6} {'cycles/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'client CPU µs':>13}"
        f" {'PG CPU µs':>9} {'WAL B':>6}  (per cycle)"
    )
    with PostgresCluster({"synchronous_commit": args.synchronous_commit}) as cluster:
        cluster.psql(SCHEMA)
        for mode in modes:
            results: dict[str, list[dict[str, float]]] = {d: [] for d in drivers}
            for _ in range(args.rounds):
                for driver in drivers:
                    cluster.psql(FILL.format(count=args.max_cycles + args.pool * 6 + args.workers + 1000))
                    args.delete = mode
                    results[driver].append(asyncio.run(run(driver, cluster, args)))
            for driver in drivers:
                runs = results[driver]

                def med(key: str, runs: list[dict[str, float]] = runs) -> float:
                    return statistics.median(r[key] for r in runs)

                each = ", ".join(f"{r['cycles_s']:.0f}" for r in runs)
                print(
                    f"{driver:9} {mode:6} {med('cycles_s'):9.0f} {med('p50_ms'):7.1f} {med('p99_ms'):7.1f}"
                    f" {med('cpu_us'):13.0f} {med('pg_cpu_us'):9.0f} {med('wal_bytes'):6.0f}   (runs: {each})",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
