"""What the ``masstasker`` command and the web dashboard share: plain views of admin messages, and the retry op.

Nothing here does I/O. Both operator surfaces read through the admin API (``masstasker.admin.v1``) and
change tasks through the ordinary ``Update``/``BulkSet``; this module turns the admin API's messages
into JSON-ready dicts (payloads decoded where the type is known to this process) and builds the ops
that ``retry`` and ``move`` send, so that the two surfaces cannot drift apart.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.any_pb2 import Any as AnyPb
from google.protobuf.descriptor_pool import Default as default_pool
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message_factory import GetMessageClass
from google.protobuf.timestamp_pb2 import Timestamp

from masstasker._pb import masstasker_admin_pb2 as admin_pb
from masstasker._pb import masstasker_pb2 as pb
from masstasker.client._ops import Op, UpdatePlan

__all__ = [
    "STATES",
    "Retry",
    "decode_payload",
    "group_view",
    "parse_labels",
    "parse_state",
    "selector",
    "state_name",
    "task_view",
]

#: The ``--state``/``state=`` names an operator types, and the admin API's enum values.
STATES: dict[str, admin_pb.TaskState.ValueType] = {
    "all": admin_pb.TASK_STATE_UNSPECIFIED,
    "visible": admin_pb.TASK_STATE_VISIBLE,
    "leased": admin_pb.TASK_STATE_LEASED,
    "scheduled": admin_pb.TASK_STATE_SCHEDULED,
    "error": admin_pb.TASK_STATE_ERROR,
}
_STATE_NAMES: dict[int, str] = {int(value): name for name, value in STATES.items()}


def parse_state(name: str) -> admin_pb.TaskState.ValueType:
    """The admin API's ``TaskState`` for ``visible``/``leased``/``scheduled``/``error``/``all``."""
    try:
        return STATES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown state {name!r}: choose from {', '.join(STATES)}") from None


def state_name(state: int) -> str:
    """``visible``, ``leased``, ``scheduled`` (or ``error``/``all`` for filters)."""
    return _STATE_NAMES.get(state, "unknown")


def parse_labels(pairs: Iterable[str]) -> dict[str, str]:
    """``["k=v", ...]`` as a dict; a pair without ``=`` is a ValueError that names it."""
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"a label is KEY=VALUE, got {pair!r}")
        labels[key] = value
    return labels


def _seconds(duration: Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def _time(stamp: Timestamp) -> str:
    """RFC 3339 in UTC with microseconds, or ``""`` for an unset timestamp."""
    if stamp.seconds == 0 and stamp.nanos == 0:
        return ""
    when = datetime.fromtimestamp(stamp.seconds, UTC).replace(microsecond=stamp.nanos // 1000)
    return when.isoformat().replace("+00:00", "Z")


def decode_payload(data: AnyPb) -> dict[str, Any]:
    """A task's ``Any`` payload: its type URL, its fields as JSON where the type is known to this process
    (protobuf's default pool: every generated module imported so far), and always its bytes in base64.

    ``fields`` is None when the type is unknown or the bytes do not parse as it.
    """
    view: dict[str, Any] = {"type_url": data.type_url, "fields": None, "base64": base64.b64encode(data.value).decode()}
    name = data.type_url.rpartition("/")[2]
    if not name:
        return view
    try:
        message = GetMessageClass(default_pool().FindMessageTypeByName(name))()
        message.ParseFromString(data.value)
        view["fields"] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    except Exception:  # unknown type, bytes that are not that type, a nested Any of an unknown type
        view["fields"] = None
    return view


def task_view(task: pb.Task, state: int | None = None) -> dict[str, Any]:
    """A task as a JSON-ready dict: times in RFC 3339, the payload decoded (see ``decode_payload``)."""
    view: dict[str, Any] = {
        "id": task.id,
        "group": task.group,
        "state": state_name(state) if state is not None else None,
        "not_before": _time(task.not_before),
        "labels": dict(sorted(task.labels.items())),
        "error": task.error,
        "attempts": task.attempts,
        "data": decode_payload(task.data) if task.HasField("data") else None,
    }
    return view


def group_view(stats: admin_pb.GroupStats) -> dict[str, Any]:
    """A group's statistics as a JSON-ready dict: durations in seconds (None when unset), rates per second."""
    return {
        "group": stats.group,
        "total": stats.total,
        "visible": stats.visible,
        "leased": stats.leased,
        "scheduled": stats.scheduled,
        "errors": stats.errors,
        "oldest_visible_age": _seconds(stats.oldest_visible_age) if stats.HasField("oldest_visible_age") else None,
        "created": stats.created,
        "owned": stats.owned,
        "departed": stats.departed,
        "counters_since": _time(stats.counters_since),
        "departure_rate": stats.departure_rate,
        "creation_rate": stats.creation_rate,
        "owning_rate": stats.owning_rate,
        "eta": _seconds(stats.eta) if stats.HasField("eta") else None,
        "history": [
            {
                "time": point.time.seconds + point.time.nanos / 1e9,
                "created": point.created,
                "owned": point.owned,
                "departed": point.departed,
                "total": point.total,
            }
            for point in stats.history
        ],
    }


class Retry(Op):
    """Move failed tasks back to ``group``, visible now, with ``error`` cleared and ``attempts``
    reset to 0: for each task, delete it by its ID and create the cleaned copy, in the one atomic
    Update of ``do()``. A task someone changed meanwhile makes the whole batch fail with ``TaskNotFound``.
    """

    __slots__ = ("group",)

    def __init__(self, group: str, *tasks: pb.Task) -> None:
        super().__init__(*tasks)
        self.group = group

    def add_to(self, plan: UpdatePlan) -> None:
        """Delete each task and create its copy in ``group`` with a clean slate."""
        reset: dict[str, object] = {"group": self.group, "error": None, "not_before": plan.now, "attempts": None}
        for task in self.tasks:
            plan.delete(task)
            plan.create(task, **reset)

    def __repr__(self) -> str:
        return f"Retry({self.group!r}, {', '.join(str(t.id) for t in self.tasks)})"


def selector(labels: Mapping[str, str]) -> pb.LabelSelector | None:
    """A label selector for the admin API's ``ListTasks``, or None for no filter."""
    return pb.LabelSelector(labels=dict(labels)) if labels else None
