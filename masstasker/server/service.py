"""The gRPC servicer: request bytes -> store calls -> response bytes, and status codes.

Handlers take and return raw bytes (registered with no (de)serializers), so
that a request that does not parse gets INVALID_ARGUMENT from us rather than
a generic error from the gRPC layer, and so responses are built straight
into their final message without intermediate copies.

The servicer talks to a :class:`~masstasker.server.stores.base.TaskStore`
and never learns which store runs: each RPC is one atomic store operation
(plus, for a waiting Query, the wait).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from masstasker._pb import masstasker_pb2 as pb
from masstasker.server.admission import WaitingAdmission
from masstasker.server.config import Settings
from masstasker.server.convert import (
    check_timestamp_ns,
    fill_task,
    labels_tuple,
    query_from_pb,
    refs_from_pb,
    specs_from_pb,
    timestamp_ns,
)
from masstasker.server.limits import Limits
from masstasker.server.metrics import RpcMetrics
from masstasker.server.stores.base import BadRequest, NotFound, PreconditionFailed, TaskStore

__all__ = ["SERVICE_NAME", "MassTaskerService"]

SERVICE_NAME = "masstasker.MassTasker"

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

_CODES: dict[type[BaseException], grpc.StatusCode] = {
    PreconditionFailed: grpc.StatusCode.FAILED_PRECONDITION,
    NotFound: grpc.StatusCode.NOT_FOUND,
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    TimeoutError: grpc.StatusCode.DEADLINE_EXCEEDED,
}

Handler = Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Awaitable[bytes]]


def _parse(message_type: type[M], data: bytes) -> M:
    try:
        return message_type.FromString(data)
    except DecodeError as exc:
        raise BadRequest(f"request is not a valid {message_type.DESCRIPTOR.full_name}: {exc}") from None


class MassTaskerService:
    """The four MassTasker RPCs over one store."""

    def __init__(
        self,
        store: TaskStore,
        admission: WaitingAdmission,
        settings: Settings,
        metrics: RpcMetrics,
        *,
        clock: Callable[[], int],
    ) -> None:
        self._store = store
        self._admission = admission
        self._metrics = metrics
        self._limits = Limits(settings)
        # The server's one clock, the store's and the waiters' too: a Query without ``now`` sees what they see.
        self._clock = clock

    def handler(self) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
        """The generic handler to register with a server."""
        methods = {
            "Update": self._wrap("Update", self.update),
            "Query": self._wrap("Query", self.query),
            "BulkSet": self._wrap("BulkSet", self.bulk_set),
            "Debug": self._wrap("Debug", self.debug),
        }
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME, {name: grpc.unary_unary_rpc_method_handler(fn) for name, fn in methods.items()}
        )

    def _wrap(self, method: str, fn: Callable[[bytes, Any], Awaitable[bytes]]) -> Handler:
        """Status-code mapping, metrics and debug logging around one RPC."""
        observe = self._metrics.observer(method)
        perf_counter = time.perf_counter
        debug = log.isEnabledFor(logging.DEBUG)

        async def handle(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            start = perf_counter()
            try:
                response = await fn(request, context)
            except asyncio.CancelledError:
                observe("CANCELLED", perf_counter() - start)
                raise
            except Exception as exc:
                # Our own exceptions map by type; one that knows its status (a full waiting limit, with a
                # retry-after hint) says so itself.
                code = _CODES.get(type(exc)) or getattr(exc, "status_code", None)
                if code is None:
                    log.exception("%s failed", method)
                    code, details = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
                else:
                    details = str(exc) or code.name.lower().replace("_", " ")
                observe(code.name, perf_counter() - start)
                if debug:
                    log.debug("%s -> %s: %s", method, code.name, details)
                await context.abort(code, details, trailing_metadata=getattr(exc, "trailing_metadata", ()))
            observe("OK", perf_counter() - start)
            if debug:
                log.debug("%s -> OK (%d bytes)", method, len(response))
            return response

        return handle

    async def update(self, data: bytes, context: object) -> bytes:
        """Update: predicates, then deletions, then creations, atomically."""
        request = _parse(pb.UpdateRequest, data)
        limits = self._limits
        limits.check_update(request)
        created = specs_from_pb(request.created)
        limits.check_specs(created, len(data))
        ids = await self._store.update(created, refs_from_pb(request.deleted), request.predicates)
        return pb.UpdateResponse(created_ids=ids).SerializeToString()

    async def query(self, data: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        """Query: peek at or own the head of a group, waiting for one if asked."""
        request = _parse(pb.QueryRequest, data)
        self._limits.check_query(request)
        group, now, own_for, max_tasks, wait = query_from_pb(request)
        store = self._store
        server_now = self._clock()
        if now is None:
            now = server_now
        if own_for:
            check_timestamp_ns(now + own_for, "now + own_for")
        tasks = await store.query(group, now, own_for, max_tasks)
        if not tasks:
            if not wait:
                raise NotFound(f"no visible task in group {group!r}")
            with self._admission.admit(context.peer()):
                tasks = await store.wait(group, now - server_now, own_for, max_tasks, context.time_remaining())
        response = pb.QueryResponse()
        fill_task(response.task, tasks[0])
        if max_tasks > 1:
            add = response.tasks.add
            for task in tasks:
                fill_task(add(), task)
        return response.SerializeToString()

    async def bulk_set(self, data: bytes, context: object) -> bytes:
        """BulkSet: rewrite every selected task from the prototype's non-zero fields."""
        request = _parse(pb.BulkSetRequest, data)
        self._limits.check_bulk_set(request)
        check_body = self._limits.check_body
        proto = request.prototype
        not_before = timestamp_ns(proto.not_before, "prototype.not_before") if proto.HasField("not_before") else None
        patch = None
        if proto.HasField("data") or proto.labels or proto.error:

            def patch(body: bytes) -> bytes:
                task = pb.Task.FromString(body)
                if proto.HasField("data"):
                    task.data.CopyFrom(proto.data)
                if proto.labels:
                    task.labels.clear()
                    task.labels.update(proto.labels)
                if proto.error:
                    task.error = proto.error
                return check_body(task.SerializeToString(), "a rewritten task")

        count = await self._store.bulk_set(
            refs_from_pb(request.ref),
            group=proto.group or None,
            not_before=not_before,
            body_patch=patch,
            labels=labels_tuple(proto.labels),
        )
        return pb.BulkSetResponse(num_updated=count).SerializeToString()

    async def debug(self, data: bytes, context: object) -> bytes:
        """Debug: a group's tasks in queue order, or all tasks in ID order."""
        request = _parse(pb.DebugRequest, data)
        # A uint64 limit can exceed what islice() takes (found by fuzzing: was INTERNAL); no store is that big.
        limit = min(request.limit, sys.maxsize)
        tasks, total = await self._store.debug(request.group, limit)
        response = pb.DebugResponse(num_tasks=total)
        add = response.tasks.add
        for task in tasks:
            fill_task(add(), task)
        return response.SerializeToString()
