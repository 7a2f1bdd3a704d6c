"""Crash rounds: a real server subprocess under concurrent load, killed with SIGKILL, restarted, checked.

Used by ``tests/test_persistence_crash.py`` (a few rounds) and
``benchmarks/crash_soak.py`` (as many as you like).

Each client thread works alone in its own two groups, one RPC at a time,
and keeps a model of what its groups must hold given every answer it got.
A task is known by a label ``l`` unique to its lineage (owning and moving
keep labels, so a task's copies share it). When the server is killed, each
client has at most one RPC without an answer; after the restart its groups
must hold exactly the model, or exactly the model with that one RPC applied
in full. Tasks whose ID the client cannot know (created by the unanswered
RPC, or rewritten by a BulkSet) must have IDs above every ID the client had
seen before, and a task created after the restart must get an ID above
every ID any answer ever carried.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import any_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from masstasker._pb import masstasker_pb2 as pb
from masstasker._pb import masstasker_pb2_grpc as pb_grpc
from masstasker._server_process import ServerProcess

__all__ = ["CrashRounds", "start_server"]

NANOS = 1_000_000_000
T0 = 1_000_000_000 * NANOS  # not_before of created tasks: long past
NOW = 2_000_000_000 * NANOS  # the clock every Query passes
OWN_FOR = 60 * NANOS
_JOIN_TIMEOUT = 30.0
_RPC_TIMEOUT = 10.0


def start_server(data_dir: Path | None, log_path: Path, *extra: str) -> ServerProcess:
    """``python -m masstasker.server`` on a free loopback port, serving, with a data directory (None: memory
    only); its log is appended to ``log_path``, which outlives the process for a post-mortem."""
    args = [*extra, "--data-dir", str(data_dir)] if data_dir is not None else list(extra)
    server = ServerProcess(*args, log_file=log_path)
    try:
        server.wait_serving()
    except RuntimeError:
        server.kill()
        raise
    return server


@dataclass(frozen=True)
class Entry:
    """What the model knows of one task lineage."""

    id: int | None  # None: not known to the client
    min_id: int  # an unknown ID must be above this
    group: str
    not_before: int
    data: bytes


Model = dict[str, Entry]


def _payload(lineage: str) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(pb.Test(foo=lineage))
    return packed


def _ns(ts: Timestamp) -> int:
    return ts.seconds * NANOS + ts.nanos


@dataclass
class _Op:
    """One RPC and what it does to the model if applied."""

    name: str
    apply: Callable[[Model], Model]


class Client(threading.Thread):
    """One worker: its own groups, one RPC at a time, a model of its state."""

    def __init__(self, name: str, target: str, model: Model, seed: int, round_no: int, max_seen: int) -> None:
        super().__init__(name=f"crash-client-{name}", daemon=True)
        self.client = name
        self.group = name
        self.moved = name + "-moved"
        self.model = model
        self.rng = random.Random(seed)
        self.round_no = round_no
        self.max_seen = max_seen  # largest ID any answer to this client carried
        self.counter = 0
        self.inflight: _Op | None = None
        self.error: str | None = None
        self.ops = 0
        self.killed = threading.Event()
        self.stop_flag = threading.Event()
        self._target = target

    # -- ops ---------------------------------------------------------------------

    def _lineage(self) -> str:
        self.counter += 1
        return f"{self.client}.{self.round_no}.{self.counter}"

    def _known(self) -> list[tuple[str, int]]:
        """(lineage, ID) of every task whose ID this client knows."""
        return [(k, e.id) for k, e in sorted(self.model.items()) if e.id is not None]

    def _op_create(self, stub: pb_grpc.MassTaskerStub) -> None:
        lineages = [self._lineage() for _ in range(self.rng.randint(1, 3))]
        known = self._known()
        victim = self.rng.choice(known) if known and self.rng.random() < 0.5 else None
        floor = self.max_seen

        def apply(model: Model, ids: list[int] | None = None) -> Model:
            model = dict(model)
            if victim is not None:
                del model[victim[0]]
            for i, lineage in enumerate(lineages):
                model[lineage] = Entry(
                    ids[i] if ids else None, floor, self.group, T0, _payload(lineage).SerializeToString()
                )
            return model

        request = pb.UpdateRequest(
            created=[
                pb.Task(group=self.group, labels={"l": x}, data=_payload(x), not_before=Timestamp(seconds=T0 // NANOS))
                for x in lineages
            ],
            deleted=[pb.TaskRef(id=victim[1])] if victim is not None else [],
        )
        self.inflight = _Op("create", apply)
        response = stub.Update(request, timeout=_RPC_TIMEOUT)
        ids = list(response.created_ids)
        self.model = apply(self.model, ids)
        self.max_seen = max([self.max_seen, *ids])

    def _op_delete(self, stub: pb_grpc.MassTaskerStub) -> None:
        known = self._known()
        if not known:
            return self._op_create(stub)
        lineage, task_id = self.rng.choice(known)

        def apply(model: Model) -> Model:
            model = dict(model)
            del model[lineage]
            return model

        self.inflight = _Op("delete", apply)
        stub.Update(pb.UpdateRequest(deleted=[pb.TaskRef(id=task_id)]), timeout=_RPC_TIMEOUT)
        self.model = apply(self.model)

    def _op_own(self, stub: pb_grpc.MassTaskerStub) -> None:
        model = self.model
        visible = [(e.not_before, e.id, k) for k, e in model.items() if e.group == self.group and e.not_before <= NOW]
        if not visible or any(e.id is None for e in self.model.values()):
            return self._op_create(stub)
        _, _, head = min(visible)  # IDs are all known here, so no None is compared
        floor = self.max_seen

        def apply(model: Model, new_id: int | None = None) -> Model:
            model = dict(model)
            model[head] = dataclasses.replace(model[head], id=new_id, min_id=floor, not_before=NOW + OWN_FOR)
            return model

        self.inflight = _Op("own", apply)
        response = stub.Query(
            pb.QueryRequest(
                group=self.group,
                own_for=Duration(seconds=OWN_FOR // NANOS),
                now=Timestamp(seconds=NOW // NANOS),
            ),
            timeout=_RPC_TIMEOUT,
        )
        task = response.task
        if task.labels["l"] != head or _ns(task.not_before) != NOW + OWN_FOR:
            raise AssertionError(f"owned {task.labels['l']} at {_ns(task.not_before)}, expected {head}")
        self.model = apply(self.model, task.id)
        self.max_seen = max(self.max_seen, task.id)

    def _op_move(self, stub: pb_grpc.MassTaskerStub) -> None:
        back = self.rng.random() < 0.5
        source, dest = (self.moved, self.group) if back else (self.group, self.moved)
        floor = self.max_seen

        def apply(model: Model) -> Model:
            return {
                k: dataclasses.replace(e, id=None, min_id=floor, group=dest, not_before=T0 if back else e.not_before)
                if e.group == source
                else e
                for k, e in model.items()
            }

        prototype = pb.Task(group=dest)
        if back:
            prototype.not_before.FromNanoseconds(T0)
        self.inflight = _Op("bulk-set", apply)
        expected = sum(1 for e in self.model.values() if e.group == source)
        request = pb.BulkSetRequest(ref=[pb.TaskRef(group=source)], prototype=prototype)
        response = stub.BulkSet(request, timeout=_RPC_TIMEOUT)
        if response.num_updated != expected:
            raise AssertionError(f"BulkSet rewrote {response.num_updated} tasks, expected {expected}")
        self.model = apply(self.model)
        # Learn the new IDs (a read: nothing is in flight).
        self.inflight = None
        self.model = self._resync(stub)

    def _resync(self, stub: pb_grpc.MassTaskerStub) -> Model:
        model = dict(self.model)
        for group in (self.group, self.moved):
            for task in stub.Debug(pb.DebugRequest(group=group), timeout=_RPC_TIMEOUT).tasks:
                lineage = task.labels["l"]
                entry = model[lineage]
                if entry.id is not None and entry.id != task.id:
                    raise AssertionError(f"{lineage}: ID {task.id}, expected {entry.id}")
                if entry.id is None and task.id <= entry.min_id:
                    raise AssertionError(f"{lineage}: ID {task.id} reused (not above {entry.min_id})")
                model[lineage] = dataclasses.replace(entry, id=task.id)
                self.max_seen = max(self.max_seen, task.id)
        return model

    def run(self) -> None:
        ops = (self._op_create, self._op_own, self._op_delete, self._op_move)
        weights = (3, 4, 2, 1)
        try:
            with grpc.insecure_channel(self._target) as channel:
                stub = pb_grpc.MassTaskerStub(channel)
                while not self.stop_flag.is_set() and self.ops < 100_000:
                    op = self.rng.choices(ops, weights)[0]
                    op(stub)
                    self.inflight = None
                    self.ops += 1
        except grpc.RpcError as exc:
            if not self.killed.is_set():
                self.error = f"{self.client}: RPC failed before the kill: {exc.code()} {exc.details()}"
        except Exception as exc:  # a broken expectation: report, do not hang the round
            self.error = f"{self.client}: {type(exc).__name__}: {exc}"


def _matches(actual: Model, expected: Model) -> str | None:
    """None if ``actual`` is ``expected`` (unknown IDs fresh), else what differs."""
    if actual.keys() != expected.keys():
        missing = sorted(expected.keys() - actual.keys())[:5]
        extra = sorted(actual.keys() - expected.keys())[:5]
        return f"lineages missing {missing}, unexpected {extra}"
    for lineage, want in expected.items():
        got = actual[lineage]
        assert got.id is not None
        if want.id is not None and got.id != want.id:
            return f"{lineage}: ID {got.id}, expected {want.id}"
        if want.id is None and got.id <= want.min_id:
            return f"{lineage}: ID {got.id} not above {want.min_id} (reused)"
        if (got.group, got.not_before, got.data) != (want.group, want.not_before, want.data):
            return f"{lineage}: {got} expected {want}"
    return None


@dataclass
class RoundResult:
    """One round's figures."""

    ops: int
    inflight: int
    applied_inflight: int
    tasks: int


class CrashRounds:
    """Kill-and-restart rounds against one data directory."""

    def __init__(self, data_dir: Path, *, clients: int = 4, seed: int = 0, server_args: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.log_path = data_dir.parent / (data_dir.name + "-server.log")
        self.rng = random.Random(seed)
        self.names = [f"c{i}" for i in range(clients)]
        self.models: dict[str, Model] = {name: {} for name in self.names}
        self.max_seen = 0
        self.server_args = server_args
        self.round_no = 0
        self.server = start_server(data_dir, self.log_path, *server_args)

    def round(self, *, min_load: float = 0.05, max_load: float = 0.5) -> RoundResult:
        """Load, SIGKILL at a random moment, restart, check. Raises AssertionError on any violation."""
        self.round_no += 1
        clients = [
            Client(name, self.server.target, self.models[name], self.rng.getrandbits(32), self.round_no, self.max_seen)
            for name in self.names
        ]
        for client in clients:
            client.start()
        time.sleep(self.rng.uniform(min_load, max_load))
        for client in clients:
            client.killed.set()
        self.server.kill()
        for client in clients:
            client.stop_flag.set()
        for client in clients:
            client.join(_JOIN_TIMEOUT)
            assert not client.is_alive(), f"{client.client} did not stop"
            assert client.error is None, client.error
        self.server = start_server(self.data_dir, self.log_path, *self.server_args)
        recovered = self._read_state()
        result = RoundResult(sum(c.ops for c in clients), 0, 0, sum(len(m) for m in recovered.values()))
        for client in clients:
            actual = recovered.get(client.client, {})
            problem = _matches(actual, client.model)
            if problem is not None and client.inflight is not None:
                result.inflight += 1
                applied = client.inflight.apply(client.model)
                second = _matches(actual, applied)
                if second is None:
                    result.applied_inflight += 1
                    problem = None
                else:
                    problem = (
                        f"{client.client} ({client.inflight.name} in flight): "
                        f"not as acknowledged ({problem}) nor with it applied ({second})"
                    )
            elif client.inflight is not None:
                result.inflight += 1
            assert problem is None, f"round {self.round_no}: {problem}"
            self.models[client.client] = actual
            self.max_seen = max(self.max_seen, client.max_seen)
        self._check_fresh_id()
        return result

    def _read_state(self) -> dict[str, Model]:
        state: dict[str, Model] = {}
        with grpc.insecure_channel(self.server.target) as channel:
            stub = pb_grpc.MassTaskerStub(channel)
            for task in stub.Debug(pb.DebugRequest(), timeout=60).tasks:
                lineage = task.labels["l"]
                client = lineage.split(".", 1)[0]
                data = task.data.SerializeToString()
                entry = Entry(task.id, 0, task.group, _ns(task.not_before), data)
                state.setdefault(client, {})[lineage] = entry
        return state

    def _check_fresh_id(self) -> None:
        """A task created now gets an ID above every ID ever acknowledged; then it is removed."""
        with grpc.insecure_channel(self.server.target) as channel:
            stub = pb_grpc.MassTaskerStub(channel)
            (new_id,) = stub.Update(
                pb.UpdateRequest(created=[pb.Task(group="probe", labels={"l": "probe.0"})]), timeout=_RPC_TIMEOUT
            ).created_ids
            assert new_id > self.max_seen, f"ID {new_id} reused: IDs up to {self.max_seen} were acknowledged"
            self.max_seen = new_id
            stub.Update(pb.UpdateRequest(deleted=[pb.TaskRef(id=new_id)]), timeout=_RPC_TIMEOUT)

    def close(self) -> int:
        """Stop the last server gracefully; its exit code."""
        return self.server.stop()
