"""Exceptions raised by the MassTasker client.

Every error the client raises derives from one root, so a worker can catch
``MassTaskerError`` and never see a bare ``grpc.RpcError``::

    MassTaskerError                  .code: grpc.StatusCode | None
    ├── StatusError                  a gRPC call failed; .code and .details from the status
    │   ├── TaskNotFound             NOT_FOUND: a deleted ID is gone, or Query found nothing (wait=False)
    │   ├── PreconditionFailed       FAILED_PRECONDITION: a predicate ID is gone (someone changed the task)
    │   ├── InvalidArgument          INVALID_ARGUMENT: the request is malformed
    │   ├── ResourceExhausted        RESOURCE_EXHAUSTED: a message over a size limit, or the server's
    │   │                            waiting-Query limits are full (.retry_after says when to ask again)
    │   ├── DeadlineExceeded         DEADLINE_EXCEEDED: the call's timeout passed (also a TimeoutError)
    │   ├── Unavailable              UNAVAILABLE: the server cannot be reached (also a ConnectionError)
    │   ├── Unauthenticated          UNAUTHENTICATED: no accepted bearer token (also a PermissionError)
    │   └── Cancelled                CANCELLED: the call or the channel was cancelled
    └── LeaseLost                    run_with_lease could not renew: someone else owns the task now

``SavedError`` is deliberately outside this tree: the client never raises it.
Your work raises it to say "this task failed for good, park it in the error
group" (see ``delete_or_move``), and a worker loop that retries on
``MassTaskerError`` must not swallow it.

The status-code mapping lives in one place, ``from_rpc_error``; every mapped
exception is raised ``from`` the original gRPC error, which stays available
as ``__cause__``.
"""

from __future__ import annotations

import grpc
from grpc import aio

from masstasker._wire import RETRY_AFTER_MS

# A hint above this (an hour) is not a hint we follow.
_MAX_RETRY_AFTER_MS = 3_600_000

__all__ = [
    "Cancelled",
    "DeadlineExceeded",
    "InvalidArgument",
    "LeaseLost",
    "MassTaskerError",
    "PreconditionFailed",
    "ResourceExhausted",
    "SavedError",
    "StatusError",
    "TaskNotFound",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
    "is_saved_error",
]


class MassTaskerError(Exception):
    """Root of every error the client raises. ``code`` is the gRPC status behind it, if any."""

    code: grpc.StatusCode | None = None


class StatusError(MassTaskerError):
    """A gRPC call failed with a status; ``code`` and ``details`` come from that status."""

    code: grpc.StatusCode
    #: Seconds the server asked us to wait before trying again, if it said (our server does when its
    #: waiting-Query limits are full); None otherwise.
    retry_after: float | None = None

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}" if details else code.name)
        self.code = code
        self.details = details


class TaskNotFound(StatusError):
    """NOT_FOUND: a task to delete is gone, or a non-waiting Query found no visible task."""


class PreconditionFailed(StatusError):
    """FAILED_PRECONDITION: a predicate task no longer exists (it was changed or deleted)."""


class InvalidArgument(StatusError):
    """INVALID_ARGUMENT: the server rejected the request as malformed."""


class ResourceExhausted(StatusError):
    """RESOURCE_EXHAUSTED: the request or response exceeds a configured limit, or the server holds as many
    waiting Queries as it allows (then ``retry_after`` is set, and a waiting ``query`` retries by itself)."""


class DeadlineExceeded(StatusError, TimeoutError):
    """DEADLINE_EXCEEDED: the call's timeout passed before the server answered."""


class Unavailable(StatusError, ConnectionError):
    """UNAVAILABLE: the server could not be reached."""


class Unauthenticated(StatusError, PermissionError):
    """UNAUTHENTICATED: the server wants a bearer token (``token=`` or ``MASSTASKER_TOKEN``) and got none it
    accepts. The details say whether it was missing or refused; retrying with the same token will not help."""


class Cancelled(StatusError):
    """CANCELLED: the call was cancelled, e.g. because the channel was closed."""


class LeaseLost(MassTaskerError):
    """``run_with_lease`` could not renew the lease: the task's ID is gone, so another worker owns it.

    The work was told to stop (asyncio: cancelled; sync: its ``lost`` event was set). Do not commit the
    task: the ID you hold is dead, and the new owner will do the work.
    """

    def __init__(self, task_id: int, message: str = "") -> None:
        super().__init__(message or f"lost the lease on task {task_id}: another worker owns it now")
        self.code = grpc.StatusCode.NOT_FOUND
        self.task_id = task_id


_BY_CODE: dict[grpc.StatusCode, type[StatusError]] = {
    grpc.StatusCode.NOT_FOUND: TaskNotFound,
    grpc.StatusCode.FAILED_PRECONDITION: PreconditionFailed,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def from_rpc_error(error: grpc.RpcError) -> StatusError:
    """The client exception for a failed gRPC call, with the original as ``__cause__``.

    Works for both the synchronous (``grpc.Call``) and the asyncio (``AioRpcError``) error types.
    """
    code = grpc.StatusCode.UNKNOWN
    details = ""
    if isinstance(error, grpc.Call | aio.AioRpcError):
        code = error.code() or grpc.StatusCode.UNKNOWN
        details = error.details() or ""
    else:  # an RpcError raised outside a call (rare): keep its text
        details = str(error)
    mapped = _BY_CODE.get(code, StatusError)(code, details)
    if isinstance(error, grpc.Call | aio.AioRpcError):
        mapped.retry_after = _retry_after(error.trailing_metadata())
    mapped.__cause__ = error
    return mapped


def _retry_after(metadata: object) -> float | None:
    """The server's retry hint (``masstasker-retry-after-ms``) in seconds, if the trailers carry a valid one."""
    for item in metadata or ():  # type: ignore[attr-defined]
        key, value = item
        if key == RETRY_AFTER_MS:
            try:
                millis = int(value)
            except (TypeError, ValueError):
                return None
            return millis / 1000 if 0 <= millis <= _MAX_RETRY_AFTER_MS else None
    return None


class SavedError(Exception):
    """Raise this from your work to say a task failed for good and should be parked, not retried.

    ``SavedError(exc)`` wraps an exception (which becomes ``__cause__``); ``SavedError("reason")`` takes
    a message. ``delete_or_move(error_group, task)(exc)`` moves the task to ``error_group`` with its
    ``error`` field set to the message, when ``is_saved_error(exc)``.
    """

    def __init__(self, error: BaseException | str) -> None:
        self.error = error
        super().__init__(str(error) if isinstance(error, BaseException) else error)
        if isinstance(error, BaseException):
            self.__cause__ = error


def is_saved_error(exc: BaseException | None) -> bool:
    """True if ``exc`` is a ``SavedError`` or one is in its ``__cause__``/``__context__`` chain."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc] if exc is not None else []
    while todo:
        current = todo.pop()
        if id(current) in seen:  # chains can form cycles
            continue
        seen.add(id(current))
        if isinstance(current, SavedError):
            return True
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return False
