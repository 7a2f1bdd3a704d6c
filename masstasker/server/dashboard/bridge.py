"""How the dashboard's HTTP threads call the server's own RPC handlers, in-process, on its event loop.

The dashboard is a client of the admin API and of ``Update``/``BulkSet`` like any other, only without
the network: it looks up the very handlers registered with the gRPC server (status mapping, metrics,
durability included) and runs them on the server's loop with ``run_coroutine_threadsafe``. Each call
is one short coroutine (a page of tasks, one batch of changes), so no dashboard request holds the
loop for long; the HTTP thread waits at most ``timeout`` seconds for it.

Group statistics are fetched once per ``max_age`` and shared by every open page (``Snapshots``): a
hundred browsers on the live overview cost the loop what one does.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from masstasker._pb import masstasker_admin_pb2 as admin_pb

__all__ = ["CallFailed", "Calls", "Snapshots"]

M = TypeVar("M", bound=Message)

# Seconds an HTTP thread waits for its call on the loop before answering 503.
CALL_TIMEOUT = 10.0


class CallFailed(Exception):
    """An in-process call ended with a non-OK status (``code``, ``details``), as a remote one would."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class _Aborted(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Details:
    """The ``HandlerCallDetails`` a generic handler looks a method up by."""

    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


class _Context:
    """The part of ``grpc.aio.ServicerContext`` our handlers use, for a call that has no network peer."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode = grpc.StatusCode.OK
        self.details = ""

    def peer(self) -> str:
        return "dashboard"

    def time_remaining(self) -> float | None:
        return CALL_TIMEOUT

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        self.code, self.details = code, details
        raise _Aborted


def _unary(fn: Callable[[Any, Any], Any], *, takes_bytes: bool) -> Callable[[Message, _Context], Awaitable[Any]]:
    async def call(request: Message, context: _Context) -> Any:
        # Our MassTasker handlers are registered without (de)serializers: bytes in and out.
        result = fn(request.SerializeToString() if takes_bytes else request, context)
        return await result if asyncio.iscoroutine(result) else result

    return call


class Calls:
    """Unary calls into the gRPC handlers registered on this server, made from any thread."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        handlers: Sequence[grpc.GenericRpcHandler],  # type: ignore[type-arg]
        *,
        timeout: float = CALL_TIMEOUT,
    ) -> None:
        self._loop = loop
        self._handlers = tuple(handlers)
        self._timeout = timeout

    def _find(self, method: str) -> Callable[[Message, _Context], Awaitable[Any]]:
        details = _Details(method)
        for handler in self._handlers:
            found = handler.service(details)  # type: ignore[arg-type]
            if found is not None and found.unary_unary is not None:
                return _unary(found.unary_unary, takes_bytes=found.request_deserializer is None)
        raise CallFailed(grpc.StatusCode.UNIMPLEMENTED, f"no handler for {method}")

    def call(self, method: str, request: Message, response_type: type[M]) -> M:
        """Run ``method`` (e.g. ``/masstasker.MassTasker/Update``) on the server's loop; its response.

        Raises ``CallFailed`` with the status the handler aborted with, or UNAVAILABLE if the loop did
        not run it within the timeout (the server is stopping, or overloaded).
        """
        handler = self._find(method)
        context = _Context()

        async def run() -> Any:
            return await handler(request, context)

        try:
            future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        except RuntimeError as exc:  # the loop is closed: the server stopped
            raise CallFailed(grpc.StatusCode.UNAVAILABLE, "the server is stopping") from exc
        try:
            raw = future.result(self._timeout)
        except _Aborted:
            raise CallFailed(context.code, context.details) from None
        except TimeoutError:
            future.cancel()
            raise CallFailed(grpc.StatusCode.UNAVAILABLE, "the server did not answer in time") from None
        if context.code != grpc.StatusCode.OK:  # set_code() instead of abort()
            raise CallFailed(context.code, context.details)
        return raw if isinstance(raw, response_type) else response_type.FromString(raw)


class Snapshots:
    """``ListGroups`` at most once per ``max_age`` seconds, shared by every reader (the live pages)."""

    def __init__(self, calls: Calls, *, max_age: float = 0.5, clock: Callable[[], float] = time.monotonic) -> None:
        self._calls = calls
        self._max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._taken = -float("inf")
        self._latest: admin_pb.ListGroupsResponse | None = None

    def latest(self) -> admin_pb.ListGroupsResponse:
        """The freshest statistics, at most ``max_age`` old."""
        with self._lock:  # one thread refreshes; the others wait for its result instead of calling too
            if self._latest is None or self._clock() - self._taken >= self._max_age:
                self._latest = self._calls.call(
                    "/masstasker.admin.v1.Admin/ListGroups", admin_pb.ListGroupsRequest(), admin_pb.ListGroupsResponse
                )
                self._taken = self._clock()
            return self._latest
