"""The high-level MassTasker client: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Both work on ``Task`` protobuf objects and keep their IDs current: after ``do(Update(task))`` the same
object carries the task's new ID. See ``Client`` for the methods; ``errors`` for what they raise.
"""

from masstasker.client._core import DEFAULT_HEARTBEAT, DEFAULT_OWN_FOR, DEFAULT_QUERY_RETRY_PAUSE
from masstasker.client._ops import (
    Create,
    Delete,
    Disown,
    Move,
    Op,
    Pred,
    Reown,
    Task,
    Update,
    delete_or_move,
    new_task,
    pack_data,
    unpack_data,
)
from masstasker.client._time import AdvancingClock, Clock, Seconds, SystemClock
from masstasker.client.aio import AsyncClient
from masstasker.client.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    LeaseLost,
    MassTaskerError,
    PreconditionFailed,
    ResourceExhausted,
    SavedError,
    StatusError,
    TaskNotFound,
    Unauthenticated,
    Unavailable,
    is_saved_error,
)
from masstasker.client.sync import Client

__all__ = [
    "DEFAULT_HEARTBEAT",
    "DEFAULT_OWN_FOR",
    "DEFAULT_QUERY_RETRY_PAUSE",
    "AdvancingClock",
    "AsyncClient",
    "Cancelled",
    "Client",
    "Clock",
    "Create",
    "DeadlineExceeded",
    "Delete",
    "Disown",
    "InvalidArgument",
    "LeaseLost",
    "MassTaskerError",
    "Move",
    "Op",
    "PreconditionFailed",
    "Pred",
    "Reown",
    "ResourceExhausted",
    "SavedError",
    "Seconds",
    "StatusError",
    "SystemClock",
    "Task",
    "TaskNotFound",
    "Unauthenticated",
    "Unavailable",
    "Update",
    "delete_or_move",
    "is_saved_error",
    "new_task",
    "pack_data",
    "unpack_data",
]
