"""The store on its own: fast unit tests, and random operation sequences against a simple model."""

from __future__ import annotations

import pytest
from clocks import HandClock
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from masstasker._pb import masstasker_pb2 as pb
from masstasker.server.body import dead_letter_message
from masstasker.server.stores.memory.stats import body_has_error
from masstasker.server.stores.memory.store import (
    BadRequest,
    DeadLetter,
    GroupRef,
    IdRef,
    LabelRef,
    NotFound,
    PreconditionFailed,
    Ref,
    Store,
    StoredTask,
    TaskSpec,
)

NOW = 1_000_000


def snapshot(store: Store) -> list[tuple[int, str, int, bytes, object]]:
    return [(t.id, t.group, t.not_before, t.body, t.labels) for t in store.all_tasks()] + [("next", store.next_id)]  # type: ignore[list-item]


@pytest.fixture
def store() -> Store:
    return Store(HandClock(NOW))


def spec(group: str = "g", not_before: int | None = None, body: bytes = b"", **labels: str) -> TaskSpec:
    # The error flag as the converter would set it: the statistics' error index relies on it.
    return TaskSpec(group, not_before, body, tuple(sorted(labels.items())) or None, body_has_error(body))


def test_ids_start_at_one_and_increase_in_request_order(store: Store) -> None:
    assert store.update([spec(), spec("h"), spec()]) == [1, 2, 3]
    assert store.update([spec()]) == [4]
    store.update([], [IdRef(4)])
    assert store.update([spec()]) == [5], "IDs are never reused"
    store._check()


def test_default_not_before_is_the_store_clock(store: Store) -> None:
    [task_id] = store.update([spec()])
    assert store.get(task_id).not_before == NOW  # type: ignore[union-attr]


def test_predicates_are_checked_before_deletions(store: Store) -> None:
    store.update([spec()])
    with pytest.raises(PreconditionFailed):
        store.update([], [IdRef(99)], [99])
    with pytest.raises(NotFound):
        store.update([], [IdRef(99)], [1])


def test_failed_update_changes_nothing(store: Store) -> None:
    store.update([spec(a="1"), spec("h")])
    before = snapshot(store)
    for args in (
        ([spec()], [IdRef(1), IdRef(42)], []),
        ([spec()], [GroupRef("g")], [1, 42]),
    ):
        with pytest.raises((NotFound, PreconditionFailed, BadRequest)):
            store.update(*args)  # type: ignore[arg-type]
        assert snapshot(store) == before
    store._check()


def test_refs_that_select_a_task_twice_delete_it_once(store: Store) -> None:
    store.update([spec(a="1"), spec()])
    store.update([], [IdRef(1), GroupRef("g"), LabelRef((("a", "1"),))])
    assert len(store) == 0
    store._check()


def test_label_selectors_need_every_pair(store: Store) -> None:
    store.update([spec(a="1", b="2"), spec(a="1"), spec("other", a="1", b="2", c="3")])
    store.update([], [LabelRef((("a", "1"), ("b", "2")))])
    assert [t.id for t in store.all_tasks()] == [2]
    store._check()


def test_query_peek_changes_nothing_and_own_replaces_the_head(store: Store) -> None:
    store.update([spec(not_before=NOW - 1), spec(not_before=NOW - 2)])
    [peeked] = store.query("g", NOW)
    assert peeked.id == 2
    before = snapshot(store)
    assert store.query("g", NOW)[0] is peeked
    assert snapshot(store) == before
    [owned] = store.query("g", NOW, own_for=10)
    assert (owned.id, owned.not_before) == (3, NOW + 10)
    assert store.get(2) is None
    assert store.query("g", NOW)[0].id == 1
    store._check()


def test_query_honours_not_before(store: Store) -> None:
    store.update([spec(not_before=NOW + 5)])
    assert store.query("g", NOW) == []
    assert store.query("g", NOW + 5)[0].id == 1
    assert store.visible_count("g", NOW + 4) == 0
    assert store.visible_count("g", NOW + 5) == 1


def test_query_many_takes_visible_tasks_in_order(store: Store) -> None:
    store.update([spec(not_before=NOW - i) for i in range(5)] + [spec(not_before=NOW + 1)])
    owned = store.query("g", NOW, own_for=100, max_tasks=10)
    assert [t.not_before for t in owned] == [NOW + 100] * 5
    assert [t.id for t in owned] == [7, 8, 9, 10, 11]
    assert store.query("g", NOW) == []
    store._check()


def test_owning_counts_attempts_and_a_peek_does_not(store: Store) -> None:
    store.update([spec(body=make_body(0, "x"))])
    for expected in (1, 2, 3):
        [owned] = store.query("g", NOW + expected * 100, own_for=10)
        assert owned.body == make_body(expected, "x")
    before = snapshot(store)
    store.query("g", NOW + 1000, dead_letter=DeadLetter(1, "dead"))  # a peek: nothing parked
    assert snapshot(store) == before
    store._check()


def test_a_task_owned_max_attempts_times_is_parked_and_the_next_one_owned(store: Store) -> None:
    store.update([spec(body=make_body(2, "earlier"), not_before=NOW - 2, k="v"), spec(not_before=NOW - 1)])
    owned = store.query("g", NOW, own_for=10, max_tasks=1, dead_letter=DeadLetter(2, "dead"))
    assert [(t.id, t.group, t.body) for t in owned] == [(4, "g", make_body(1, ""))]
    [parked] = store.group_tasks("dead")
    reason = dead_letter_message(2)
    assert "owned 2 times" in reason
    assert (parked.id, parked.not_before, parked.labels) == (3, NOW, (("k", "v"),))
    assert parked.body == make_body(2, f"earlier; {reason}")
    assert store.get(1) is None and store.get(2) is None
    store._check()


def test_parked_tasks_do_not_count_toward_max_tasks(store: Store) -> None:
    bodies = [make_body(a, "") for a in (3, 0, 3, 3, 1, 0)]
    store.update([spec(body=b, not_before=NOW - 10 + i) for i, b in enumerate(bodies)])
    owned = store.query("g", NOW, own_for=10, max_tasks=2, dead_letter=DeadLetter(3, "dead"))
    assert [t.body for t in owned] == [make_body(1, ""), make_body(2, "")]
    assert [t.body for t in store.group_tasks("dead")] == [make_body(3, dead_letter_message(3))] * 3
    assert [t.body for t in store.group_tasks("g")] == [make_body(0, ""), make_body(1, ""), make_body(2, "")]
    # Nothing but poison left visible: all parked, nothing returned.
    store.update([spec("h", body=make_body(5, ""), not_before=NOW), spec("h", body=make_body(3, ""))])
    assert store.query("h", NOW, own_for=10, max_tasks=5, dead_letter=DeadLetter(3, "dead")) == []
    assert store.group_size("h") == 0 and store.group_size("dead") == 5
    store._check()


def test_max_attempts_needs_another_dead_letter_group(store: Store) -> None:
    store.update([spec()])
    before = snapshot(store)
    for dead_letter in (DeadLetter(1, ""), DeadLetter(1, "g"), DeadLetter(0, "dead")):
        with pytest.raises(BadRequest):
            store.query("g", NOW, own_for=10, dead_letter=dead_letter)
    assert snapshot(store) == before


def test_bulk_set_rewrites_every_selected_task(store: Store) -> None:
    store.update([spec("err", body=make_body(0, "x"), a="1"), spec("err"), spec("keep")])
    count = store.bulk_set([GroupRef("err")], group="main", not_before=7, labels=(("z", "9"),))
    assert count == 2
    moved = store.group_tasks("main")
    assert [(t.id, t.not_before, t.labels) for t in moved] == [(4, 7, (("z", "9"),)), (5, 7, (("z", "9"),))]
    assert moved[0].body == make_body(0, "x")
    assert store.group_size("err") == 0
    with pytest.raises(NotFound):
        store.bulk_set([IdRef(1)], group="x")
    store._check()


def test_debug_orders(store: Store) -> None:
    store.update([spec(not_before=3), spec(not_before=1), spec(not_before=2)])
    assert [t.id for t in store.group_tasks("g")] == [2, 3, 1]
    assert [t.id for t in store.group_tasks("g", limit=2)] == [2, 3]
    assert [t.id for t in store.all_tasks()] == [1, 2, 3]
    assert [t.id for t in store.all_tasks(limit=1)] == [1]


def test_negative_and_extreme_times_sort_correctly(store: Store) -> None:
    far_past, far_future = -62_135_596_800 * 10**9, 253_402_300_799 * 10**9
    store.update([spec(not_before=far_future), spec(not_before=far_past), spec(not_before=0)])
    assert [t.id for t in store.group_tasks("g")] == [2, 3, 1]
    store._check()


def test_listeners_see_every_commit(store: Store) -> None:
    seen: list[tuple[list[int], list[int]]] = []
    store.listeners.append(lambda removed, created: seen.append((list(removed), [t.id for t in created])))
    store.update([spec(), spec()])
    store.query("g", NOW, own_for=1)
    store.query("g", NOW)  # a peek commits nothing
    with pytest.raises(NotFound):
        store.update([spec()], [IdRef(77)])
    assert seen == [([], [1, 2]), ([1], [3])]


# -- model-based: random operations against a deliberately naive model ----------

GROUPS = st.sampled_from(["", "a", "b"])
LABELS = st.dictionaries(st.sampled_from(["k", "l"]), st.sampled_from(["1", "2"]), max_size=2)
SELECTORS = st.dictionaries(st.sampled_from(["k", "l"]), st.sampled_from(["1", "2"]), min_size=1, max_size=2)
TIMES = st.integers(NOW - 3, NOW + 3)
ATTEMPTS = st.sampled_from([0, 0, 1, 2, 127, 128, 2**32 - 1])
ERRORS = st.sampled_from(["", "", "boom", "é"])


def make_body(attempts: int, error: str) -> bytes:
    """A valid stored body with these fields, built without the store's own helpers."""
    task = pb.Task(error=error)
    rest = task.SerializeToString()
    if not attempts:
        return rest
    return pb.Task(attempts=attempts).SerializeToString() + rest  # attempts first, as the store keeps it


class Model:
    """A list of tasks; every operation is a scan. Obviously right, slow."""

    def __init__(self) -> None:
        # id -> (group, not_before, attempts, error, labels)
        self.tasks: dict[int, tuple[str, int, int, str, dict[str, str]]] = {}
        self.next_id = 1

    def select(self, ref: Ref) -> list[int]:
        if isinstance(ref, IdRef):
            if ref.id not in self.tasks:
                raise NotFound
            return [ref.id]
        if isinstance(ref, GroupRef):  # queue order, so a BulkSet keeps the group's order
            return [i for _, i in sorted((t[1], i) for i, t in self.tasks.items() if t[0] == ref.group)]
        return [i for i, t in self.tasks.items() if all(t[4].get(k) == v for k, v in ref.labels)]

    def add(self, task: tuple[str, int, int, str, dict[str, str]]) -> int:
        self.tasks[self.next_id] = task
        self.next_id += 1
        return self.next_id - 1

    def update(
        self,
        created: list[tuple[str, int | None, int, str, dict[str, str]]],
        deleted: list[Ref],
        preds: list[int],
        now: int,
    ) -> list[int]:
        if any(p not in self.tasks for p in preds):
            raise PreconditionFailed
        doomed = dict.fromkeys(i for ref in deleted for i in self.select(ref))
        for i in doomed:
            del self.tasks[i]
        return [self.add((g, now if nb is None else nb, a, e, labels)) for g, nb, a, e, labels in created]

    def query(self, group: str, now: int, own_for: int, max_tasks: int, max_attempts: int, dead: str) -> list[int]:
        order = [i for _, i in sorted((t[1], i) for i, t in self.tasks.items() if t[0] == group and t[1] <= now)]
        if own_for <= 0:
            return order[: max(max_tasks, 1)]
        out = []
        for i in order:
            if len(out) == max(max_tasks, 1):
                break
            g, _, attempts, error, labels = self.tasks.pop(i)
            if max_attempts and attempts >= max_attempts:
                reason = dead_letter_message(attempts)
                self.add((dead, now, attempts, f"{error}; {reason}" if error else reason, labels))
            else:
                out.append(self.add((g, now + own_for, min(attempts + 1, 2**32 - 1), error, labels)))
        return out


class StoreAgainstModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = HandClock(NOW)
        self.store = Store(self.clock)
        self.model = Model()

    def ref_strategy(self) -> st.SearchStrategy[Ref]:
        ids = st.integers(1, max(self.model.next_id, 2))
        return st.one_of(
            ids.map(IdRef),
            GROUPS.map(GroupRef),
            # Never empty: the request's conversion refuses an empty selector before a store sees it.
            SELECTORS.map(lambda d: LabelRef(tuple(sorted(d.items())))),
        )

    def both(self, store_call, model_call):  # type: ignore[no-untyped-def]
        try:
            expected = model_call()
        except (NotFound, PreconditionFailed, BadRequest) as exc:
            before = snapshot(self.store)
            with pytest.raises(type(exc)):
                store_call()
            assert snapshot(self.store) == before, "a failed operation changed the store"
            return
        assert store_call() == expected

    @rule(data=st.data(), n=st.integers(0, 3), n_del=st.integers(0, 2), n_pred=st.integers(0, 2))
    def update(self, data: st.DataObject, n: int, n_del: int, n_pred: int) -> None:
        created = [
            (data.draw(GROUPS), data.draw(st.none() | TIMES), data.draw(ATTEMPTS), data.draw(ERRORS), data.draw(LABELS))
            for _ in range(n)
        ]
        specs = [
            TaskSpec(g, nb, make_body(a, e), tuple(sorted(labels.items())) or None, e != "")
            for g, nb, a, e, labels in created
        ]
        deleted = [data.draw(self.ref_strategy()) for _ in range(n_del)]
        preds = [data.draw(st.integers(1, self.model.next_id)) for _ in range(n_pred)]
        now = self.clock.now
        self.both(
            lambda: self.store.update(specs, deleted, preds),
            lambda: self.model.update(created, deleted, preds, now),
        )

    @rule(
        group=GROUPS,
        now=TIMES,
        own_for=st.sampled_from([0, 0, 1, 5]),
        max_tasks=st.integers(0, 3),
        max_attempts=st.sampled_from([0, 0, 1, 2, 3]),
        dead=st.sampled_from(["dead", "a"]),
    )
    def query(self, group: str, now: int, own_for: int, max_tasks: int, max_attempts: int, dead: str) -> None:
        dead_letter = DeadLetter(max_attempts, dead) if max_attempts else None
        if max_attempts and dead == group:
            with pytest.raises(BadRequest):
                self.store.query(group, now, own_for, max_tasks, dead_letter)
            return
        got = self.store.query(group, now, own_for, max_tasks, dead_letter)
        assert [t.id for t in got] == self.model.query(group, now, own_for, max_tasks, max_attempts, dead)

    @precondition(lambda self: self.model.tasks)
    @rule(data=st.data(), group=st.none() | st.sampled_from(["a", "b"]), not_before=st.none() | TIMES)
    def bulk_set(self, data: st.DataObject, group: str | None, not_before: int | None) -> None:
        ref = data.draw(self.ref_strategy())

        def model() -> int:
            doomed = list(dict.fromkeys(self.model.select(ref)))
            created = []
            for i in doomed:
                g, nb, a, e, labels = self.model.tasks[i]
                created.append((g if group is None else group, nb if not_before is None else not_before, a, e, labels))
            self.model.update(created, [IdRef(i) for i in doomed], [], self.clock.now)
            return len(doomed)

        self.both(lambda: self.store.bulk_set([ref], group=group, not_before=not_before), model)

    @rule(step=st.integers(-2, 2))
    def tick(self, step: int) -> None:
        self.clock.now += step

    @invariant()
    def agrees(self) -> None:
        self.store._check()
        assert {t.id: (t.group, t.not_before, t.body, dict(t.labels or ())) for t in self.store.all_tasks()} == {
            i: (g, nb, make_body(a, e), labels) for i, (g, nb, a, e, labels) in self.model.tasks.items()
        }
        assert self.store.next_id == self.model.next_id
        for group in ("", "a", "b", "dead"):
            order = sorted((t[1], i) for i, t in self.model.tasks.items() if t[0] == group)
            assert [t.id for t in self.store.group_tasks(group)] == [i for _, i in order]


TestStoreAgainstModel = StoreAgainstModel.TestCase
TestStoreAgainstModel.settings = settings(max_examples=150, stateful_step_count=25, deadline=None)


def test_stored_task_repr() -> None:
    assert "id=1" in repr(StoredTask(1, "g", 0, b"", None))
