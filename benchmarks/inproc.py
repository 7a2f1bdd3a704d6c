"""Server CPU per operation in process, without gRPC: the servicer's handlers on request bytes.

``python -m benchmarks.inproc`` (or ``PYTHONPATH=TREE python benchmarks/inproc.py`` to measure
another checkout of the server with this script) runs, for each operation, a bounded loop of calls
to the servicer's registered handlers (the same ``_wrap``ped coroutines gRPC calls: parsing,
limits, conversion, the in-memory store with its statistics, metrics, the response bytes) and prints
the CPU time (``time.process_time``) per operation, best of ``--repeats``. CPU time, not wall time:
another process taking the core does not change it, so two trees can be compared on a shared machine
by alternating runs. Operations:

- ``lease``: Query(own_for 600 s) on a 1,000-task group, then an Update deleting that task by ID.
- ``batch``: Query(own_for, max_tasks 100), then one Update deleting the 100 tasks.
- ``create``: an Update creating 1,000 tasks in one group (the store is emptied between repeats).

``--statistics-cost`` also times each operation with the store's statistics switched off (a
diagnostic, never a server mode), alternating with the normal store in the same process: the
difference is what keeping the statistics costs (issue 12's budget).

The handlers never suspend without a data directory, so each call is driven to completion with
``coroutine.send(None)``: no event loop in the measurement. The client's side of each cycle (reading
the response, building the delete) is inside the timed loop too, the same for every tree. Works with
the trees before the store seam (38fa188: ``MassTaskerService(store, waiters, ...)``) and after it.

``--tree DIR`` (twice or more) compares checkouts: ``--rounds`` rounds, each running this script once
per tree in a fresh process with ``PYTHONPATH=DIR``, trees alternating; it prints each tree's median
over the rounds of the best-of-repeats figure, and the ratio to the first tree.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from google.protobuf import any_pb2
from google.protobuf.duration_pb2 import Duration
from prometheus_client import CollectorRegistry

from masstasker._pb import masstasker_pb2 as pb
from masstasker.server.config import Settings
from masstasker.server.metrics import RpcMetrics

_GROUP = "work"
_FILL = 1_000
_NANOS = 1_000_000_000
_OWN_FOR_S = 600


class _Context:
    """The few ServicerContext methods a handler may call; none is called on these paths."""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: Any, details: str, trailing_metadata: Any = ()) -> None:
        raise RuntimeError(f"{code}: {details}")


def _service() -> tuple[Any, Callable[[str], Callable[[bytes], bytes]]]:
    """The tree's servicer over a fresh in-memory store, and a way to call its handlers synchronously."""
    clock = time.time_ns
    settings = Settings(port=0, listen_http="")
    metrics = RpcMetrics(CollectorRegistry())
    try:  # after the store seam
        from masstasker.server.admission import WaitingAdmission
        from masstasker.server.service import MassTaskerService
        from masstasker.server.stores.memory.adapter import MemoryTaskStore
        from masstasker.server.stores.memory.store import Store

        store = Store(clock)
        service = MassTaskerService(
            MemoryTaskStore(store, clock), WaitingAdmission(settings), settings, metrics, clock=clock
        )
    except ImportError:  # 38fa188: before statistics and the seam
        from masstasker.server.store import Store  # type: ignore[no-redef]
        from masstasker.server.waiters import Waiters  # type: ignore[import-not-found]

        from masstasker.server.service import MassTaskerService  # type: ignore[no-redef]

        store = Store(clock)
        service = MassTaskerService(store, Waiters(store, clock), settings, metrics)  # type: ignore[arg-type]
    handlers = service.handler()
    context = _Context()

    def method(name: str) -> Callable[[bytes], bytes]:
        handler = handlers._method_handlers[f"/masstasker.MassTasker/{name}"].unary_unary

        def call(request: bytes) -> bytes:
            coroutine: Coroutine[Any, Any, bytes] = handler(request, context)
            try:
                coroutine.send(None)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            raise RuntimeError("a handler suspended: the in-process benchmark needs a store without a data directory")

        return call

    return store, method


def _task() -> pb.Task:
    payload = any_pb2.Any(type_url="type.googleapis.com/masstasker.Test", value=b"x" * 20)
    return pb.Task(group=_GROUP, data=payload)


def _create_request(count: int) -> bytes:
    return pb.UpdateRequest(created=[_task() for _ in range(count)]).SerializeToString()


def _cpu() -> float:
    gc.collect()
    return time.process_time()


def _deletes(ids: list[list[int]]) -> list[bytes]:
    """One Update deleting each list of IDs, serialized before the timed loop."""
    return [pb.UpdateRequest(deleted=[pb.TaskRef(id=i) for i in batch]).SerializeToString() for batch in ids]


def main(argv: list[str] | None = None) -> int:
    """Print the CPU time per operation of each operation, best of the repeats."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cycles", type=int, default=3_000, help="lease cycles per repeat")
    parser.add_argument("--batches", type=int, default=100, help="100-task batch cycles per repeat")
    parser.add_argument("--creates", type=int, default=50, help="1,000-task creates per repeat")
    parser.add_argument("--only", action="append", choices=["lease", "batch", "create"])
    parser.add_argument("--tree", action="append", help="a checkout to measure (repeat to compare)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds with --tree")
    parser.add_argument(
        "--statistics-cost",
        action="store_true",
        help="also time each operation with the store's statistics switched off (diagnostic), alternating",
    )
    args = parser.parse_args(argv)
    if args.tree:
        return _compare(args.tree, args.rounds, list(sys.argv[1:] if argv is None else argv))
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)  # the server's GC_THRESHOLDS
    store, method = _service()
    query, update = method("Query"), method("Update")
    fill = _create_request(_FILL)
    own = pb.QueryRequest(group=_GROUP, own_for=Duration(seconds=_OWN_FOR_S)).SerializeToString()
    own100 = pb.QueryRequest(group=_GROUP, own_for=Duration(seconds=_OWN_FOR_S), max_tasks=100).SerializeToString()
    create = _create_request(1_000)
    parse_query = pb.QueryResponse.FromString

    def top_up(least: int) -> None:
        while store.group_size(_GROUP) < least:
            update(fill)

    # Each loop returns its CPU seconds per operation. The IDs an owning Query gives out are known in
    # advance (the copies take the next IDs in order), so the deletes are serialized before the timer
    # starts and only the server's side is timed; the last answer is checked against them.
    def lease() -> float:
        top_up(args.cycles + _FILL)
        first = store.next_id
        deletes = _deletes([[first + c] for c in range(args.cycles)])
        start = _cpu()
        for delete in deletes:
            answer = query(own)
            update(delete)
        spent = time.process_time() - start
        assert parse_query(answer).task.id == first + args.cycles - 1
        return float(spent / args.cycles)

    def batch() -> float:
        top_up(100 * args.batches + _FILL)
        first = store.next_id
        deletes = _deletes([list(range(first + 100 * b, first + 100 * (b + 1))) for b in range(args.batches)])
        start = _cpu()
        for delete in deletes:
            answer = query(own100)
            update(delete)
        spent = time.process_time() - start
        assert [t.id for t in parse_query(answer).tasks] == list(range(store.next_id - 100, store.next_id))
        return float(spent / args.batches)

    def creates() -> float:
        start = _cpu()
        for _ in range(args.creates):
            update(create)
        spent = time.process_time() - start
        update(pb.UpdateRequest(deleted=[pb.TaskRef(group=_GROUP)]).SerializeToString())
        return float(spent / args.creates)

    loops = {"lease": (lease, 1), "batch": (batch, 100), "create": (creates, 1_000)}
    chosen = args.only or list(loops)
    stats = getattr(store, "stats", None)
    # The diagnostic variant: the store's statistics told nothing (an instance attribute shadows the
    # method). Nothing on these paths reads them, so the wire answers are the same.
    variants = [("", None)] + ([("-nostats", lambda *_: None)] if args.statistics_cost and stats else [])
    best = {name + suffix: float("inf") for name in chosen for suffix, _ in variants}
    for _ in range(args.repeats):
        for name in chosen:
            for suffix, committed in variants:  # alternating within each repeat: the same machine state
                if committed is not None:
                    stats.committed = committed
                elif stats is not None:
                    vars(stats).pop("committed", None)
                best[name + suffix] = min(best[name + suffix], loops[name][0]())
    if stats is not None:
        vars(stats).pop("committed", None)
    for key, value in best.items():
        tasks = loops[key.split("-")[0]][1]
        per_op = value * 1e6
        print(f"{key:15s} {per_op:9.1f} us/op  {per_op / tasks * 1000:9.1f} ns/task")
    return 0


def _compare(trees: list[str], rounds: int, argv: list[str]) -> int:
    """Run this script in each tree alternately and print the medians over the rounds."""
    passed, skip = [], False
    for arg in argv:  # everything but --tree/--rounds goes to each run
        if skip:
            skip = False
        elif arg in ("--tree", "--rounds"):
            skip = True
        elif not arg.startswith(("--tree=", "--rounds=")):
            passed.append(arg)
    figures: dict[str, dict[str, list[float]]] = {tree: {} for tree in trees}
    for round_ in range(rounds):
        for tree in trees:
            env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), *passed],
                env=env,
                capture_output=True,
                text=True,
                check=True,
                timeout=600,
                cwd=os.path.abspath(tree),
            ).stdout
            for line in out.splitlines():
                name, value = line.split()[:2]
                figures[tree].setdefault(name, []).append(float(value))
            print(f"round {round_ + 1} {tree}: " + "; ".join(out.splitlines()), file=sys.stderr)
    first = trees[0]
    for name in figures[first]:
        base = statistics.median(figures[first][name])
        for tree in trees:
            values = figures[tree][name]
            median = statistics.median(values)
            print(
                f"{name:7s} {median:9.1f} us/op (rounds {min(values):.1f}-{max(values):.1f})"
                f"  {median / base:5.3f}x of {first}  {tree}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
