"""What the PostgreSQL store's statistics need computed in Python: pure functions, no I/O.

A change's counters are written by its own statements (see :mod:`.statements`):
a deletion counts as departed, a creation as created, and INSERT_TASKS takes
back, per group, the pairs that are rewrites (:func:`pairs`), exactly as the
in-memory store pairs them (:mod:`masstasker.server.stores.memory.stats`).
Which created tasks carry a lease over is decided by the in-memory store's
own function (:func:`carried_leases` adapts the rows to it).

Reading: rates are the in-memory store's
:class:`~masstasker.server.counters.RateEstimator` fed with the per-second
increments of the last :data:`RATE_WINDOW_SECONDS` (:func:`rates`); history
points are a :class:`~masstasker.server.counters.CounterHistory` rebuilt from
the kept rows (:func:`rebuilt_history`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from masstasker.server.counters import RATE_IDLE_RESET_SECONDS, CounterHistory, RateEstimator
from masstasker.server.stores.base import StoredTask
from masstasker.server.stores.memory.stats import BULK_SET, UPDATE, _inherited_leases

__all__ = ["RATE_WINDOW_SECONDS", "Removed", "carried_leases", "pairs", "rates", "rebuilt_history"]

#: Rates read this many seconds of increments. The in-memory estimator starts afresh after this long
#: without increments, and increments older than this weigh under e^-5 (0.7 %) in a rate.
RATE_WINDOW_SECONDS = RATE_IDLE_RESET_SECONDS

#: A removed row as the delete statements return it: (id, grp, nb_s, nb_ns, leased, labels, ...).
Removed = Sequence[object]


def pairs(removed_groups: Iterable[bytes], created_groups: Iterable[bytes]) -> dict[bytes, int]:
    """Per group, how many created tasks rewrite a removed one: min(removed, created), where both are non-zero."""
    gone = Counter(removed_groups)
    if not gone:
        return {}
    came = Counter(created_groups)
    return {group: min(count, gone[group]) for group, count in came.items() if gone.get(group)}


def carried_leases(
    bulk_set: bool,
    removed: Sequence[tuple[str, int, int, bool]],
    created: Sequence[tuple[str, int]],
    now: int,
) -> list[bool]:
    """For each created task ``(group, not_before)``, whether it carries over the lease of the removed task
    ``(group, id, not_before, leased)`` it is paired with; ``removed`` in the order the refs selected them.

    The in-memory store's rule, by its own function: a BulkSet copy keeps the lease when it keeps the
    group and not_before; an Update's i-th creation into a group pairs with the i-th removal from it and
    keeps the lease when it is still in the future (a renewal, not a disown).
    """
    was_leased = set()
    old_tasks = []
    for group, task_id, not_before, leased in removed:
        task = StoredTask(task_id, group, not_before, b"", None)
        old_tasks.append(task)
        if leased:
            was_leased.add(task.key)
    if not was_leased:
        return [False] * len(created)
    new_tasks = [StoredTask(0, group, not_before, b"", None) for group, not_before in created]
    carried = {
        id(task) for task in _inherited_leases(BULK_SET if bulk_set else UPDATE, old_tasks, new_tasks, was_leased, now)
    }
    return [id(task) in carried for task in new_tasks]


def rates(
    seconds: Sequence[int] | None,
    increments: Sequence[Sequence[int] | None],
    upto: int,
) -> tuple[float, float, float]:
    """(creation, owning, departure) rates as of the end of second ``upto``.

    ``seconds`` (ascending) and the three ``increments`` sequences (created, owned, departed per second)
    are the last :data:`RATE_WINDOW_SECONDS`' increments; seconds without any are absent.
    """
    if not seconds:
        return 0.0, 0.0, 0.0
    result = []
    for values in increments:
        if not values or not any(values):  # never started: the estimator would say 0.0 too
            result.append(0.0)
            continue
        estimator = RateEstimator()
        for second, value in zip(seconds, values or (), strict=True):
            estimator.add(second, value)
        result.append(estimator.rate(upto))
    return result[0], result[1], result[2]


def rebuilt_history(
    counters: tuple[int, int, int],
    periods: Sequence[int],
    increments: Sequence[Sequence[int]],
) -> CounterHistory:
    """The group's :class:`CounterHistory` from its kept rows, oldest first.

    ``counters`` are the cumulative counters at the end of the newest row;
    a per-minute row is fed as its first second (it comes before any
    per-second row of the same minute), so both rings sum right.
    """
    history = CounterHistory()
    created, owned, departed = increments
    total = (sum(created), sum(owned), sum(departed))
    running = [counters[0] - total[0], counters[1] - total[1], counters[2] - total[2]]
    history.start((running[0], running[1], running[2]))
    for i, period in enumerate(periods):
        running[0] += created[i]
        running[1] += owned[i]
        running[2] += departed[i]
        history.close(period, (running[0], running[1], running[2]))
    return history
