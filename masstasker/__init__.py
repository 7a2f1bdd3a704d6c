"""MassTasker: a task-queue server and client, wire-compatible with the Go MassTasker.

The client is importable from here: ``from masstasker import Client, new_task, Delete``; ``pb`` is the
module of wire messages (``pb.Task``, ``pb.Test``, ``pb.DebugRequest``, …) for use with ``client.rpc``.
"""

from importlib.metadata import PackageNotFoundError, version

from masstasker._pb import masstasker_pb2 as pb
from masstasker.client import (
    AsyncClient,
    Cancelled,
    Client,
    Clock,
    Create,
    DeadlineExceeded,
    Delete,
    Disown,
    InvalidArgument,
    LeaseLost,
    MassTaskerError,
    Move,
    Op,
    PreconditionFailed,
    Pred,
    Reown,
    ResourceExhausted,
    SavedError,
    StatusError,
    SystemClock,
    Task,
    TaskNotFound,
    Unauthenticated,
    Unavailable,
    Update,
    delete_or_move,
    is_saved_error,
    new_task,
    pack_data,
    unpack_data,
)

try:
    __version__ = version("masstasker")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
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
    "StatusError",
    "SystemClock",
    "Task",
    "TaskNotFound",
    "Unauthenticated",
    "Unavailable",
    "Update",
    "__version__",
    "delete_or_move",
    "is_saved_error",
    "new_task",
    "pack_data",
    "pb",
    "unpack_data",
]
