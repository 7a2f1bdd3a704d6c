"""The scenarios: what each one sets up, runs and reports.

Each scenario gets fresh servers, a :class:`Context` (the load-generator
pool, the sizes and times for this run), and returns :class:`Row` values.
Scenarios that compare the real server with the ceiling run them side by
side, alternating repeat by repeat, so drift in a noisy machine hits both.
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from benchmarks import payload as P
from benchmarks.loadgen import Pool, percentile
from benchmarks.procs import ServerProcess
from masstasker._pb import masstasker_pb2 as pb

__all__ = ["SCENARIOS", "Context", "Row", "Sizes"]

_DISPATCH_SLACK = 0.3  # seconds between sending jobs and the callers' start
_FILL_BATCH = 1000
_SETUP_TIMEOUT = 120.0  # wall-clock cap on any one setup step (filling, waiting for waiters)
_WAITER_RAMP = 1000.0  # new waiting Queries per second, all load processes together
_PLATEAU = 3.0  # seconds without a new waiting Query after the ramp: the rest are not coming


@dataclass(frozen=True)
class Sizes:
    """Sizes and times for one run; :meth:`full` and :meth:`quick`."""

    warmup: float
    window: float
    repeats: int
    batch: int  # tasks per batch lease
    batch_workers: int
    create_batch: int
    big_group: int
    memory_tasks: int
    waiters: int
    wake_creates: int
    lease_fill: int  # minimum prefill for one lease repeat
    batch_fill: int

    @classmethod
    def full(cls) -> Sizes:
        """The sizes the issue's targets are stated for."""
        return cls(
            warmup=1.0,
            window=3.0,
            repeats=3,
            batch=100,
            batch_workers=16,
            create_batch=1000,
            big_group=1_000_000,
            memory_tasks=1_000_000,
            waiters=10_000,
            wake_creates=2_000,
            lease_fill=40_000,
            batch_fill=500_000,
        )

    @classmethod
    def quick(cls) -> Sizes:
        """Small sizes for a smoke run of a few seconds per scenario."""
        return cls(
            warmup=0.2,
            window=0.6,
            repeats=1,
            batch=100,
            batch_workers=4,
            create_batch=1000,
            big_group=20_000,
            memory_tasks=20_000,
            waiters=500,
            wake_creates=50,
            lease_fill=10_000,
            batch_fill=150_000,
        )


@dataclass
class Row:
    """One line of the results table: a scenario on one server, medians over repeats."""

    scenario: str
    server: str
    workers: int
    ops_s: float = float("nan")
    tasks_s: float = float("nan")
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    server_cpu: float = float("nan")  # cores the server used during the window
    loadgen_cpu: float = float("nan")  # cores the load generators used during the window
    errors: dict[str, int] = field(default_factory=dict)
    repeats: list[dict[str, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sample:
    """One measurement window."""

    ops_s: float
    tasks_s: float
    p50_ms: float
    p99_ms: float
    server_cpu: float
    loadgen_cpu: float
    errors: dict[str, int]


@dataclass
class Context:
    """What every scenario needs: the pool, the sizes, CPU pinning, profiling."""

    pool: Pool
    sizes: Sizes
    server_cpus: set[int] | None
    profile_dir: Path | None = None
    log: Callable[[str], None] = print

    # -- servers -----------------------------------------------------------------

    @contextmanager
    def servers(self, *kinds: str, metrics: bool = False) -> Iterator[list[ServerProcess]]:
        """Start fresh servers of these kinds; stop them afterwards."""
        started: list[ServerProcess] = []
        try:
            for kind in kinds:
                started.append(ServerProcess(kind, cpus=self.server_cpus, metrics=metrics).start())
            yield started
        finally:
            for server in started:
                server.stop()

    # -- measuring ---------------------------------------------------------------

    def measure(
        self,
        server: ServerProcess,
        workload: str,
        workers: int,
        *,
        profile: str | None = None,
        first: int = 0,
        processes: int | None = None,
        **params: Any,
    ) -> Sample:
        """Run ``workers`` callers of one workload, spread over the pool from process ``first`` on; one window.

        ``processes`` caps how many load processes share the callers (one process with
        ``channels=1`` is one HTTP/2 connection carrying every call).
        """
        sizes = self.sizes
        procs = min(self.pool.size - first, workers, processes or workers)
        t_start = time.time() + _DISPATCH_SLACK
        t_measure = t_start + sizes.warmup
        t_end = t_measure + sizes.window
        jobs = [
            {
                "workload": workload,
                "target": server.target,
                "concurrency": workers // procs + (1 if i < workers % procs else 0),
                "t_start": t_start,
                "t_measure": t_measure,
                "t_end": t_end,
                **params,
            }
            for i in range(procs)
        ]
        slots = self.pool.submit(jobs, first)
        _sleep_until(t_measure)
        spy = self._start_profile(server, profile)
        cpu0 = server.cpu_seconds()
        _sleep_until(t_end)
        cpu1 = server.cpu_seconds()
        results = self.pool.collect(slots, t_end)
        if spy is not None:
            spy.wait(_SETUP_TIMEOUT)
        latencies = sorted(x for r in results for x in r["latencies"])
        errors: dict[str, int] = {}
        for r in results:
            for code, n in r["errors"].items():
                errors[code] = errors.get(code, 0) + n
        window = sizes.window
        return Sample(
            ops_s=sum(r["ops"] for r in results) / window,
            tasks_s=sum(r["items"] for r in results) / window,
            p50_ms=percentile(latencies, 50) * 1e3,
            p99_ms=percentile(latencies, 99) * 1e3,
            server_cpu=(cpu1 - cpu0) / window,
            loadgen_cpu=sum(r["window_cpu_s"] for r in results) / window,
            errors=errors,
        )

    def _start_profile(self, server: ServerProcess, name: str | None) -> subprocess.Popen[bytes] | None:
        """py-spy on the server for exactly one window, when profiling was asked for.

        The ceiling is profiled too (``NAME.ceiling.raw.txt``): what the gRPC stack costs without our code.
        """
        if self.profile_dir is None or name is None:
            return None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        suffix = "" if server.kind == "real" else f".{server.kind}"
        out = self.profile_dir / f"{name}{suffix}.raw.txt"
        spy = Path(sys.executable).with_name("py-spy")
        argv = [str(spy), "record", "--pid", str(server.pid), "--format", "raw", "--rate", "250"]
        argv += ["--nonblocking", "--duration", str(max(1, round(self.sizes.window))), "--output", str(out)]
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def compare(
        self,
        name: str,
        workers: int,
        workload: str,
        kinds: tuple[str, ...] = ("real", "ceiling"),
        before: Callable[[ServerProcess, dict[str, float]], None] | None = None,
        **params: Any,
    ) -> list[Row]:
        """The same workload on each kind of server, alternating, ``repeats`` times."""
        rows = {kind: Row(name, kind, workers) for kind in kinds}
        samples: dict[str, list[Sample]] = {kind: [] for kind in kinds}
        with self.servers(*kinds) as servers:
            last: dict[str, float] = {}
            for repeat in range(self.sizes.repeats):
                for server in servers if repeat % 2 == 0 else reversed(servers):
                    if before is not None:
                        before(server, last)
                    profile = name if repeat == 0 else None
                    sample = self.measure(server, workload, workers, profile=profile, **params)
                    if server.kind == "real":
                        last["tasks_s"] = sample.tasks_s
                    samples[server.kind].append(sample)
        for kind, row in rows.items():
            _fill_row(row, samples[kind])
        if "ceiling" in rows and "real" in rows:
            rows["real"].extra["vs_ceiling"] = rows["real"].ops_s / rows["ceiling"].ops_s
            # Repeat by repeat (each pair measured back to back): the spread of the ratio on a noisy machine.
            pairs = list(zip(samples["real"], samples["ceiling"], strict=True))
            rows["real"].extra["vs_ceiling_repeats"] = [r.ops_s / c.ops_s if c.ops_s else math.nan for r, c in pairs]
            # Server CPU per operation, ceiling / real: when another process steals the server's core, the
            # throughput of that window drops but CPU per operation does not, so this ratio stays honest.
            per_op = {kind: statistics.median(_cpu_per_op(s) for s in samples[kind]) for kind in ("real", "ceiling")}
            rows["real"].extra["cpu_per_op_vs_ceiling"] = per_op["ceiling"] / per_op["real"]
            for kind, value in per_op.items():
                rows[kind].extra["server_cpu_us_per_op"] = value * 1e6
        return list(rows.values())


def _cpu_per_op(sample: Sample) -> float:
    return sample.server_cpu / sample.ops_s if sample.ops_s else math.inf


def _sleep_until(moment: float) -> None:
    delay = moment - time.time()
    if delay > 0:
        time.sleep(delay)


def _fill_row(row: Row, samples: list[Sample]) -> None:
    """Medians over the repeats; every repeat kept for the JSON."""

    def median(attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in samples)

    row.ops_s, row.tasks_s = median("ops_s"), median("tasks_s")
    row.p50_ms, row.p99_ms = median("p50_ms"), median("p99_ms")
    row.server_cpu, row.loadgen_cpu = median("server_cpu"), median("loadgen_cpu")
    for s in samples:
        for code, n in s.errors.items():
            row.errors[code] = row.errors.get(code, 0) + n
    row.repeats = [
        {k: getattr(s, k) for k in ("ops_s", "tasks_s", "p50_ms", "p99_ms", "server_cpu", "loadgen_cpu")}
        for s in samples
    ]


# -- setup helpers (run in the parent, synchronous gRPC) ---------------------------------


def _group_size(target: str, group: str) -> int:
    with grpc.insecure_channel(target) as channel:
        debug = channel.unary_unary("/masstasker.MassTasker/Debug")
        answer = debug(pb.DebugRequest(group=group, limit=1).SerializeToString(), timeout=30)
        return int(pb.DebugResponse.FromString(answer).num_tasks)


def create_one_by_one(pool: Pool, target: str, group: str, count: int) -> Any:
    """``count`` single-task Updates into ``group``, from the pool's last process; what the creator reports."""
    job = {
        "workload": "creator",
        "target": target,
        "group": group,
        "count": count,
        "t_end": time.time() + _SETUP_TIMEOUT,
    }
    (created,) = pool.collect(pool.submit([job], first=pool.size - 1), time.time() + _SETUP_TIMEOUT)
    return created


def fill(target: str, group: str, count: int) -> float:
    """Create ``count`` tasks in ``group`` in batches of 1,000; returns the seconds it took."""
    began = time.perf_counter()
    deadline = began + _SETUP_TIMEOUT
    with grpc.insecure_channel(target) as channel:
        update = channel.unary_unary("/masstasker.MassTasker/Update")
        full = P.create_request(group, _FILL_BATCH)
        # A few calls in flight keep the server busy while the next request travels.
        pending: list[Any] = []
        left = count
        while left > 0:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"filling {group!r} with {count} tasks took over {_SETUP_TIMEOUT} s")
            n = min(left, _FILL_BATCH)
            request = full if n == _FILL_BATCH else P.create_request(group, n)
            pending.append(update.future(request, timeout=60))
            left -= n
            if len(pending) >= 4:
                pending.pop(0).result()
        for call in pending:
            call.result()
    return time.perf_counter() - began


def _top_up(group: str, minimum: int, sizes: Sizes) -> Callable[[ServerProcess, dict[str, float]], None]:
    """Before a repeat: make sure the real server's group will not run dry in it."""

    def before(server: ServerProcess, last: dict[str, float]) -> None:
        if server.kind != "real":
            return
        expected = last.get("tasks_s", 0.0) * (sizes.warmup + sizes.window + _DISPATCH_SLACK)
        need = max(minimum, int(expected * 1.5))
        have = _group_size(server.target, group)
        if have < need:
            fill(server.target, group, need - have)

    return before


# -- the scenarios -----------------------------------------------------------------------


def lease(workers: int, *, one_connection: bool = False) -> Callable[[Context], list[Row]]:
    """Single-task lease cycle: Query(own) + Update(delete it), ``workers`` at a time.

    With ``one_connection``, every worker is a coroutine of one load process on one
    channel: all calls share one HTTP/2 connection, as a worker pool in one process does.
    """

    def run(ctx: Context) -> list[Row]:
        group = "lease"
        before = _top_up(group, ctx.sizes.lease_fill, ctx.sizes)
        if one_connection:
            name = f"lease-{workers}-1conn"
            rows = ctx.compare(name, workers, "lease", before=before, group=group, processes=1, channels=1)
            for row in rows:
                row.extra["connections"] = 1
            return rows
        return ctx.compare(f"lease-{workers}", workers, "lease", before=before, group=group)

    return run


def batch_lease(ctx: Context) -> list[Row]:
    """Batch lease: Query(own, max_tasks=100) + one Update deleting them all."""
    group = "batch"
    sizes = ctx.sizes
    before = _top_up(group, sizes.batch_fill, sizes)
    rows = ctx.compare("batch-lease", sizes.batch_workers, "batch_lease", before=before, group=group, batch=sizes.batch)
    for row in rows:
        row.extra["batch"] = sizes.batch
    return rows


def peek(ctx: Context) -> list[Row]:
    """Query without owning on a group of 1,000 tasks."""
    group = "peek"

    def before(server: ServerProcess, last: dict[str, float]) -> None:
        if server.kind == "real" and not _group_size(server.target, group):
            fill(server.target, group, 1000)

    return ctx.compare("peek", 64, "peek", before=before, group=group)


def create(batch: int, workers: int) -> Callable[[Context], list[Row]]:
    """Updates creating ``batch`` tasks each (20-byte payload, no labels)."""

    def run(ctx: Context) -> list[Row]:
        rows = ctx.compare(f"create-{batch}", workers, "create", group="create", batch=batch)
        for row in rows:
            row.extra["batch"] = batch
        return rows

    return run


def query_head(ctx: Context) -> list[Row]:
    """Query(own, 1 µs lease, no commit) on a 10-task group and on a big one, same server, alternating."""
    sizes = ctx.sizes
    groups = {"head-10": 10, f"head-{sizes.big_group}": sizes.big_group}
    samples: dict[str, list[Sample]] = {g: [] for g in groups}
    workers = 64
    with ctx.servers("real") as (server,):
        for group, count in groups.items():
            took = fill(server.target, group, count)
            ctx.log(f"  filled {group} with {count} tasks in {took:.1f} s")
        for repeat in range(sizes.repeats):
            order = list(groups) if repeat % 2 == 0 else list(reversed(groups))
            for group in order:
                profile = f"query-{group}" if repeat == 0 else None
                samples[group].append(ctx.measure(server, "head", workers, profile=profile, group=group))
    rows = []
    for group, count in groups.items():
        row = Row(f"query-{group}", "real", workers)
        _fill_row(row, samples[group])
        row.extra["group_size"] = count
        rows.append(row)
    rows[1].extra["vs_small_group"] = rows[1].ops_s / rows[0].ops_s
    return rows


def memory(ctx: Context) -> list[Row]:
    """Server RSS before and after loading N tasks (20-byte payload, no labels) into one group."""
    count = ctx.sizes.memory_tasks
    with ctx.servers("real") as (server,):
        time.sleep(0.5)  # let the freshly started server settle
        before = server.rss_bytes()
        took = fill(server.target, "memory", count)
        time.sleep(0.5)
        after = server.rss_bytes()
        stored = _group_size(server.target, "memory")
    row = Row("memory", "real", 1, tasks_s=count / took)
    row.extra.update(
        tasks=stored,
        rss_before_mib=before / 2**20,
        rss_after_mib=after / 2**20,
        bytes_per_task=(after - before) / count,
        load_s=took,
    )
    return [row]


def _waiting(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("masstasker_waiting_queries "):
                return float(line.split()[1])
    raise LookupError("masstasker_waiting_queries is not in the server's metrics")


def waiters(ctx: Context) -> list[Row]:
    """N waiting Queries held by one server; other RPCs meanwhile; then tasks created one by one."""
    sizes = ctx.sizes
    pool = ctx.pool
    count = sizes.waiters
    holders = max(1, pool.size - 1)  # the last process runs the side load and the creator
    cap = time.time() + _SETUP_TIMEOUT + 60
    with ctx.servers("real", metrics=True) as (server,):
        assert server.metrics_url, "the server did not report its metrics address"
        fill(server.target, "side", sizes.lease_fill)
        threads_before, rss_before = server.threads(), server.rss_bytes()
        jobs = [
            {
                "workload": "waiters",
                "target": server.target,
                "group": "wait",
                "concurrency": count // holders + (1 if i < count % holders else 0),
                "channels": 4,
                "ramp_per_s": _WAITER_RAMP / holders,
                "t_end": cap,
            }
            for i in range(holders)
        ]
        began = time.perf_counter()
        slots = pool.submit(jobs)
        try:
            seen, last_change = 0.0, began
            ramp_done = began + count / _WAITER_RAMP
            while seen < count and time.perf_counter() - began < _SETUP_TIMEOUT:
                time.sleep(0.1)
                now, previous, seen = time.perf_counter(), seen, _waiting(server.metrics_url)
                if seen != previous:
                    last_change = now
                elif now > ramp_done and now - last_change > _PLATEAU:
                    break  # some Queries failed instead of waiting: carry on, they show as errors
            registered_s = time.perf_counter() - began
            ctx.log(f"  {seen:.0f} of {count} Queries waiting after {registered_s:.1f} s")
            rss_waiting, threads_waiting = server.rss_bytes(), server.threads()
            side = ctx.measure(server, "lease", 16, profile="waiters-side", first=holders, group="side")
            rss_peak = max(rss_waiting, server.rss_bytes())
            created = create_one_by_one(pool, server.target, "wait", sizes.wake_creates)
            time.sleep(0.5)  # the last wake-ups are on their way
            rss_peak = max(rss_peak, server.rss_bytes())
            still_waiting = _waiting(server.metrics_url)
        finally:
            pool.stop(slots)
        results = pool.collect(slots, cap)
    wakeups = sorted(x for r in results for x in r["latencies"])
    create_lat = sorted(created["latencies"])
    errors: dict[str, int] = {}
    for r in results:
        for code, n in r["errors"].items():
            errors[code] = errors.get(code, 0) + n
    side_row = Row("waiters-other-rpcs", "real", 16)
    _fill_row(side_row, [side])
    side_row.extra.update(waiting=seen, note=f"lease cycles on another group while {seen:.0f} Queries wait")
    wake_row = Row("waiters-wakeup", "real", count, errors=errors)
    wake_row.ops_s = wake_row.tasks_s = len(wakeups) / max(sum(create_lat), 1e-9)
    wake_row.p50_ms = percentile(wakeups, 50) * 1e3
    wake_row.p99_ms = percentile(wakeups, 99) * 1e3
    wake_row.extra.update(
        waiting=seen,
        created=created["ops"],
        woken=len(wakeups),
        still_waiting=still_waiting,
        register_s=registered_s,
        create_p99_ms=percentile(create_lat, 99) * 1e3,
        threads_before=threads_before,
        threads_waiting=threads_waiting,
        rss_before_mib=rss_before / 2**20,
        rss_peak_mib=rss_peak / 2**20,
        note="latency from sending the create to the waiter's answer",
    )
    return [side_row, wake_row]


#: Every scenario by name, in the order a full run goes through them.
SCENARIOS: dict[str, Callable[[Context], list[Row]]] = {
    "lease-1": lease(1),
    "lease-16": lease(16),
    "lease-64": lease(64),
    "lease-256": lease(256),
    "lease-64-1conn": lease(64, one_connection=True),
    "batch-lease": batch_lease,
    "peek": peek,
    "create-1": create(1, 64),
    "create-1000": create(1000, 8),
    "query-head": query_head,
    "waiters": waiters,
    "memory": memory,
}
