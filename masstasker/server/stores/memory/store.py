"""The in-memory task store: tasks by ID, one index per group, a label index.

No I/O and no gRPC in here. The servicer turns requests into calls on
:class:`Store`, and :class:`StoreError` subclasses into status codes.

Layout (the way the Go original keeps it: one structure, private
``_commit`` (which inserts) and ``_remove`` helpers that keep every index in sync, public
operations that check everything first and only then mutate):

- ``_tasks``: ``id -> StoredTask``. IDs only grow and a task is never
  re-inserted under an old ID, so the dict's insertion order is ID order.
- ``_groups``: ``group -> SortedList`` of integer keys ``not_before_ns << 64 | id``.
  One int per entry is smaller and compares faster than a tuple, and it
  orders exactly like ``(not_before, id)`` because ``0 <= id < 2**64``.
- ``_labels``: ``(key, value) -> set of IDs``, for label selectors.
- ``stats``: per-group counters, lease and error indices and history
  (:mod:`~masstasker.server.stores.memory.stats`), told about every commit by ``_commit``.

Times are integer nanoseconds since the Unix epoch throughout.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import NamedTuple

from sortedcontainers import SortedList

from masstasker.server import body as task_body
from masstasker.server.body import attempts_of, owned_once_more, parked_body
from masstasker.server.stores.memory.stats import BULK_SET, OWN, UPDATE, StoreStatistics, body_has_error

__all__ = [
    "MAX_ID",
    "NANOS_PER_SECOND",
    "BadRequest",
    "DeadLetter",
    "GroupRef",
    "IdRef",
    "LabelRef",
    "NotFound",
    "PreconditionFailed",
    "Ref",
    "Store",
    "StoreError",
    "StoredTask",
    "TaskSpec",
    "check_dead_letter",
    "key_of",
]

NANOS_PER_SECOND = 1_000_000_000

_ID_BITS = 64
_ID_MASK = (1 << _ID_BITS) - 1
MAX_ID = _ID_MASK
#: Times (``not_before``, the clock) are integer nanoseconds since the epoch.
NANOS_PER_SECOND = 1_000_000_000


def key_of(not_before: int, task_id: int) -> int:
    """The group-index key that sorts like ``(not_before, id)``."""
    return (not_before << _ID_BITS) | task_id


class StoreError(Exception):
    """A request the store refuses; nothing was changed."""


class PreconditionFailed(StoreError):
    """A predicate ID does not exist."""


class NotFound(StoreError):
    """A referenced task does not exist, or no task is visible."""


class BadRequest(StoreError):
    """The request is malformed."""


class StoredTask:
    """One immutable task.

    ``key`` is the task's group-index key (``not_before << 64 | id``): one
    int object shared with the index stands for both, and ``id`` and
    ``not_before`` are derived from it. ``body`` is the serialized ``Task``
    message without ``id``, ``group`` and ``not_before`` (so it carries
    ``data``, ``labels``, ``error`` and ``attempts``): the store never looks
    inside the payload, and bytes are compact. Owning raises ``attempts``
    in the body itself, so counting costs no slot (see
    :mod:`masstasker.server.body` for the rule that makes it O(1)). ``labels`` duplicates the label pairs
    only for tasks that have any, so the label index can be maintained
    without parsing ``body``. Four slots keep an instance at 64 bytes.
    """

    __slots__ = ("body", "group", "key", "labels")

    def __init__(
        self, task_id: int, group: str, not_before: int, body: bytes, labels: tuple[tuple[str, str], ...] | None
    ) -> None:
        self.key = (not_before << _ID_BITS) | task_id
        self.group = group
        self.body = body
        self.labels = labels

    @property
    def id(self) -> int:
        """The task's ID."""
        return self.key & _ID_MASK

    @property
    def not_before(self) -> int:
        """When the task becomes visible, in ns since the epoch."""
        return self.key >> _ID_BITS

    def __repr__(self) -> str:
        return f"StoredTask(id={self.id}, group={self.group!r}, not_before={self.not_before})"


class DeadLetter(NamedTuple):
    """Where an owning Query parks a task it already handed out ``max_attempts`` times (``max_attempts`` > 0)."""

    max_attempts: int
    group: str


class TaskSpec(NamedTuple):
    """A task to create: the store assigns the ID.

    ``not_before`` None means "the store's now". ``labels`` and ``body`` as in
    :class:`StoredTask`. ``error`` says whether ``body`` has a non-empty
    ``error`` (the converter knows; the store never parses bodies on the
    request path). A named tuple: the server makes one per created task, and
    a tuple is the cheapest object to build.
    """

    group: str
    not_before: int | None
    body: bytes = b""
    labels: tuple[tuple[str, str], ...] | None = None
    error: bool = False


@dataclass(frozen=True, slots=True)
class IdRef:
    """Selects one task by ID; a missing ID is an error."""

    id: int


@dataclass(frozen=True, slots=True)
class GroupRef:
    """Selects every task of a group (possibly none)."""

    group: str


@dataclass(frozen=True, slots=True)
class LabelRef:
    """Selects every task carrying all the given label pairs: at least one (the request's conversion checks)."""

    labels: tuple[tuple[str, str], ...]


Ref = IdRef | GroupRef | LabelRef

# Builds a TaskSpec straight from its fields, half the cost of NamedTuple's generated __new__: an
# owning Query makes one per task it owns.
_new_spec = tuple.__new__

#: Called after every committed change with the IDs removed and the tasks
#: added (durability and wake-ups hang off this).
ChangeListener = Callable[[list[int], list[StoredTask]], None]


class Store:
    """Tasks in groups; every public operation is atomic and all-or-nothing.

    ``clock`` returns the current time in nanoseconds; it is read only when a
    caller does not pass ``now`` and for default ``not_before`` values.
    """

    def __init__(self, clock: Callable[[], int], *, next_id: int = 1) -> None:
        self._clock = clock
        self._next_id = next_id
        self._tasks: dict[int, StoredTask] = {}
        self._groups: dict[str, SortedList] = {}
        self._labels: dict[tuple[str, str], set[int]] = {}
        self.listeners: list[ChangeListener] = []
        #: Group statistics, kept by every commit.
        self.stats = StoreStatistics(clock)

    # -- reading ---------------------------------------------------------

    @property
    def next_id(self) -> int:
        """The ID the next created task will get."""
        return self._next_id

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._tasks

    def get(self, task_id: int) -> StoredTask | None:
        """The task with this ID, or None. O(1)."""
        return self._tasks.get(task_id)

    def group_size(self, group: str) -> int:
        """How many tasks the group holds. O(1)."""
        index = self._groups.get(group)
        return len(index) if index is not None else 0

    def visible_count(self, group: str, now: int) -> int:
        """How many tasks of the group have ``not_before <= now``. O(log n)."""
        index = self._groups.get(group)
        if not index:
            return 0
        return int(index.bisect_left(key_of(now + 1, 0)))

    def task_at(self, group: str, position: int) -> StoredTask:
        """The task at this position of the group's ``(not_before, id)`` order. O(log n)."""
        return self._tasks[self._groups[group][position] & _ID_MASK]

    def group_index(self, group: str) -> SortedList | None:
        """The group's index keys in ``(not_before, id)`` order (read only), or None for an empty group."""
        return self._groups.get(group)

    def label_ids(self, pair: tuple[str, str]) -> set[int] | frozenset[int]:
        """The IDs of the tasks carrying this label pair (read only). O(1)."""
        return self._labels.get(pair) or frozenset()

    def groups(self) -> Iterator[tuple[str, int]]:
        """Every non-empty group with its size."""
        for name, index in self._groups.items():
            yield name, len(index)

    def group_tasks(self, group: str, limit: int = 0) -> list[StoredTask]:
        """A group's tasks in ``(not_before, id)`` order, at most ``limit`` (0: all)."""
        index = self._groups.get(group)
        if not index:
            return []
        keys = index if not limit else islice(index, limit)
        tasks = self._tasks
        return [tasks[k & _ID_MASK] for k in keys]

    def all_tasks(self, limit: int = 0) -> list[StoredTask]:
        """Every task in ID order, at most ``limit`` (0: all)."""
        values = self._tasks.values()
        return list(values if not limit else islice(values, limit))

    # -- the operations ------------------------------------------------------

    def update(
        self, created: Iterable[TaskSpec], deleted: Iterable[Ref] = (), predicates: Iterable[int] = ()
    ) -> list[int]:
        """Check predicates, resolve deletions, then delete and create atomically.

        Returns the new IDs in request order. Raises
        :class:`PreconditionFailed` for a missing predicate (checked first),
        :class:`NotFound` for a missing ID ref. Cost: O(log n) per task touched, plus the size of
        any group or label set a ref selects.
        """
        tasks = self._tasks
        for pred in predicates:
            if pred not in tasks:
                raise PreconditionFailed(f"predicate task {pred} does not exist")
        doomed = self._resolve(deleted)
        created = list(created)
        self._check_ids(len(created))
        return self._commit(doomed, created)

    def bulk_set(
        self,
        refs: Iterable[Ref],
        *,
        group: str | None = None,
        not_before: int | None = None,
        body_patch: Callable[[bytes], bytes] | None = None,
        labels: tuple[tuple[str, str], ...] | None = None,
    ) -> int:
        """Replace every selected task by a copy with the given fields overwritten.

        ``body_patch`` rewrites the serialized body (data, labels, error) and
        ``labels`` is then the copy's label pairs; None keeps the old ones.
        Returns how many tasks were rewritten. Cost as :meth:`update`.
        """
        doomed = self._resolve(refs)
        self._check_ids(len(doomed))
        specs = []
        is_error = self.stats.is_error
        for task_id in doomed:
            old = self._tasks[task_id]
            body = old.body if body_patch is None else body_patch(old.body)
            specs.append(
                TaskSpec(
                    group=old.group if group is None else group,
                    not_before=old.not_before if not_before is None else not_before,
                    body=body,
                    labels=old.labels if labels is None else (labels or None),
                    # A patched body is read once here (BulkSet is rare); otherwise the error index says.
                    error=is_error(old.group, old.key) if body_patch is None else body_has_error(body),
                )
            )
        self._commit(doomed, specs, BULK_SET)
        return len(doomed)

    def query(
        self,
        group: str,
        now: int,
        own_for: int = 0,
        max_tasks: int = 1,
        dead_letter: DeadLetter | None = None,
    ) -> list[StoredTask]:
        """Up to ``max_tasks`` visible tasks from the head of the group.

        With ``own_for > 0`` each is atomically replaced by a copy with a new
        ID, ``not_before = now + own_for`` and ``attempts`` one higher, and
        the copies are returned. With a ``dead_letter`` as well, a task
        already owned ``dead_letter.max_attempts`` times is not returned: in
        the same step it is moved to ``dead_letter.group`` (visible at
        ``now``, ``error`` saying why) and the next visible task is taken
        instead; these do not count toward ``max_tasks``. A peek (``own_for`` 0) changes nothing.
        An empty list means nothing (else) is visible. Cost: O(log n) per
        task returned or moved.
        """
        if dead_letter is not None:
            check_dead_letter(dead_letter, group)
        index = self._groups.get(group)
        if not index:
            return []
        limit = key_of(now + 1, 0)
        wanted = max(max_tasks, 1)
        tasks = self._tasks
        if own_for <= 0 or dead_letter is None:
            keys = []
            for key in islice(index, wanted):
                if key >= limit:
                    break
                keys.append(key)
            if not keys:
                return []
            if own_for <= 0:
                return [tasks[k & _ID_MASK] for k in keys]
            self._check_ids(len(keys))
            until = now + own_for
            doomed = [k & _ID_MASK for k in keys]
            once_more = owned_once_more
            # The group's error index, looked up once per Query rather than once per owned task.
            errors = self.stats.error_keys(group)
            specs: list[TaskSpec] = []
            append = specs.append
            for i, k in zip(doomed, keys, strict=True):
                task = tasks[i]
                append(_new_spec(TaskSpec, (group, until, once_more(task.body), task.labels, k in errors)))
            new_ids = self._commit(doomed, specs, OWN)
            return [tasks[i] for i in new_ids]
        return self._own_or_park(index, group, now, own_for, wanted, limit, dead_letter)

    def _own_or_park(
        self,
        index: SortedList,
        group: str,
        now: int,
        own_for: int,
        wanted: int,
        limit: int,
        dead_letter: DeadLetter,
    ) -> list[StoredTask]:
        """:meth:`query`'s owning step when a maximum applies: the head tasks, each owned or parked."""
        tasks = self._tasks
        until = now + own_for
        max_attempts, dead_letter_group = dead_letter
        is_error = self.stats.is_error
        doomed: list[int] = []
        specs: list[TaskSpec] = []
        owned: list[bool] = []
        count = 0
        # Parked tasks do not count toward `wanted`: the walk goes on past them. It parks each
        # poison task once, so its length is paid for by the tasks it removes from the group.
        for key in index:
            if key >= limit or count == wanted:
                break
            task_id = key & _ID_MASK
            task = tasks[task_id]
            doomed.append(task_id)
            attempts = attempts_of(task.body)
            if attempts < max_attempts:
                specs.append(TaskSpec(group, until, owned_once_more(task.body), task.labels, is_error(group, key)))
                owned.append(True)
                count += 1
            else:
                specs.append(TaskSpec(dead_letter_group, now, parked_body(task.body, attempts), task.labels, True))
                owned.append(False)
        if not doomed:
            return []
        self._check_ids(len(doomed))
        new_ids = self._commit(doomed, specs, OWN)
        return [tasks[i] for i, mine in zip(new_ids, owned, strict=True) if mine]

    def restore_all(self, tasks: Iterable[StoredTask], *, errors: Container[int] | None = None) -> None:
        """Insert many tasks with their own IDs (recovery), IDs in increasing order.

        Each group index is built with one sort instead of one insertion per
        task: O(n log n) overall, several times faster than inserting one by
        one. On error the tasks before the bad one are in. ``errors`` holds
        the IDs of the tasks with an error when known (a snapshot stores
        them); otherwise each body is looked at.
        """
        tasks_by_id = self._tasks
        keys: dict[str, list[int]] = {}
        error_keys: dict[str, list[int]] = {}
        next_id = self._next_id
        try:
            for task in tasks:
                task_id = task.id
                if task_id < next_id or task_id > MAX_ID:
                    raise BadRequest(f"restored task {task_id} is not above the ID counter {next_id}")
                next_id = task_id + 1
                tasks_by_id[task_id] = task
                group_keys = keys.get(task.group)
                if group_keys is None:
                    group_keys = keys[task.group] = []
                group_keys.append(task.key)
                if task.labels:
                    self._index_labels(task_id, task.labels)
                # Most bodies have no "2" byte at all (0x32 is the error's tag): skip the call.
                if task_id in errors if errors is not None else b"2" in task.body and body_has_error(task.body):
                    error_keys.setdefault(task.group, []).append(task.key)
        finally:
            self._next_id = next_id
            for group, new_keys in keys.items():
                index = self._groups.get(group)
                if index is None:
                    self._groups[group] = SortedList(new_keys)
                else:
                    index.update(new_keys)
                self.stats.restored(group, len(new_keys), error_keys.get(group, ()))

    def restore_removal(self, task_id: int) -> None:
        """Remove a task (recovery); missing IDs are an error."""
        if task_id not in self._tasks:
            raise NotFound(f"task {task_id} does not exist")
        self.stats.removed_by_recovery(self._remove(task_id))

    def set_next_id(self, next_id: int) -> None:
        """Raise the ID counter (recovery), never lower it."""
        self._next_id = max(self._next_id, next_id)

    # -- helpers: the only code that touches the indices ------------------

    def _resolve(self, refs: Iterable[Ref]) -> list[int]:
        """The distinct IDs the refs select, in first-selected order. Mutates nothing."""
        tasks = self._tasks
        selected: dict[int, None] = {}
        for ref in refs:
            if type(ref) is IdRef:
                if ref.id not in tasks:
                    raise NotFound(f"task {ref.id} does not exist")
                selected[ref.id] = None
            elif type(ref) is GroupRef:
                index = self._groups.get(ref.group)
                if index:
                    selected.update(dict.fromkeys(k & _ID_MASK for k in index))
            elif type(ref) is LabelRef:  # never empty: requests are validated where they are converted
                sets = sorted((self._labels.get(pair, set()) for pair in ref.labels), key=len)
                matches = set(sets[0]).intersection(*sets[1:])
                selected.update(dict.fromkeys(sorted(matches)))
            else:
                raise TypeError(f"not a Ref: {ref!r}")
        return list(selected)

    def _check_ids(self, count: int) -> None:
        if self._next_id + count - 1 > MAX_ID:
            raise BadRequest("task ID space exhausted")

    def _commit(self, doomed: list[int], created: list[TaskSpec], kind: int = UPDATE) -> list[int]:
        """Remove then create, after every check passed: this cannot fail. O(log n) per task.

        ``kind`` (UPDATE, OWN, BULK_SET) tells the statistics how to count the change.
        """
        remove = self._remove
        removed = [remove(task_id) for task_id in doomed]
        new_tasks: list[StoredTask] = []
        new_ids: list[int] = []
        errored: list[StoredTask] = []
        by_group: dict[str, int] = {}
        if created:
            tasks, groups, index_labels = self._tasks, self._groups, self._index_labels
            now: int | None = None
            task_id = self._next_id
            # Consecutive tasks of one group (a create of many, an owning Query) share one index lookup
            # and one count for the statistics. `is`: group names are interned, and an equal name that is
            # another object only costs one more lookup.
            run_group = ""
            index: SortedList | None = None
            run = 0
            for group, not_before, body, labels, error in created:
                if index is None or group is not run_group:
                    if run:
                        by_group[run_group] = by_group.get(run_group, 0) + run
                    index = groups.get(group)
                    if index is None:
                        index = groups[group] = SortedList()
                    run_group, run = group, 0
                if not_before is None:
                    if now is None:
                        now = self._clock()
                    not_before = now
                task = StoredTask(task_id, group, not_before, body, labels)
                tasks[task_id] = task
                index.add(task.key)
                if labels:
                    index_labels(task_id, labels)
                new_tasks.append(task)
                new_ids.append(task_id)
                if error:
                    errored.append(task)
                task_id += 1
                run += 1
            by_group[run_group] = by_group.get(run_group, 0) + run
            self._next_id = task_id
        self.stats.committed(kind, removed, new_tasks, errored, by_group)
        for listener in self.listeners:
            listener(doomed, new_tasks)
        return new_ids

    def _index_labels(self, task_id: int, labels: tuple[tuple[str, str], ...]) -> None:
        label_index = self._labels
        for pair in labels:
            ids = label_index.get(pair)
            if ids is None:
                label_index[pair] = {task_id}
            else:
                ids.add(task_id)

    def _remove(self, task_id: int) -> StoredTask:
        task = self._tasks.pop(task_id)
        index = self._groups[task.group]
        index.remove(task.key)
        if not index:
            del self._groups[task.group]
        if task.labels:
            for pair in task.labels:
                ids = self._labels[pair]
                ids.discard(task_id)
                if not ids:
                    del self._labels[pair]
        return task

    # -- invariants ----------------------------------------------------------

    def _check(self) -> None:
        """Assert every invariant; the tests call this after every operation."""
        seen = 0
        for group, index in self._groups.items():
            assert index, f"empty index kept for group {group!r}"
            index._check()
            for key in index:
                task = self._tasks[key & _ID_MASK]
                assert task.group == group, (task, group)
                assert key == task.key and key is task.key, (task, key)
            seen += len(index)
        assert seen == len(self._tasks), (seen, len(self._tasks))
        previous = 0
        expected: dict[tuple[str, str], set[int]] = {}
        for task_id, task in self._tasks.items():
            assert task.id == task_id and previous < task_id < self._next_id, (task, previous, self._next_id)
            previous = task_id
            for pair in task.labels or ():
                expected.setdefault(pair, set()).add(task_id)
        assert expected == self._labels, "label index out of sync"
        for task in self._tasks.values():
            task_body.check(task.body)

        tasks = self._tasks
        self.stats.check(self._groups, lambda key: tasks[key & _ID_MASK].body)


def check_dead_letter(dead_letter: DeadLetter, group: str) -> None:
    """BadRequest unless ``dead_letter`` has a limit and a group other than the queried ``group``."""
    if dead_letter.max_attempts <= 0 or not dead_letter.group or dead_letter.group == group:
        raise BadRequest("a dead letter needs max_attempts > 0 and a group other than the queried group")
