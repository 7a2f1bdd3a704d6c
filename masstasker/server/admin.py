"""The admin gRPC servicer (``masstasker.admin.v1.Admin``): read-only views for operators.

A thin layer: requests are validated and turned into calls on the store's
:class:`~masstasker.server.stats.AdminView` (its statistics and listings),
and the values it returns into admin messages. Like the MassTasker servicer
it takes and returns raw bytes, so a request that does not parse is
INVALID_ARGUMENT. Every store keeps the statistics (in memory and on
PostgreSQL). Tokens and TLS apply to it as to every service of the server
(they are the server's, not a servicer's).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from masstasker._pb import masstasker_admin_pb2 as apb
from masstasker.server.convert import duration_ns, fill_task, labels_tuple
from masstasker.server.limits import Limits
from masstasker.server.metrics import RpcMetrics
from masstasker.server.stats import AdminView, GroupStats, HistoryRequest, TaskState
from masstasker.server.stores.base import BadRequest, NotFound, PreconditionFailed, StoreUnavailable

__all__ = ["ADMIN_SERVICE_NAME", "DEFAULT_PAGE_SIZE", "MAX_HISTORY_SECONDS", "MAX_PAGE_SIZE", "AdminService"]

ADMIN_SERVICE_NAME = "masstasker.admin.v1.Admin"
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
#: GetGroup's default history, and the longest any request gets (the store keeps a day).
DEFAULT_HISTORY_SECONDS = 3600
MAX_HISTORY_SECONDS = 24 * 3600

_NANOS = 1_000_000_000
log = logging.getLogger("masstasker.server")

_CODES: dict[type[BaseException], grpc.StatusCode] = {
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    PreconditionFailed: grpc.StatusCode.FAILED_PRECONDITION,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
}
_STATES = {int(s) for s in TaskState}

Handler = Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Awaitable[bytes]]


def _history(span: Any, step: Any, default: int) -> HistoryRequest | None:
    """A HistoryRequest from the request's ``history``/``step`` Durations (seconds, clamped)."""
    span_ns = duration_ns(span, "history") if span.ByteSize() else default * _NANOS
    step_ns = duration_ns(step, "step") if step.ByteSize() else 0
    if span_ns < 0 or step_ns < 0:
        raise BadRequest("history and step must not be negative")
    seconds = min(span_ns // _NANOS, MAX_HISTORY_SECONDS)
    if not seconds:
        return None
    return HistoryRequest(seconds, max(step_ns // _NANOS, 1))


def fill_stats(out: apb.GroupStats, stats: GroupStats) -> None:
    """Write one group's statistics into an (empty) GroupStats message."""
    out.group = stats.group
    out.total = stats.total
    out.visible = stats.visible
    out.leased = stats.leased
    out.scheduled = stats.scheduled
    out.errors = stats.errors
    if stats.oldest_visible_age is not None:
        out.oldest_visible_age.FromNanoseconds(stats.oldest_visible_age)
    out.created = stats.created
    out.owned = stats.owned
    out.departed = stats.departed
    out.counters_since.FromNanoseconds(stats.counters_since)
    out.departure_rate = stats.departure_rate
    out.creation_rate = stats.creation_rate
    out.owning_rate = stats.owning_rate
    eta = stats.eta
    if eta is not None:
        out.eta.FromNanoseconds(eta)
    add = out.history.add
    for point in stats.history:
        p = add(created=point.created, owned=point.owned, departed=point.departed, total=point.total)
        p.time.FromNanoseconds(point.time_ns)


class AdminService:
    """The four admin RPCs over one :class:`AdminView`."""

    def __init__(
        self,
        view: AdminView,
        limits: Limits,
        metrics: RpcMetrics,
        *,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self._view = view
        self._limits = limits
        self._metrics = metrics
        self._clock = clock

    def handler(self) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
        """The generic handler to register with a server."""
        methods = {
            "ListGroups": self.list_groups,
            "GetGroup": self.get_group,
            "ListTasks": self.list_tasks,
            "GetTask": self.get_task,
        }
        return grpc.method_handlers_generic_handler(
            ADMIN_SERVICE_NAME,
            {name: grpc.unary_unary_rpc_method_handler(self._wrap(name, fn)) for name, fn in methods.items()},
        )

    def _wrap(self, method: str, fn: Callable[[bytes], Awaitable[bytes]]) -> Handler:
        """Status codes and metrics around one RPC."""
        observe = self._metrics.observer(f"admin.{method}")

        async def handle(data: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            start = time.perf_counter()
            try:
                response = await fn(data)
            except Exception as exc:
                code = _CODES.get(type(exc))
                if code is None:
                    log.exception("admin %s failed", method)
                    code, details = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
                else:
                    details = str(exc)
                observe(code.name, time.perf_counter() - start)
                await context.abort(code, details)
            observe("OK", time.perf_counter() - start)
            return response

        return handle

    async def list_groups(self, data: bytes) -> bytes:
        """ListGroups: every group with its statistics."""
        request = _parse(apb.ListGroupsRequest, data)
        history = _history(request.history, request.step, 0)
        now = self._clock()
        response = apb.ListGroupsResponse()
        response.now.FromNanoseconds(now)
        add = response.groups.add
        for stats in await self._view.group_stats(now, history):
            fill_stats(add(), stats)
        return response.SerializeToString()

    async def get_group(self, data: bytes) -> bytes:
        """GetGroup: one group's statistics with history and ETA."""
        request = _parse(apb.GetGroupRequest, data)
        self._limits.check_group(request.group, "group")
        history = _history(request.history, request.step, DEFAULT_HISTORY_SECONDS)
        now = self._clock()
        response = apb.GetGroupResponse()
        response.now.FromNanoseconds(now)
        fill_stats(response.group, await self._view.one_group_stats(request.group, now, history))
        return response.SerializeToString()

    async def list_tasks(self, data: bytes) -> bytes:
        """ListTasks: a page of a group's tasks in queue order."""
        request = _parse(apb.ListTasksRequest, data)
        self._limits.check_group(request.group, "group")
        labels = labels_tuple(request.selector.labels)
        if labels:
            self._limits.check_labels(labels, "selector.labels")
        if request.state not in _STATES:
            raise BadRequest(f"state {request.state} is not a TaskState")
        page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        now = self._clock()
        page = await self._view.list_tasks(
            request.group,
            now,
            state=TaskState(request.state),
            labels=labels,
            page_token=request.page_token,
            page_size=page_size,
        )
        response = apb.ListTasksResponse(next_page_token=page.next_token)
        response.now.FromNanoseconds(now)
        add = response.tasks.add
        states = response.states
        for task, state in page.tasks:
            fill_task(add(), task)
            states.append(int(state))  # type: ignore[arg-type]
        return response.SerializeToString()

    async def get_task(self, data: bytes) -> bytes:
        """GetTask: one task by ID, with its state."""
        request = _parse(apb.GetTaskRequest, data)
        now = self._clock()
        task, state = await self._view.get_task(request.id, now)
        response = apb.GetTaskResponse(state=int(state))  # type: ignore[arg-type]
        fill_task(response.task, task)
        response.now.FromNanoseconds(now)
        return response.SerializeToString()


def _parse(message_type: Any, data: bytes) -> Any:
    try:
        return message_type.FromString(data)
    except DecodeError as exc:
        raise BadRequest(f"request is not a valid {message_type.DESCRIPTOR.full_name}: {exc}") from None
