"""The PostgreSQL store on a real throwaway cluster: what only a shared database can get wrong.

The wire semantics (the same as in memory) are tested through the server by
the parametrized server tests; here: predicates held against a concurrent
delete, racing owners, deadlocks retried, hostile strings byte for byte,
migrations, notifications per group, connection loss and recovery, and the
query plans of the hot statements.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest

psycopg = pytest.importorskip("psycopg")

from masstasker.server.body import attempts_of, encode, error_of, owned_once_more, with_error  # noqa: E402
from masstasker.server.stores.base import (  # noqa: E402
    GroupRef,
    IdRef,
    LabelRef,
    NotFound,
    PreconditionFailed,
    StoreUnavailable,
    TaskSpec,
)
from masstasker.server.stores.postgres import schema  # noqa: E402
from masstasker.server.stores.postgres.options import PgOptions, masked  # noqa: E402
from masstasker.server.stores.postgres.statements import render  # noqa: E402
from masstasker.server.stores.postgres.store import PostgresStore  # noqa: E402
from masstasker.testing_postgres import PostgresCluster, quote_ident  # noqa: E402

T = TypeVar("T")
SECOND = 1_000_000_000
DEADLINE = 30.0


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def opened(dsn: str, schema_name: str, **options: Any) -> AsyncIterator[PostgresStore]:
    options.setdefault("pool_size", 4)
    store = await PostgresStore.open(PgOptions(dsn=dsn, schema=schema_name, **options), time.time_ns)
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def raw(dsn: str) -> AsyncIterator[Any]:
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    try:
        yield conn
    finally:
        await conn.close()


def spec(group: str, body: bytes = b"", labels: tuple[tuple[str, str], ...] | None = None) -> TaskSpec:
    return TaskSpec(group, None, body, labels)


def body(text: str) -> bytes:
    """A valid stored body that says ``text`` (its error field): owning rewrites a body's attempts, so
    bodies a lease hands back must be real ones."""
    return with_error(b"", text)


# -- predicates are held until commit ------------------------------------------------------------


async def _wait_until_blocked(dsn: str, application: str = "masstasker") -> None:
    """Until some backend of the store waits on a lock."""

    async def blocked() -> bool:
        async with raw(dsn) as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'",
                (application,),
            )
            row = await cur.fetchone()
            return bool(row and row[0])

    await eventually(blocked, "the store's transaction to wait on a lock")


def test_a_predicate_is_held_until_the_update_commits(postgresql_dsn: str, postgresql_schema: str) -> None:
    """While an Update with predicate P runs, a concurrent delete of P waits; the Update then commits."""

    async def scenario() -> None:
        async with opened(postgresql_dsn, postgresql_schema) as store:
            pred, doomed = await store.update([spec("config"), spec("work")])
            table = f"{quote_ident(postgresql_schema)}.tasks"
            async with raw(postgresql_dsn) as blocker, raw(postgresql_dsn) as deleter:
                # Hold the row the Update must delete, so the Update stops after locking its predicate.
                await blocker.execute("BEGIN")
                await blocker.execute(f"SELECT id FROM {table} WHERE id = %s FOR UPDATE", (doomed,))
                update = asyncio.create_task(store.update([spec("result")], [IdRef(doomed)], [pred]))
                await _wait_until_blocked(postgresql_dsn)
                await deleter.execute("SET lock_timeout = '300ms'")
                delete = render(postgresql_schema).delete_by_ids
                with pytest.raises(psycopg.errors.LockNotAvailable):
                    await deleter.execute(delete, {"ids": [pred], "at_s": 0})
                await blocker.execute("ROLLBACK")
                assert len(await update) == 1
                # The predicate survived the Update and is deletable now that it committed.
                cur = await deleter.execute(delete, {"ids": [pred], "at_s": 0})
                assert [row[0] for row in await cur.fetchall()] == [pred]

    run(scenario())


def test_a_predicate_deleted_concurrently_fails_the_update(postgresql_dsn: str, postgresql_schema: str) -> None:
    """An Update whose predicate another transaction deletes and commits gets FAILED_PRECONDITION, changing nothing."""

    async def scenario() -> None:
        async with opened(postgresql_dsn, postgresql_schema) as store:
            pred, other = await store.update([spec("config"), spec("work")])
            async with raw(postgresql_dsn) as deleter:
                await deleter.execute("BEGIN")
                # The statement another server's Update would run to delete it.
                await deleter.execute(render(postgresql_schema).delete_by_ids, {"ids": [pred], "at_s": 0})
                update = asyncio.create_task(store.update([spec("result")], [IdRef(other)], [pred]))
                await _wait_until_blocked(postgresql_dsn)
                await deleter.execute("COMMIT")
                with pytest.raises(PreconditionFailed, match=str(pred)):
                    await update
            tasks, total = await store.debug("", 0)
            assert [t.id for t in tasks] == [other] and total == 1

    run(scenario())


def test_an_update_with_a_missing_id_changes_nothing(postgresql_dsn: str, postgresql_schema: str) -> None:
    """All or nothing: deletes that matched and creates that ran are rolled back; IDs beyond bigint are missing."""

    async def scenario() -> None:
        async with opened(postgresql_dsn, postgresql_schema) as store:
            ids = await store.update([spec("a"), spec("a"), spec("b", labels=(("k", "v"),))])
            for missing in (ids[-1] + 1000, 2**64 - 1):
                with pytest.raises(NotFound, match=str(missing)):
                    await store.update(
                        [spec("new")], [IdRef(ids[0]), GroupRef("b"), LabelRef((("k", "v"),)), IdRef(missing)]
                    )
                with pytest.raises(PreconditionFailed, match=str(missing)):
                    await store.update([spec("new")], [IdRef(ids[0]), IdRef(missing)], [ids[1], missing])
            tasks, total = await store.debug("", 0)
            assert [t.id for t in tasks] == ids and total == 3
            stats, _ = await store.group_stats(time.time_ns())
            assert stats == {"a": (2, 2), "b": (1, 1)}

    run(scenario())


# -- racing owners -----------------------------------------------------------------------------------


def test_racing_owners_on_two_stores_never_share_a_task(postgresql_dsn: str, postgresql_schema: str) -> None:
    """Two stores (two servers' pools) drain one group concurrently: every task is owned exactly once."""
    count = 300

    async def scenario() -> None:
        async with (
            opened(postgresql_dsn, postgresql_schema, pool_size=6) as a,
            opened(postgresql_dsn, postgresql_schema, pool_size=6) as b,
        ):
            await a.update([spec("q", body(str(i))) for i in range(count)])
            seen: list[str] = []

            async def worker(store: PostgresStore) -> None:
                idle = 0
                while idle < 3:
                    tasks = await store.query("q", time.time_ns(), own_for=60 * SECOND, max_tasks=2)
                    if not tasks:
                        # NOT_FOUND may mean "all visible tasks are held right now": look again a few times.
                        idle += 1
                        await asyncio.sleep(0.01)
                        continue
                    idle = 0
                    seen.extend(error_of(t.body) for t in tasks)
                    assert all(attempts_of(t.body) == 1 for t in tasks)
                    await asyncio.gather(*(store.update([], [IdRef(t.id)]) for t in tasks))

            await asyncio.gather(*(worker(store) for store in (a, b) for _ in range(6)))
            assert sorted(seen) == sorted(str(i) for i in range(count))
            assert await a.debug("q", 0) == ([], 0)

    run(scenario(), timeout=120)


def test_one_head_two_owners_exactly_one_wins(postgresql_dsn: str, postgresql_schema: str) -> None:
    async def scenario() -> None:
        async with opened(postgresql_dsn, postgresql_schema, pool_size=8) as store:
            for _ in range(5):
                await store.update([spec("one", b"x")])
                results = await asyncio.gather(
                    *(store.query("one", time.time_ns(), own_for=60 * SECOND) for _ in range(8))
                )
                assert sum(len(r) for r in results) == 1
                (winner,) = (r[0] for r in results if r)
                await store.update([], [IdRef(winner.id)])

    run(scenario())


# -- retries -----------------------------------------------------------------------------------------


def test_a_deadlock_is_retried_inside_the_store(postgresql_dsn: str, postgresql_schema: str) -> None:
    """A deadlock that PostgreSQL resolves by aborting the store's transaction is retried, not reported."""

    async def scenario() -> None:
        async with opened(postgresql_dsn, postgresql_schema) as store:
            first, second = await store.update([spec("d"), spec("d")])
            table = f"{quote_ident(postgresql_schema)}.tasks"
            async with raw(postgresql_dsn) as rival:
                # The rival waits long before checking for deadlocks, so PostgreSQL picks the store's side.
                await rival.execute("SET deadlock_timeout = '60s'")
                await rival.execute("BEGIN")
                await rival.execute(f"SELECT id FROM {table} WHERE id = %s FOR UPDATE", (second,))
                update = asyncio.create_task(store.update([], [IdRef(first), IdRef(second)]))
                await _wait_until_blocked(postgresql_dsn)  # holds `first`, waits for `second`
                closing = asyncio.create_task(
                    rival.execute(f"SELECT id FROM {table} WHERE id = %s FOR UPDATE", (first,))
                )
                await eventually(lambda: asyncio.sleep(0, store.retries > 0), "the store to retry after a deadlock")
                await closing
                await rival.execute("ROLLBACK")
                assert await update == []
            assert await store.debug("d", 0) == ([], 0)

    run(scenario())


# -- hostile strings -----------------------------------------------------------------------------------

HOSTILE = [
    "",
    "'",
    "''; DROP TABLE tasks; --",
    '"; DROP SCHEMA masstasker CASCADE; --',
    "\\",
    "\\x00",
    "a\x00b",
    "\x00",
    "%s %(grp)s {schema}",
    "$1",
    "E'\\n'",
    "ünïcødé ✓ 🚀",
    "\u2028\ufeff",
    " ",
    ":",
    "*",
]


def test_hostile_strings_round_trip_byte_for_byte(postgresql_dsn: str, postgresql_schema: str) -> None:
    async def scenario() -> None:
        async with opened(postgresql_dsn, postgresql_schema) as store:
            for text in HOSTILE:
                labels = ((text, text), ("k", text))
                body = text.encode() + b"\x00\xff"
                (task_id,) = await store.update([TaskSpec(text, 0, body, labels)])
                tasks, total = await store.debug(text, 0)
                assert total == 1 and [(t.id, t.group, t.body) for t in tasks] == [(task_id, text, body)]
                (peeked,) = await store.query(text, time.time_ns())
                assert (peeked.id, peeked.group, peeked.body) == (task_id, text, body)
                stats, _ = await store.group_stats(time.time_ns())
                assert stats[text] == (1, 1)
                # The selector finds it by the hostile label, and nothing else.
                assert await store.update([], [LabelRef(((text, text),))]) == []
                assert await store.debug(text, 0) == ([], 0)
            assert (await store.debug("", 0))[1] == 0
            tables = await _table_names(postgresql_dsn, postgresql_schema)
            assert tables == {"tasks", "group_counts", "group_history", "schema_version"}

    run(scenario())


async def _table_names(dsn: str, schema_name: str) -> set[str]:
    async with raw(dsn) as conn:
        cur = await conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema_name,))
        return {row[0] for row in await cur.fetchall()}


def test_a_hostile_schema_name_is_quoted(postgresql_dsn: str, postgresql_schema: str) -> None:
    name = postgresql_schema + "_we\"ird'; DROP TABLE x; --"

    async def scenario() -> None:
        try:
            async with opened(postgresql_dsn, name) as store:
                (task_id,) = await store.update([spec("g")])
                assert [t.id for t in (await store.debug("g", 0))[0]] == [task_id]
            assert await _table_names(postgresql_dsn, name) == {
                "tasks",
                "group_counts",
                "group_history",
                "schema_version",
            }
        finally:
            async with raw(postgresql_dsn) as conn:
                await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(name)} CASCADE")

    run(scenario())


# -- migrations -------------------------------------------------------------------------------------


def test_first_start_creates_the_latest_schema(postgresql_dsn: str, postgresql_schema: str) -> None:
    async def scenario() -> None:
        async with opened(postgresql_dsn, postgresql_schema) as store:
            assert store.schema_version == schema.SchemaVersion(0, schema.LATEST)
        async with opened(postgresql_dsn, postgresql_schema) as store:
            assert store.schema_version == schema.SchemaVersion(schema.LATEST, schema.LATEST)

    run(scenario())


def test_an_older_schema_is_upgraded_in_place_with_its_tasks(postgresql_dsn: str, postgresql_schema: str) -> None:
    """Version 1 had no group counts: the upgrade adds them, counted from the tasks already there."""

    async def scenario() -> None:
        async with raw(postgresql_dsn) as conn:
            await schema.migrate(conn, postgresql_schema, target=1)
            table = f"{quote_ident(postgresql_schema)}.tasks"
            await conn.execute(
                f"INSERT INTO {table} (id, grp, nb_s, nb_ns, body) "
                "SELECT i, convert_to('g' || (i % 3), 'UTF8'), 0, 0, '' FROM generate_series(1, 30) i"
            )
            await conn.execute(f"SELECT setval('{quote_ident(postgresql_schema)}.task_ids', 30)")
        async with opened(postgresql_dsn, postgresql_schema) as store:
            assert store.schema_version == schema.SchemaVersion(1, schema.LATEST)
            stats, total = await store.group_stats(time.time_ns())
            assert stats == {"g0": (10, 10), "g1": (10, 10), "g2": (10, 10)} and total == 30
            assert await store.update([spec("g0")]) == [31]

    run(scenario())


# Bodies for the error flag: an error, none, an empty one, a later empty one winning, 0x32 bytes that are
# not the error field (inside data, in a varint, in an unknown group), attempts first.
ERROR_BODIES = [
    (b"", False),
    (with_error(b"", "boom"), True),
    (encode(5, with_error(b"\x1a\x03abc", "x")), True),
    (b"\x32\x00", False),
    (with_error(b"", "boom") + b"\x32\x00", False),
    (b"\x32\x00" + with_error(b"", "late"), True),
    (b"\x1a\x032\x32\x32", False),
    (b"\x08\x32", False),
    (b"\x0b\x32\x01z\x0c", False),
    (encode(200, b"\x1a\x01\x32"), False),
]


def test_the_upgrade_to_statistics_flags_existing_errors(postgresql_dsn: str, postgresql_schema: str) -> None:
    """Version 3 had no error flags: the upgrade's SQL walker agrees with body.py on every body."""

    async def scenario() -> None:
        async with raw(postgresql_dsn) as conn:
            await schema.migrate(conn, postgresql_schema, target=3)
            table = f"{quote_ident(postgresql_schema)}.tasks"
            for i, (body, _) in enumerate(ERROR_BODIES, start=1):
                await conn.execute(
                    f"INSERT INTO {table} (id, grp, nb_s, nb_ns, body) VALUES (%s, %s, 0, 0, %s)",
                    (i, b"g" + bytes([48 + i % 2]), body),
                )
                # As version 3's own statements did: one count row per change.
                await conn.execute(
                    f"INSERT INTO {quote_ident(postgresql_schema)}.group_counts (grp, n) VALUES (%s, 1)",
                    (b"g" + bytes([48 + i % 2]),),
                )
            await conn.execute(f"SELECT setval('{quote_ident(postgresql_schema)}.task_ids', %s)", (len(ERROR_BODIES),))
        async with opened(postgresql_dsn, postgresql_schema) as store:
            assert store.schema_version == schema.SchemaVersion(3, schema.LATEST)
            async with raw(postgresql_dsn) as conn:
                cur = await conn.execute(f"SELECT id, has_error FROM {table} ORDER BY id")
                flags = [flag for _, flag in await cur.fetchall()]
            assert flags == [expected for _, expected in ERROR_BODIES]
            assert [error_of(body) != "" for body, _ in ERROR_BODIES] == flags  # the table is right too
            stats = {s.group: s for s in await store.admin.group_stats(time.time_ns())}
            for group in ("g0", "g1"):
                parity = int(group[1])
                wanted = sum(e for i, (_, e) in enumerate(ERROR_BODIES, start=1) if i % 2 == parity)
                assert (stats[group].errors, stats[group].created) == (wanted, 0)
            await store.check()

    run(scenario())


def test_a_newer_schema_is_refused(postgresql_dsn: str, postgresql_schema: str) -> None:
    async def scenario() -> None:
        async with opened(postgresql_dsn, postgresql_schema):
            pass
        async with raw(postgresql_dsn) as conn:
            await conn.execute(
                f"UPDATE {quote_ident(postgresql_schema)}.schema_version SET version = %s", (schema.LATEST + 1,)
            )
        with pytest.raises(schema.SchemaTooNew, match=r"newer than this server knows.*--store-schema"):
            await PostgresStore.open(PgOptions(dsn=postgresql_dsn, schema=postgresql_schema), time.time_ns)

    run(scenario())


def test_servers_starting_together_migrate_once(postgresql_dsn: str, postgresql_schema: str) -> None:
    async def scenario() -> None:
        options = PgOptions(dsn=postgresql_dsn, schema=postgresql_schema, pool_size=1)
        stores = await asyncio.gather(*(PostgresStore.open(options, time.time_ns) for _ in range(6)))
        try:
            versions = [s.schema_version for s in stores]
            assert sum(1 for v in versions if v is not None and v.created) == 1
            assert all(v is not None and v.now == schema.LATEST for v in versions)
            booted = await asyncio.gather(*(s.bootstrap("boot") for s in stores))
            assert booted.count(True) == 1
            assert (await stores[0].debug("boot", 0))[1] == 1
        finally:
            for store in stores:
                await store.close()

    run(scenario())


# -- notifications and waiting across stores --------------------------------------------------------


def test_one_notification_per_group_per_transaction(postgresql_dsn: str, postgresql_schema: str) -> None:
    async def scenario() -> None:
        options = PgOptions(dsn=postgresql_dsn, schema=postgresql_schema)
        async with opened(postgresql_dsn, postgresql_schema) as store, raw(postgresql_dsn) as listener:
            await listener.execute(f"LISTEN {quote_ident(options.channel)}")
            await store.update([spec(f"g{i % 3}") for i in range(1000)])
            await store.update([spec("g0")], [GroupRef("g1")])
            received = [n.payload async for n in listener.notifies(timeout=1.0)]
            assert sorted(received) == sorted(g.encode().hex() for g in ("g0", "g1", "g2", "g0"))

    run(scenario())


def test_a_waiter_on_one_store_is_woken_by_a_create_on_another(postgresql_dsn: str, postgresql_schema: str) -> None:
    async def scenario() -> None:
        async with opened(postgresql_dsn, postgresql_schema) as a, opened(postgresql_dsn, postgresql_schema) as b:
            # A poll interval far above the deadline: only the notification can wake it in time.
            a.waiters.poll_interval = 3600
            waiting = asyncio.create_task(a.wait("w", 0, 60 * SECOND, 1, 30.0))
            await eventually(lambda: asyncio.sleep(0, a.waiters.count == 1), "the waiter to wait")
            start = time.monotonic()
            (created,) = await b.update([spec("w", body("hello"))])
            (task,) = await waiting
            assert error_of(task.body) == "hello" and task.id > created
            assert time.monotonic() - start < 5.0

    run(scenario())


def test_poll_only_mode_wakes_waiters_without_notifications(postgresql_dsn: str, postgresql_schema: str) -> None:
    """For a pooler that drops notifications (PgBouncer in transaction mode): the poll finds the task."""

    async def scenario() -> None:
        # Both poll-only: nobody LISTENs, so the notification the create sends reaches no one.
        async with (
            opened(postgresql_dsn, postgresql_schema, poll_only=True) as a,
            opened(postgresql_dsn, postgresql_schema, poll_only=True) as b,
        ):
            waiting = asyncio.create_task(a.wait("w", 0, 60 * SECOND, 1, 30.0))
            await eventually(lambda: asyncio.sleep(0, a.waiters.count == 1), "the waiter to wait")
            await b.update([spec("w", body("polled"))])
            (task,) = await waiting
            assert error_of(task.body) == "polled"
            assert a.waiters.polls >= 1

    run(scenario())


def test_a_waiter_wakes_when_not_before_arrives(postgresql_dsn: str, postgresql_schema: str) -> None:
    async def scenario() -> None:
        async with opened(postgresql_dsn, postgresql_schema) as store:
            store.waiters.poll_interval = 3600
            due = time.time_ns() + SECOND // 2
            await store.update([TaskSpec("later", due, b"", None)])
            (task,) = await store.wait("later", 0, 0, 1, 30.0)
            assert time.time_ns() >= due and task.not_before == due

    run(scenario())


def test_a_cancelled_waiter_never_takes_the_task(postgresql_dsn: str, postgresql_schema: str) -> None:
    async def scenario() -> None:
        async with opened(postgresql_dsn, postgresql_schema) as store:
            first = asyncio.create_task(store.wait("fifo", 0, 60 * SECOND, 1, 30.0))
            await eventually(lambda: asyncio.sleep(0, store.waiters.count == 1), "the first waiter")
            second = asyncio.create_task(store.wait("fifo", 0, 60 * SECOND, 1, 30.0))
            await eventually(lambda: asyncio.sleep(0, store.waiters.count == 2), "the second waiter")
            first.cancel()
            await store.update([spec("fifo", body("only"))])
            (task,) = await second
            assert error_of(task.body) == "only"
            with pytest.raises(asyncio.CancelledError):
                await first
            assert [t.id for t in (await store.debug("fifo", 0))[0]] == [task.id]

    run(scenario())


def test_calls_cancelled_mid_statement_take_nothing_and_leave_no_dirty_connection(
    postgresql_dsn: str, postgresql_schema: str
) -> None:
    """Clients that go away at any moment: no task is taken by them, no pooled connection stays in a transaction."""

    async def scenario() -> None:
        async with opened(postgresql_dsn, postgresql_schema, pool_size=2) as store:
            await store.update([spec("g") for _ in range(50)])
            answered: set[int] = set()  # leases that reached a caller: those are rightly held
            for i in range(100):
                call = asyncio.create_task(store.wait("g", 0, 60 * SECOND if i % 2 else 0, 1, 5.0))
                await asyncio.sleep(0.0005 * (i % 7))  # cut off at a different point each time
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    answered.update(t.id for t in await call if t.not_before > time.time_ns())
            assert (await store.debug("g", 0))[1] == 50

            async def none_leased() -> bool:
                # A take whose commit was under way when its caller left is given back (in the background).
                tasks = (await store.debug("g", 0))[0]
                return all(t.not_before < time.time_ns() or t.id in answered for t in tasks)

            await eventually(none_leased, "every task a departed waiter took to be given back")

            async def state(conn: Any) -> tuple[int, int]:
                return conn.pgconn.transaction_status, conn.pgconn.pipeline_status

            for _ in range(4):
                assert await store._run(state) == (0, 0)  # idle, not in a pipeline
            await store.check()

    run(scenario(), timeout=120)


def test_waiters_are_served_first_come_first_served(postgresql_dsn: str, postgresql_schema: str) -> None:
    async def scenario() -> None:
        async with opened(postgresql_dsn, postgresql_schema) as store:
            waiters = []
            for i in range(5):
                waiters.append(asyncio.create_task(store.wait("order", 0, 60 * SECOND, 1, 30.0)))
                await eventually(lambda n=i + 1: asyncio.sleep(0, store.waiters.count == n), "waiter queued")
            for i in range(5):
                await store.update([spec("order", body(str(i)))])
            bodies = [error_of((await w)[0].body) for w in waiters]
            assert bodies == ["0", "1", "2", "3", "4"]

    run(scenario())


# -- losing the database ------------------------------------------------------------------------------


def test_losing_the_database_is_unavailable_then_recovers(
    postgresql_cluster: PostgresCluster, postgresql_dsn: str, postgresql_schema: str
) -> None:
    """Stopped: UNAVAILABLE naming the store, waiters released, unavailable within 2 s; back: serving again."""

    async def scenario() -> None:
        async with opened(postgresql_dsn, postgresql_schema) as store:
            changes: list[bool] = []

            async def record(reason: str | None) -> None:
                changes.append(reason is None)

            store.on_availability(record)
            (kept,) = await store.update([spec("kept")])
            waiting = asyncio.create_task(store.wait("empty", 0, 0, 1, 60.0))
            await eventually(lambda: asyncio.sleep(0, store.waiters.count == 1), "the waiter")
            await asyncio.to_thread(postgresql_cluster.stop, "fast")
            stopped_at = time.monotonic()  # pg_ctl returns once the server is down (slow on a busy machine)
            try:
                await eventually(lambda: asyncio.sleep(0, not store.available), "the store to notice")
                assert time.monotonic() - stopped_at < 2.0, "noticed more than 2 s after the database went down"
                with pytest.raises(StoreUnavailable, match="PostgreSQL store"):
                    await waiting
                with pytest.raises(StoreUnavailable, match="PostgreSQL store"):
                    await store.query("kept", time.time_ns())
                with pytest.raises(StoreUnavailable, match="PostgreSQL store"):
                    await store.wait("empty", 0, 0, 1, 1.0)
            finally:
                await asyncio.to_thread(postgresql_cluster.start)
            await eventually(lambda: asyncio.sleep(0, store.available), "the store to recover")
            assert changes == [False, True]
            # Every pooled connection was replaced: the first operations after recovery work.
            for _ in range(8):
                assert [t.id for t in await store.query("kept", time.time_ns())] == [kept]

    run(scenario(), timeout=120)


# -- plans and options -----------------------------------------------------------------------------------


def test_owning_raises_attempts_in_sql_exactly_as_in_memory(postgresql_dsn: str, postgresql_schema: str) -> None:
    """The schema's owned_once_more against masstasker.server.body's, byte for byte, at every varint edge."""
    bodies = [b"", b"\x1a\x03abc", with_error(b"", "boom"), b"8", b"\x38", b"\x38\x80", b"\x38\xff\xff"]
    for count in (1, 2, 126, 127, 128, 255, 16383, 16384, 2**21, 2**32 - 2, 2**32 - 1):
        bodies += [encode(count, b""), encode(count, with_error(b"", "x")), encode(count, b"\x52\x02hi")]

    async def scenario() -> None:
        async with opened(postgresql_dsn, postgresql_schema), raw(postgresql_dsn) as conn:
            function = f"{quote_ident(postgresql_schema)}.owned_once_more"
            for stored in bodies:
                row = await (await conn.execute(f"SELECT {function}(%s::bytea)", (stored,))).fetchone()
                assert row is not None and bytes(row[0]) == owned_once_more(stored), stored

    run(scenario())


def test_hot_statements_use_their_indexes(postgresql_dsn: str, postgresql_schema: str) -> None:
    """EXPLAIN the statements the lease path and Debug run: an index regression fails here."""

    async def scenario() -> None:
        async with opened(postgresql_dsn, postgresql_schema) as store:
            for _ in range(4):
                await store.update(
                    [spec(f"g{i % 20}", labels=(("n", str(i)),) if i % 50 == 0 else None) for i in range(5000)]
                )
            sql = render(postgresql_schema)
            now_s, now_ns = divmod(time.time_ns(), SECOND)
            params = {
                "grp": b"g3",
                "now_s": now_s,
                "now_ns": now_ns,
                "n": 1,
                "until_s": now_s + 60,
                "until_ns": 0,
                "at_s": now_s,
            }
            async with raw(postgresql_dsn) as conn:
                await conn.execute(f"ANALYZE {quote_ident(postgresql_schema)}.tasks")

                async def plan(statement: str, values: dict[str, Any]) -> str:
                    # Inside a transaction that rolls back: EXPLAIN ANALYZE would run the statement.
                    cur = await conn.execute("EXPLAIN " + statement, values)
                    return "\n".join(row[0] for row in await cur.fetchall())

                keyset = {**params, "after_s": now_s - 60, "after_ns": 0, "after_id": 7}
                for name in ("peek_head", "own_head", "next_hidden", "lock_head"):
                    text = await plan(getattr(sql, name), keyset)
                    assert "tasks_queue" in text and "Sort" not in text.split("tasks_queue")[0].split("\n")[-1], text
                assert "tasks_queue" in await plan(sql.debug_group, {"grp": b"g3", "limit": 10})
                assert "tasks_pkey" in await plan(sql.debug_all, {"limit": 10})
                assert "tasks_queue" in await plan(sql.group_stats, {"now_s": now_s, "now_ns": now_ns})
                assert "tasks_pkey" in await plan(sql.delete_by_ids, {"ids": [1, 2], "at_s": 0})
                assert "tasks_pkey" in await plan(sql.delete_one, {"id": 1, "at_s": 0})
                assert "tasks_labels" in await plan(sql.delete_by_labels, {"labels": ["6e:35"], "at_s": 0})
                # The admin API: statistics probe tasks_queue per group, listings walk an index from the token.
                window = {"now_s": now_s, "now_ns": now_ns, "from_s": now_s - 300, "to_s": now_s}
                assert "tasks_queue" in await plan(sql.admin_groups, window)
                assert "tasks_queue" in await plan(sql.admin_group, {**window, "grp": b"g3"})
                page = {
                    **keyset,
                    "high_s": now_s,
                    "high_ns": 0,
                    "leased": None,
                    "labels": None,
                    "scan": 20_000,
                    "page": 101,
                }
                assert "tasks_queue" in await plan(sql.list_tasks, page)
                assert "tasks_errors" in await plan(sql.list_error_tasks, page)
                assert "tasks_pkey" in await plan(sql.get_task, {"id": 5})

    run(scenario(), timeout=120)


def test_the_dsn_is_logged_without_its_password() -> None:
    assert "s3cret" not in masked("postgresql://user:s3cret@db.example/tasks")
    assert "***" in masked("host=/tmp user=u password=s3cret")
    assert "s3cret" not in masked("host=/tmp user=u password='s3cret'")


def test_the_password_file_wins(tmp_path: Any) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    options = PgOptions(dsn="postgresql://u:from-dsn@localhost/db", password_file=str(secret))
    assert "password=from-file" in options.conninfo()


def test_an_unreachable_database_fails_the_start_and_names_the_store(tmp_path: Any) -> None:
    options = PgOptions(dsn=f"host={tmp_path} user=u password=s3cret dbname=x", connect_timeout=1)
    with pytest.raises(StoreUnavailable, match="PostgreSQL store") as caught:
        run(PostgresStore.open(options, time.time_ns))
    assert "s3cret" not in str(caught.value)
