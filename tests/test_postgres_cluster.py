"""Several MassTasker server processes on one PostgreSQL database, as a fleet runs them.

Real ``python -m masstasker.server --store ...`` processes, real clients, a real (throwaway) cluster:

- 50,000 tasks drained by 64 workers spread over two servers: each processed exactly once;
- Updates racing on the same predicates and the same deletes from both servers stay all-or-nothing;
- a waiting Query on one server is woken by a create on the other, with one notification per Update;
- kill -9 of one server under load: what it acknowledged is in the database, its clients' leases
  expire and the other server finishes the work;
- PostgreSQL stopped (and restarted) under load: the servers answer UNAVAILABLE and report NOT_SERVING
  meanwhile, serve again by themselves when it is back, and lose nothing they acknowledged.

The fault tests run on a cluster of their own, so stopping it never disturbs the session's.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from masstasker import (
    AsyncClient,
    Client,
    Create,
    Delete,
    PreconditionFailed,
    Pred,
    StatusError,
    TaskNotFound,
    Unavailable,
    new_task,
    pb,
    unpack_data,
)
from masstasker.testing import ServerProcess, run_server_process
from masstasker.testing_postgres import PostgresCluster, fresh_schema_name

pytestmark = pytest.mark.timeout(300)

SERVICES = ("", "masstasker.MassTasker")
_METRICS = re.compile(r"metrics on (http://\S+/metrics)")
LEASE_S = 3.0  # the fault tests' leases: short, so a dead worker's tasks come back soon


@contextlib.contextmanager
def servers(dsn: str, schema: str, count: int, *extra: str) -> Iterator[list[ServerProcess]]:
    """``count`` server processes sharing ``schema`` of the database at ``dsn``."""
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(run_server_process("--store", dsn, "--store-schema", schema, *extra))
            for _ in range(count)
        ]


def create_numbered(target: str, group: str, count: int) -> None:
    """``count`` tasks in ``group`` whose payloads are "0", "1", ...: each task's identity across leases."""
    with Client(target) as client:
        for start in range(0, count, 1000):
            client.create(*(new_task(group, pb.Test(foo=str(i))) for i in range(start, min(start + 1000, count))))


def key(task: pb.Task) -> str:
    return unpack_data(task, pb.Test).foo


def group_tasks(target: str, group: str) -> list[pb.Task]:
    with Client(target) as client:
        return list(client.rpc.Debug(pb.DebugRequest(group=group)).tasks)


def health(target: str) -> tuple[int, ...]:
    """The overall and the service's health status; UNKNOWN (0) when the server does not answer."""
    statuses = []
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in SERVICES:
            try:
                statuses.append(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status)
            except grpc.RpcError:
                statuses.append(health_pb2.HealthCheckResponse.UNKNOWN)
    return tuple(statuses)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``predicate()`` until true; the seconds it took. Fails the test after ``timeout``."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if predicate():
            return time.monotonic() - began
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


# -- exactly once over two servers --------------------------------------------------------------


def test_two_servers_drain_50000_tasks_exactly_once(postgresql_dsn: str, postgresql_schema: str) -> None:
    total, workers = 50_000, 64
    with servers(postgresql_dsn, postgresql_schema, 2) as (a, b):
        create_numbered(a.target, "drain", total)
        processed = asyncio.run(_drain([a.target, b.target], "drain", total, workers, deadline_s=180))
        left = group_tasks(b.target, "drain")
    counts = Counter(processed)
    duplicates = {k: n for k, n in counts.items() if n > 1}
    lost = total - len(counts)
    assert (len(duplicates), lost, len(left)) == (0, 0, 0), f"duplicates {list(duplicates)[:5]}, lost {lost}"
    assert set(counts) == {str(i) for i in range(total)}


async def _drain(targets: list[str], group: str, total: int, workers: int, deadline_s: float) -> list[str]:
    """``workers`` coroutines over clients spread across ``targets``: lease (1, 5 or 20 at a time), delete."""
    clients = [AsyncClient(targets[i % len(targets)]) for i in range(8)]
    processed: list[str] = []
    deadline = time.monotonic() + deadline_s
    batches = (1, 5, 20)

    async def worker(n: int) -> None:
        client, batch = clients[n % len(clients)], batches[n % len(batches)]
        while len(processed) < total and time.monotonic() < deadline:
            tasks = await client.query_many(group, batch, 300, wait=False, timeout=30)
            if not tasks:
                await asyncio.sleep(0.05)  # the rest is leased by others; they will finish it
                continue
            await client.do(Delete(*tasks), timeout=30)
            processed.extend(key(t) for t in tasks)

    try:
        await asyncio.gather(*(worker(n) for n in range(workers)))
    finally:
        for client in clients:
            await client.close()
    return processed


# -- all or nothing under races ------------------------------------------------------------------


def test_racing_updates_on_shared_predicates_are_all_or_nothing(postgresql_dsn: str, postgresql_schema: str) -> None:
    """Pairs of tokens are taken (deleted) with a receipt, under a shared guard predicate, from both servers.

    Every acknowledged Update left a receipt and removed both its tokens; every failed one left nothing;
    no token is in two receipts; once the guard's deletion is acknowledged no Update commits.
    """
    tokens = 300
    with servers(postgresql_dsn, postgresql_schema, 2) as (a, b):
        create_numbered(a.target, "tokens", tokens)
        with Client(a.target) as client:
            client.create(new_task("guard"))
        by_key = {key(t): t for t in group_tasks(b.target, "tokens")}
        (guard,) = group_tasks(b.target, "guard")
        outcome = asyncio.run(_race([a.target, b.target], by_key, guard))
        receipts = [key(t) for t in group_tasks(a.target, "receipts")]
        remaining = {key(t) for t in group_tasks(b.target, "tokens")}

    taken = [k for receipt in receipts for k in receipt.split(",")]
    assert len(taken) == len(set(taken)), "a token is in two receipts"
    assert set(taken).isdisjoint(remaining), "a token has a receipt but was not deleted"
    assert set(taken) | remaining == set(by_key), "a token was deleted without a receipt"
    unacknowledged = sorted(set(receipts) - set(outcome.committed))
    assert set(outcome.committed) <= set(receipts), "an acknowledged Update left no receipt"
    assert set(unacknowledged) <= set(outcome.unknown), "a receipt from an Update that failed with a clear error"
    assert outcome.committed and outcome.not_found, "the race did not race: no commits or no conflicts"
    assert outcome.late_commits == [], "an Update sent after the guard's deletion was acknowledged committed"
    assert outcome.precondition_failed, "no Update saw the guard gone"


@dataclass
class _RaceOutcome:
    committed: list[str] = field(default_factory=list)
    not_found: int = 0
    precondition_failed: int = 0
    late_commits: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


async def _race(targets: list[str], tokens: dict[str, pb.Task], guard: pb.Task) -> _RaceOutcome:
    clients = [AsyncClient(t) for t in targets]
    outcome = _RaceOutcome()
    rng = random.Random(11)
    names = sorted(tokens)
    guard_gone_at: list[float] = []
    attempts = 0

    async def taker(n: int) -> None:
        nonlocal attempts
        client = clients[n % 2]
        while attempts < 1500:
            attempts += 1
            pair = rng.sample(names, 2)
            receipt = ",".join(pair)
            sent = time.monotonic()
            try:
                await client.do(
                    Pred(guard),
                    Delete(tokens[pair[0]], tokens[pair[1]]),
                    Create(new_task("receipts", pb.Test(foo=receipt))),
                    timeout=30,
                )
            except TaskNotFound:
                outcome.not_found += 1
            except PreconditionFailed:
                outcome.precondition_failed += 1
            except Unavailable:
                # A statement timeout while queued behind the other racers' row locks, on an overloaded
                # machine: not acknowledged, so it may go either way, but still all or nothing.
                outcome.unknown.append(receipt)
            else:
                outcome.committed.append(receipt)
                if guard_gone_at and sent > guard_gone_at[0]:
                    outcome.late_commits.append(receipt)

    async def remove_guard() -> None:
        while attempts < 600:
            await asyncio.sleep(0.01)
        await clients[1].do(Delete(guard), timeout=30)
        guard_gone_at.append(time.monotonic())

    try:
        await asyncio.gather(remove_guard(), *(taker(n) for n in range(32)))
    finally:
        for client in clients:
            await client.close()
    return outcome


# -- waiting across servers ----------------------------------------------------------------------


def test_waiting_query_on_one_server_is_woken_by_a_create_on_the_other(
    postgresql_dsn: str, postgresql_schema: str
) -> None:
    with servers(postgresql_dsn, postgresql_schema, 2, "--listen-http", "127.0.0.1:0") as (a, b):
        metrics = _metrics_url(a)

        async def scenario() -> pb.Task:
            async with AsyncClient(a.target) as waiter_client, AsyncClient(b.target) as creator:
                waiting = asyncio.ensure_future(waiter_client.query("wake", 60, timeout=60))
                # Only once A holds the Query is it a test of waking (a task created first is just found).
                await asyncio.to_thread(wait_until, lambda: _waiting(metrics) >= 1, 30, "the Query waits on A")
                await creator.create(new_task("wake", pb.Test(foo="from B")))
                return await asyncio.wait_for(waiting, 30)

        task = asyncio.run(scenario())
    assert task.group == "wake" and key(task) == "from B"


def _metrics_url(server: ServerProcess) -> str:
    def found() -> bool:
        return any(_METRICS.search(line) for line in server.log)

    wait_until(found, 10, "the server logs its metrics address")
    match = next(m for m in map(_METRICS.search, server.log) if m)
    return match.group(1)


def _waiting(url: str) -> float:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("masstasker_waiting_queries "):
                return float(line.split()[1])
    return 0.0


# -- faults --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[PostgresCluster]:
    """A cluster these tests may stop, restart and kill."""
    with PostgresCluster() as cluster:
        yield cluster


@dataclass
class _Ledger:
    """What the workers were told: acknowledged results, and every error code by phase."""

    acked: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    leased_at: dict[str, list[float]] = field(default_factory=dict)  # when each lease's Query was sent
    answered_at: dict[str, list[float]] = field(default_factory=dict)  # when it came back
    acked_at: dict[str, float] = field(default_factory=dict)


async def _work(client: AsyncClient, ledger: _Ledger, deadline: float, stop: asyncio.Event) -> None:
    """Lease one task for 3 s, then delete it and create its result in one Update; survive outages."""
    while time.monotonic() < deadline and not stop.is_set():
        sent = time.monotonic()
        try:
            task = await client.query("work", LEASE_S, wait=False, timeout=10)
        except TaskNotFound:
            await asyncio.sleep(0.05)
            continue
        except StatusError as exc:
            ledger.errors[exc.code.name] += 1
            await asyncio.sleep(0.1)
            continue
        k = key(task)
        ledger.leased_at.setdefault(k, []).append(sent)
        ledger.answered_at.setdefault(k, []).append(time.monotonic())
        try:
            await client.do(Delete(task), Create(new_task("results", pb.Test(foo=k))), timeout=10)
        except StatusError as exc:
            # Not acknowledged: it may or may not have committed. Either its result exists, or its
            # lease expires and someone does it again; never both, since the Update is atomic.
            ledger.errors[exc.code.name] += 1
            await asyncio.sleep(0.1)
            continue
        ledger.acked.append(k)
        ledger.acked_at[k] = time.monotonic()


async def _until_all_done(target: str, deadline: float) -> None:
    """Until the work group is empty, leased tasks included: every task's result committed.

    Not "until every task was acknowledged": an Update that committed while its answer was lost (the
    server died, the connection dropped) is done without an acknowledgement.
    """
    async with AsyncClient(target) as client:
        while True:
            try:
                left = (await client.rpc.Debug(pb.DebugRequest(group="work", limit=1), timeout=10)).num_tasks
            except grpc.RpcError:
                left = -1
            if left == 0:
                return
            assert time.monotonic() < deadline, f"{left} tasks still to do at the deadline"
            await asyncio.sleep(0.1)


def _check_nothing_acknowledged_lost(target: str, total: int, ledger: _Ledger) -> None:
    results = Counter(key(t) for t in group_tasks(target, "results"))
    assert group_tasks(target, "work") == [], "tasks left undone"
    assert {k: n for k, n in results.items() if n > 1} == {}, "a task's result was committed twice"
    assert set(results) == {str(i) for i in range(total)}, "a task has no result"
    assert Counter(ledger.acked) == Counter(set(ledger.acked)), "a task was acknowledged twice"
    assert set(ledger.acked) <= set(results), "an acknowledged result is missing"
    resurrected = [k for k, t in ledger.acked_at.items() if any(at > t for at in ledger.leased_at[k])]
    assert resurrected == [], "a task was leased again after its deletion was acknowledged"


def test_kill_9_one_of_two_servers_under_load(own_cluster: PostgresCluster) -> None:
    total = 2000
    schema = fresh_schema_name()
    with servers(own_cluster.dsn, schema, 2) as (a, b):
        create_numbered(b.target, "work", total)
        ledgers = {"a": _Ledger(), "b": _Ledger()}

        async def scenario() -> tuple[int, float]:
            deadline = time.monotonic() + 150
            stop_a = asyncio.Event()
            never = asyncio.Event()
            clients_a = [AsyncClient(a.target) for _ in range(2)]
            clients_b = [AsyncClient(b.target) for _ in range(2)]
            work = [
                *(_work(clients_a[i % 2], ledgers["a"], deadline, stop_a) for i in range(8)),
                *(_work(clients_b[i % 2], ledgers["b"], deadline, never) for i in range(8)),
            ]
            running = asyncio.gather(*work)
            while len(ledgers["a"].acked) + len(ledgers["b"].acked) < total // 3:
                assert time.monotonic() < deadline, "no progress before the kill"
                await asyncio.sleep(0.02)
            a.process.kill()  # SIGKILL: no goodbye to clients or to PostgreSQL
            killed_at = time.monotonic()
            b_before = len(ledgers["b"].acked)
            # A's workers now see UNAVAILABLE; let them try a little, then stop them as a crashed fleet would.
            await asyncio.sleep(1)
            stop_a.set()
            # B's workers must finish everything, including A's leased tasks once their leases expire.
            await _until_all_done(b.target, deadline)
            never.set()
            await running
            for client in (*clients_a, *clients_b):
                await client.close()
            return len(ledgers["b"].acked) - b_before, killed_at

        b_after_kill, _ = asyncio.run(scenario())
        assert a.process.wait(10) == -9
        merged = _Ledger(
            acked=ledgers["a"].acked + ledgers["b"].acked,
            leased_at={
                k: ledgers["a"].leased_at.get(k, []) + ledgers["b"].leased_at.get(k, [])
                for k in set(ledgers["a"].leased_at) | set(ledgers["b"].leased_at)
            },
            acked_at={**ledgers["a"].acked_at, **ledgers["b"].acked_at},
        )
        _check_nothing_acknowledged_lost(b.target, total, merged)
        results = {key(t) for t in group_tasks(b.target, "results")}
    # What A's workers held when it died: either their Update committed unacknowledged (the result is
    # there and nobody leased it again), or the lease expired and B leased it, never before expiry.
    a_acked = set(ledgers["a"].acked)
    orphans = {k for k in ledgers["a"].leased_at if k not in a_acked}
    assert orphans, "A's workers held no leases when it died: the test did not test lease expiry"
    for k in orphans:
        assert k in results
        taken_by_a = max(ledgers["a"].leased_at[k])
        for answered in ledgers["b"].answered_at.get(k, []):
            if answered > taken_by_a:
                assert answered >= taken_by_a + LEASE_S, f"task {k} leased by B before A's lease expired"
    assert b_after_kill > 0, "the surviving server did not go on serving"
    assert not ledgers["b"].errors, f"the surviving server's clients saw errors: {ledgers['b'].errors}"
    assert ledgers["a"].errors.get("UNAVAILABLE", 0) > 0, "the killed server's clients saw no UNAVAILABLE"


def test_postgresql_stopped_and_restarted_under_load(own_cluster: PostgresCluster) -> None:
    total = 2000
    schema = fresh_schema_name()
    with servers(own_cluster.dsn, schema, 2) as (a, b):
        create_numbered(a.target, "work", total)
        ledger = _Ledger()
        observed: dict[str, object] = {}

        async def scenario() -> None:
            deadline = time.monotonic() + 200
            never = asyncio.Event()
            clients = [AsyncClient(s.target) for s in (a, b)]
            running = asyncio.gather(*(_work(clients[i % 2], ledger, deadline, never) for i in range(16)))

            async def progress(at_least: int) -> None:
                while len(ledger.acked) < at_least:
                    assert time.monotonic() < deadline, f"stuck at {len(ledger.acked)} of {at_least}"
                    await asyncio.sleep(0.02)

            await progress(total // 4)
            # 1. A fast stop: both servers notice, say so on health and answer UNAVAILABLE.
            await asyncio.to_thread(own_cluster.stop, "fast")
            stopped = time.monotonic()
            for server in (a, b):
                await asyncio.to_thread(
                    wait_until,
                    lambda s=server: health(s.target) == (health_pb2.HealthCheckResponse.NOT_SERVING,) * 2,
                    10,
                    f"{server.target} reports NOT_SERVING for '' and masstasker.MassTasker",
                )
            observed["not_serving_after_s"] = time.monotonic() - stopped
            for client in clients:
                with pytest.raises(Unavailable, match=r"(?i)postgres|store|database"):
                    await client.query("work", 3, wait=False, timeout=10)
            acked_while_down = len(ledger.acked)
            await asyncio.sleep(1)
            observed["acked_while_down"] = len(ledger.acked) - acked_while_down
            # 2. Back: the servers serve again by themselves.
            await asyncio.to_thread(own_cluster.start)
            restarted = time.monotonic()
            for server in (a, b):
                await asyncio.to_thread(
                    wait_until,
                    lambda s=server: health(s.target) == (health_pb2.HealthCheckResponse.SERVING,) * 2,
                    30,
                    f"{server.target} serves again",
                )
            observed["serving_after_s"] = time.monotonic() - restarted
            await progress(len(ledger.acked) + 100)
            # 3. pg_ctl restart -m fast in the middle of the load: it just carries on afterwards.
            await asyncio.to_thread(own_cluster.restart, "fast")
            await _until_all_done(a.target, deadline)
            never.set()
            await running
            for client in clients:
                await client.close()

        asyncio.run(scenario())
        _check_nothing_acknowledged_lost(a.target, total, ledger)
    assert observed["acked_while_down"] == 0, "an Update was acknowledged while the database was down"
    assert set(ledger.errors) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}, ledger.errors
    assert ledger.errors["UNAVAILABLE"] > 0
