"""Tasks, payloads, and the operations of ``do``: turning ops into one UpdateRequest and writing IDs back.

Nothing here does I/O. ``build_update`` never mutates the caller's tasks: it sends copies, and
``UpdatePlan.apply`` copies them back (with the server's new IDs) only once the server said yes, so a
failed ``do`` leaves every object the caller holds as it was.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import TypeVar

from google.protobuf.message import Message

from masstasker._pb import masstasker_pb2 as pb
from masstasker.client._time import Seconds, to_seconds, to_timestamp
from masstasker.client.errors import MassTaskerError, is_saved_error

__all__ = [
    "Create",
    "Delete",
    "Disown",
    "Move",
    "Op",
    "Pred",
    "Reown",
    "Task",
    "Update",
    "UpdatePlan",
    "build_update",
    "check_group",
    "check_task",
    "delete_or_move",
    "error_text",
    "new_task",
    "pack_data",
    "unpack_data",
]

Task = pb.Task
"""The task message (``masstasker.Task`` protobuf); the client works on these objects directly."""

M = TypeVar("M", bound=Message)


def check_group(group: object, *, name: str = "group") -> str:
    """``group`` if it is a ``str``; ``TypeError`` otherwise.

    ``None`` in particular would reach the wire as the group ``""`` — a worker whose group came from an unset
    setting would wait on the wrong group forever — so it is refused rather than converted.
    """
    if not isinstance(group, str):
        raise TypeError(f"{name} must be a str (a group name), got {group!r}")
    return group


def check_task(task: object, *, name: str = "task") -> pb.Task:
    """``task`` if it is a ``Task``; ``TypeError`` otherwise (rather than an error from protobuf's insides)."""
    if not isinstance(task, pb.Task):
        raise TypeError(f"{name} must be a Task (from new_task() or a query), got {type(task).__name__}: {task!r}")
    return task


def _check_message(data: object, *, name: str) -> Message:
    if not isinstance(data, Message):
        raise TypeError(f"{name} must be a protobuf message (e.g. pb.Test(...)), got {type(data).__name__}")
    return data


def new_task(
    group: str,
    data: Message | None = None,
    *,
    labels: Mapping[str, str] | None = None,
    not_before: datetime | None = None,
) -> pb.Task:
    """A new, not yet created task in ``group`` with ``data`` packed into its ``Any`` payload.

    Without ``not_before`` the client stamps its clock's now when the task is created (visible at once).
    ``not_before`` must be timezone-aware (``ValueError`` for a naive datetime, which could mean any zone).
    """
    task = pb.Task(group=check_group(group), labels=dict(labels or {}))
    if data is not None:
        pack_data(task, _check_message(data, name="data"))
    if not_before is not None:
        task.not_before.CopyFrom(to_timestamp(not_before, name="not_before"))
    return task


def pack_data(task: pb.Task, data: Message) -> None:
    """Store ``data`` as the task's payload (``Any.Pack``), replacing any previous one."""
    check_task(task).data.Pack(_check_message(data, name="data"))


def unpack_data(task: pb.Task, into: type[M] | M) -> M:
    """The task's payload as a message: pass the message class (a new instance is returned) or an instance
    to fill in. Raises ``TypeError`` if the payload holds another message type (or none)."""
    if isinstance(into, type) and issubclass(into, Message):
        message = into()
    elif isinstance(into, Message):
        message = into
    else:
        raise TypeError(f"into must be a protobuf message class or instance (e.g. pb.Test), got {into!r}")
    if not check_task(task).data.Unpack(message):
        held = task.data.type_url or "no payload"
        raise TypeError(f"task {task.id} holds {held}, not {message.DESCRIPTOR.full_name}")
    return message


class UpdatePlan:
    """One UpdateRequest under construction, plus what to write back into which caller object."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self.request = pb.UpdateRequest()
        self._targets: list[pb.Task] = []  # the caller's objects, parallel to request.created
        self._creating: set[int] = set()  # id() of the caller's objects already being created

    def create(self, task: pb.Task, **changes: object) -> None:
        """Send a copy of ``task`` with ``changes`` applied; write it back on success."""
        if id(task) in self._creating:
            # Two creations from one object would leave it unclear which new ID it should carry.
            raise ValueError(f"task {task.id} ({task.group!r}) is created twice in one do()")
        self._creating.add(id(task))
        copy = self.request.created.add()
        copy.CopyFrom(task)
        copy.ClearField("id")  # the server assigns IDs; clearing keeps the request honest
        for name, value in changes.items():
            if value is None:
                copy.ClearField(name)  # type: ignore[arg-type]
            elif isinstance(value, datetime):
                getattr(copy, name).CopyFrom(to_timestamp(value, name=name))
            else:
                setattr(copy, name, value)
        if not copy.HasField("not_before"):
            # The client's clock, not the server's, so that a fake clock governs visibility end to end.
            copy.not_before.CopyFrom(to_timestamp(self.now, name="the clock's now()"))
        self._targets.append(task)

    def delete(self, task: pb.Task) -> None:
        """Delete the task by its current ID."""
        self.request.deleted.add(id=_existing_id(task, "delete"))

    def pred(self, task: pb.Task) -> None:
        """Make the update conditional on the task's current ID still existing."""
        self.request.predicates.append(_existing_id(task, "use as a predicate"))

    def apply(self, response: pb.UpdateResponse) -> None:
        """Write the sent copies, with their new IDs, back into the caller's objects."""
        ids = response.created_ids
        if len(ids) != len(self._targets):
            raise MassTaskerError(f"server returned {len(ids)} IDs for {len(self._targets)} created tasks")
        for target, sent, new_id in zip(self._targets, self.request.created, ids, strict=True):
            target.CopyFrom(sent)
            target.id = new_id


def _existing_id(task: pb.Task, what: str) -> int:
    if task.id == 0:
        raise ValueError(f"cannot {what} a task that was never created (it has no ID): {task.group!r}")
    return task.id


class Op:
    """One part of an atomic ``do(*ops)``. Build ops with the classes below; they hold the caller's tasks
    and read them when ``do`` runs."""

    __slots__ = ("tasks",)

    def __init__(self, *tasks: pb.Task) -> None:
        name = type(self).__name__
        self.tasks: tuple[pb.Task, ...] = tuple(check_task(t, name=f"{name}() argument") for t in tasks)

    def add_to(self, plan: UpdatePlan) -> None:
        """Add this op's part to ``plan``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(str(t.id) for t in self.tasks)})"


class Create(Op):
    """Create the tasks; each gets its new server ID written back."""

    __slots__ = ()

    def add_to(self, plan: UpdatePlan) -> None:
        for task in self.tasks:
            plan.create(task)


class Delete(Op):
    """Delete the tasks by their current IDs (``TaskNotFound`` if one is gone)."""

    __slots__ = ()

    def add_to(self, plan: UpdatePlan) -> None:
        for task in self.tasks:
            plan.delete(task)


class Pred(Op):
    """Commit only if the tasks still exist with their current IDs (``PreconditionFailed`` otherwise)."""

    __slots__ = ()

    def add_to(self, plan: UpdatePlan) -> None:
        for task in self.tasks:
            plan.pred(task)


class Update(Op):
    """Replace each task by a copy of its current content (delete + create): it gets a new ID."""

    __slots__ = ()

    def add_to(self, plan: UpdatePlan) -> None:
        for task in self.tasks:
            plan.delete(task)
            plan.create(task)


class Move(Op):
    """``Update`` into another group (and, with ``error``, record why, as ``delete_or_move`` does)."""

    __slots__ = ("error", "group")

    def __init__(self, group: str, *tasks: pb.Task, error: str | None = None) -> None:
        super().__init__(*tasks)
        self.group = check_group(group, name="Move() group")
        if error is not None and not isinstance(error, str):
            raise TypeError(f"Move() error must be a str or None, got {error!r}")
        self.error = error

    def add_to(self, plan: UpdatePlan) -> None:
        for task in self.tasks:
            plan.delete(task)
            if self.error is None:
                plan.create(task, group=self.group)
            else:
                plan.create(task, group=self.group, error=self.error)

    def __repr__(self) -> str:
        return f"Move({self.group!r}, {', '.join(str(t.id) for t in self.tasks)})"


class Disown(Op):
    """``Update`` with ``not_before`` reset to the clock's now: the task is visible to others at once."""

    __slots__ = ()

    def add_to(self, plan: UpdatePlan) -> None:
        for task in self.tasks:
            plan.delete(task)
            plan.create(task, not_before=plan.now)


class Reown(Op):
    """``Update`` with ``not_before = now + own_for``: extend (or take) the lease on the tasks."""

    __slots__ = ("own_for",)

    def __init__(self, own_for: Seconds, *tasks: pb.Task) -> None:
        super().__init__(*tasks)
        self.own_for = timedelta(seconds=to_seconds(own_for, name="own_for"))

    def add_to(self, plan: UpdatePlan) -> None:
        for task in self.tasks:
            plan.delete(task)
            plan.create(task, not_before=plan.now + self.own_for)

    def __repr__(self) -> str:
        return f"Reown({self.own_for}, {', '.join(str(t.id) for t in self.tasks)})"


def build_update(ops: Iterable[Op], now: datetime) -> UpdatePlan:
    """The plan for ``do(*ops)`` at time ``now``: one request, and what to write back on success."""
    plan = UpdatePlan(now)
    for op in ops:
        if not isinstance(op, Op):
            raise TypeError(f"do() takes ops such as Create(task) or Delete(task), not {op!r}")
        op.add_to(plan)
    return plan


# Lone surrogates (e.g. from bytes decoded with errors="surrogateescape") are not valid UTF-8 and would
# make the protobuf string field unserializable.
_ILL_FORMED = re.compile("[\ud800-\udfff]")


def error_text(exc: BaseException) -> str:
    """The message stored in ``Task.error`` for ``exc``: its text, ill-formed UTF-8 replaced by U+FFFD."""
    return _ILL_FORMED.sub("\ufffd", str(exc) or type(exc).__name__)


def delete_or_move(error_group: str, *tasks: pb.Task) -> Callable[[BaseException | None], Op]:
    """``delete_or_move(error_group, task)(exc)``: the op that commits ``task`` given the outcome ``exc``.

    A saved error (``is_saved_error(exc)``) gives ``Move(error_group, task)`` with ``error`` set to the
    message; anything else, including ``None``, gives ``Delete(task)``. Decide first whether a non-saved
    error should be retried: then do not commit at all and let the lease expire (or ``Disown``).
    """

    check_group(error_group, name="error_group")
    tasks = tuple(check_task(t, name="delete_or_move() argument") for t in tasks)

    def decide(exc: BaseException | None) -> Op:
        if exc is not None and is_saved_error(exc):
            return Move(error_group, *tasks, error=error_text(exc))
        return Delete(*tasks)

    return decide
