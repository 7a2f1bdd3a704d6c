"""The admin view of the PostgreSQL store: statistics and listings in one statement each, never a scan.

The statistics are kept by the statements that change tasks (see
:mod:`.statements`): every change writes one ``group_counts`` row per group
it touches, with the size, error and counter deltas and the second it
happened in; compaction folds those rows into one base row per group and
their counters into ``group_history``. So a read sums a small table, counts
the tasks that are not visible yet (usually the leases) and probes each
group's head, whatever the backlog. The meaning is the in-memory store's
(:mod:`masstasker.server.stores.memory.stats`); rates read only the last
:data:`~.stats.RATE_WINDOW_SECONDS` seconds (docs/postgres.md).

Listings walk ``tasks_queue`` (or ``tasks_errors``) from the page token's
key, examine at most :data:`MAX_SCAN_PER_PAGE` tasks per page whatever the
filter, and use the in-memory store's page tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from masstasker.server.stats import GroupStats, HistoryRequest, TaskPage, TaskState
from masstasker.server.stores.base import NotFound, StoredTask
from masstasker.server.stores.memory.admin import MAX_SCAN_PER_PAGE, page_token_for, parse_page_token
from masstasker.server.stores.memory.store import key_of
from masstasker.server.stores.postgres.codec import group_bytes, group_from_bytes, join_ns, label_element, split_ns
from masstasker.server.stores.postgres.stats import RATE_WINDOW_SECONDS, rates, rebuilt_history

if TYPE_CHECKING:
    import psycopg

    from masstasker.server.stores.postgres.store import PostgresStore

__all__ = ["PgAdminView"]

_NANOS = 1_000_000_000
_ID_BITS = 64
_ID_MASK = (1 << _ID_BITS) - 1
_INT8_MIN = -(2**63)
_INT8_MAX = 2**63 - 1
_LAST_NS = _NANOS - 1
_MAX_ID = 2**63 - 1


class PgAdminView:
    """:class:`~masstasker.server.stats.AdminView` over a :class:`PostgresStore`."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    async def group_stats(
        self, now: int, history: HistoryRequest | None = None, *, wait_durable: bool = True
    ) -> list[GroupStats]:
        """Every group with tasks or counters, sorted by name; one statement (one snapshot).

        With ``history``, every group's history too (the whole history table is read).
        ``wait_durable`` is moot: what PostgreSQL shows is committed.
        """
        store = self._store
        sql = store._sql
        now_s, now_ns = split_ns(now)
        to_s = now // _NANOS - 1
        params = {"now_s": now_s, "now_ns": now_ns, "from_s": to_s - RATE_WINDOW_SECONDS, "to_s": to_s}

        async def read(conn: psycopg.AsyncConnection[Any]) -> list[GroupStats]:
            if history is None:
                rows = await (await conn.execute(sql.admin_groups, params)).fetchall()
                return [self._from_groups_row(row, now, to_s) for row in rows]
            rows = await (await conn.execute(sql.admin_groups_history, params)).fetchall()
            return [self._from_group_row(group_from_bytes(row[0]), row[1:], now, to_s, history) for row in rows]

        return await store._run(read)

    async def one_group_stats(self, group: str, now: int, history: HistoryRequest | None = None) -> GroupStats:
        """One group's statistics with its history; zeros for a group never seen. One statement."""
        store = self._store
        now_s, now_ns = split_ns(now)
        to_s = now // _NANOS - 1
        params = {"grp": group_bytes(group), "now_s": now_s, "now_ns": now_ns}

        async def read(conn: psycopg.AsyncConnection[Any]) -> GroupStats:
            row = await (await conn.execute(store._sql.admin_group, params)).fetchone()
            assert row is not None
            return self._from_group_row(group, row, now, to_s, history)

        return await store._run(read)

    def _from_groups_row(self, row: Sequence[Any], now: int, to_s: int) -> GroupStats:
        grp, n, errors, created, owned, departed, leased, hidden, head_s, head_ns, seconds, c, o, d = row
        creation, owning, departure = rates(seconds, (c, o, d), to_s)
        return self._stats(
            group_from_bytes(grp),
            now,
            n,
            errors,
            (created, owned, departed),
            leased,
            hidden,
            head_s,
            head_ns,
            (creation, owning, departure),
            (),
        )

    def _from_group_row(
        self, group: str, row: Sequence[Any], now: int, to_s: int, history: HistoryRequest | None
    ) -> GroupStats:
        n, errors, created, owned, departed, leased, hidden, head_s, head_ns = row[:9]
        widths, periods, c, o, d = (value or [] for value in row[9:])
        # Rows after to_s are the second still open: not history yet, as in memory.
        closed = [i for i, p in enumerate(periods) if p <= to_s]
        recent = [i for i in closed if widths[i] == 1 and periods[i] >= to_s - RATE_WINDOW_SECONDS]
        measured = rates(
            [periods[i] for i in recent], ([c[i] for i in recent], [o[i] for i in recent], [d[i] for i in recent]), to_s
        )
        points: Sequence[Any] = ()
        if history is not None and closed:
            still_open = [i for i, p in enumerate(periods) if p > to_s]
            counters = (
                created - sum(c[i] for i in still_open),
                owned - sum(o[i] for i in still_open),
                departed - sum(d[i] for i in still_open),
            )
            increments = ([c[i] for i in closed], [o[i] for i in closed], [d[i] for i in closed])
            rebuilt = rebuilt_history(counters, [periods[i] for i in closed], increments)
            points = rebuilt.points(to_s, history.span, history.step, n - created + departed)
        return self._stats(
            group, now, n, errors, (created, owned, departed), leased, hidden, head_s, head_ns, measured, points
        )

    def _stats(
        self,
        group: str,
        now: int,
        n: int,
        errors: int,
        counters: tuple[int, int, int],
        leased: int,
        hidden: int,
        head_s: int | None,
        head_ns: int | None,
        measured: tuple[float, float, float],
        points: Sequence[Any],
    ) -> GroupStats:
        visible = n - hidden
        head = None if head_s is None or head_ns is None else join_ns(head_s, head_ns)
        return GroupStats(
            group=group,
            now=now,
            total=n,
            visible=visible,
            leased=leased,
            errors=errors,
            oldest_visible_age=now - head if head is not None and visible > 0 and head <= now else None,
            created=counters[0],
            owned=counters[1],
            departed=counters[2],
            counters_since=self._store.stats_since,
            creation_rate=measured[0],
            owning_rate=measured[1],
            departure_rate=measured[2],
            history=points,
        )

    async def list_tasks(
        self,
        group: str,
        now: int,
        *,
        state: TaskState,
        labels: tuple[tuple[str, str], ...] | None,
        page_token: str,
        page_size: int,
    ) -> TaskPage:
        """A page of the group's tasks in queue order after ``page_token``; see the module docstring."""
        after = parse_page_token(page_token)
        store = self._store
        if after is None:
            after_s, after_ns, after_id = _INT8_MIN, 0, 0
        else:
            (after_s, after_ns), after_id = split_ns(after >> _ID_BITS), after & _ID_MASK
            if not _INT8_MIN <= after_s <= _INT8_MAX or after_id > _MAX_ID:
                return TaskPage((), "")  # beyond every key PostgreSQL can hold
        now_s, now_ns = split_ns(now)
        start, high = (after_s, after_ns, after_id), (_INT8_MAX, _LAST_NS)
        leased: bool | None = None
        if state is TaskState.VISIBLE:
            high = (now_s, now_ns)
        elif state in (TaskState.LEASED, TaskState.SCHEDULED):
            # Tasks after now: keys above (now, the largest ID).
            start, leased = max(start, (now_s, now_ns, _MAX_ID)), state is TaskState.LEASED
        params = {
            "grp": group_bytes(group),
            "after_s": start[0],
            "after_ns": start[1],
            "after_id": start[2],
            "high_s": high[0],
            "high_ns": high[1],
            "leased": leased,
            "labels": [label_element(k, v) for k, v in labels] if labels else None,
            "scan": MAX_SCAN_PER_PAGE,
            "page": page_size + 1,
        }
        statement = store._sql.list_error_tasks if state is TaskState.ERROR else store._sql.list_tasks

        async def read(conn: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
            return await (await conn.execute(statement, params)).fetchall()

        rows = await store._run(read)
        limit = key_of(now + 1, 0)
        found: list[tuple[StoredTask, TaskState]] = []
        bound: StoredTask | None = None  # the last candidate, when the scan bound was reached
        for task_id, nb_s, nb_ns, is_leased, body, hit, number in rows:
            task = StoredTask(task_id, group, join_ns(nb_s, nb_ns), bytes(body), None)
            if hit:
                found.append((task, _state(task.key, limit, is_leased)))
            if number == MAX_SCAN_PER_PAGE:
                bound = task
        if len(found) > page_size:  # one more match exists: the page is full and there is a next one
            del found[page_size:]
            return TaskPage(found, page_token_for(found[-1][0].key))
        if bound is not None:  # the bound was reached: the next page goes on from there
            return TaskPage(found, page_token_for(bound.key))
        return TaskPage(found, "")

    async def get_task(self, task_id: int, now: int) -> tuple[StoredTask, TaskState]:
        """The task and its state; NotFound if it does not exist. One primary-key lookup."""
        if task_id > _MAX_ID:
            raise NotFound(f"task {task_id} does not exist")
        store = self._store

        async def read(conn: psycopg.AsyncConnection[Any]) -> tuple[Any, ...] | None:
            return await (await conn.execute(store._sql.get_task, {"id": task_id})).fetchone()

        row = await store._run(read)
        if row is None:
            raise NotFound(f"task {task_id} does not exist")
        grp, nb_s, nb_ns, body, is_leased = row
        task = StoredTask(task_id, group_from_bytes(grp), join_ns(nb_s, nb_ns), bytes(body), None)
        return task, _state(task.key, key_of(now + 1, 0), is_leased)


def _state(key: int, limit: int, leased: bool) -> TaskState:
    if key < limit:
        return TaskState.VISIBLE
    return TaskState.LEASED if leased else TaskState.SCHEDULED
