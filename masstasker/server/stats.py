"""Group statistics as the admin API and the metrics see them, whatever store keeps them.

:class:`GroupStats` is a plain value: a store computes it from its own
incremental bookkeeping (the in-memory store in :mod:`store_stats`), and
the admin servicer and the Prometheus collector only read it. :class:`AdminView`
is the small interface the admin servicer needs from a store.

How the ETA is computed (docs/api.md says the same for users):
``remaining = total`` (leased tasks included: they are in progress, not
done), ``eta = remaining / departure_rate``, where ``departure_rate`` is the
bias-corrected exponentially weighted average of departures per second
(:class:`~masstasker.server.counters.RateEstimator`, time constant one
minute). It is unknown (None) while nothing has departed lately, and zero
for an empty group.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from masstasker.server.counters import CounterPoint
from masstasker.server.stores.memory.store import StoredTask

__all__ = ["AdminView", "CounterPoint", "GroupStats", "HistoryRequest", "TaskPage", "TaskState", "eta_ns"]

_NANOS = 1_000_000_000


class TaskState(enum.IntEnum):
    """Where a task stands; the values are the admin proto's ``TaskState`` numbers."""

    ANY = 0  # as a filter only
    VISIBLE = 1
    LEASED = 2
    SCHEDULED = 3
    ERROR = 4  # as a filter only: orthogonal to the other three


@dataclass(frozen=True, slots=True)
class HistoryRequest:
    """How much counter history to attach: the last ``span`` seconds, points ``step`` seconds apart."""

    span: int
    step: int = 1


@dataclass(frozen=True, slots=True)
class GroupStats:
    """One group's statistics at one moment (``now``). Times in ns since the epoch, durations in ns."""

    group: str
    now: int
    total: int
    visible: int
    leased: int
    errors: int
    oldest_visible_age: int | None  # None: nothing visible
    created: int
    owned: int
    departed: int
    counters_since: int
    departure_rate: float  # tasks per second, smoothed
    creation_rate: float
    owning_rate: float
    history: Sequence[CounterPoint] = field(default=())

    @property
    def scheduled(self) -> int:
        """Tasks waiting for a later ``not_before`` that no Query owns."""
        return self.total - self.visible - self.leased

    @property
    def eta(self) -> int | None:
        """Nanoseconds until the group is empty at the current departure rate; None when unknown."""
        return eta_ns(self.total, self.departure_rate)


def eta_ns(remaining: int, departure_rate: float) -> int | None:
    """``remaining / departure_rate`` in nanoseconds: 0 when nothing remains, None without departures."""
    if remaining <= 0:
        return 0
    if departure_rate <= 0.0:
        return None
    return round(remaining / departure_rate * _NANOS)


@dataclass(frozen=True, slots=True)
class TaskPage:
    """One page of :meth:`AdminView.list_tasks`: tasks in queue order with their states."""

    tasks: Sequence[tuple[StoredTask, TaskState]]
    next_token: str  # empty: the listing is complete


class AdminView(Protocol):
    """What the admin servicer needs from a store. Nothing here may scan a group per call.

    ``now`` is the server's clock in ns. Errors are the store's: BadRequest
    for a malformed page token, NotFound for a missing task.
    """

    async def group_stats(
        self, now: int, history: HistoryRequest | None = None, *, wait_durable: bool = True
    ) -> list[GroupStats]:
        """Every group with tasks or with counters, sorted by name.

        ``wait_durable`` False answers at once even when changes it counts are
        not durable yet (metrics: they must work after durability is lost).
        """
        ...

    async def one_group_stats(self, group: str, now: int, history: HistoryRequest | None = None) -> GroupStats:
        """One group's statistics (all zeros for a group the store has never seen)."""
        ...

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
        """A page of the group's tasks in ``(not_before, id)`` order after ``page_token``."""
        ...

    async def get_task(self, task_id: int, now: int) -> tuple[StoredTask, TaskState]:
        """One task and its state."""
        ...
