"""What each operation of the PostgreSQL store costs the database: the figures behind docs/scaling.md.

``python -m benchmarks.pg_costs`` starts a throwaway cluster with ``pg_stat_statements``, opens the
store directly (no gRPC: this is the database's side of the bill), and runs each operation ``--count``
times one after another on an otherwise idle database. Per operation it prints:

- statements executed and transactions committed (``pg_stat_statements``, ``pg_stat_database``);
- WAL bytes written (``pg_current_wal_lsn()`` before and after);
- heap rows inserted and deleted in ``tasks`` and ``group_counts`` (``pg_stat_user_tables``): each row
  inserted into ``tasks`` is one entry in each of its two B-tree indexes (plus the GIN index's entries
  for a labelled task), and each deleted row leaves a dead heap row and dead index entries for vacuum;
- the PostgreSQL CPU time used (all its processes, from /proc).

Round trips are the store's design (one per statement outside pipelines, one per pipeline): see
docs/scaling.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python benchmarks/pg_costs.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.payload import payload
from benchmarks.procs import cpu_seconds
from masstasker._pb import masstasker_pb2 as pb
from masstasker.testing_postgres import PostgresCluster

__all__ = ["main"]

SCHEMA = "costs"
LEASE_NS = 600 * 10**9

_COUNTERS = f"""
SELECT pg_stat_force_next_flush();
SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8,
       (SELECT coalesce(sum(calls), 0) FROM pg_stat_statements
         WHERE query NOT ILIKE '%pg_stat%' AND query NOT ILIKE 'VACUUM%' AND query NOT ILIKE 'SELECT $1'
           AND query NOT ILIKE 'SET %' AND query NOT ILIKE '%schema_version%' AND query NOT ILIKE 'LISTEN%'
           AND query NOT ILIKE '%advisory%' AND query NOT ILIKE 'CREATE %'),
       (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()),
       (SELECT n_tup_ins FROM pg_stat_user_tables WHERE schemaname = '{SCHEMA}' AND relname = 'tasks'),
       (SELECT n_tup_del FROM pg_stat_user_tables WHERE schemaname = '{SCHEMA}' AND relname = 'tasks'),
       (SELECT n_tup_ins FROM pg_stat_user_tables WHERE schemaname = '{SCHEMA}' AND relname = 'group_counts')
"""
_FIELDS = ("wal", "statements", "commits", "task_ins", "task_del", "count_ins")


def _counters(cluster: PostgresCluster) -> dict[str, float]:
    line = cluster.psql(_COUNTERS).strip().splitlines()[-1]
    values = dict(zip(_FIELDS, (float(v or 0) for v in line.split("|")), strict=True))
    values["pg_cpu"] = cpu_seconds(cluster.pids())
    return values


def _body() -> bytes:
    # The benchmarks' task: a 20-byte Test payload, stored as the Task without id, group, not_before.
    return pb.Task(data=payload()).SerializeToString()


async def _measure(args: argparse.Namespace, cluster: PostgresCluster) -> list[tuple[str, str, dict[str, float]]]:
    from masstasker.server.stores.memory.store import IdRef, TaskSpec
    from masstasker.server.stores.postgres.options import PgOptions
    from masstasker.server.stores.postgres.store import PostgresStore

    def clock() -> int:
        return time.time_ns()

    body = _body()
    n = args.count
    rows: list[tuple[str, str, dict[str, float]]] = []
    options = PgOptions(dsn=cluster.dsn, schema=SCHEMA, pool_size=1)

    async def cost(
        name: str, unit: str, tasks: int, step: Callable[[PostgresStore], Awaitable[object]], times: int
    ) -> None:
        per = times
        # A store of its own: its backends exit when it closes, and so report their statistics.
        store = await PostgresStore.open(options, clock)
        cluster.psql("SELECT pg_stat_statements_reset()")
        before = _counters(cluster)
        try:
            for _ in range(times):
                await step(store)
            cpu = cpu_seconds(cluster.pids())  # before the backends exit and take it with them
        finally:
            await store.close()
        await asyncio.sleep(0.5)  # the backends' exit, and with it their statistics, is asynchronous
        after = {**_counters(cluster), "pg_cpu": cpu}
        rows.append((name, unit, {**{k: (after[k] - before[k]) / per for k in after}, "tasks": tasks}))
        if args.statements:
            print(f"-- {name}: statements per {unit}")
            listing = cluster.psql(
                "SELECT round(calls::numeric / "
                + str(per)
                + ", 2) || '  ' || left(regexp_replace(query, '\\s+', ' ', 'g'), 100)"
                " FROM pg_stat_statements WHERE calls >= " + str(max(1, times // 2)) + " ORDER BY calls DESC"
            )
            print(listing.rstrip())

    async def backlog(store: PostgresStore) -> None:
        await store.update([TaskSpec("q", None, body)] * 1000)

    # A backlog so the group looks like a working queue, then each operation on it.
    await cost("(set-up: 10 Updates of 1,000 tasks)", "Update", 1000, backlog, 10)
    cluster.psql(f"VACUUM ANALYZE {SCHEMA}.tasks")

    async def create_1(store: PostgresStore) -> None:
        await store.update([TaskSpec("c1", None, body)])

    async def create_1000(store: PostgresStore) -> None:
        await store.update([TaskSpec("c1000", None, body)] * 1000)

    async def lease_cycle(store: PostgresStore) -> None:
        (task,) = await store.query("q", clock(), LEASE_NS, 1)
        await store.update([], [IdRef(task.id)])

    async def batch_cycle(store: PostgresStore) -> None:
        tasks = await store.query("q", clock(), LEASE_NS, 100)
        await store.update([], [IdRef(t.id) for t in tasks])

    async def commit_with_result(store: PostgresStore) -> None:
        (task,) = await store.query("q", clock(), LEASE_NS, 1)
        await store.update([TaskSpec("done", None, body)], [IdRef(task.id)], [task.id])

    async def peek(store: PostgresStore) -> None:
        await store.query("q", clock(), 0, 1)

    batches = max(1, n // 100)
    await cost("create 1 task", "Update", 1, create_1, n)
    await cost("create 1,000 tasks", "Update", 1000, create_1000, batches)
    await cost("lease cycle: own 1, delete it", "cycle", 1, lease_cycle, n)
    await cost("batch lease: own 100, delete them", "cycle", 100, batch_cycle, batches)
    await cost("lease, then pred + delete + create result", "cycle", 1, commit_with_result, n)
    await cost("peek (Query without own)", "Query", 1, peek, n)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Start the cluster, measure, print a table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pg_costs", description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="repetitions of each single operation (default 2000)")
    parser.add_argument("--statements", action="store_true", help="also list the statements each operation ran")
    args = parser.parse_args(argv)
    settings = {"shared_preload_libraries": "pg_stat_statements", "pg_stat_statements.track": "all"}
    with PostgresCluster(settings) as cluster:
        cluster.psql("CREATE EXTENSION pg_stat_statements")
        rows = asyncio.run(_measure(args, cluster))
    print(
        f"# one connection, otherwise idle cluster, synchronous_commit=on; {args.count} repetitions (1/100 for batches)"
    )
    head = f"{'operation':42} {'per':6} {'stmts':>6} {'xacts':>6} {'WAL B':>7} {'WAL B/task':>10}"
    print(head + f" {'rows +':>7} {'rows -':>7} {'counts +':>8} {'PG CPU µs':>9}")
    for name, unit, c in rows:
        print(
            f"{name:42} {unit:6} {c['statements']:6.2f} {c['commits']:6.2f} {c['wal']:7.0f}"
            f" {c['wal'] / c['tasks']:10.0f} {c['task_ins']:7.1f} {c['task_del']:7.1f} {c['count_ins']:8.2f}"
            f" {c['pg_cpu'] * 1e6:9.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
