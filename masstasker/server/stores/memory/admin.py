"""The admin view of the in-memory store: statistics and listings from its indices, never a scan.

Everything is read from the store's incremental state: the group index
(total, visible by bisection, the head's age), the statistics
(:mod:`store_stats`: counters, lease and error indices, history). A listing
walks one index from the page token's key and stops after
:data:`MAX_SCAN_PER_PAGE` keys whatever the filter, so a page costs
O(log n + page + scan bound) even over a million tasks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Container, Iterator

from sortedcontainers import SortedList

from masstasker.server.stats import GroupStats, HistoryRequest, TaskPage, TaskState
from masstasker.server.stores.memory.stats import GroupRecord
from masstasker.server.stores.memory.store import BadRequest, NotFound, Store, StoredTask, key_of

__all__ = ["MAX_SCAN_PER_PAGE", "MemoryAdminView", "page_token_for", "parse_page_token"]

#: At most this many index entries are examined for one page of a filtered listing.
MAX_SCAN_PER_PAGE = 20_000
_ID_BITS = 64
_EMPTY = GroupRecord()


def parse_page_token(token: str) -> int | None:
    """The index key a page token stands for (None for the first page); BadRequest if malformed."""
    if not token:
        return None
    try:
        key = int(token, 16)
    except ValueError:
        key = -1
    if key < 0 or len(token) > 48:
        raise BadRequest(f"page_token {token[:60]!r} is not a token this server gave out")
    return key


class MemoryAdminView:
    """:class:`~masstasker.server.stats.AdminView` over a :class:`Store`; run on the store's event loop."""

    def __init__(self, store: Store, *, durable: Callable[[], Awaitable[None]] | None = None) -> None:
        self._store = store
        # With a data directory, an answer waits until what it reveals is durable, as every answer does.
        self._durable = durable

    async def group_stats(
        self, now: int, history: HistoryRequest | None = None, *, wait_durable: bool = True
    ) -> list[GroupStats]:
        """Every group with tasks or counters, sorted by name. O(groups x log n)."""
        result = self.all_stats(now, history)
        if self._durable is not None and wait_durable:
            await self._durable()
        return result

    async def one_group_stats(self, group: str, now: int, history: HistoryRequest | None = None) -> GroupStats:
        """One group's statistics; zeros for a group never seen. O(log n + history points)."""
        result = self.stats(group, now, history)
        if self._durable is not None:
            await self._durable()
        return result

    def all_stats(self, now: int, history: HistoryRequest | None = None) -> list[GroupStats]:
        """:meth:`group_stats`, synchronously."""
        stats = self._store.stats
        stats.sample(now)
        return [self._stats(group, record, now, history) for group, record in sorted(stats.groups.items())]

    def stats(self, group: str, now: int, history: HistoryRequest | None = None) -> GroupStats:
        """:meth:`one_group_stats`, synchronously."""
        stats = self._store.stats
        stats.sample(now)
        return self._stats(group, stats.groups.get(group, _EMPTY), now, history)

    def _stats(self, group: str, record: GroupRecord, now: int, history: HistoryRequest | None) -> GroupStats:
        store = self._store
        index = store.group_index(group)
        limit = key_of(now + 1, 0)
        total = len(index) if index else 0
        visible = int(index.bisect_left(limit)) if index else 0
        leased = record.leased
        second = store.stats.rate_second(now)
        created_rate, owning_rate, departure_rate = (r.rate(second) for r in record.history.rates)
        return GroupStats(
            group=group,
            now=now,
            total=total,
            visible=visible,
            leased=leased.after(limit) if leased else 0,
            errors=len(record.errors) if record.errors else 0,
            oldest_visible_age=now - (index[0] >> _ID_BITS) if index and visible else None,
            created=record.created,
            owned=record.owned,
            departed=record.departed,
            counters_since=store.stats.since,
            departure_rate=departure_rate,
            creation_rate=created_rate,
            owning_rate=owning_rate,
            history=record.history.points(second, history.span, history.step, record.base) if history else (),
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
        result = self.page(group, now, state=state, labels=labels, page_token=page_token, page_size=page_size)
        if self._durable is not None:
            await self._durable()
        return result

    def page(
        self,
        group: str,
        now: int,
        *,
        state: TaskState,
        labels: tuple[tuple[str, str], ...] | None,
        page_token: str,
        page_size: int,
    ) -> TaskPage:
        """:meth:`list_tasks`, synchronously."""
        after = parse_page_token(page_token)
        store = self._store
        index = store.group_index(group)
        record = store.stats.groups.get(group, _EMPTY)
        if not index:
            return TaskPage((), "")
        limit = key_of(now + 1, 0)
        leased: Container[int] = record.leased or ()
        low = -1 if after is None else after  # keys strictly above this
        high: int | None = None  # keys strictly below this
        source: SortedList = index
        # Past `limit` the group index holds leased and scheduled tasks; the lease index says which.
        want_leased: bool | None = None
        if state is TaskState.VISIBLE:
            high = limit
        elif state is TaskState.LEASED:
            low, want_leased = max(low, limit - 1), True
        elif state is TaskState.SCHEDULED:
            low, want_leased = max(low, limit - 1), False
        elif state is TaskState.ERROR:
            source = record.errors or SortedList()
        candidates = self._candidates(source, group, low, high, labels)
        tasks = store.get
        found: list[tuple[StoredTask, TaskState]] = []
        last = low
        scanned = 0
        for key in candidates:
            scanned += 1
            if scanned > MAX_SCAN_PER_PAGE:
                return TaskPage(found, page_token_for(last))
            if want_leased is not None and (key in leased) is not want_leased:
                last = key
                continue
            task = tasks(key & ((1 << _ID_BITS) - 1))
            assert task is not None
            if labels and not _has_labels(task, labels):
                last = key
                continue
            if len(found) == page_size:
                # One more match exists: the page is full and there is a next one.
                return TaskPage(found, page_token_for(found[-1][0].key))
            found.append((task, _state(key, limit, leased)))
            last = key
        return TaskPage(found, "")

    def _candidates(
        self,
        source: SortedList,
        group: str,
        low: int,
        high: int | None,
        labels: tuple[tuple[str, str], ...] | None,
    ) -> Iterator[int]:
        """Keys of ``source`` in (low, high), in order; through the label index when that is smaller."""
        if labels:
            smallest = min((self._store.label_ids(pair) for pair in labels), key=len)
            if len(smallest) <= MAX_SCAN_PER_PAGE:
                tasks = self._store.get
                keys: list[int] = []
                for task_id in smallest:
                    task = tasks(task_id)
                    if (
                        task is not None
                        and task.group == group
                        and task.key > low
                        and (high is None or task.key < high)
                    ):
                        keys.append(task.key)
                keys.sort()
                if source is not self._store.group_index(group):
                    keys = [k for k in keys if k in source]
                return iter(keys)
        return iter(source.irange(low, high, inclusive=(False, False)))

    async def get_task(self, task_id: int, now: int) -> tuple[StoredTask, TaskState]:
        """The task and its state; NotFound if it does not exist."""
        try:
            return self.task(task_id, now)
        finally:  # a NOT_FOUND reveals a delete too
            if self._durable is not None:
                await self._durable()

    def task(self, task_id: int, now: int) -> tuple[StoredTask, TaskState]:
        """:meth:`get_task`, synchronously."""
        task = self._store.get(task_id)
        if task is None:
            raise NotFound(f"task {task_id} does not exist")
        leased = self._store.stats.groups[task.group].leased or ()
        return task, _state(task.key, key_of(now + 1, 0), leased)


def page_token_for(key: int) -> str:
    """The token for the page after the task with this key."""
    return f"{key:x}"


def _has_labels(task: StoredTask, labels: tuple[tuple[str, str], ...]) -> bool:
    own = task.labels
    return own is not None and all(pair in own for pair in labels)


def _state(key: int, limit: int, leased: Container[int]) -> TaskState:
    if key < limit:
        return TaskState.VISIBLE
    return TaskState.LEASED if key in leased else TaskState.SCHEDULED
