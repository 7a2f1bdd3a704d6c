"""Group statistics against a model, under random gRPC operations, on both stores; and across a restart.

The model is computed here from what the test asked for, independently of
either store: which tasks exist, in which group, visible or leased or
scheduled, with an error or not, and the created/owned/departed counters with
the pairing rule (a task removed and one created into the same group by one
change are a rewrite, counted neither way) and the lease rule (an owning
Query leases; a renewal carries the lease over, a disown or a move does not).
The servers run on a hand-moved clock.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import pytest
from clocks import HandClock
from google.protobuf.duration_pb2 import Duration

from masstasker._pb import masstasker_admin_pb2 as apb
from masstasker._pb import masstasker_admin_pb2_grpc as apb_grpc
from masstasker._pb import masstasker_pb2 as pb
from masstasker._pb import masstasker_pb2_grpc as pb_grpc
from masstasker.server import BackgroundServer, Settings

TIMEOUT = 10.0
S = 1_000_000_000
GROUPS = ("a", "b", "c")
DEAD = "dead"
MAX_ATTEMPTS = 3


@dataclass
class Task:
    group: str
    not_before: int
    error: bool
    attempts: int = 0
    leased: bool = False


@dataclass
class Model:
    """What the statistics must say, from the operations alone."""

    tasks: dict[int, Task] = field(default_factory=dict)
    counters: dict[str, list[int]] = field(default_factory=dict)  # group -> [created, owned, departed]

    def count(self, group: str, created: int = 0, owned: int = 0, departed: int = 0) -> None:
        c = self.counters.setdefault(group, [0, 0, 0])
        c[0] += created
        c[1] += owned
        c[2] += departed

    def changed(self, removed: list[Task], created: list[Task]) -> None:
        """One Update or BulkSet: per group, min(removed, created) pairs are rewrites."""
        for group in {t.group for t in removed} | {t.group for t in created}:
            gone = sum(t.group == group for t in removed)
            came = sum(t.group == group for t in created)
            pairs = min(gone, came)
            self.count(group, created=came - pairs, departed=gone - pairs)

    def visible(self, group: str, now: int) -> list[tuple[int, int]]:
        return sorted((t.not_before, i) for i, t in self.tasks.items() if t.group == group and t.not_before <= now)

    def expected(self, now: int) -> dict[str, tuple[int, ...]]:
        result = {}
        for group, (created, owned, departed) in self.counters.items():
            mine = [t for t in self.tasks.values() if t.group == group]
            visible = [t for t in mine if t.not_before <= now]
            leased = sum(t.leased and t.not_before > now for t in mine)
            oldest = now - min(t.not_before for t in visible) if visible else -1
            result[group] = (
                len(mine),
                len(visible),
                leased,
                len(mine) - len(visible) - leased,
                sum(t.error for t in mine),
                oldest,
                created,
                owned,
                departed,
            )
        return result


def observed(stats: apb.GroupStats) -> tuple[int, ...]:
    oldest = stats.oldest_visible_age.ToNanoseconds() if stats.HasField("oldest_visible_age") else -1
    return (
        stats.total,
        stats.visible,
        stats.leased,
        stats.scheduled,
        stats.errors,
        oldest,
        stats.created,
        stats.owned,
        stats.departed,
    )


class Driver:
    """Random operations through the real gRPC API, mirrored in the model."""

    def __init__(self, server: BackgroundServer, clock: HandClock, seed: int) -> None:
        self.server = server
        self.clock = clock
        self.rng = random.Random(seed)
        self.model = Model()
        self.channel = grpc.insecure_channel(server.target)
        self.mt = pb_grpc.MassTaskerStub(self.channel)
        self.admin = apb_grpc.AdminStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def _update(self, created: list[pb.Task], deleted: list[int]) -> list[int]:
        request = pb.UpdateRequest(created=created, deleted=[pb.TaskRef(id=i) for i in deleted])
        return list(self.mt.Update(request, timeout=TIMEOUT).created_ids)

    def _pick(self, leased: bool | None = None) -> int | None:
        now = self.clock.now
        ids = sorted(
            i for i, t in self.model.tasks.items() if leased is None or (t.leased and t.not_before > now) == leased
        )
        return self.rng.choice(ids) if ids else None

    def create(self) -> None:
        rng, now = self.rng, self.clock.now
        specs = []
        for _ in range(rng.randint(1, 5)):
            group = rng.choice(GROUPS)
            later = rng.random() < 0.2
            not_before = now + rng.randint(1, 30) * S if later else now - rng.randint(0, 5) * S
            error = rng.random() < 0.25
            specs.append(Task(group, not_before, error))
        messages = [
            pb.Task(group=t.group, not_before={"seconds": t.not_before // S}, error="boom" if t.error else "")
            for t in specs
        ]
        for t in specs:
            t.not_before = t.not_before // S * S
        ids = self._update(messages, [])
        for task_id, task in zip(ids, specs, strict=True):
            self.model.tasks[task_id] = task
        self.model.changed([], specs)

    def own(self) -> None:
        rng, model, now = self.rng, self.model, self.clock.now
        group = rng.choice(GROUPS)
        wanted = rng.randint(1, 3)
        poison = rng.random() < 0.5
        own_for = rng.randint(2, 20) * S
        request = pb.QueryRequest(group=group, own_for={"seconds": own_for // S}, max_tasks=wanted)
        if poison:
            request.max_attempts = MAX_ATTEMPTS
            request.dead_letter_group = DEAD
        request.now.FromNanoseconds(now)
        try:
            response = self.mt.Query(request, timeout=TIMEOUT)
            got = list(response.tasks) or [response.task]
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
            got = []
        # The model's own walk of the head: park what is past max_attempts, own the rest.
        owned, parked = [], []
        for _, task_id in model.visible(group, now):
            if len(owned) == wanted:
                break
            task = model.tasks[task_id]
            (parked if poison and task.attempts >= MAX_ATTEMPTS else owned).append(task_id)
        assert len(got) == len(owned), (got, owned)
        for task_id, new in zip(owned, got, strict=True):
            old = model.tasks.pop(task_id)
            model.tasks[new.id] = Task(group, now + own_for, old.error, old.attempts + 1, leased=True)
            assert new.attempts == old.attempts + 1
        model.count(group, owned=len(owned))
        if parked:
            known = set(model.tasks)
            dead = self.mt.Debug(pb.DebugRequest(group=DEAD), timeout=TIMEOUT).tasks
            new_ids = sorted(t.id for t in dead if t.id not in known)
            assert len(new_ids) == len(parked)
            for task_id, new_id in zip(parked, new_ids, strict=True):
                old = model.tasks.pop(task_id)
                model.tasks[new_id] = Task(DEAD, now, True, old.attempts)
            model.count(group, departed=len(parked))
            model.count(DEAD, created=len(parked))

    def _copy(self, task_id: int, group: str, not_before: int) -> tuple[pb.Task, Task]:
        old = self.model.tasks[task_id]
        message = pb.Task(
            group=group,
            not_before={"seconds": not_before // S},
            error="boom" if old.error else "",
            attempts=old.attempts,
        )
        return message, Task(group, not_before // S * S, old.error, old.attempts)

    def rewrite(self, kind: str) -> None:
        """renew / disown a leased task, move or delete any task: one Update."""
        rng, model, now = self.rng, self.model, self.clock.now
        task_id = self._pick(leased=True if kind in ("renew", "disown") else None)
        if task_id is None:
            return
        old = model.tasks[task_id]
        if kind == "delete":
            self._update([], [task_id])
            model.changed([model.tasks.pop(task_id)], [])
            return
        if kind == "renew":
            message, new = self._copy(task_id, old.group, now + rng.randint(5, 30) * S)
            new.leased = True
        elif kind == "disown":
            message, new = self._copy(task_id, old.group, now - S)
        else:
            message, new = self._copy(task_id, rng.choice([g for g in GROUPS if g != old.group]), now)
        [new_id] = self._update([message], [task_id])
        model.changed([model.tasks.pop(task_id)], [new])
        model.tasks[new_id] = new

    def renew_two(self) -> None:
        """Two renewals of one group in one Update: the i-th removed pairs with the i-th created."""
        now = self.clock.now
        for group in GROUPS:
            leased = sorted(
                i for i, t in self.model.tasks.items() if t.group == group and t.leased and t.not_before > now
            )
            if len(leased) >= 2:
                break
        else:
            return
        first, second = leased[:2]
        # The first is renewed, the second disowned: whichever pairing a store used shows in `leased`.
        m1, t1 = self._copy(first, group, now + 25 * S)
        t1.leased = True
        m2, t2 = self._copy(second, group, now - S)
        ids = self._update([m1, m2], [first, second])
        self.model.changed([self.model.tasks.pop(first), self.model.tasks.pop(second)], [t1, t2])
        self.model.tasks[ids[0]], self.model.tasks[ids[1]] = t1, t2

    def bulk_set(self) -> None:
        rng, model, now = self.rng, self.model, self.clock.now
        ids = sorted(rng.sample(sorted(model.tasks), min(len(model.tasks), rng.randint(1, 4))))
        if not ids:
            return
        kind = rng.choice(["error", "move", "later"])
        prototype = pb.Task()
        if kind == "error":
            prototype.error = "set by BulkSet"
        elif kind == "move":
            prototype.group = rng.choice(GROUPS)
        else:
            prototype.not_before.FromNanoseconds(now + 7 * S)
        request = pb.BulkSetRequest(ref=[pb.TaskRef(id=i) for i in ids], prototype=prototype)
        assert self.mt.BulkSet(request, timeout=TIMEOUT).num_updated == len(ids)
        removed, created = [], []
        for task_id in ids:
            old = model.tasks.pop(task_id)
            new = Task(old.group, old.not_before, old.error, old.attempts, old.leased)
            if kind == "error":
                new.error = True
            elif kind == "move":
                new.group = prototype.group
            else:
                new.not_before = now + 7 * S
            # A copy keeps its lease when it keeps its group and not_before.
            new.leased = old.leased and (new.group, new.not_before) == (old.group, old.not_before)
            removed.append(old)
            created.append(new)
        model.changed(removed, created)
        # BulkSet's new IDs come from the listing: the selected tasks were replaced in ID order.
        known = set(model.tasks)
        fresh = sorted(t.id for t in self.mt.Debug(pb.DebugRequest(), timeout=TIMEOUT).tasks if t.id not in known)
        assert len(fresh) == len(created)
        for new_id, new in zip(fresh, created, strict=True):
            model.tasks[new_id] = new

    def step(self) -> None:
        action = self.rng.choices(
            ["create", "own", "renew", "disown", "move", "delete", "two", "bulk", "tick", "compact"],
            [5, 5, 2, 1, 2, 2, 1, 1, 3, 1],
        )[0]
        if action == "create":
            self.create()
        elif action == "own":
            self.own()
        elif action in ("renew", "disown", "move", "delete"):
            self.rewrite(action)
        elif action == "two":
            self.renew_two()
        elif action == "bulk":
            self.bulk_set()
        elif action == "tick":
            self.clock.advance(self.rng.choice([S // 3, S, 2 * S, 25 * S]))
        else:
            compact(self.server)

    def verify(self) -> None:
        now = self.clock.now
        expected = self.model.expected(now)
        listing = self.admin.ListGroups(apb.ListGroupsRequest(), timeout=TIMEOUT)
        got = {g.group: observed(g) for g in listing.groups}
        assert got == expected
        group = self.rng.choice(sorted(expected))
        one = self.admin.GetGroup(apb.GetGroupRequest(group=group), timeout=TIMEOUT).group
        assert observed(one) == expected[group]
        leased = self.admin.ListTasks(
            apb.ListTasksRequest(group=group, state=apb.TASK_STATE_LEASED, page_size=1000), timeout=TIMEOUT
        )
        assert sorted(t.id for t in leased.tasks) == sorted(
            i for i, t in self.model.tasks.items() if t.group == group and t.leased and t.not_before > now
        )
        errors = self.admin.ListTasks(
            apb.ListTasksRequest(group=group, state=apb.TASK_STATE_ERROR, page_size=1000), timeout=TIMEOUT
        )
        assert sorted(t.id for t in errors.tasks) == sorted(
            i for i, t in self.model.tasks.items() if t.group == group and t.error
        )


def compact(server: BackgroundServer) -> None:
    """On PostgreSQL, fold the journal rows into base rows and history now (the store does it in the background)."""

    async def fold(s: object) -> None:
        store = s.store  # type: ignore[attr-defined]
        if hasattr(store, "compact_counts"):
            await store.compact_counts(force=True)

    server.call(fold)


@pytest.fixture
def clock() -> HandClock:
    return HandClock(1_800_000_000 * S)


@pytest.mark.parametrize("seed", [1, 2])
def test_statistics_follow_a_model_under_random_operations(
    make_server: Callable[..., BackgroundServer], clock: HandClock, seed: int
) -> None:
    server = make_server(clock=clock)
    driver = Driver(server, clock, seed)
    try:
        for i in range(160):
            driver.step()
            if i % 4 == 3:
                driver.verify()
        driver.verify()
        server.call(lambda s: s.store.check())
        # ListGroups with history says what GetGroup says, group by group.
        clock.advance(2 * S)
        listing = driver.admin.ListGroups(apb.ListGroupsRequest(history=Duration(seconds=3600)), timeout=TIMEOUT)
        assert any(g.history for g in listing.groups)
        for stats in listing.groups:
            assert stats == driver.admin.GetGroup(apb.GetGroupRequest(group=stats.group), timeout=TIMEOUT).group
        # Counters and history read the same before and after the journal is folded.
        before = driver.admin.GetGroup(apb.GetGroupRequest(group="a"), timeout=TIMEOUT).group
        compact(server)
        after = driver.admin.GetGroup(apb.GetGroupRequest(group="a"), timeout=TIMEOUT).group
        assert after == before
        server.call(lambda s: s.store.check())
    finally:
        driver.close()


def test_counters_and_history_survive_a_restart_on_postgresql(
    postgresql_dsn: str, postgresql_schema: str, clock: HandClock
) -> None:
    pytest.importorskip("psycopg")
    settings = Settings(port=0, listen_http="", store=postgresql_dsn, store_schema=postgresql_schema)
    with BackgroundServer(settings, clock=clock) as first:
        driver = Driver(first, clock, seed=7)
        try:
            for i in range(80):
                driver.step()
                if i % 10 == 0:
                    clock.advance(S)
            clock.advance(2 * S)
            before = driver.admin.ListGroups(apb.ListGroupsRequest(), timeout=TIMEOUT)
            history = driver.admin.GetGroup(apb.GetGroupRequest(group="a"), timeout=TIMEOUT).group
        finally:
            driver.close()
    assert before.groups and history.created > 0 and history.history
    with BackgroundServer(settings, clock=clock) as second, grpc.insecure_channel(second.target) as channel:
        admin = apb_grpc.AdminStub(channel)
        after = admin.ListGroups(apb.ListGroupsRequest(), timeout=TIMEOUT)
        assert after == before
        assert admin.GetGroup(apb.GetGroupRequest(group="a"), timeout=TIMEOUT).group == history
        second.call(lambda s: s.store.check())
