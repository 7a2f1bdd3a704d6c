"""MassTasker: a task-queue server and client, wire-compatible with the Go MassTasker.

The client is importable from here: ``from masstasker import Client, new_task, Delete``; ``pb`` is the
module of wire messages (``pb.Task``, ``pb.Test``, ``pb.DebugRequest``, …) for use with ``client.rpc``.

These names are loaded on first use, not when the package is imported: the pytest plugin
(``masstasker.pytest_plugin``) is imported into every test run once masstasker is installed, and loading
our protobuf bindings there would clash with a project's own bindings of the Go ``masstasker.proto``
(same proto package, so ``duplicate symbol 'masstasker.Task'``).
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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


def __getattr__(name: str) -> object:
    """Load a public name on first use (PEP 562); see the module docstring for why."""
    if name == "pb":
        value: object = import_module("masstasker._pb.masstasker_pb2")
    elif name in __all__:
        value = getattr(import_module("masstasker.client"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
