"""The client's logic, written once and run by both drivers (``Client`` and ``AsyncClient``).

Each operation is a generator ("flow") that yields the I/O it needs as plain values: ``Call`` (make one
unary RPC and send back the response, or throw in the mapped ``StatusError`` — or ``ClockAdvanced`` when
a waiting Query was cut short because a fake clock moved), ``Pause`` (wait a real
time, e.g. before retrying) and ``Tick`` (the lease heartbeat's wait, timed on the client's clock and
cut short when the lease is released). The drivers in ``sync.py`` and ``aio.py`` only know how to do
those three things, blocking or with ``await``; everything else — request building, retries, deadline
bookkeeping, ID write-back, lease renewal — lives here, with no I/O, the way httpx runs its auth flows.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, TypeAlias, TypeVar

import grpc
from google.protobuf.message import Message

from masstasker._pb import masstasker_pb2 as pb
from masstasker.client._ops import (
    Delete,
    Disown,
    Move,
    Op,
    Reown,
    UpdatePlan,
    build_update,
    check_group,
    check_task,
    error_text,
)
from masstasker.client._time import Clock, Seconds, SystemClock, to_duration, to_seconds, to_timestamp
from masstasker.client.errors import (
    DeadlineExceeded,
    LeaseLost,
    ResourceExhausted,
    TaskNotFound,
    Unavailable,
    is_saved_error,
)

__all__ = [
    "DEFAULT_HEARTBEAT",
    "DEFAULT_OWN_FOR",
    "DEFAULT_QUERY_RETRY_PAUSE",
    "MAX_QUERY_TASKS",
    "TARGET_ENV",
    "Call",
    "ClientBase",
    "ClockAdvanced",
    "Flow",
    "Lease",
    "Pause",
    "Step",
    "Tick",
    "commit_or_move_ops",
    "do_flow",
    "heartbeat_flow",
    "optional_seconds",
    "query_flow",
    "resolve_target",
]

T = TypeVar("T")

DEFAULT_HEARTBEAT = 10.0
"""Seconds between lease renewals in ``run_with_lease``."""
DEFAULT_OWN_FOR = 30.0
"""Seconds each renewal extends the lease by; several heartbeats, so one slow renewal is not fatal."""
DEFAULT_QUERY_RETRY_PAUSE = 5.0
"""Seconds a waiting ``query`` pauses before asking again after NOT_FOUND/DEADLINE_EXCEEDED — the Go
client's value, which keeps thousands of idle workers from hammering a Go server that cannot wait."""
MAX_QUERY_TASKS = 2**32 - 1
"""``QueryRequest.max_tasks`` is a uint32."""
TARGET_ENV = "MASSTASKER_TARGET"
"""The environment variable a client dials when it is given no target."""


def resolve_target(target: object, environ: Mapping[str, str] = os.environ) -> str:
    """The address to dial: ``target``, or ``$MASSTASKER_TARGET`` when it is None.

    Checked here, at construction, because gRPC would accept anything and fail only at the first call
    (an empty target as ``StatusError UNKNOWN``, with its own log lines on stderr).
    """
    if target is None:
        target = environ.get(TARGET_ENV, "").strip()
        if not target:
            raise TypeError(f"no server to dial: pass a target such as 'host:port' or set {TARGET_ENV}")
    if not isinstance(target, str):
        raise TypeError(f"target must be a str such as 'host:port', got {target!r}")
    if not target.strip():
        raise ValueError("target must name a server, such as 'host:port' or 'unix:/path', got an empty string")
    return target


@dataclass(frozen=True, slots=True)
class Call:
    """Make the unary call ``method`` with ``request`` and send back its response."""

    method: Literal["Update", "Query", "BulkSet", "Debug"]
    request: Message
    timeout: float | None
    stamped: datetime | None = None
    """For a waiting Query, the clock time in its ``now``. A driver whose clock can jump (``AdvancingClock``,
    such as ``FakeClock``) cancels the call when the clock moves on from it and throws ``ClockAdvanced``:
    the server times the wait from that ``now``, so it would otherwise follow real time."""


class ClockAdvanced(Exception):  # a signal between driver and flow, not an error
    """Thrown into a query flow when its clock moved while a waiting Query was in flight: ask again now."""


@dataclass(frozen=True, slots=True)
class Pause:
    """Wait ``seconds`` of real time (a retry pause; it is about the network, not about task time)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Tick:
    """Wait ``seconds`` on the client's clock; the driver ends the flow instead if the lease is released."""

    seconds: float


Step: TypeAlias = Call | Pause | Tick
Flow: TypeAlias = Generator[Step, Any, T]


def optional_seconds(value: Seconds | None, *, name: str) -> float | None:
    """``None`` stays ``None`` (no limit); anything else becomes non-negative seconds."""
    return None if value is None else to_seconds(value, name=name)


def do_flow(ops: Sequence[Op], *, clock: Clock, timeout: float | None) -> Flow[None]:
    """``do(*ops)``: one atomic Update; on success the new IDs are written into the caller's tasks."""
    plan = build_update(ops, clock.now())
    response: pb.UpdateResponse = yield Call("Update", plan.request, timeout)
    plan.apply(response)


def query_flow(
    group: str,
    own_for: Seconds,
    *,
    wait: bool,
    max_tasks: int,
    many: bool,
    timeout: float | None,
    clock: Clock,
    retry_pause: float,
    monotonic: Callable[[], float] = time.monotonic,
) -> Flow[list[pb.Task]]:
    """``query``/``query_many``: the visible head(s) of ``group``, owned for ``own_for`` if it is positive.

    With ``wait``, a server that answers NOT_FOUND or DEADLINE_EXCEEDED instead of waiting (the Go
    server, for an empty group), or OK with no task (the Go server, when a task's ``not_before`` equals
    ``now``), is asked again after ``retry_pause``, until ``timeout`` (real seconds, overall) runs out;
    then ``DeadlineExceeded`` is raised. A wait cut short by the clock jumping (``ClockAdvanced``) is asked
    again at once, with the new ``now``. Without ``wait``, nothing visible raises ``TaskNotFound`` at once
    — or, for ``many`` (``query_many``), returns an empty list.
    """
    check_group(group)
    if not isinstance(max_tasks, int) or isinstance(max_tasks, bool):
        raise TypeError(f"max_tasks must be an int, got {max_tasks!r}")
    if not 1 <= max_tasks <= MAX_QUERY_TASKS:
        raise ValueError(f"max_tasks must be between 1 and {MAX_QUERY_TASKS}, got {max_tasks}")
    own_for_pb = to_duration(own_for, name="own_for")
    deadline = None if timeout is None else monotonic() + timeout

    def remaining() -> float | None:
        return None if deadline is None else deadline - monotonic()

    while True:
        left = remaining()
        if left is not None and left <= 0:
            raise DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED, f"no task in group {group!r} within {timeout}s")
        now = clock.now()  # re-read on every attempt: a retry must not ask about the past
        request = pb.QueryRequest(
            group=group,
            own_for=own_for_pb,
            now=to_timestamp(now, name="the clock's now()"),
            wait=wait,
            # 0 keeps the request byte-identical to Go's for the common single-task case.
            max_tasks=max_tasks if max_tasks > 1 else 0,
        )
        pause = retry_pause
        try:
            response: pb.QueryResponse = yield Call("Query", request, left, stamped=now if wait else None)
        except ClockAdvanced:
            continue  # what the server waits for may be visible at the new time: ask again now
        except TaskNotFound:
            if not wait:
                if many:
                    return []
                raise
        except ResourceExhausted as exc:
            if not wait or exc.retry_after is None:
                raise  # a size limit: asking again cannot help
            # The server holds as many waiting Queries as it allows. Ask again when it says, spread out
            # so that thousands of refused workers do not all come back in the same instant.
            pause = exc.retry_after * random.uniform(0.5, 1.5)
        except DeadlineExceeded:
            left = remaining()
            if not wait or (left is not None and left <= 0):
                raise  # the caller's own timeout: not something to retry
        else:
            # A server that ignores max_tasks (Go) fills in only `task`.
            tasks = list(response.tasks) or ([response.task] if response.HasField("task") else [])
            if tasks or (many and not wait):
                return tasks
            if not wait:
                raise TaskNotFound(grpc.StatusCode.NOT_FOUND, f"the server returned no task for group {group!r}")
            # OK and empty: the Go server's answer when a task becomes visible exactly at `now`. It did not
            # wait, so this is its NOT_FOUND by another name: pause and ask again, as for that.
        # Only a waiting query gets here: the server gave up instead of waiting, or asked us to come back.
        left = remaining()
        yield Pause(pause if left is None else max(0.0, min(pause, left)))


def commit_or_move_ops(task: pb.Task, exc: BaseException | None, error_group: str) -> tuple[Op, BaseException | None]:
    """What ``commit_or_move`` does, as Go's ``CommitOrMove``: the op to run and the error to raise after.

    No error: delete the task. A saved error and an ``error_group``: move the task there with ``error``
    set. Anything else: disown the task (so another worker retries it soon) and raise ``exc``.
    """
    check_task(task)
    check_group(error_group, name="error_group")
    if exc is not None and not isinstance(exc, BaseException):
        raise TypeError(f"exc must be an exception or None, got {exc!r}")
    if exc is None:
        return Delete(task), None
    if error_group and is_saved_error(exc):
        return Move(error_group, task, error=error_text(exc)), None
    return Disown(task), exc


class Lease:
    """The state ``run_with_lease`` shares between its work and its heartbeat.

    The heartbeat renews a private copy of the task (``held``) and never touches the caller's object
    while the work runs, so the two cannot race on the ID; ``finish`` writes the current ID (and the
    lease's ``not_before``) into the caller's task once the heartbeat has stopped.
    """

    def __init__(self, task: pb.Task, *, heartbeat: Seconds, own_for: Seconds, clock: Clock) -> None:
        self.heartbeat = to_seconds(heartbeat, name="heartbeat")
        self.own_for = to_seconds(own_for, name="own_for")
        if not 0 < self.heartbeat < self.own_for:
            # A heartbeat at or beyond own_for lets the lease lapse between renewals.
            raise ValueError(f"need 0 < heartbeat ({self.heartbeat}s) < own_for ({self.own_for}s)")
        if check_task(task).id == 0:
            raise ValueError("run_with_lease needs a task the server gave you (it has no ID)")
        self.task = task
        self.held = pb.Task()
        self.held.CopyFrom(task)
        self.clock = clock
        self.renewals = 0
        self.error: BaseException | None = None  # why the heartbeat stopped early, if it did
        self.released = False  # set by the driver when the work is over: the heartbeat stops at its next Tick

    def finish(self) -> None:
        """Write the current ID and lease expiry into the caller's task (call once the heartbeat stopped)."""
        self.task.id = self.held.id
        self.task.not_before.CopyFrom(self.held.not_before)


def heartbeat_flow(lease: Lease) -> Flow[None]:
    """Renew ``lease`` every ``heartbeat`` until the driver stops it (at a ``Tick``) or renewal fails.

    A renewal that finds the ID gone (NOT_FOUND) means someone else owns the task: ``LeaseLost``. An
    unreachable server or a timed-out renewal is retried at the next beat: the ID is ours until the
    server says otherwise (if such a renewal did apply, the next one finds the ID gone, and we stop).
    """
    while True:
        yield Tick(lease.heartbeat)
        plan: UpdatePlan = build_update([Reown(timedelta(seconds=lease.own_for), lease.held)], lease.clock.now())
        try:
            # A renewal slower than the lease is worthless; do not let it block the stop forever.
            response: pb.UpdateResponse = yield Call("Update", plan.request, lease.own_for)
        except TaskNotFound as exc:
            raise LeaseLost(lease.held.id) from exc
        except (Unavailable, DeadlineExceeded):
            continue
        # Any other error (say INVALID_ARGUMENT) propagates: the lease cannot be kept, so the work is stopped.
        plan.apply(response)
        lease.renewals += 1


class ClientBase:
    """What ``Client`` and ``AsyncClient`` share: configuration, and the flows behind every method."""

    clock: Clock
    query_retry_pause: float
    wait_for_ready: bool

    def _configure(self, *, clock: Clock | None, query_retry_pause: Seconds, wait_for_ready: bool) -> None:
        self.clock = clock if clock is not None else SystemClock()
        self.query_retry_pause = to_seconds(query_retry_pause, name="query_retry_pause")
        self.wait_for_ready = wait_for_ready

    def _do_flow(self, ops: Sequence[Op], timeout: Seconds | None) -> Flow[None]:
        return do_flow(ops, clock=self.clock, timeout=optional_seconds(timeout, name="timeout"))

    def _query_flow(
        self, group: str, own_for: Seconds, *, wait: bool, max_tasks: int, many: bool, timeout: Seconds | None
    ) -> Flow[list[pb.Task]]:
        return query_flow(
            group,
            own_for,
            wait=wait,
            max_tasks=max_tasks,
            many=many,
            timeout=optional_seconds(timeout, name="timeout"),
            clock=self.clock,
            retry_pause=self.query_retry_pause,
        )

    def _lease(self, task: pb.Task, heartbeat: Seconds, own_for: Seconds) -> Lease:
        return Lease(task, heartbeat=heartbeat, own_for=own_for, clock=self.clock)
