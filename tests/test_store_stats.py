"""Group statistics of the in-memory store: against a naive model under random operations, and by example."""

from __future__ import annotations

import random

import pytest
from clocks import HandClock
from google.protobuf import any_pb2
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from masstasker._pb import masstasker_pb2 as pb
from masstasker.server.convert import body_of
from masstasker.server.stats import HistoryRequest, TaskState
from masstasker.server.stores.memory.admin import MemoryAdminView
from masstasker.server.stores.memory.stats import FORGET_IDLE_SECONDS, body_has_error
from masstasker.server.stores.memory.store import (
    BadRequest,
    GroupRef,
    IdRef,
    LabelRef,
    NotFound,
    PreconditionFailed,
    Ref,
    Store,
    TaskSpec,
)

S = 1_000_000_000
NOW = 1_700_000_000 * S

GROUPS = ["", "a", "b"]
LABELS = [None, (("k", "1"),), (("k", "2"),), (("k", "1"), ("l", "2"))]


def body(error: str = "", payload: bytes = b"", labels: tuple[tuple[str, str], ...] | None = None) -> bytes:
    """A stored body as the converter makes it: a Task without id, group and not_before."""
    task = pb.Task(error=error, labels=dict(labels or ()))
    if payload:
        task.data.CopyFrom(any_pb2.Any(type_url="t/x", value=payload))
    return task.SerializeToString()


# -- the model: a dict of tasks, every figure computed by a scan ------------------------------


class Task:
    __slots__ = ("error", "group", "labels", "leased", "not_before")

    def __init__(self, group: str, not_before: int, error: bool, labels: object, leased: bool) -> None:
        self.group, self.not_before, self.error, self.labels, self.leased = group, not_before, error, labels, leased


class Model:
    """Counts by the rules in store_stats' docstring, written the obvious (slow) way."""

    def __init__(self) -> None:
        self.tasks: dict[int, Task] = {}
        self.next_id = 1
        self.counters: dict[str, list[int]] = {}  # created, owned, departed

    def count(self, group: str, which: int, n: int = 1) -> None:
        self.counters.setdefault(group, [0, 0, 0])[which] += n

    def select(self, ref: Ref) -> list[int]:
        if isinstance(ref, IdRef):
            if ref.id not in self.tasks:
                raise NotFound
            return [ref.id]
        if isinstance(ref, GroupRef):
            return [i for _, i in sorted((t.not_before, i) for i, t in self.tasks.items() if t.group == ref.group)]
        if not ref.labels:
            raise BadRequest
        found = [i for i, t in self.tasks.items() if all(p in (t.labels or ()) for p in ref.labels)]  # type: ignore[operator]
        return sorted(found)

    def apply(self, doomed: list[int], created: list[Task], now: int, bulk: bool) -> list[int]:
        olds = [self.tasks.pop(i) for i in doomed]
        ids = []
        for task in created:
            self.tasks[self.next_id] = task
            ids.append(self.next_id)
            self.next_id += 1
        if bulk:  # created[i] is olds[i] rewritten
            for old, new in zip(olds, created, strict=True):
                if old.group != new.group:
                    self.count(old.group, 2)
                    self.count(new.group, 0)
                new.leased = old.leased and old.group == new.group and old.not_before == new.not_before
            return ids
        for group in {t.group for t in olds} | {t.group for t in created}:
            gone = [t for t in olds if t.group == group]
            came = [t for t in created if t.group == group]
            pairs = min(len(gone), len(came))
            self.count(group, 0, len(came) - pairs)
            self.count(group, 2, len(gone) - pairs)
            for old, new in zip(gone, came, strict=False):
                new.leased = old.leased and new.not_before > now
        return ids

    def update(self, specs: list[TaskSpec], refs: list[Ref], preds: list[int], now: int) -> list[int]:
        if any(p not in self.tasks for p in preds):
            raise PreconditionFailed
        doomed = list(dict.fromkeys(i for ref in refs for i in self.select(ref)))
        created = [
            Task(s.group, now if s.not_before is None else s.not_before, s.error, s.labels, False) for s in specs
        ]
        return self.apply(doomed, created, now, bulk=False)

    def query(self, group: str, now: int, own_for: int, max_tasks: int) -> list[int]:
        order = sorted((t.not_before, i) for i, t in self.tasks.items() if t.group == group and t.not_before <= now)
        picked = [i for _, i in order[: max(max_tasks, 1)]]
        if own_for <= 0:
            return picked
        out = []
        for i in picked:
            old = self.tasks.pop(i)
            self.tasks[self.next_id] = Task(group, now + own_for, old.error, old.labels, True)
            out.append(self.next_id)
            self.next_id += 1
        self.count(group, 1, len(out))
        return out

    def state(self, task: Task, now: int) -> TaskState:
        if task.not_before <= now:
            return TaskState.VISIBLE
        return TaskState.LEASED if task.leased else TaskState.SCHEDULED

    def listing(self, group: str, now: int, state: TaskState, labels: object) -> list[tuple[int, TaskState]]:
        out = []
        for _, i in sorted((t.not_before, i) for i, t in self.tasks.items() if t.group == group):
            task = self.tasks[i]
            if labels and not all(p in (task.labels or ()) for p in labels):  # type: ignore[attr-defined]
                continue
            actual = self.state(task, now)
            if state is TaskState.ERROR and not task.error:
                continue
            if state not in (TaskState.ANY, TaskState.ERROR, actual):
                continue
            out.append((i, actual))
        return out


class StatsAgainstModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = HandClock(NOW)
        self.store = Store(self.clock)
        self.view = MemoryAdminView(self.store)
        self.model = Model()

    def ref(self, data: st.DataObject) -> Ref:
        return data.draw(
            st.one_of(
                st.integers(1, max(self.model.next_id, 2)).map(IdRef),
                st.sampled_from(GROUPS).map(GroupRef),
                st.sampled_from(LABELS[1:]).map(LabelRef),
            )
        )

    def spec(self, data: st.DataObject) -> TaskSpec:
        error = data.draw(st.sampled_from(["", "", "boom"]))
        labels = data.draw(st.sampled_from(LABELS))
        payload = data.draw(st.sampled_from([b"", b"2", b"\x32\x05"]))
        offset = data.draw(st.none() | st.sampled_from([-S, 0, S // 2, 3 * S]))
        not_before = None if offset is None else self.clock.now + offset
        return TaskSpec(
            data.draw(st.sampled_from(GROUPS)), not_before, body(error, payload, labels), labels, bool(error)
        )

    def both(self, store_call, model_call):  # type: ignore[no-untyped-def]
        try:
            expected = model_call()
        except (NotFound, PreconditionFailed, BadRequest) as exc:
            with pytest.raises(type(exc)):
                store_call()
            return
        assert store_call() == expected

    @rule(data=st.data(), n=st.integers(0, 3), n_del=st.integers(0, 2), n_pred=st.integers(0, 1))
    def update(self, data: st.DataObject, n: int, n_del: int, n_pred: int) -> None:
        specs = [self.spec(data) for _ in range(n)]
        refs = [self.ref(data) for _ in range(n_del)]
        preds = [data.draw(st.integers(1, self.model.next_id)) for _ in range(n_pred)]
        now = self.clock.now
        self.both(lambda: self.store.update(specs, refs, preds), lambda: self.model.update(specs, refs, preds, now))

    @precondition(lambda self: self.model.tasks)
    @rule(data=st.data(), own_for=st.sampled_from([1, 5]))
    def renew_or_disown(self, data: st.DataObject, own_for: int) -> None:
        """What the client's heartbeat (Reown) and Disown send: delete a task, create its copy in its group."""
        leased = sorted(i for i, t in self.model.tasks.items() if t.leased)
        task_id = data.draw(st.sampled_from(leased or sorted(self.model.tasks)))
        old = self.store.get(task_id)
        assert old is not None
        not_before = self.clock.now + own_for * S if data.draw(st.booleans()) else self.clock.now
        error = self.model.tasks[task_id].error
        spec = TaskSpec(old.group, not_before, old.body, old.labels, error)
        now = self.clock.now
        self.both(
            lambda: self.store.update([spec], [IdRef(task_id)]),
            lambda: self.model.update([spec], [IdRef(task_id)], [], now),
        )

    @rule(group=st.sampled_from(GROUPS), own_for=st.sampled_from([0, 1, 5]), max_tasks=st.integers(0, 3))
    def query(self, group: str, own_for: int, max_tasks: int) -> None:
        now = self.clock.now
        got = [t.id for t in self.store.query(group, now, own_for * S, max_tasks)]
        assert got == self.model.query(group, now, own_for * S, max_tasks)

    @precondition(lambda self: self.model.tasks)
    @rule(
        data=st.data(),
        group=st.none() | st.sampled_from(["a", "b"]),
        offset=st.none() | st.sampled_from([-S, 0, 3 * S]),
        set_error=st.booleans(),
    )
    def bulk_set(self, data: st.DataObject, group: str | None, offset: int | None, set_error: bool) -> None:
        leased = sorted(i for i, t in self.model.tasks.items() if t.leased)
        ref = IdRef(data.draw(st.sampled_from(leased))) if leased and data.draw(st.booleans()) else self.ref(data)
        not_before = None if offset is None else self.clock.now + offset

        def patch(old: bytes) -> bytes:  # as the servicer's BulkSet does: attempts stay the body's first field
            task = pb.Task.FromString(old)
            task.error = "set by bulk"
            return body_of(task)

        def model() -> int:
            doomed = list(dict.fromkeys(self.model.select(ref)))
            created = []
            for i in doomed:
                t = self.model.tasks[i]
                created.append(
                    Task(
                        t.group if group is None else group,
                        t.not_before if not_before is None else not_before,
                        t.error or set_error,
                        t.labels,
                        False,
                    )
                )
            self.model.apply(doomed, created, self.clock.now, bulk=True)
            return len(doomed)

        self.both(
            lambda: self.store.bulk_set(
                [ref],
                group=group,
                not_before=not_before,
                body_patch=patch if set_error else None,
            ),
            model,
        )

    @rule(step=st.sampled_from([-S // 2, 1, S // 3, S, 2 * S]))
    def tick(self, step: int) -> None:
        self.clock.now += step

    @rule(
        group=st.sampled_from(GROUPS),
        state=st.sampled_from(list(TaskState)),
        labels=st.sampled_from(LABELS),
        page_size=st.integers(1, 3),
    )
    def list_tasks(self, group: str, state: TaskState, labels: object, page_size: int) -> None:
        now = self.clock.now
        listed: list[tuple[int, TaskState]] = []
        token = ""
        for _ in range(100):
            page = self.view.page(group, now, state=state, labels=labels, page_token=token, page_size=page_size)  # type: ignore[arg-type]
            assert len(page.tasks) <= page_size
            listed += [(task.id, task_state) for task, task_state in page.tasks]
            token = page.next_token
            if not token:
                break
        assert listed == self.model.listing(group, now, state, labels)
        for task_id, task_state in listed:
            assert self.view.task(task_id, now)[1] is task_state

    @invariant()
    def agrees(self) -> None:
        self.store._check()
        now = self.clock.now
        seen = {s.group: s for s in self.view.all_stats(now)}
        for group in set(GROUPS) | set(seen):
            tasks = [t for t in self.model.tasks.values() if t.group == group]
            stats = self.view.stats(group, now)
            if group in seen:
                assert seen[group] == stats
            visible = [t.not_before for t in tasks if t.not_before <= now]
            leased = [t for t in tasks if t.leased and t.not_before > now]
            expected = (
                len(tasks),
                len(visible),
                len(leased),
                len(tasks) - len(visible) - len(leased),
                sum(t.error for t in tasks),
                now - min(visible) if visible else None,
                *self.model.counters.get(group, [0, 0, 0]),
            )
            actual = (
                stats.total,
                stats.visible,
                stats.leased,
                stats.scheduled,
                stats.errors,
                stats.oldest_visible_age,
                stats.created,
                stats.owned,
                stats.departed,
            )
            assert actual == expected, group


TestStatsAgainstModel = StatsAgainstModel.TestCase
TestStatsAgainstModel.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)


@given(
    error=st.text(max_size=3),
    payload=st.binary(max_size=40),
    labels=st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=3),
    unknown=st.binary(max_size=8),
)
def test_body_has_error_agrees_with_protobuf(
    error: str, payload: bytes, labels: dict[str, str], unknown: bytes
) -> None:
    task = pb.Task(error=error, labels=labels)
    if payload:
        task.data.CopyFrom(any_pb2.Any(type_url="x", value=payload))
    # An unknown field from a newer peer (field 7, length-delimited) must not confuse the walk.
    data = task.SerializeToString() + b"\x3a" + bytes([len(unknown)]) + unknown
    assert body_has_error(data) == bool(pb.Task.FromString(data).error)


# -- by example ----------------------------------------------------------------------------------------


@pytest.fixture
def clock() -> HandClock:
    return HandClock(NOW)


@pytest.fixture
def store(clock: HandClock) -> Store:
    return Store(clock)


def counters(store: Store, group: str) -> tuple[int, int, int]:
    record = store.stats.groups[group]
    return record.created, record.owned, record.departed


def test_a_lease_cycle_counts_one_creation_one_owning_one_departure(store: Store, clock: HandClock) -> None:
    store.update([TaskSpec("g", None)])
    [leased] = store.query("g", clock.now, own_for=60 * S)
    view = MemoryAdminView(store)
    assert (view.stats("g", clock.now).leased, view.stats("g", clock.now).scheduled) == (1, 0)
    # Heartbeat renewals (delete + copy in the same group, later not_before) keep the lease and count nothing.
    [renewed] = store.update([TaskSpec("g", clock.now + 90 * S, leased.body)], [IdRef(leased.id)])
    assert counters(store, "g") == (1, 1, 0)
    assert view.task(renewed, clock.now)[1] is TaskState.LEASED
    store.update([], [IdRef(renewed)])
    assert counters(store, "g") == (1, 1, 1)
    store._check()


def test_moving_counts_a_departure_and_a_creation_and_a_disown_makes_the_task_visible(
    store: Store, clock: HandClock
) -> None:
    store.update([TaskSpec("g", None), TaskSpec("g", None)])
    [a, _] = store.query("g", clock.now, own_for=60 * S, max_tasks=2)
    store.update([TaskSpec("errors", None, body("failed"), None, True)], [IdRef(a.id)])
    assert counters(store, "g") == (2, 2, 1)
    assert counters(store, "errors") == (1, 0, 0)
    view = MemoryAdminView(store)
    assert view.stats("errors", clock.now).errors == 1
    [b] = [t for t in store.group_tasks("g")]
    [disowned] = store.update([TaskSpec("g", clock.now, b.body)], [IdRef(b.id)])
    stats = view.stats("g", clock.now)
    assert (stats.visible, stats.leased, stats.scheduled) == (1, 0, 0)
    assert view.task(disowned, clock.now)[1] is TaskState.VISIBLE
    # A retry with back-off (a copy scheduled for later by an Update of a task no Query owns) is scheduled.
    [later] = store.update([TaskSpec("g", clock.now + 10 * S, b.body)], [IdRef(disowned)])
    assert view.task(later, clock.now)[1] is TaskState.SCHEDULED
    store._check()


def test_bulk_set_keeps_a_lease_only_when_it_keeps_group_and_not_before(store: Store, clock: HandClock) -> None:
    store.update([TaskSpec("g", None) for _ in range(3)])
    a, b, c = store.query("g", clock.now, own_for=60 * S, max_tasks=3)
    view = MemoryAdminView(store)

    def set_error(old: bytes) -> bytes:
        return body("noted")

    store.bulk_set([IdRef(a.id)], body_patch=set_error)  # same group and not_before: still leased
    store.bulk_set([IdRef(b.id)], not_before=clock.now + 120 * S)  # postponed by an operator: scheduled
    store.bulk_set([IdRef(c.id)], group="other")  # moved: a departure, scheduled there
    stats = view.stats("g", clock.now)
    assert (stats.leased, stats.scheduled, stats.errors, stats.departed) == (1, 1, 1, 1)
    assert (view.stats("other", clock.now).scheduled, view.stats("other", clock.now).created) == (1, 1)
    store._check()


def test_an_expired_lease_counts_as_visible_not_leased(store: Store, clock: HandClock) -> None:
    store.update([TaskSpec("g", None)])
    store.query("g", clock.now, own_for=5 * S)
    view = MemoryAdminView(store)
    assert view.stats("g", clock.now).leased == 1
    clock.now += 5 * S
    stats = view.stats("g", clock.now)
    assert (stats.visible, stats.leased, stats.oldest_visible_age) == (1, 0, 0)
    clock.now += 2 * S
    assert view.stats("g", clock.now).oldest_visible_age == 2 * S


def test_history_has_one_point_per_second_and_coarser_points_beyond(store: Store, clock: HandClock) -> None:
    view = MemoryAdminView(store)
    clock.now = (clock.now // (60 * S) + 1) * 60 * S  # on a minute boundary
    start = clock.now
    for second in range(130):
        store.update([TaskSpec("g", None) for _ in range(second % 3)])
        clock.now += S
    stats = view.stats("g", clock.now, HistoryRequest(span=10))
    assert [p.time_ns for p in stats.history] == [clock.now - (9 - i) * S for i in range(10)]
    expected_created = [sum(s % 3 for s in range(130 - 10 + i + 1)) for i in range(10)]
    assert [p.created for p in stats.history] == expected_created
    assert [p.total for p in stats.history] == expected_created
    every_5 = view.stats("g", clock.now, HistoryRequest(span=20, step=5)).history
    assert [p.created for p in every_5] == [sum(s % 3 for s in range(130 - 15 + 5 * i)) for i in range(4)]
    assert [p.time_ns for p in every_5] == [clock.now - (15 - 5 * i) * S for i in range(4)]
    minutes = view.stats("g", clock.now, HistoryRequest(span=3600, step=60)).history
    # Ends of minutes since the first second recorded, then the newest second.
    assert [p.time_ns for p in minutes] == [start + 60 * S, start + 120 * S, clock.now]
    assert [p.created for p in minutes] == [sum(s % 3 for s in range(n)) for n in (60, 120, 130)]


def test_empty_groups_are_forgotten_after_a_day_idle(store: Store, clock: HandClock) -> None:
    view = MemoryAdminView(store)
    [task_id] = store.update([TaskSpec("gone", None)])
    store.update([], [IdRef(task_id)])
    store.update([TaskSpec("kept", None)])
    clock.now += 3600 * S
    assert [s.group for s in view.all_stats(clock.now)] == ["gone", "kept"]
    clock.now += FORGET_IDLE_SECONDS * S
    view.all_stats(clock.now)
    clock.now += 120 * S
    assert [s.group for s in view.all_stats(clock.now)] == ["kept"]
    assert view.stats("gone", clock.now).departed == 0


@pytest.mark.parametrize(("size", "rate", "offset"), [(10_000, 100.0, 0.0), (6_000, 37.0, 0.43), (2_000, 2.5, 0.9)])
def test_eta_is_within_15_percent_once_a_tenth_has_departed_at_a_steady_rate(
    store: Store, clock: HandClock, size: int, rate: float, offset: float
) -> None:
    """A simulated drain on a fake clock: workers lease and delete at a steady rate after an idle hour."""
    view = MemoryAdminView(store)
    store.update([TaskSpec("g", clock.now) for _ in range(size)])
    clock.now += 3600 * S + int(offset * S)  # idle, then the drain starts part-way through a second
    start = clock.now
    rng = random.Random(7)
    departed = 0
    checked = 0
    while departed < size * 0.6:
        # Steady on average, jittered per task (+-20 %), as real workers are.
        clock.now += int(S / rate * rng.uniform(0.8, 1.2))
        [task] = store.query("g", clock.now, own_for=30 * S)
        store.update([], [IdRef(task.id)])
        departed += 1
        if departed >= size * 0.1 and departed % max(size // 50, 1) == 0:
            stats = view.stats("g", clock.now)
            true_remaining = (size - departed) / rate
            assert stats.eta is not None
            assert abs(stats.eta / S - true_remaining) <= 0.15 * true_remaining, (departed, stats.eta / S)
            checked += 1
    assert checked >= 5
    assert clock.now - start > 0


def test_eta_is_zero_for_an_empty_group_and_unknown_without_departures(store: Store, clock: HandClock) -> None:
    view = MemoryAdminView(store)
    assert view.stats("nothing", clock.now).eta == 0
    store.update([TaskSpec("g", None)])
    clock.now += 5 * S
    assert view.stats("g", clock.now).eta is None


# -- the counter history on its own, against sums over every increment ----------------------------------------------


@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from([0, 1, 1, 2, 59, 61, 3599, 3600, 3601, 86_399, 90_000]),  # seconds to the next close
            st.integers(0, 3),
            st.integers(0, 3),
            st.integers(0, 3),
        ),
        min_size=1,
        max_size=40,
    ),
    span=st.sampled_from([1, 7, 60, 600, 3600, 7200, 86_400]),
    step=st.sampled_from([1, 5, 60, 300]),
    trim=st.booleans(),
)
@settings(deadline=None)
def test_counter_history_points_are_sums_of_what_was_recorded(
    steps: list[tuple[int, int, int, int]], span: int, step: int, trim: bool
) -> None:
    from masstasker.server.counters import MINUTES_KEPT, SECONDS_KEPT, CounterHistory

    history = CounterHistory()
    second = 1_700_000_000
    counters = [0, 0, 0]
    recorded: dict[int, list[int]] = {}  # second -> increments
    first = second
    for gap, c, o, d in steps:
        second += gap
        counters = [counters[0] + c, counters[1] + o, counters[2] + d]
        history.close(second, (counters[0], counters[1], counters[2]))
        if c or o or d:
            slot = recorded.setdefault(second, [0, 0, 0])
            slot[0], slot[1], slot[2] = slot[0] + c, slot[1] + o, slot[2] + d
        if trim:
            history.trim(second)
    if not recorded:
        assert history.points(second, span, step, 0) == []
        return
    first = min(recorded)
    last = max(recorded)
    upto = second + 5

    def at_end_of(moment: int) -> tuple[int, int, int]:
        sums = [sum(v[i] for s, v in recorded.items() if s <= moment) for i in range(3)]
        return sums[0], sums[1], sums[2]

    points = history.points(upto, span, step, base=100)
    if span <= SECONDS_KEPT and step < 60:
        oldest = max(upto - span + 1, first, last - SECONDS_KEPT + 1)
        ends = list(range(upto, oldest - 1, -step))[::-1]
        expected = [(end + 1) * 10**9 for end in ends]
        values = [at_end_of(end) for end in ends]
    else:
        minutes = -(-step // 60)
        oldest = max((upto - span + 1) // 60, first // 60, last // 60 - MINUTES_KEPT + 1)
        ends = list(range(upto // 60 - 1, oldest - 1, -minutes))[::-1]
        expected = [(end + 1) * 60 * 10**9 for end in ends] + [(upto + 1) * 10**9]
        values = [at_end_of((end + 1) * 60 - 1) for end in ends] + [at_end_of(upto)]
    assert [p.time_ns for p in points] == expected
    assert [(p.created, p.owned, p.departed) for p in points] == values
    assert [p.total for p in points] == [max(100 + c - d, 0) for c, _, d in values]
    assert history.memory() <= 4 * 3 * (SECONDS_KEPT + MINUTES_KEPT)
