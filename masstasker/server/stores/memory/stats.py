"""The in-memory store's group statistics, kept up to date by every commit. No I/O.

The store calls :meth:`StoreStatistics.committed` once per committed change
with the tasks it removed and created and the kind of change; nothing else
here runs on the request path. Per group (:class:`GroupRecord`) it keeps:

- ``created``, ``owned``, ``departed``: counters since ``since``. A task
  *created into* a group is new there (created, or moved in); one that
  *departed* left it (deleted, or moved out); an *owned* one was leased by
  an owning Query. A change that removes a task and puts a copy back in the
  same group (a lease renewal, a disown, a BulkSet that keeps the group) is
  a rewrite and counts as neither: per group and commit, ``min(removed,
  created)`` pairs are rewrites. So ``total == base + created - departed``
  always holds, with ``base`` only moved by recovery.
- ``leased``: the index keys of tasks an owning Query re-created, or that a
  rewrite carried a lease over to (a renewal: an Update whose copy is still
  in the future, or a BulkSet that keeps ``not_before``), in a
  :class:`~masstasker.server.stores.memory.leases.LeaseIndex` (a set, and a
  heap that counts the keys after a time). Keys at or before now are
  expired leases (those tasks are visible); only keys after now count.
  Memory only for tasks that have been leased.
- ``errors``: the keys of tasks with a non-empty ``error``; memory only for them.
- the counter history and smoothed rates (:mod:`counters`). Changes are
  attributed to the second (on the store's clock) in which they were
  committed: the first commit or read in a new second closes the previous
  one into every group's history, so no timer is needed and a fake clock
  drives it exactly.

Cost per commit: O(1) per group touched plus O(1) per removed or created
task that is (or becomes) leased, O(log n) per one in error; a plain create
or delete adds a dictionary update per group. The three commonest commits (a
lease, a completion, a create) have paths of their own in
:meth:`StoreStatistics.committed` that skip what cannot apply to them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Container, Iterable
from operator import attrgetter
from typing import TYPE_CHECKING

from sortedcontainers import SortedList

from masstasker.server.body import error_of
from masstasker.server.counters import CounterHistory
from masstasker.server.stores.memory.leases import LeaseIndex

if TYPE_CHECKING:
    from masstasker.server.stores.memory.store import StoredTask as _Task

__all__ = ["BULK_SET", "OWN", "UPDATE", "GroupRecord", "StoreStatistics", "body_has_error"]

#: Kinds of commit (also the write-ahead log's record kinds).
UPDATE = 0
OWN = 1
BULK_SET = 2

_NANOS = 1_000_000_000
_ID_BITS = 64
#: A group without tasks whose counters have not moved for this long is forgotten.
FORGET_IDLE_SECONDS = 24 * 3600
_FORGET_EVERY_SECONDS = 60
_group_of = attrgetter("group")
_key_of = attrgetter("key")


class GroupRecord:
    """One group's counters, lease and error indices, and history."""

    __slots__ = ("base", "created", "departed", "errors", "history", "leased", "owned")

    def __init__(self) -> None:
        self.base = 0  # total - created + departed
        self.created = 0
        self.owned = 0
        self.departed = 0
        self.leased: LeaseIndex | None = None
        self.errors: SortedList | None = None
        self.history = CounterHistory()

    def counters(self) -> tuple[int, int, int]:
        """``(created, owned, departed)``."""
        return self.created, self.owned, self.departed

    def is_empty(self) -> bool:
        """The group holds no task."""
        return self.base + self.created - self.departed == 0


def body_has_error(body: bytes) -> bool:
    """Whether a stored body (a serialized Task without id, group, not_before) has a non-empty ``error``.

    Used where the converter's flag is not at hand (recovery, the invariant check).
    """
    # 0x32 is the tag byte of a present error: rule most tasks out in C before walking the fields.
    return b"2" in body and error_of(body) != ""


class StoreStatistics:
    """Statistics for every group of one store; the store is the only writer."""

    def __init__(self, clock: Callable[[], int]) -> None:
        self._clock = clock
        #: group -> its record; a group with tasks always has one.
        self.groups: dict[str, GroupRecord] = {}
        #: When the counters began (ns since the epoch); kept across restarts with a data directory.
        self.since = clock()
        self._open = self.since // _NANOS  # the second the counters' pending changes belong to
        self._open_until = (self._open + 1) * _NANOS  # when it ends: one comparison per commit, no division
        self._next_forget = 0
        #: The last commit's kind and time (ns, the store's clock): the log records them.
        self.last_kind = UPDATE
        self.last_time = self.since
        self._untimed = False  # recovery replayed records without a time (an old log)

    def record(self, group: str) -> GroupRecord:
        """The group's record, made on first use."""
        record = self.groups.get(group)
        if record is None:
            record = self.groups[group] = GroupRecord()
        return record

    def error_keys(self, group: str) -> Container[int]:
        """The index keys of the group's tasks with an error (read only); ``in`` is O(log e)."""
        record = self.groups.get(group)
        errors = record.errors if record is not None else None
        return errors if errors else ()

    def is_error(self, group: str, key: int) -> bool:
        """Whether the task with this index key is in the group's error index. O(log e)."""
        record = self.groups.get(group)
        errors = record.errors if record is not None else None
        return bool(errors) and key in errors  # type: ignore[operator]

    def is_leased(self, group: str, key: int) -> bool:
        """Whether the task with this key carries a lease (expired or not). O(1)."""
        record = self.groups.get(group)
        leased = record.leased if record is not None else None
        return bool(leased) and key in leased  # type: ignore[operator]

    # -- the request path ------------------------------------------------------

    def committed(
        self,
        kind: int,
        removed: list[_Task],
        created: list[_Task],
        errored: list[_Task],
        created_by_group: dict[str, int] | None = None,
    ) -> None:
        """Account for one committed change (``created[i]`` replaces ``removed[i]`` for OWN).

        ``created_by_group``, when the caller has it, is how many of ``created`` went into each
        group (the store counts them while inserting, so a create of many tasks is not walked again).
        The three commonest commits (a lease, a completion, a create) take a path of their own;
        they count exactly as the general one does (the model test in ``tests/test_store_stats.py``).
        """
        now = self.last_time = self._clock()
        self.last_kind = kind
        if now >= self._open_until:
            self._close_open_second(now)
        groups = self.groups
        if kind == OWN and removed and not errored:
            # A lease: the head of one group replaced by copies in it. A parked poison task always
            # has an error, so without one nothing was parked; the removed tasks had no error either
            # (a copy keeps its original's), so only the lease index is touched.
            record = groups[removed[0].group]
            leased = record.leased
            if leased is None:
                leased = record.leased = LeaseIndex()
            record.owned += len(created)
            if len(removed) == 1:  # a tuple, not a list comprehension: that is a call of its own
                leased.replace((removed[0].key,), (created[0].key,))
            else:
                leased.replace([task.key for task in removed], [task.key for task in created])
            return
        if not created:  # deletions only (a worker's completion): no rewrite, no lease carried over
            if not removed:  # refs that selected nothing
                return
            group = removed[0].group
            # Interned names: one group, the common case (and one task, the commonest: no generator).
            if len(removed) == 1 or all(task.group is group for task in removed):
                self._departed(groups[group], removed)
            else:
                runs: dict[str, list[_Task]] = {}
                for task in removed:
                    runs.setdefault(task.group, []).append(task)
                for group, tasks in runs.items():
                    self._departed(groups[group], tasks)
            return
        if not removed:  # creates only
            if created_by_group is None:
                created_by_group = Counter(map(_group_of, created))
            record_of = self.record
            for group, count in created_by_group.items():
                record_of(group).created += count
        else:
            was_leased = self._unindex(removed)
            if kind == OWN:
                owned, parked_from, parked = _split_own(removed, created)
                if owned:
                    groups[owned[0].group].owned += len(owned)
                    self._add_leased(owned)
                if parked:  # poison tasks moved to a dead-letter group: departed from one, created in the other
                    self._count(UPDATE, parked_from, parked, None, now)
            else:
                carried = self._count(kind, removed, created, was_leased, now)
                if carried:
                    self._add_leased(carried)
        if errored:
            for task in errored:
                record = groups[task.group]
                if record.errors is None:
                    record.errors = SortedList()
                record.errors.add(task.key)

    @staticmethod
    def _departed(record: GroupRecord, removed: list[_Task]) -> None:
        """Tasks of the record's group deleted (or moved away) by a change that created nothing."""
        record.departed += len(removed)
        leased, errors = record.leased, record.errors
        if leased is not None or errors is not None:
            keys = (removed[0].key,) if len(removed) == 1 else [task.key for task in removed]
            if leased is not None:
                leased.replace(keys, ())
            if errors is not None:
                for key in keys:
                    errors.discard(key)
                if not errors:  # None again: a group whose errors are gone pays nothing for them
                    record.errors = None

    def _unindex(self, removed: list[_Task]) -> set[int] | None:
        """Take removed tasks out of the lease and error indices; the keys that carried a lease."""
        groups = self.groups
        was_leased: set[int] | None = None
        for task in removed:
            record = groups[task.group]
            leased, errors, key = record.leased, record.errors, task.key
            if leased and leased.discard(key):
                if was_leased is None:
                    was_leased = set()
                was_leased.add(key)
            if errors:
                errors.discard(key)
        return was_leased

    def _add_leased(self, tasks: Iterable[_Task]) -> None:
        groups = self.groups
        for task in tasks:
            record = groups[task.group]
            if record.leased is None:
                record.leased = LeaseIndex()
            record.leased.add(task.key)

    def _count(
        self,
        kind: int,
        removed: list[_Task],
        created: list[_Task],
        was_leased: set[int] | None,
        now: int,
    ) -> list[_Task]:
        """Counters for an Update or BulkSet: per group, min(removed, created) pairs are rewrites.

        Returns the created tasks that carry over a removed task's lease.
        """
        groups = self.groups
        record = self.record
        if not removed:
            if len(created) == 1:
                record(created[0].group).created += 1
            else:
                for group, count in Counter(map(_group_of, created)).items():
                    record(group).created += count
            return []
        if not created:  # deletions only (a worker's completion): nothing can be a rewrite
            for task in removed:
                groups[task.group].departed += 1
            return []
        if len(removed) == 1 and len(created) == 1:  # one task replaced: a renewal, a disown, or a move
            old, new = removed[0], created[0]
            if old.group != new.group:
                groups[old.group].departed += 1
                record(new.group).created += 1
                return []
            if (
                was_leased
                and old.key in was_leased
                and (new.not_before == old.not_before if kind == BULK_SET else new.not_before > now)
            ):
                return [new]
            return []
        gone = Counter(map(_group_of, removed))
        came = Counter(map(_group_of, created))
        for group, count in came.items():
            rewrites = min(count, gone.get(group, 0))
            record(group).created += count - rewrites
        for group, count in gone.items():
            groups[group].departed += count - min(count, came.get(group, 0))
        if was_leased and created:
            return _inherited_leases(kind, removed, created, was_leased, now)
        return []

    # -- recovery ---------------------------------------------------------------

    def replayed(
        self, kind: int, time: int | None, removed: list[_Task], created: list[_Task], leased_ids: set[int]
    ) -> None:
        """Count one log record as :meth:`committed` counted it live (recovery, in log order).

        The lease and error indices are rebuilt once at the end
        (:meth:`recovered`); meanwhile ``leased_ids`` holds the IDs that
        carry a lease, and is updated here. ``time`` None (a record of an
        old log, which has no time and no kind) counts as an Update and
        leaves the history alone.
        """
        if time is None:
            self._untimed = True
        elif time // _NANOS > self._open:
            self._close_open_second(time)
        discard = leased_ids.discard
        if kind == OWN:  # the commonest record: a lease (which may also have parked poison tasks)
            for task in removed:
                discard(task.id)
            owned, parked_from, parked = _split_own(removed, created)
            if owned:
                self.record(owned[0].group).owned += len(owned)
                leased_ids.update([task.id for task in owned])
            if parked:
                self._count(UPDATE, parked_from, parked, None, 0 if time is None else time)
            return
        if not created:  # the next commonest: a completion
            groups = self.groups
            for task in removed:
                discard(task.id)
                groups[task.group].departed += 1
            return
        was_leased = {t.key for t in removed if t.id in leased_ids}
        for task in removed:
            discard(task.id)
        for task in self._count(kind, removed, created, was_leased, 0 if time is None else time):
            leased_ids.add(task.id)

    def recovered(
        self, get: Callable[[int], _Task | None], leased_ids: Iterable[int], size: Callable[[str], int]
    ) -> None:
        """After recovery: the lease index from ``leased_ids``, and ``base`` from each group's size."""
        leases = [task for task in map(get, leased_ids) if task is not None]
        self._add_leased(sorted(leases, key=_key_of))
        for group, record in self.groups.items():
            record.base = size(group) - record.created + record.departed
            if self._untimed:
                record.history.start(record.counters())
        self._untimed = False

    def load(self, since: int, open_second: int) -> None:
        """The start of the counters and the open second, from a snapshot."""
        self.since = since
        self._open = open_second
        self._open_until = (open_second + 1) * _NANOS

    @property
    def open_second(self) -> int:
        """The second that changes not yet in the histories belong to (snapshots keep it)."""
        return self._open

    def restored(self, group: str, count: int, error_keys: Iterable[int]) -> None:
        """Tasks put back by recovery: they join ``base``, not the counters."""
        record = self.record(group)
        record.base += count
        keys = list(error_keys)
        if keys:
            if record.errors is None:
                record.errors = SortedList()
            record.errors.update(keys)

    def removed_by_recovery(self, task: _Task) -> None:
        """A task taken out by recovery: it leaves ``base``, not the counters."""
        self._unindex([task])
        self.groups[task.group].base -= 1

    # -- once a second -------------------------------------------------------------

    def sample(self, now: int) -> None:
        """Before a read at ``now``: close the open second into the histories if ``now`` is past it.

        O(groups) once per second at most; otherwise O(1).
        """
        if now // _NANOS > self._open:
            self._close_open_second(now)

    def _close_open_second(self, now: int) -> None:
        second = self._open
        for record in self.groups.values():
            record.history.close(second, (record.created, record.owned, record.departed))
        self._open = now // _NANOS
        self._open_until = (self._open + 1) * _NANOS
        if second >= self._next_forget:
            self._next_forget = second + _FORGET_EVERY_SECONDS
            horizon = second - FORGET_IDLE_SECONDS
            groups = self.groups
            stale = [g for g, r in groups.items() if r.history.idle_since(horizon) and r.is_empty()]
            for group in stale:
                del groups[group]
            for record in groups.values():
                record.history.trim(second)

    def rate_second(self, now: int) -> int:
        """The newest complete second at ``now``: rates and ETAs are read as of its end."""
        return now // _NANOS - 1

    # -- invariants -------------------------------------------------------------------

    def check(self, groups: dict[str, SortedList], body_of: Callable[[int], bytes]) -> None:
        """Recompute what can be recomputed by a scan and compare; the store's ``_check`` calls this."""
        for group in groups:
            assert group in self.groups, f"group {group!r} has tasks but no statistics"
        for group, record in self.groups.items():
            index = groups.get(group)
            keys = set(index) if index else set()
            assert len(keys) == record.base + record.created - record.departed, (
                f"group {group!r}: {len(keys)} tasks but base {record.base} + created {record.created}"
                f" - departed {record.departed}"
            )
            expected_errors = sorted(k for k in keys if body_has_error(body_of(k)))
            assert list(record.errors or ()) == expected_errors, f"group {group!r}: error index out of sync"
            for key in record.leased or ():
                assert key in keys, f"group {group!r}: leased key {key} is not a task of the group"
            if record.leased is not None:
                record.leased._check()
            if record.errors is not None:
                record.errors._check()
            assert min(record.created, record.owned, record.departed) >= 0


def _inherited_leases(
    kind: int, removed: list[_Task], created: list[_Task], was_leased: set[int], now: int
) -> list[_Task]:
    """The created tasks that carry over their partner's lease.

    A BulkSet's ``created[i]`` is ``removed[i]`` rewritten: it keeps the lease
    when it stays in the group with the same ``not_before``. An Update's
    partners are matched in order within a group (the i-th task removed
    from a group with the i-th created into it, as the client sends
    renewals), and the copy keeps the lease when it is still in the future
    (a renewal, not a disown).
    """
    if kind == BULK_SET:
        return [
            new
            for old, new in zip(removed, created, strict=True)
            if old.key in was_leased and new.group == old.group and new.not_before == old.not_before
        ]
    old_by_group: dict[str, list[_Task]] = {}
    for task in removed:
        old_by_group.setdefault(task.group, []).append(task)
    position: dict[str, int] = {}
    carried = []
    for task in created:
        olds = old_by_group.get(task.group)
        i = position.get(task.group, 0)
        if not olds or i >= len(olds):
            continue
        position[task.group] = i + 1
        if olds[i].key in was_leased and task.not_before > now:
            carried.append(task)
    return carried


def _split_own(removed: list[_Task], created: list[_Task]) -> tuple[list[_Task], list[_Task], list[_Task]]:
    """An owning Query's change: the tasks it owned, and the tasks it parked with the ones they replace.

    ``created[i]`` replaces ``removed[i]``; an owned copy stays in its group, a parked one (a poison task,
    past its maximum of attempts) goes to the dead-letter group, which is never the queried group.
    """
    if all(new.group == old.group for old, new in zip(removed, created, strict=True)):
        return created, [], []
    owned: list[_Task] = []
    parked_from: list[_Task] = []
    parked: list[_Task] = []
    for old, new in zip(removed, created, strict=True):
        if new.group == old.group:
            owned.append(new)
        else:
            parked_from.append(old)
            parked.append(new)
    return owned, parked_from, parked
