"""The PostgreSQL store: the in-memory store's operations and errors, on a database many servers share.

Each operation is one transaction (most of them one statement, or one
pipelined round trip plus the commit). Deadlocks and serialization failures
are retried here, so a client sees only the codes the in-memory store gives;
a database that cannot be reached, or a statement past its timeout, is
:class:`~masstasker.server.stores.base.StoreUnavailable` (UNAVAILABLE).

Times are integer nanoseconds since the Unix epoch, as in memory; IDs come
from one sequence (unique, increasing in allocation order, gaps possible).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, LiteralString, TypeVar

import psycopg
import psycopg_pool
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from psycopg import errors

from masstasker.server.body import attempts_of, owned_once_more, parked_body
from masstasker.server.counters import MINUTES_KEPT, SECONDS_KEPT
from masstasker.server.stores.base import (
    BadRequest,
    DeadLetter,
    GroupRef,
    GroupStats,
    IdRef,
    LabelRef,
    NotFound,
    PreconditionFailed,
    Ref,
    StoredTask,
    StoreUnavailable,
    TaskSpec,
    check_dead_letter,
)
from masstasker.server.stores.memory.stats import body_has_error
from masstasker.server.stores.postgres import schema
from masstasker.server.stores.postgres.admin import PgAdminView
from masstasker.server.stores.postgres.codec import (
    group_bytes,
    group_from_bytes,
    join_ns,
    label_element,
    labels_column,
    notify_payload,
    split_ns,
)
from masstasker.server.stores.postgres.connection import PgConnection
from masstasker.server.stores.postgres.listener import Listener
from masstasker.server.stores.postgres.options import POLL_ONLY_INTERVAL, PgOptions, masked
from masstasker.server.stores.postgres.statements import Statements, render
from masstasker.server.stores.postgres.stats import carried_leases, pairs
from masstasker.server.stores.postgres.waiting import PgWaiters

__all__ = ["PostgresStore"]

log = logging.getLogger("masstasker.server.postgres")

T = TypeVar("T")
Conn = PgConnection

# The largest ID a bigint sequence hands out; a larger ID in a request cannot exist.
_MAX_ID = 2**63 - 1
# Deadlocks and serialization failures are retried this many times before giving up (UNAVAILABLE).
_RETRIES = 10
# group_counts is compacted once it holds this many delta rows, or a journal row this many seconds old
# (so the history table has the seconds before they are trimmed into minutes).
_COMPACT_AT = 1000
_COMPACT_AGE_SECONDS = 60
_COMPACT_EVERY = 5.0
# History is trimmed (seconds into minutes, old minutes away, idle groups forgotten) at most this often.
_TRIM_EVERY_SECONDS = 60
_NANOS = 1_000_000_000
_STORE = "PostgreSQL store"
# A queue key (nb_s, nb_ns, id) below every task's: where LOCK_HEAD's first page starts.
_BEFORE_ALL = (-(2**63), 0, 0)


#: A row for INSERT_TASKS: (grp, nb_s, nb_ns, body, labels, has_error).
Row = tuple[bytes, int, int, bytes, str | None, bool]


def _labels_from_column(value: list[str] | None) -> str | None:
    return " ".join(value) if value else None


class PostgresStore:
    """Tasks in PostgreSQL. Make one with :meth:`open`; every method runs on the server's event loop."""

    name = _STORE

    def __init__(self, options: PgOptions, clock: Callable[[], int]) -> None:
        self.options = options
        self._clock = clock
        self._sql: Statements = render(options.schema)
        self._conninfo = options.conninfo()
        self._pool = psycopg_pool.AsyncConnectionPool(
            self._conninfo,
            connection_class=PgConnection,
            min_size=options.pool_size,
            max_size=options.pool_size,
            open=False,
            kwargs={
                "autocommit": True,
                # A pooler in transaction mode cannot keep server-side prepared statements.
                "prepare_threshold": None if options.poll_only else 2,
            },
            configure=self._configure,
            timeout=options.statement_timeout,
            reconnect_timeout=24 * 3600.0,
            name="masstasker",
        )
        self.waiters = PgWaiters(clock, POLL_ONLY_INTERVAL if options.poll_only else options.poll_interval)
        self._listener = Listener(
            self._conninfo,
            options.channel,
            poll_only=options.poll_only,
            interval=options.poll_interval,
            on_notify=self.waiters.signal,
            on_down=self._on_down,
            on_up=self._on_up,
            on_replaced=self._recheck_pool,
        )
        self._down: str | None = None  # why the database is unreachable, while it is
        self._compactor: asyncio.Task[None] | None = None
        self._background: set[asyncio.Future[Any]] = set()
        self._closing = False
        self.schema_version: schema.SchemaVersion | None = None
        self.retries = 0  # transactions retried after a deadlock or serialization failure, ever
        self.pool_rechecks = 0  # pool checks done after the listener replaced its connection, ever
        self._availability: list[Callable[[str | None], Awaitable[None]]] = []
        #: When the counters began (ns since the epoch), read at open.
        self.stats_since = 0
        self._next_trim = 0
        #: Group statistics and listings for the admin API and the metrics.
        self.admin = PgAdminView(self)

    # -- life cycle --------------------------------------------------------------------

    @classmethod
    async def open(
        cls, options: PgOptions, clock: Callable[[], int], *, migrate_to: int = schema.LATEST
    ) -> PostgresStore:
        """Connect, create or upgrade the schema, listen. Raises StoreUnavailable if the database is not there."""
        store = cls(options, clock)
        try:
            async with await psycopg.AsyncConnection.connect(store._conninfo, autocommit=True) as conn:
                store.schema_version = await schema.migrate(conn, options.schema, target=migrate_to)
                if store.schema_version.now >= 4:
                    store.stats_since = await schema.stats_since(conn, options.schema, clock())
            await store._pool.open(wait=True, timeout=max(options.connect_timeout, 1.0) * 2)
            await store._listener.start()
        except (psycopg.Error, psycopg_pool.PoolTimeout, OSError) as exc:
            await store._pool.close()
            raise StoreUnavailable(f"{_STORE} at {masked(options.dsn)}: cannot connect: {exc}") from None
        store.waiters.start()
        store._compactor = asyncio.get_running_loop().create_task(
            store._compact_forever(), name="masstasker-pg-compact"
        )
        log.info(
            "%s at %s, schema %r version %d%s, pool of %d",
            _STORE,
            masked(options.dsn),
            options.schema,
            store.schema_version.now,
            " (created)" if store.schema_version.created else "",
            options.pool_size,
        )
        return store

    async def close(self) -> None:
        """Release waiters, stop the background work, close every connection."""
        self._closing = True
        await self.waiters.close()
        # Takes still finishing for departed waiters, give-backs, health callbacks: end them here,
        # on a loop that is still running.
        background = list(self._background)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if self._compactor is not None:
            self._compactor.cancel()
            await asyncio.gather(self._compactor, return_exceptions=True)
        await self._listener.close()
        await self._pool.close()

    @property
    def available(self) -> bool:
        """False while the database is unreachable."""
        return self._down is None

    @property
    def listener(self) -> Listener:
        """The connection that listens for notifications and pings the database."""
        return self._listener

    def on_availability(self, callback: Callable[[str | None], Awaitable[None]]) -> None:
        """Call ``callback(reason)`` when the database is lost and ``callback(None)`` when it is back."""
        self._availability.append(callback)

    async def failed(self) -> str:
        """Never: a lost database is waited out (health NOT_SERVING meanwhile), not fatal."""
        never: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        return await never

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Whether the database is reachable, failed pings it survived, transactions retried after a deadlock."""
        registry.register(_PgCollector(self))

    def release_waiters(self) -> None:
        """Release every waiting Query with UNAVAILABLE (shutdown)."""
        self.waiters.release_all(StoreUnavailable(f"{_STORE}: the server is shutting down"))

    def _on_down(self, reason: str) -> None:
        self._down = reason
        self.waiters.release_all(StoreUnavailable(f"{_STORE} unreachable: {reason}"))
        for callback in self._availability:
            task = asyncio.ensure_future(callback(reason))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _recheck_pool(self) -> None:
        # The listener's connection was replaced: pooled connections ended with it are replaced now,
        # rather than each failing one call first.
        async def check() -> None:
            try:
                await self._pool.check()
            except (psycopg.Error, psycopg_pool.PoolTimeout, OSError) as exc:
                log.warning("could not recheck the pool: %s", exc)
            self.pool_rechecks += 1

        task = asyncio.ensure_future(check())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _on_up(self) -> None:
        # Connections from before the outage are dead: replace them before answering again.
        await self._pool.check()
        self._down = None
        self.waiters.reopen()
        self.waiters.signal(None)  # notifications sent while we were away are lost: everyone looks
        for callback in self._availability:
            await callback(None)

    async def _configure(self, conn: Conn) -> None:
        timeout_ms = max(1, round(self.options.statement_timeout * 1000))
        # No JIT: every statement here is short, and on a large table the planner's cost estimates cross
        # jit_above_cost, whose compilation (30 to 100 ms) would then dominate a statistics read.
        await conn.execute(f"SET statement_timeout = {timeout_ms}; SET jit = off")

    # -- running statements ----------------------------------------------------------------

    async def _run(self, op: Callable[[Conn], Awaitable[T]]) -> T:
        """Run ``op`` on a pooled connection; retry deadlocks and serialization failures."""
        if self._down is not None:
            raise StoreUnavailable(f"{_STORE} unreachable: {self._down}")
        for attempt in range(_RETRIES):
            try:
                # getconn/putconn rather than connection(): that one also enters the connection's own
                # context (a commit, a no-op in autocommit) and keeps usage statistics, on every call.
                # putconn rolls back a connection left in a transaction, and replaces a closed one.
                conn = await self._pool.getconn()
                try:
                    return await op(conn)
                except asyncio.CancelledError:
                    # Cut off mid-statement (the caller went away), the connection may still be
                    # inside a transaction or a pipeline: never hand it to the next caller.
                    conn.pgconn.finish()
                    raise
                finally:
                    await self._pool.putconn(conn)
            except (errors.SerializationFailure, errors.DeadlockDetected):
                self.retries += 1
                if attempt == _RETRIES - 1:
                    raise StoreUnavailable(f"{_STORE}: still conflicting after {_RETRIES} attempts") from None
                # Back off a little, at random, so the two sides do not collide again.
                await asyncio.sleep(random.uniform(0.001, 0.005) * (attempt + 1))
            except errors.QueryCanceled as exc:
                raise StoreUnavailable(f"{_STORE}: statement timed out ({exc})") from None
            except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
                raise StoreUnavailable(f"{_STORE} unreachable: {exc}") from None
        raise AssertionError("unreachable")

    # -- Query ---------------------------------------------------------------------------

    async def query(
        self, group: str, now: int, own_for: int = 0, max_tasks: int = 1, dead_letter: DeadLetter | None = None
    ) -> list[StoredTask]:
        """Up to ``max_tasks`` visible tasks from the head of the group, owned if ``own_for > 0``.

        An empty list means nothing is visible (or every visible task is held
        by a concurrent transaction). With ``dead_letter``, an owning Query
        parks tasks past ``max_attempts`` as the in-memory store does, in the
        same transaction.
        """
        if dead_letter is not None:
            check_dead_letter(dead_letter, group)
        grp = group_bytes(group)
        now_s, now_ns = split_ns(now)
        n = max(max_tasks, 1)
        if own_for <= 0:

            async def peek(conn: Conn) -> list[StoredTask]:
                cur = await conn.one(self._sql.peek_head, {"grp": grp, "now_s": now_s, "now_ns": now_ns, "n": n})
                return [StoredTask(i, group, join_ns(s, ns), b, None) for i, s, ns, b in await cur.fetchall()]

            return await self._run(peek)
        until = now + own_for
        if dead_letter is not None:

            async def own_or_park(conn: Conn) -> list[StoredTask]:
                async with conn.transaction():
                    return await self._own_or_park(conn, group, now, until, n, dead_letter)

            return await self._run(own_or_park)
        params = self._own_params(grp, now, until, n)

        async def own(conn: Conn) -> list[StoredTask]:
            cur = await conn.one(self._sql.own_head, params)
            rows = sorted(await cur.fetchall())
            return [StoredTask(i, group, until, b, None) for i, b in rows]

        return await self._run(own)

    def _own_params(self, grp: bytes, now: int, until: int, n: int) -> dict[str, object]:
        """OWN_HEAD's parameters: the group's first ``n`` visible at ``now``, owned until ``until``."""
        now_s, now_ns = split_ns(now)
        until_s, until_ns = split_ns(until)
        return {
            "grp": grp,
            "now_s": now_s,
            "now_ns": now_ns,
            "n": n,
            "until_s": until_s,
            "until_ns": until_ns,
            "at_s": self._clock() // _NANOS,
        }

    async def _own_or_park(
        self, conn: Conn, group: str, now: int, until: int, n: int, dead_letter: DeadLetter
    ) -> list[StoredTask]:
        """In the caller's transaction: lock the head page by page; park each task already owned
        ``max_attempts`` times, own the others, until ``n`` are owned or nothing visible is left.

        Parked tasks do not count toward ``n``, so the walk may read past them, one keyset page at a time.
        """
        grp = group_bytes(group)
        now_s, now_ns = split_ns(now)
        until_s, until_ns = split_ns(until)
        max_attempts, dead_group = dead_letter
        dead_grp = group_bytes(dead_group)
        doomed: list[int] = []
        rows: list[Row] = []
        owned: list[bool] = []
        count = 0
        after_s, after_ns, after_id = _BEFORE_ALL
        while count < n:
            page = n - count
            cur = await conn.execute(
                self._sql.lock_head,
                {
                    "grp": grp,
                    "now_s": now_s,
                    "now_ns": now_ns,
                    "after_s": after_s,
                    "after_ns": after_ns,
                    "after_id": after_id,
                    "n": page,
                },
            )
            found = await cur.fetchall()
            for task_id, _, _, stored, labels, has_error in found:
                body = bytes(stored)
                doomed.append(task_id)
                attempts = attempts_of(body)
                if attempts < max_attempts:
                    rows.append((grp, until_s, until_ns, owned_once_more(body), _labels_from_column(labels), has_error))
                    owned.append(True)
                    count += 1
                else:
                    parked = parked_body(body, attempts)
                    rows.append((dead_grp, now_s, now_ns, parked, _labels_from_column(labels), True))
                    owned.append(False)
            if len(found) < page:
                break
            after_id, after_s, after_ns = found[-1][0], found[-1][1], found[-1][2]
        if not doomed:
            return []
        at_s = self._clock() // _NANOS
        # The owned copies are rewrites of what the deletion removed (it counted them as departed), and owned.
        kept = count
        async with conn.pipeline():
            deleted = await conn.execute(self._sql.delete_by_ids, {"ids": doomed, "at_s": at_s})
            inserted = await self._send_inserts(
                conn, rows, at_s, leased=owned, paired={grp: kept} if kept else None, owned={grp: kept}
            )
            assert inserted is not None
            await deleted.fetchall()
            # INSERT_TASKS numbers the rows in order: sorted IDs line up with `rows`.
            ids = sorted(row[0] for row in await inserted.fetchall())
        return [
            StoredTask(i, group, until, row[3], None) for i, row, mine in zip(ids, rows, owned, strict=True) if mine
        ]

    async def wait(
        self,
        group: str,
        offset: int,
        own_for: int,
        max_tasks: int,
        timeout: float | None,
        dead_letter: DeadLetter | None = None,
    ) -> list[StoredTask]:
        """Wait for visible tasks and take them as :meth:`query` does; ``now`` is the clock plus ``offset``.

        Raises TimeoutError after ``timeout`` seconds and StoreUnavailable
        when the database is lost meanwhile.
        """
        if dead_letter is not None:
            check_dead_letter(dead_letter, group)
        grp = group_bytes(group)
        n = max(max_tasks, 1)

        async def take(now: int) -> tuple[list[StoredTask], bool]:
            if own_for <= 0:
                # A peek leaves the task where it is: the next waiter sees it too.
                tasks = await self.query(group, now, 0, n)
                return tasks, bool(tasks)
            until = now + own_for
            now_s, now_ns = split_ns(now)
            if dead_letter is not None:

                async def own_or_park(conn: Conn) -> tuple[list[StoredTask], bool]:
                    async with conn.transaction():  # rolled back if the waiter's call is cancelled, as below
                        tasks = await self._own_or_park(conn, group, now, until, n, dead_letter)
                        behind = await conn.execute(
                            self._sql.peek_head, {"grp": grp, "now_s": now_s, "now_ns": now_ns, "n": 1}
                        )
                        more = bool(await behind.fetchall())
                    return tasks, more

                return await self._run(own_or_park)
            params = self._own_params(grp, now, until, n)

            async def own(conn: Conn) -> tuple[list[StoredTask], bool]:
                # The peek after the lease (same round trip) tells whether the next waiter should look too.
                async with conn.pipeline(), conn.transaction():
                    cur = await conn.execute(self._sql.own_head, params)
                    behind = await conn.execute(
                        self._sql.peek_head, {"grp": grp, "now_s": now_s, "now_ns": now_ns, "n": 1}
                    )
                    rows = sorted(await cur.fetchall())
                    more = bool(await behind.fetchall())
                return [StoredTask(i, group, until, b, None) for i, b in rows], more

            # The take runs to its end even if the caller goes away meanwhile (a statement cut off
            # cannot tell whether it committed); what a departed caller took is given back.
            taking = asyncio.ensure_future(self._run(own))
            self._background.add(taking)
            taking.add_done_callback(self._background.discard)
            try:
                return await asyncio.shield(taking)
            except asyncio.CancelledError:
                taking.add_done_callback(lambda done: self._give_back(done, group, now))
                raise

        async def next_hidden(now: int) -> int | None:
            now_s, now_ns = split_ns(now)

            async def read(conn: Conn) -> int | None:
                cur = await conn.one(self._sql.next_hidden, {"grp": grp, "now_s": now_s, "now_ns": now_ns})
                row = await cur.fetchone()
                return None if row is None else join_ns(row[0], row[1])

            return await self._run(read)

        return await self.waiters.wait(group, offset, take, next_hidden, timeout)

    def _give_back(self, taken: asyncio.Future[tuple[list[StoredTask], bool]], group: str, now: int) -> None:
        """Undo the lease a cancelled waiter's take committed: the tasks are visible again at its ``now``."""
        if self._closing or taken.cancelled() or taken.exception() is not None or not taken.result()[0]:
            return  # (when the server stops, a lease left behind expires as any other would)
        ids = [task.id for task in taken.result()[0]]
        now_s, now_ns = split_ns(now)

        async def apply(conn: Conn) -> None:
            async with conn.pipeline():
                await conn.execute(self._sql.give_back, {"ids": ids, "now_s": now_s, "now_ns": now_ns})
                await conn.execute(
                    self._sql.notify_groups, {"channel": self.options.channel, "groups": [notify_payload(group)]}
                )

        async def give_back() -> None:
            try:
                await self._run(apply)
            except StoreUnavailable as exc:  # the lease then expires as any other would
                log.warning("could not give back tasks %s a departed waiter leased: %s", ids, exc)

        task = asyncio.ensure_future(give_back())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- Update and BulkSet ----------------------------------------------------------------

    async def update(
        self, created: Sequence[TaskSpec], deleted: Sequence[Ref] = (), predicates: Sequence[int] = ()
    ) -> list[int]:
        """Check predicates (held until commit), delete what the refs select, create; all or nothing.

        Same errors, in the same order, as the in-memory store's ``update``.
        """
        ids, groups, selectors = _split_refs(deleted)
        now = self._clock()
        at_s = now // _NANOS
        new_rows = self._rows(created, now)
        if not predicates and not groups and not selectors and not created and len(ids) == 1:
            # A lease's commit: one statement, one round trip; 0 rows deleted changed nothing.
            return await self._delete_one(ids[0], at_s)
        if not predicates and not deleted:
            return await self._create_only(new_rows, at_s)

        async def apply(conn: Conn) -> list[int]:
            # Two round trips: the checks and deletions, then (only if they pass, so a failed Update
            # uses no ID) the creations with the COMMIT. Between them, Python pairs the creations with
            # the removed tasks, for the counters and the leases carried over.
            async with conn.pipeline():
                async with conn.transaction():
                    pending = await self._send_deletes(
                        conn, predicates, ids, groups, selectors, self._sql.delete_by_ids, at_s
                    )
                    removed = await self._check_deletes(pending, predicates, ids)
                    paired = pairs((bytes(row[1]) for row in removed), (row[0] for row in new_rows))
                    leased = None
                    if paired and any(row[4] for row in removed):
                        leased = carried_leases(
                            False,
                            _removed_in_order(deleted, removed),
                            [(group_from_bytes(row[0]), join_ns(row[1], row[2])) for row in new_rows],
                            now,
                        )
                    inserted = await self._send_inserts(conn, new_rows, at_s, leased=leased, paired=paired)
                return sorted(row[0] for row in await inserted.fetchall()) if inserted is not None else []

        return await self._run(apply)

    async def bulk_set(
        self,
        refs: Sequence[Ref],
        *,
        group: str | None = None,
        not_before: int | None = None,
        body_patch: Callable[[bytes], bytes] | None = None,
        labels: tuple[tuple[str, str], ...] | None = None,
    ) -> int:
        """Replace every selected task by a copy with the given fields overwritten (as in memory)."""
        ids, groups, selectors = _split_refs(refs)
        at_s = self._clock() // _NANOS

        async def apply(conn: Conn) -> int:
            async with conn.transaction():
                async with conn.pipeline():
                    pending = await self._send_deletes(conn, (), ids, groups, selectors, self._sql.take_by_ids, at_s)
                    taken = await self._check_deletes(pending, (), ids)
                rows = {row[0]: row for row in taken}
                new_rows: list[Row] = []
                leased: list[bool] = []
                for old_id in _selection_order(refs, rows):
                    _, old_grp, old_s, old_ns, was_leased, old_labels, body, has_error = rows[old_id]
                    grp, s, ns = bytes(old_grp), old_s, old_ns
                    if group is not None:
                        grp = group_bytes(group)
                    if not_before is not None:
                        s, ns = split_ns(not_before)
                    if body_patch is not None:
                        body = body_patch(bytes(body))
                        has_error = body_has_error(body)
                    label_text = _labels_from_column(old_labels) if labels is None else labels_column(labels)
                    new_rows.append((grp, s, ns, bytes(body), label_text, has_error))
                    # A copy that keeps its group and not_before keeps its lease (the in-memory rule).
                    leased.append(was_leased and grp == bytes(old_grp) and (s, ns) == (old_s, old_ns))
                paired = pairs((bytes(row[1]) for row in taken), (row[0] for row in new_rows))
                async with conn.pipeline():
                    inserted = await self._send_inserts(conn, new_rows, at_s, leased=leased, paired=paired)
                    if inserted is not None:
                        await inserted.fetchall()
                return len(new_rows)

        return await self._run(apply)

    def _rows(self, created: Iterable[TaskSpec], now: int) -> list[Row]:
        """Created tasks as INSERT_TASKS rows; no ``not_before`` means ``now``."""
        rows = []
        for group, not_before, body, labels, error in created:
            s, ns = split_ns(now if not_before is None else not_before)
            rows.append((group_bytes(group), s, ns, body, labels_column(labels), error))
        return rows

    async def _delete_one(self, task_id: int, at_s: int) -> list[int]:
        if task_id > _MAX_ID:
            raise NotFound(f"task {task_id} does not exist")

        async def apply(conn: Conn) -> list[int]:
            cur = await conn.one(self._sql.delete_one, {"id": task_id, "at_s": at_s})
            row = await cur.fetchone()
            if row is None or not row[0]:
                raise NotFound(f"task {task_id} does not exist")
            return []

        return await self._run(apply)

    async def _create_only(self, rows: list[Row], at_s: int) -> list[int]:
        if not rows:
            return []

        async def apply(conn: Conn) -> list[int]:
            # Autocommit: the insert commits, then the notification goes out. One round trip.
            async with conn.pipeline():
                inserted = await self._send_inserts(conn, rows, at_s)
                assert inserted is not None
                return sorted(row[0] for row in await inserted.fetchall())

        return await self._run(apply)

    async def _send_deletes(
        self,
        conn: Conn,
        predicates: Sequence[int],
        ids: list[int],
        groups: list[str],
        selectors: list[tuple[tuple[str, str], ...]],
        by_ids: LiteralString,
        at_s: int,
    ) -> list[psycopg.AsyncCursor[Any]]:
        """Queue (in a pipeline) the predicate locks and the deletions, IDs first (so overlaps count as found)."""
        pending: list[psycopg.AsyncCursor[Any]] = []
        # A predicate this Update also deletes by ID is locked by the delete itself: taking a KEY SHARE
        # lock first would make two such Updates deadlock (each holds the share the other's delete needs).
        deleting = set(ids)
        real_predicates = [p for p in predicates if p <= _MAX_ID and p not in deleting]
        if real_predicates:
            pending.append(await conn.execute(self._sql.lock_predicates, {"ids": real_predicates}))
        if ids:
            pending.append(await conn.execute(by_ids, {"ids": [i for i in ids if i <= _MAX_ID], "at_s": at_s}))
        take = by_ids is self._sql.take_by_ids
        if groups:
            statement = self._sql.take_by_groups if take else self._sql.delete_by_groups
            pending.append(await conn.execute(statement, {"groups": [group_bytes(g) for g in groups], "at_s": at_s}))
        for selector in selectors:
            statement = self._sql.take_by_labels if take else self._sql.delete_by_labels
            labels = [label_element(k, v) for k, v in selector]
            pending.append(await conn.execute(statement, {"labels": labels, "at_s": at_s}))
        return pending

    async def _check_deletes(
        self, cursors: list[psycopg.AsyncCursor[Any]], predicates: Sequence[int], ids: list[int]
    ) -> list[tuple[Any, ...]]:
        """Predicates first (FAILED_PRECONDITION), then ID refs (NOT_FOUND); every row deleted."""
        results = [await cur.fetchall() for cur in cursors]
        position = 0
        deleting = set(ids)
        found: set[int] = set()
        if any(p <= _MAX_ID and p not in deleting for p in predicates):
            found = {row[0] for row in results[0]}
            position = 1
        deleted = {row[0] for row in results[position]} if ids else set()
        for pred in predicates:
            if pred not in found and pred not in deleted:
                raise PreconditionFailed(f"predicate task {pred} does not exist")
        if ids:
            for task_id in ids:
                if task_id not in deleted:
                    raise NotFound(f"task {task_id} does not exist")
        return [row for rows in results[position:] for row in rows]

    async def _send_inserts(
        self,
        conn: Conn,
        rows: list[Row],
        at_s: int,
        *,
        leased: list[bool] | None = None,
        paired: dict[bytes, int] | None = None,
        owned: dict[bytes, int] | None = None,
    ) -> psycopg.AsyncCursor[Any] | None:
        """Queue the inserts and one notification per distinct group; None when there is nothing to insert.

        ``leased``: which rows carry a lease (none if None). ``paired``: per group, how many rows rewrite
        a task this transaction removed; ``owned``: per group, how many an owning Query owned.
        """
        if not rows:
            return None
        # Lists: psycopg sends a list as an array (a tuple would be a record).
        columns = [list(column) for column in zip(*rows, strict=True)]
        pair_groups = sorted({*(paired or ()), *(owned or ())})
        cur = await conn.execute(
            self._sql.insert_tasks,
            {
                "groups": columns[0],
                "nb_s": columns[1],
                "nb_ns": columns[2],
                "bodies": columns[3],
                "labels": columns[4],
                # None when no row has the flag: most creates have neither, and an array costs per row.
                "errors": columns[5] if any(columns[5]) else None,
                "leased": leased if leased is not None and any(leased) else None,
                "pair_groups": pair_groups,
                "rewrites": [(paired or {}).get(g, 0) for g in pair_groups],
                "owned": [(owned or {}).get(g, 0) for g in pair_groups],
                "at_s": at_s,
            },
        )
        payloads = sorted({notify_payload(group_from_bytes(g)) for g in dict.fromkeys(columns[0])})
        await conn.execute(self._sql.notify_groups, {"channel": self.options.channel, "groups": payloads})
        return cur

    # -- Debug and metrics -----------------------------------------------------------------

    async def debug(self, group: str, limit: int) -> tuple[list[StoredTask], int]:
        """A group's tasks in queue order (or all tasks in ID order), at most ``limit`` (0: all), and the count.

        One statement: reads only the rows it returns, takes the count from
        group_counts, both from one snapshot.
        """
        bounded = limit if 0 < limit <= _MAX_ID else None

        async def read(conn: Conn) -> tuple[list[StoredTask], int]:
            if group:
                cur = await conn.execute(self._sql.debug_group, {"grp": group_bytes(group), "limit": bounded})
                rows = await cur.fetchall()
                tasks = [StoredTask(i, group, join_ns(s, ns), b, None) for _, i, s, ns, b in rows if i is not None]
            else:
                cur = await conn.execute(self._sql.debug_all, {"limit": bounded})
                rows = await cur.fetchall()
                tasks = [
                    StoredTask(i, group_from_bytes(g), join_ns(s, ns), b, None)
                    for _, i, g, s, ns, b in rows
                    if i is not None
                ]
            return tasks, int(rows[0][0]) if rows else 0

        return await self._run(read)

    async def group_stats(self, now: int) -> tuple[GroupStats, int]:
        """Every non-empty group's (size, visible at ``now``), and the total; never scans the tasks table."""
        now_s, now_ns = split_ns(now)

        async def read(conn: Conn) -> tuple[GroupStats, int]:
            cur = await conn.execute(self._sql.group_stats, {"now_s": now_s, "now_ns": now_ns})
            rows = await cur.fetchall()
            stats = {group_from_bytes(g): (n, n - hidden) for g, n, hidden in rows}
            return stats, sum(n for _, n, _ in rows)

        return await self._run(read)

    async def size(self) -> int:
        """How many tasks the schema holds, from group_counts."""
        return (await self.debug("", 1))[1]

    async def check(self) -> None:
        """Assert that group_counts and the statistics agree with the tasks table, and the waiters' invariants.

        For the tests: it scans both tables and reads every body.
        """

        async def read(conn: Conn) -> tuple[list[tuple[Any, ...]], ...]:
            async with conn.transaction():  # one snapshot for the three reads
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                counts = await (await conn.execute(self._sql.counts_disagree)).fetchall()
                stats = await (await conn.execute(self._sql.stats_disagree)).fetchall()
                flags = await (await conn.execute(self._sql.error_flags)).fetchall()
            return counts, stats, flags

        disagree, wrong_stats, flags = await self._run(read)
        assert not disagree, f"group_counts disagrees with the tasks table (group, counted, actual): {disagree}"
        assert not wrong_stats, (
            "statistics disagree with the tasks table or break an invariant "
            f"(group, n, actual n, errors, actual errors, created, owned, departed): {wrong_stats}"
        )
        wrong_flags = [task_id for task_id, body, flag in flags if flag != body_has_error(bytes(body))]
        assert not wrong_flags, f"tasks whose has_error disagrees with their body: {wrong_flags[:20]}"
        self.waiters._check()

    async def compact_counts(self, *, force: bool = False) -> bool:
        """Fold group_counts' journal rows into base rows and history if due (or ``force``); True when it did.

        Due: many rows, or a journal row older than a minute. At most once a minute (and when forced),
        history is trimmed too. One transaction, one server at a time (an advisory lock: the others skip).
        """
        now_s = self._clock() // _NANOS
        trim = force or now_s >= self._next_trim

        async def compact(conn: Conn) -> bool:
            row = await (await conn.execute(self._sql.count_rows)).fetchone()
            assert row is not None
            rows, oldest = row
            fresh = oldest is None or oldest >= now_s - _COMPACT_AGE_SECONDS
            if not force and not trim and rows < _COMPACT_AT and fresh:
                return False
            async with conn.transaction():
                cur = await conn.execute(self._sql.compact_lock, {"key": "masstasker compact " + self.options.schema})
                locked = await cur.fetchone()
                if not locked or not locked[0]:
                    return False
                await conn.execute(self._sql.compact_counts)
                if trim:
                    await conn.execute(self._sql.trim_seconds, {"before": now_s - SECONDS_KEPT})
                    await conn.execute(self._sql.trim_minutes, {"before": now_s - 60 * MINUTES_KEPT})
            if trim:
                self._next_trim = now_s + _TRIM_EVERY_SECONDS
            return True

        return await self._run(compact)

    async def _compact_forever(self) -> None:
        while True:
            await asyncio.sleep(_COMPACT_EVERY)
            try:
                await self.compact_counts()
            except StoreUnavailable as exc:
                log.debug("group count compaction skipped: %s", exc)

    async def bootstrap(self, group: str) -> bool:
        """Create the bootstrap task on the schema's first start only (as a data directory's first start)."""
        rows = self._rows([TaskSpec(group, None)], self._clock())

        async def apply(conn: Conn) -> bool:
            async with conn.transaction():
                if not await schema.claim_bootstrap(conn, self.options.schema):
                    return False
                async with conn.pipeline():
                    inserted = await self._send_inserts(conn, rows, self._clock() // _NANOS)
                    assert inserted is not None
                    await inserted.fetchall()
                return True

        return await self._run(apply)


class _PgCollector(Collector):
    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    def collect(self) -> Iterator[Any]:
        yield GaugeMetricFamily(
            "masstasker_store_available", "1 while the PostgreSQL store is reachable", value=int(self._store.available)
        )
        yield CounterMetricFamily(
            "masstasker_store_ping_failures",
            "Pings of the database that failed while a new connection worked (slow moments, not outages)",
            value=self._store.listener.ping_failures,
        )
        yield CounterMetricFamily(
            "masstasker_store_retries",
            "Transactions retried after a deadlock or serialization failure",
            value=self._store.retries,
        )


def _split_refs(refs: Iterable[Ref]) -> tuple[list[int], list[str], list[tuple[tuple[str, str], ...]]]:
    """ID, group and label refs apart, in request order; malformed refs are BadRequest."""
    ids: list[int] = []
    groups: list[str] = []
    selectors: list[tuple[tuple[str, str], ...]] = []
    for ref in refs:
        if type(ref) is IdRef:
            ids.append(ref.id)
        elif type(ref) is GroupRef:
            groups.append(ref.group)
        elif type(ref) is LabelRef:
            if not ref.labels:
                raise BadRequest("empty label selector: use a group ref to select a whole group")
            selectors.append(ref.labels)
        else:
            raise BadRequest("task ref has no selector set (id, selector or group)")
    return ids, groups, selectors


def _removed_in_order(refs: Iterable[Ref], removed: list[tuple[Any, ...]]) -> list[tuple[str, int, int, bool]]:
    """The removed rows (id, grp, nb_s, nb_ns, leased, labels) as ``(group, id, not_before, leased)``,
    in the order the in-memory store removes them (the order that pairs them with creations)."""
    rows = {row[0]: row for row in removed}
    return [
        (group_from_bytes(row[1]), row[0], join_ns(row[2], row[3]), row[4])
        for row in (rows[i] for i in _selection_order(refs, rows))
    ]


def _selection_order(refs: Iterable[Ref], rows: dict[int, tuple[Any, ...]]) -> list[int]:
    """The taken IDs in the order the in-memory store selects them (so new IDs are assigned alike)."""
    order: dict[int, None] = {}
    for ref in refs:
        if type(ref) is IdRef:
            order[ref.id] = None
        elif type(ref) is GroupRef:
            grp = group_bytes(ref.group)
            members = sorted((r[2], r[3], i) for i, r in rows.items() if bytes(r[1]) == grp)
            order.update(dict.fromkeys(i for _, _, i in members))
        elif type(ref) is LabelRef:
            wanted = {label_element(k, v) for k, v in ref.labels}
            order.update(dict.fromkeys(sorted(i for i, r in rows.items() if r[5] and wanted <= set(r[5]))))
    return list(order)
