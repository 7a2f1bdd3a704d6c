"""``python -m benchmarks --store postgres``: the scenarios of the PostgreSQL store.

A throwaway cluster (``masstasker.testing_postgres``: Unix socket, ``fsync`` and ``synchronous_commit``
on, autovacuum at PostgreSQL's defaults plus what the store sets on its tasks table) is started before
anything is pinned, so PostgreSQL's processes may run on every CPU while the servers stay on the server
CPU and the load generators on the others. Every ``servers()`` call gets a schema of its own, dropped
afterwards; several servers started together share it, as a fleet does.

Rows name the store they ran on: ``postgres`` (``--store``) or ``memory`` (the same server without it).
Besides the servers' CPU each row gives PostgreSQL's (``pg_cpu``, cores, all its processes: read from
/proc), and where it matters the notifications the store sent (a LISTEN connection counts them).
"""

from __future__ import annotations

import statistics
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from benchmarks.loadgen import percentile
from benchmarks.procs import ServerProcess, cpu_seconds
from benchmarks.report import Target
from benchmarks.scenarios import (
    _DISPATCH_SLACK,
    _SETUP_TIMEOUT,
    Context,
    Row,
    Sample,
    _fill_row,
    _group_size,
    create_one_by_one,
    fill,
)
from masstasker.testing_postgres import PostgresCluster, fresh_schema_name, quote_ident

__all__ = ["PG_SCENARIOS", "PgContext", "check_pg_targets", "start_cluster"]

_BLOAT_WINDOW = 10.0  # seconds per measurement window while churning towards the cycle count
_BLOAT_CAP = 900.0  # wall-clock cap on the churn, whatever the count
_SCRAPES = 20


def start_cluster() -> PostgresCluster:
    """The benchmark's cluster: PostgreSQL's defaults (durable commits), room for every pool."""
    logging = {
        "log_min_duration_statement": "1000",  # a statement over a second: why a window stalled
        "log_parameter_max_length": "0",
        "log_lock_waits": "on",
        "log_checkpoints": "on",
        "log_autovacuum_min_duration": "0",
    }
    return PostgresCluster({"max_connections": "300", **logging}).start()


class _PgCpu:
    """CPU used by every process of the cluster between start() and stop() (new backends included)."""

    def __init__(self, cluster: PostgresCluster) -> None:
        self.cluster = cluster
        self._before: dict[int, float] = {}

    def start(self) -> None:
        self._before = {pid: cpu_seconds([pid]) for pid in self.cluster.pids()}

    def seconds(self) -> float:
        now = {pid: cpu_seconds([pid]) for pid in self.cluster.pids()}
        # A process that exited during the window is lost; pools keep their backends, so that is rare.
        return sum(seconds - self._before.get(pid, 0.0) for pid, seconds in now.items())


class _NotifyCounter:
    """A LISTEN connection on the store's channel, counting notifications and the groups they name."""

    def __init__(self, dsn: str, schema: str) -> None:
        import psycopg

        from masstasker.server.stores.postgres.options import PgOptions

        self.channel = PgOptions(dsn=dsn, schema=schema).channel
        self._conn = psycopg.connect(dsn, autocommit=True)
        self._conn.execute(f"LISTEN {quote_ident(self.channel)}")
        self._times: list[float] = []
        self._groups: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for note in self._conn.notifies(timeout=0.2):
                self._times.append(time.time())
                self._groups.add(note.payload)

    def between(self, start: float, end: float) -> int:
        """Notifications received in [start, end) (wall clock)."""
        return sum(start <= t < end for t in list(self._times))

    def close(self) -> dict[str, Any]:
        """Stop listening; what was seen."""
        self._stop.set()
        self._thread.join(5)
        self._conn.close()
        return {"notifications": len(self._times), "groups_named": len(self._groups)}


@dataclass
class PgContext(Context):
    """A :class:`Context` whose "real" servers use a PostgreSQL store on ``cluster``."""

    cluster: PostgresCluster | None = None
    schema: str = ""

    @property
    def dsn(self) -> str:
        """The cluster's DSN."""
        assert self.cluster is not None
        return self.cluster.dsn

    @contextmanager
    def servers(self, *kinds: str, metrics: bool = False) -> Iterator[list[ServerProcess]]:
        """Start ``real`` servers on a fresh shared schema and ``memory`` ones without a store."""
        assert self.cluster is not None
        self.schema = fresh_schema_name("bench")
        store = ("--store", self.dsn, "--store-schema", self.schema)
        started: list[ServerProcess] = []
        try:
            for kind in kinds:
                extra = store if kind == "real" else ()
                started.append(ServerProcess(kind, cpus=self.server_cpus, metrics=metrics, extra=extra).start())
            yield started
        finally:
            for server in started:
                server.stop()
            self.cluster.drop_schema(self.schema)

    def sql(self, statement: str) -> str:
        """Run SQL against the current schema's database (``{schema}`` is replaced by the quoted name)."""
        assert self.cluster is not None
        return self.cluster.psql(statement.replace("{schema}", quote_ident(self.schema)))

    def measure_spread(
        self, servers: Sequence[ServerProcess], workload: str, workers: int, **params: Any
    ) -> tuple[Sample, dict[str, Any]]:
        """Like :meth:`Context.measure`, with the load spread over ``servers`` and PostgreSQL's CPU measured.

        Returns the sample (``server_cpu``: all servers together) and extras: each server's CPU,
        ``pg_cpu``, and the window's bounds.
        """
        assert self.cluster is not None
        sizes = self.sizes
        procs = min(self.pool.size, workers)
        t_start = time.time() + _DISPATCH_SLACK
        t_measure = t_start + sizes.warmup
        t_end = t_measure + sizes.window
        jobs = [
            {
                "workload": workload,
                "target": servers[i % len(servers)].target,
                "concurrency": workers // procs + (1 if i < workers % procs else 0),
                "t_start": t_start,
                "t_measure": t_measure,
                "t_end": t_end,
                **params,
            }
            for i in range(procs)
        ]
        slots = self.pool.submit(jobs)
        pg = _PgCpu(self.cluster)
        _sleep_until(t_measure)
        cpu0 = [s.cpu_seconds() for s in servers]
        pg.start()
        _sleep_until(t_end)
        cpu1 = [s.cpu_seconds() for s in servers]
        pg_cpu = pg.seconds()
        results = self.pool.collect(slots, t_end)
        latencies = sorted(x for r in results for x in r["latencies"])
        errors: dict[str, int] = {}
        for r in results:
            for code, n in r["errors"].items():
                errors[code] = errors.get(code, 0) + n
        window = sizes.window
        per_server = [(b - a) / window for a, b in zip(cpu0, cpu1, strict=True)]
        sample = Sample(
            ops_s=sum(r["ops"] for r in results) / window,
            tasks_s=sum(r["items"] for r in results) / window,
            p50_ms=percentile(latencies, 50) * 1e3,
            p99_ms=percentile(latencies, 99) * 1e3,
            server_cpu=sum(per_server),
            loadgen_cpu=sum(r["window_cpu_s"] for r in results) / window,
            errors=errors,
        )
        return sample, {"server_cpus": per_server, "pg_cpu": pg_cpu / window, "t_measure": t_measure, "t_end": t_end}


def _sleep_until(moment: float) -> None:
    delay = moment - time.time()
    if delay > 0:
        time.sleep(delay)


def _row(name: str, store: str, workers: int, runs: list[tuple[Sample, dict[str, Any]]]) -> Row:
    """Medians over repeats, PostgreSQL's CPU and the per-server split included."""
    row = Row(name, store, workers)
    _fill_row(row, [s for s, _ in runs])
    for repeat, (_, extra) in zip(row.repeats, runs, strict=True):
        repeat.update({k: v for k, v in extra.items() if k in ("server_cpus", "pg_cpu", "notifications_s")})
    if store == "postgres":
        row.extra["pg_cpu"] = statistics.median(extra["pg_cpu"] for _, extra in runs)
        split = [statistics.median(cpus) for cpus in zip(*(extra["server_cpus"] for _, extra in runs), strict=True)]
        if len(split) > 1:
            row.extra["server_cpu_split"] = split
        notes = [f"PostgreSQL {row.extra['pg_cpu']:.2f} cores"]
        if len(split) > 1:
            notes.append("servers " + " + ".join(f"{c:.2f}" for c in split) + " cores")
        if all("notifications_s" in extra for _, extra in runs):
            row.extra["notifications_s"] = statistics.median(extra["notifications_s"] for _, extra in runs)
            notes.append(f"{row.extra['notifications_s']:.0f} NOTIFY/s")
        row.extra["summary"] = ", ".join(notes)
    return row


def _keep_filled(ctx: PgContext, group: str, minimum: int) -> Callable[[ServerProcess, float], None]:
    """Before a window: enough tasks in ``group`` for it, judged from the last window's rate."""

    def before(server: ServerProcess, last_rate: float) -> None:
        need = max(minimum, int(last_rate * (ctx.sizes.warmup + ctx.sizes.window + _DISPATCH_SLACK) * 1.5))
        have = _group_size(server.target, group)
        if have < need:
            fill(server.target, group, need - have)

    return before


def _against_memory(
    ctx: PgContext, name: str, workers: int, workload: str, group: str, minimum: int, count_notify: bool, **params: Any
) -> list[Row]:
    """The workload on a PostgreSQL-backed server and on an in-memory one, alternating repeats."""
    runs: dict[str, list[tuple[Sample, dict[str, Any]]]] = {"postgres": [], "memory": []}
    before = _keep_filled(ctx, group, minimum) if minimum else None
    with ctx.servers("real", "memory") as (pg_server, mem_server):
        counter = _NotifyCounter(ctx.dsn, ctx.schema) if count_notify else None
        rate = {"postgres": 0.0, "memory": 0.0}
        try:
            for repeat in range(ctx.sizes.repeats):
                order = [("postgres", pg_server), ("memory", mem_server)]
                for store, server in order if repeat % 2 == 0 else reversed(order):
                    if before is not None:
                        before(server, rate[store])
                    sample, extra = ctx.measure_spread([server], workload, workers, group=group, **params)
                    if counter is not None and store == "postgres":
                        seen = counter.between(extra["t_measure"], extra["t_end"])
                        extra["notifications_s"] = seen / ctx.sizes.window
                    rate[store] = sample.tasks_s
                    runs[store].append((sample, extra))
        finally:
            if counter is not None:
                counter.close()
    rows = [_row(name, store, workers, runs[store]) for store in ("postgres", "memory")]
    rows[0].extra["vs_memory"] = rows[0].ops_s / rows[1].ops_s
    rows[0].extra["summary"] += f", {rows[0].extra['vs_memory']:.2f}x in-memory"
    return rows


# -- the scenarios -----------------------------------------------------------------------


def lease_64(ctx: PgContext) -> list[Row]:
    """Lease cycle (Query own + Update delete), 64 workers, one server: PostgreSQL vs in-memory."""
    return _against_memory(ctx, "lease-64", 64, "lease", "lease", ctx.sizes.lease_fill, count_notify=True)


def lease_64_two_servers(ctx: PgContext) -> list[Row]:
    """The same 64 workers spread over two servers on one database; CPU of each server and of PostgreSQL."""
    runs = []
    with ctx.servers("real", "real") as servers:
        before = _keep_filled(ctx, "lease", ctx.sizes.lease_fill)
        rate = 0.0
        for _ in range(ctx.sizes.repeats):
            before(servers[0], rate)
            sample, extra = ctx.measure_spread(servers, "lease", 64, group="lease")
            rate = sample.tasks_s
            runs.append((sample, extra))
    return [_row("lease-64-two-servers", "postgres", 64, runs)]


def batch_lease(ctx: PgContext) -> list[Row]:
    """Batch lease through AsyncClient: query_many(100) + one Update deleting them."""
    sizes = ctx.sizes
    runs = []
    with ctx.servers("real") as (server,):
        before = _keep_filled(ctx, "batch", sizes.batch_fill)
        rate = 0.0
        for _ in range(sizes.repeats):
            before(server, rate)
            sample, extra = ctx.measure_spread([server], "batch_lease", sizes.batch_workers, group="batch", batch=100)
            rate = sample.tasks_s
            runs.append((sample, extra))
    row = _row("batch-lease", "postgres", sizes.batch_workers, runs)
    row.extra["batch"] = 100
    return [row]


def create_1000(ctx: PgContext) -> list[Row]:
    """Updates creating 1,000 tasks each into one group; notifications counted (one group touched)."""
    runs = []
    with ctx.servers("real") as (server,):
        counter = _NotifyCounter(ctx.dsn, ctx.schema)
        try:
            for _ in range(ctx.sizes.repeats):
                sample, extra = ctx.measure_spread([server], "create", 8, group="create", batch=1000)
                extra["notifications_s"] = counter.between(extra["t_measure"], extra["t_end"]) / ctx.sizes.window
                runs.append((sample, extra))
        finally:
            seen = counter.close()
    row = _row("create-1000", "postgres", 8, runs)
    row.extra.update(batch=1000, groups_touched=1, groups_named=seen["groups_named"])
    row.extra["summary"] += f" for {row.ops_s:.0f} Updates/s and {row.tasks_s:,.0f} tasks/s into 1 group"
    return [row]


def wake_across(ctx: PgContext) -> list[Row]:
    """Waiting Queries on server A, tasks created one at a time on server B: wake-up latency across servers."""
    sizes = ctx.sizes
    pool = ctx.pool
    waiting = 100
    cap = time.time() + _SETUP_TIMEOUT + 60
    with ctx.servers("real", "real", metrics=True) as (a, b):
        counter = _NotifyCounter(ctx.dsn, ctx.schema)
        holders = max(1, pool.size - 1)
        jobs = [
            {
                "workload": "waiters",
                "target": a.target,
                "group": "wait",
                "concurrency": waiting // holders + (1 if i < waiting % holders else 0),
                "channels": 1,
                "ramp_per_s": 1000.0,
                "t_end": cap,
            }
            for i in range(holders)
        ]
        slots = pool.submit(jobs)
        try:
            _wait_for_waiting(a, waiting)
            began = time.time()
            created = create_one_by_one(pool, b.target, "wait", sizes.wake_creates)
            ended = time.time()
            time.sleep(0.5)  # the last wake-ups are on their way
        finally:
            pool.stop(slots)
        results = pool.collect(slots, cap)
        notified = counter.between(began, ended)
        counter.close()
    wakeups = sorted(x for r in results for x in r["latencies"])
    row = Row("wake-across-servers", "postgres", waiting)
    row.ops_s = row.tasks_s = len(wakeups) / max(ended - began, 1e-9)
    row.p50_ms = percentile(wakeups, 50) * 1e3
    row.p99_ms = percentile(wakeups, 99) * 1e3
    for r in results:
        for code, n in r["errors"].items():
            row.errors[code] = row.errors.get(code, 0) + n
    row.extra.update(
        waiting_on_a=waiting,
        created_on_b=created["ops"],
        woken_on_a=len(wakeups),
        notifications=notified,
        summary=(
            f"{waiting} waiting on A, {created['ops']} created one by one on B: {len(wakeups)} woken;"
            f" {notified} NOTIFYs for {created['ops']} single-task Updates"
        ),
    )
    return [row]


def _wait_for_waiting(server: ServerProcess, count: int) -> None:
    assert server.metrics_url
    deadline = time.monotonic() + _SETUP_TIMEOUT
    while time.monotonic() < deadline:
        with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("masstasker_waiting_queries ") and float(line.split()[1]) >= count:
                    return
        time.sleep(0.1)
    raise TimeoutError(f"{count} Queries did not start waiting on {server.target}")


def query_head(ctx: PgContext) -> list[Row]:
    """Query(own, 1 µs) on a 10-task group and on a big one; and /metrics scrapes with the big one stored."""
    sizes = ctx.sizes
    groups = {"head-10": 10, f"head-{sizes.big_group}": sizes.big_group}
    runs: dict[str, list[tuple[Sample, dict[str, Any]]]] = {g: [] for g in groups}
    with ctx.servers("real", metrics=True) as (server,):
        for group, count in groups.items():
            took = fill(server.target, group, count)
            ctx.log(f"  filled {group} with {count} tasks in {took:.1f} s")
        ctx.sql("VACUUM ANALYZE {schema}.tasks")
        scrapes = _scrape_times(server)
        for repeat in range(sizes.repeats):
            order = list(groups) if repeat % 2 == 0 else list(reversed(groups))
            for group in order:
                runs[group].append(ctx.measure_spread([server], "head", 64, group=group))
    rows = []
    for group, count in groups.items():
        row = _row(f"query-{group}", "postgres", 64, runs[group])
        row.extra["group_size"] = count
        rows.append(row)
    ratio = rows[1].ops_s / rows[0].ops_s
    rows[1].extra["vs_small_group"] = ratio
    rows[1].extra["summary"] += f", {ratio:.2f}x the 10-task group"
    scrape = Row("metrics-scrape", "postgres", 1)
    scrape.p50_ms, scrape.p99_ms = percentile(scrapes, 50) * 1e3, percentile(scrapes, 99) * 1e3
    scrape.extra.update(
        tasks=sum(groups.values()),
        max_ms=scrapes[-1] * 1e3,
        summary=f"{_SCRAPES} /metrics scrapes, {sum(groups.values()):,} tasks stored, max {scrapes[-1] * 1e3:.1f} ms",
    )
    return [*rows, scrape]


def _scrape_times(server: ServerProcess) -> list[float]:
    assert server.metrics_url
    times = []
    for _ in range(_SCRAPES):
        began = time.perf_counter()
        with urllib.request.urlopen(server.metrics_url, timeout=30) as response:
            body = response.read()
        times.append(time.perf_counter() - began)
        assert b"masstasker_" in body
    return sorted(times)


_SIZES_SQL = """
SELECT pg_total_relation_size('{schema}.tasks'), pg_relation_size('{schema}.tasks'),
       pg_indexes_size('{schema}.tasks'),
       (SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = '{name}' AND c.relkind = 'r'),
       (SELECT n_live_tup FROM pg_stat_user_tables WHERE relid = '{schema}.tasks'::regclass),
       (SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = '{schema}.tasks'::regclass),
       (SELECT autovacuum_count FROM pg_stat_user_tables WHERE relid = '{schema}.tasks'::regclass)
"""

_AUTOVACUUM_SQL = """
SELECT string_agg(name || '=' || setting, ' ' ORDER BY name) FROM pg_settings
WHERE name IN ('autovacuum', 'autovacuum_naptime', 'autovacuum_vacuum_scale_factor', 'autovacuum_vacuum_threshold',
               'autovacuum_vacuum_cost_delay', 'autovacuum_vacuum_cost_limit', 'autovacuum_max_workers');
SELECT coalesce(array_to_string(reloptions, ' '), '') FROM pg_class WHERE oid = '{schema}.tasks'::regclass;
"""


def _sizes(ctx: PgContext) -> dict[str, int]:
    text = ctx.sql(_SIZES_SQL.replace("{name}", ctx.schema.replace("'", "''"))).strip()
    keys = ("tasks_total", "tasks_heap", "tasks_indexes", "schema_tables_total", "live", "dead", "autovacuums")
    return dict(zip(keys, (int(v or 0) for v in text.split("|")), strict=True))


def bloat(ctx: PgContext) -> list[Row]:
    """A queue of constant depth churned for many lease cycles: do the table and its indexes stay bounded?

    Each cycle leases one task and, in the Update that deletes it, creates its replacement (so the
    depth stays at ``depth``); after every window the sizes are read. Cycles are counted from the ID
    sequence (two IDs per cycle: the lease's re-insert and the replacement), warm-ups included. Steady
    size: the sizes once the first tenth of the cycles has run (autovacuum has found its rhythm); the
    issue asks that the final size be at most twice that. Full sizes: 200,000 cycles (5x the lease
    fill); quick: 50,000.
    """
    sizes = ctx.sizes
    depth = 10_000
    total = sizes.lease_fill * 5
    cycles = 0
    series: list[dict[str, int]] = []
    began = time.monotonic()
    with ctx.servers("real") as (server,):
        fill(server.target, "churn", depth)
        ctx.sql("VACUUM ANALYZE {schema}.tasks")
        fresh = _sizes(ctx)
        settings = ctx.sql(_AUTOVACUUM_SQL).split("\n")
        steady: dict[str, int] | None = None
        samples = []
        while cycles < total and time.monotonic() - began < _BLOAT_CAP:
            sample, extra = ctx.measure_spread([server], "lease_replace", 64, group="churn")
            cycles = (int(ctx.sql("SELECT last_value FROM {schema}.task_ids").strip()) - depth) // 2
            samples.append((sample, extra))
            now = {**_sizes(ctx), "cycles": cycles}
            series.append(now)
            if steady is None and cycles >= total // 10:
                steady = now
            ctx.log(f"  {cycles:,} cycles: tasks {now['tasks_total'] / 2**20:.1f} MiB, dead {now['dead']:,}")
    final = series[-1]
    steady = steady or final
    row = _row("bloat", "postgres", 64, samples)
    row.extra.update(
        cycles=cycles,
        depth=depth,
        fresh=fresh,
        steady=steady,
        final=final,
        series=series,
        autovacuum=[s for s in settings if s],
        vs_steady=final["tasks_total"] / steady["tasks_total"],
        vs_fresh=final["tasks_total"] / fresh["tasks_total"],
    )
    row.extra["summary"] += (
        f"; {cycles:,} cycles at depth {depth:,}: tasks table+indexes {fresh['tasks_total'] / 2**20:.1f} MiB fresh,"
        f" {steady['tasks_total'] / 2**20:.1f} at {steady['cycles']:,} cycles,"
        f" {final['tasks_total'] / 2**20:.1f} at the end ({row.extra['vs_steady']:.2f}x steady,"
        f" {row.extra['vs_fresh']:.2f}x fresh); {' '.join(s for s in settings if s)}"
    )
    return [row]


#: The PostgreSQL scenarios by name, in the order a full run goes through them.
PG_SCENARIOS: dict[str, Callable[[Any], list[Row]]] = {
    "lease-64": lease_64,
    "lease-64-two-servers": lease_64_two_servers,
    "batch-lease": batch_lease,
    "create-1000": create_1000,
    "wake-across-servers": wake_across,
    "query-head": query_head,
    "bloat": bloat,
}


def check_pg_targets(rows: Sequence[Row]) -> list[Target]:
    """The issue's PostgreSQL targets, from whatever scenarios ran."""

    def get(scenario: str, pick: Callable[[Row], float], store: str = "postgres") -> float:
        row = next((r for r in rows if r.scenario == scenario and r.server == store), None)
        try:
            return float("nan") if row is None else float(pick(row))
        except (KeyError, ZeroDivisionError):
            return float("nan")

    big = next((r for r in rows if r.scenario.startswith("query-head-") and "vs_small_group" in r.extra), None)
    return [
        Target(
            "lease-64, one server: postgres / in-memory",
            get("lease-64", lambda r: r.extra["vs_memory"]),
            0.5,
            ">=",
            "ratio",
        ),
        Target("batch lease through AsyncClient", get("batch-lease", lambda r: r.tasks_s), 20_000, ">=", "tasks/s"),
        Target("create, 1,000 tasks per Update", get("create-1000", lambda r: r.tasks_s), 50_000, ">=", "tasks/s"),
        Target(
            "waiting Query woken across servers: p99", get("wake-across-servers", lambda r: r.p99_ms), 50, "<", "ms"
        ),
        Target(
            "query head: 1,000,000-task group / 10-task group",
            big.extra["vs_small_group"] if big else float("nan"),
            0.8,
            ">=",
            "ratio",
        ),
        Target(
            "/metrics scrape with the big group stored: p99", get("metrics-scrape", lambda r: r.p99_ms), 100, "<", "ms"
        ),
        Target(
            "tasks table+indexes after the churn / steady size",
            get("bloat", lambda r: r.extra["vs_steady"]),
            2,
            "<=",
            "ratio",
        ),
    ]
