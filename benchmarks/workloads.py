"""What the load-generator processes run: one coroutine per simulated worker.

Runs only inside :mod:`loadgen`'s spawned processes. Calls go through raw
method callables (bytes in, bytes out) so the client side spends as little
CPU per call as grpc.aio allows; constant requests are serialized once.
The batch lease is the exception: it goes through our own
:class:`~masstasker.client.AsyncClient`, as the issue asks, so its figure
includes what the client costs.

:func:`run` takes a job (a plain dict) and returns a result dict:
``ops`` and ``items`` completed inside the measurement window, the
latencies (seconds) of those calls, and error counts by status code.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any

import grpc

from benchmarks import payload as P
from masstasker._pb import masstasker_pb2 as pb
from masstasker.client import AsyncClient, Delete, StatusError

__all__ = ["run"]

_METHOD = "/masstasker.MassTasker/"
_CALL_TIMEOUT = 30.0
_DRY_PAUSE = 0.01  # after NOT_FOUND: do not spin on an empty group
_LEASE_S = 600.0  # long enough that no lease expires during a run
_RAMP_TICK = 0.05  # seconds between groups of new waiting Queries

Op = Callable[[], Awaitable[int]]


class _GroupEmpty(Exception):
    """Nothing visible to lease: counted as NOT_FOUND, as the raw calls would be."""


class _Stub:
    """Raw callables for the two RPCs the benchmarks use."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.query = channel.unary_unary(_METHOD + "Query")
        self.update = channel.unary_unary(_METHOD + "Update")


def _channel(target: str) -> grpc.aio.Channel:
    # A channel of its own (not a shared subchannel), so N channels are N connections.
    return grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ],
    )


# -- one operation per workload: returns how many tasks it handled ---------------


def _lease_op(stub: _Stub, job: dict[str, Any]) -> Op:
    """Query(own) then Update deleting the task by the ID the Query returned."""
    request = P.query_request(job["group"], own_for_s=_LEASE_S)
    query, update, parse, delete = stub.query, stub.update, pb.QueryResponse.FromString, P.delete_request

    async def op() -> int:
        task_id = parse(await query(request, timeout=_CALL_TIMEOUT)).task.id
        await update(delete([task_id]), timeout=_CALL_TIMEOUT)
        return 1

    return op


def _lease_replace_op(stub: _Stub, job: dict[str, Any]) -> Op:
    """Query(own), then one Update deleting the task and creating its replacement: a queue of constant depth."""
    request = P.query_request(job["group"], own_for_s=_LEASE_S)
    # Serialized messages concatenate into their merge: the delete's refs plus the create's task.
    replacement = P.create_request(job["group"], 1)
    query, update, parse, delete = stub.query, stub.update, pb.QueryResponse.FromString, P.delete_request

    async def op() -> int:
        task_id = parse(await query(request, timeout=_CALL_TIMEOUT)).task.id
        await update(delete([task_id]) + replacement, timeout=_CALL_TIMEOUT)
        return 1

    return op


def _batch_lease_op(stub: _Stub, job: dict[str, Any]) -> Op:
    """Through our own client: ``query_many(N, own_for)`` then one ``do(Delete(*tasks))``."""
    client = AsyncClient.from_channel(stub.channel)
    group, batch = job["group"], job["batch"]

    async def op() -> int:
        tasks = await client.query_many(group, batch, _LEASE_S, wait=False, timeout=_CALL_TIMEOUT)
        if not tasks:
            raise _GroupEmpty
        await client.do(Delete(*tasks), timeout=_CALL_TIMEOUT)
        return len(tasks)

    return op


def _peek_op(stub: _Stub, job: dict[str, Any]) -> Op:
    """Query without owning: the head as it is."""
    request = P.query_request(job["group"])
    query = stub.query

    async def op() -> int:
        await query(request, timeout=_CALL_TIMEOUT)
        return 1

    return op


def _head_op(stub: _Stub, job: dict[str, Any]) -> Op:
    """Query(own) with a tiny lease and no commit: the head moves to the back and is soon visible again."""
    request = P.query_request(job["group"], own_for_s=1e-6)
    query = stub.query

    async def op() -> int:
        await query(request, timeout=_CALL_TIMEOUT)
        return 1

    return op


def _create_op(stub: _Stub, job: dict[str, Any]) -> Op:
    """One Update creating ``batch`` tasks."""
    request = P.create_request(job["group"], job["batch"])
    update, count = stub.update, job["batch"]

    async def op() -> int:
        await update(request, timeout=_CALL_TIMEOUT)
        return count

    return op


_OPS: dict[str, Callable[[_Stub, dict[str, Any]], Op]] = {
    "lease": _lease_op,
    "lease_replace": _lease_replace_op,
    "batch_lease": _batch_lease_op,
    "peek": _peek_op,
    "head": _head_op,
    "create": _create_op,
}


# -- drivers ---------------------------------------------------------------------


def _code(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    if isinstance(exc, StatusError):
        return exc.code.name
    return "NOT_FOUND"


async def _watch_stop(conn: Connection, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if conn.poll():
            conn.recv()
            stop.set()
            return
        await asyncio.sleep(0.05)


async def _run_loop(job: dict[str, Any], stop: asyncio.Event) -> dict[str, Any]:
    """``concurrency`` callers repeating one op until ``t_end``; counts what completes in the window."""
    channels = [_channel(job["target"]) for _ in range(job.get("channels", 1))]
    ops = [_OPS[job["workload"]](_Stub(ch), job) for ch in channels]
    t_measure, t_end = job["t_measure"], job["t_end"]
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    counted = {"ops": 0, "items": 0}
    wall, perf = time.time, time.perf_counter

    async def caller(op: Op) -> None:
        while not stop.is_set():
            began = perf()
            try:
                items = await op()
            except (grpc.aio.AioRpcError, StatusError, _GroupEmpty) as exc:
                if wall() >= t_measure:
                    errors[_code(exc)] += 1
                if wall() >= t_end:
                    return
                await asyncio.sleep(_DRY_PAUSE)
                continue
            done = wall()
            if done >= t_end:
                return
            if done >= t_measure:
                latencies.append(perf() - began)
                counted["ops"] += 1
                counted["items"] += items

    cpu: list[float] = []

    async def sample_cpu() -> None:
        # This process's CPU time over the window: is the load generator itself saturated?
        for moment in (t_measure, t_end):
            await asyncio.sleep(max(0.0, moment - wall()))
            cpu.append(time.process_time())

    delay = job["t_start"] - wall()
    if delay > 0:
        await asyncio.sleep(delay)
    sampler = asyncio.create_task(sample_cpu())
    callers = [asyncio.create_task(caller(ops[i % len(ops)])) for i in range(job["concurrency"])]
    try:
        await asyncio.wait_for(asyncio.gather(*callers, sampler), timeout=t_end - wall() + _CALL_TIMEOUT)
    finally:
        for ch in channels:
            await ch.close()
    window_cpu = cpu[1] - cpu[0] if len(cpu) == 2 else float("nan")
    return {**counted, "latencies": latencies, "errors": dict(errors), "window_cpu_s": window_cpu}


async def _run_waiters(job: dict[str, Any], stop: asyncio.Event) -> dict[str, Any]:
    """``concurrency`` waiting Queries that wait again after each answer, until stopped.

    The created tasks carry their creation time (wall clock, ns) in the
    payload, so each answer gives a wake-up latency.
    """
    channels = [_channel(job["target"]) for _ in range(job["channels"])]
    request = P.query_request(job["group"], own_for_s=_LEASE_S, wait=True)
    parse, unpack = pb.QueryResponse.FromString, pb.Test.FromString
    wakeups: list[float] = []
    errors: Counter[str] = Counter()

    async def waiter(query: Any) -> None:
        while not stop.is_set():
            try:
                answer = await query(request, timeout=job["t_end"] - time.time())
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
                return
            arrived = time.time_ns()
            sent = int(unpack(parse(answer).task.data.value).foo.rstrip("."))
            wakeups.append((arrived - sent) / 1e9)

    queries = [_Stub(ch).query for ch in channels]
    # Arrive at a bounded rate: a burst of thousands of calls at once is a different
    # test (docs/performance.md: it used to lose part of the burst to CANCELLED).
    tasks = []
    step = max(1, round(job["ramp_per_s"] * _RAMP_TICK))
    for i in range(job["concurrency"]):
        tasks.append(asyncio.create_task(waiter(queries[i % len(queries)])))
        if i % step == step - 1:
            await asyncio.sleep(_RAMP_TICK)
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close()
    return {"ops": len(wakeups), "items": len(wakeups), "latencies": wakeups, "errors": dict(errors)}


async def _run_creator(job: dict[str, Any], stop: asyncio.Event) -> dict[str, Any]:
    """Create ``count`` tasks one at a time, each carrying its send time."""
    channel = _channel(job["target"])
    update = _Stub(channel).update
    group = job["group"]
    latencies: list[float] = []
    for _ in range(job["count"]):
        if stop.is_set() or time.time() >= job["t_end"]:
            break
        began = time.perf_counter()
        request = P.create_request(group, 1, str(time.time_ns()))
        await update(request, timeout=_CALL_TIMEOUT)
        latencies.append(time.perf_counter() - began)
        if job.get("pause"):
            await asyncio.sleep(job["pause"])
    await channel.close()
    return {"ops": len(latencies), "items": len(latencies), "latencies": latencies, "errors": {}}


_DRIVERS = {"waiters": _run_waiters, "creator": _run_creator}


async def run(job: dict[str, Any], conn: Connection) -> dict[str, Any]:
    """Run one job; the parent may send "stop" on ``conn`` to end it early."""
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch_stop(conn, stop))
    try:
        driver = _DRIVERS.get(job["workload"], _run_loop)
        return await driver(job, stop)
    finally:
        watcher.cancel()
