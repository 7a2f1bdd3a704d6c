"""Wire messages <-> store values, with the validation docs/api.md asks for.

Everything that can reject a request for its shape lives here and raises
:class:`~masstasker.server.stores.memory.store.BadRequest` with a message naming the field
and the rule; the server's configurable limits on sizes and counts are
:mod:`~masstasker.server.limits`'. What leaves here is valid input for any
store: times in range, label pairs sorted, no empty selector.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from masstasker._pb import masstasker_pb2 as pb
from masstasker.server.stores.memory.store import (
    NANOS_PER_SECOND,
    BadRequest,
    GroupRef,
    IdRef,
    LabelRef,
    Ref,
    StoredTask,
    TaskSpec,
)

__all__ = [
    "MAX_TIMESTAMP_NS",
    "MIN_TIMESTAMP_NS",
    "QuerySpec",
    "check_timestamp_ns",
    "duration_ns",
    "fill_task",
    "labels_tuple",
    "query_from_pb",
    "ref_from_pb",
    "spec_from_pb",
    "specs_from_pb",
    "timestamp_ns",
]

_NANOS = NANOS_PER_SECOND
# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z.
_MIN_TS_SECONDS = -62_135_596_800
_MAX_TS_SECONDS = 253_402_300_799
MIN_TIMESTAMP_NS = _MIN_TS_SECONDS * _NANOS
MAX_TIMESTAMP_NS = _MAX_TS_SECONDS * _NANOS + _NANOS - 1
# google.protobuf.Duration's valid range: +-10,000 years.
_MAX_DURATION_SECONDS = 315_576_000_000


def timestamp_ns(ts: Timestamp, field: str) -> int:
    """A Timestamp as nanoseconds since the epoch; out of range is BadRequest."""
    seconds, nanos = ts.seconds, ts.nanos
    if not (_MIN_TS_SECONDS <= seconds <= _MAX_TS_SECONDS and 0 <= nanos < _NANOS):
        raise BadRequest(
            f"{field}: timestamp seconds={seconds} nanos={nanos} is outside protobuf's valid range "
            "(years 1 to 9999, 0 <= nanos < 1e9)"
        )
    return seconds * _NANOS + nanos


def duration_ns(d: Duration, field: str) -> int:
    """A Duration as nanoseconds; out of range or mixed signs is BadRequest."""
    seconds, nanos = d.seconds, d.nanos
    if not (-_MAX_DURATION_SECONDS <= seconds <= _MAX_DURATION_SECONDS and -_NANOS < nanos < _NANOS) or (
        seconds * nanos < 0
    ):
        raise BadRequest(
            f"{field}: duration seconds={seconds} nanos={nanos} is outside protobuf's valid range "
            "(|seconds| <= 315576000000, |nanos| < 1e9, same sign)"
        )
    return seconds * _NANOS + nanos


def check_timestamp_ns(value: int, field: str) -> int:
    """Reject a computed time (such as now + own_for) that a Timestamp cannot carry."""
    if not MIN_TIMESTAMP_NS <= value <= MAX_TIMESTAMP_NS:
        raise BadRequest(f"{field}: the resulting time is outside protobuf's valid timestamp range")
    return value


_intern = sys.intern
# Builds a TaskSpec or QuerySpec straight from its fields: NamedTuple's generated __new__
# is Python code, and this runs once per created task (the create-1000 benchmark) or Query.
_new_spec = tuple.__new__


def spec_from_pb(task: pb.Task) -> TaskSpec:
    """A created task as a TaskSpec. The client's ``id`` is ignored; ``task`` is consumed.

    A bad ``not_before`` raises BadRequest naming ``not_before``; the caller adds which task.
    """
    if task.HasField("not_before"):
        not_before: int | None = timestamp_ns(task.not_before, "not_before")
        task.ClearField("not_before")
    else:
        not_before = None
    labels = task.labels
    # One str object per group name, not one per task: parsed strings are always new objects.
    group = _intern(task.group)
    task.ClearField("id")
    task.ClearField("group")
    # labels_tuple() is called only for tasks that have labels: most have none, and this runs per task.
    return _new_spec(TaskSpec, (group, not_before, task.SerializeToString(), labels_tuple(labels) if labels else None))


def specs_from_pb(tasks: Sequence[pb.Task]) -> list[TaskSpec]:
    """Every created task converted, in order; an error names the task's index."""
    specs: list[TaskSpec] = []
    append = specs.append
    try:
        for task in tasks:
            append(spec_from_pb(task))
    except BadRequest as exc:
        raise BadRequest(f"created[{len(specs)}].{exc}") from None
    return specs


def labels_tuple(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...] | None:
    """Label pairs in the store's canonical (sorted) form, or None for no labels."""
    return tuple(sorted(labels.items())) if labels else None


def ref_from_pb(ref: pb.TaskRef) -> Ref:
    """A TaskRef as a store Ref; no ``sel`` is BadRequest."""
    which = ref.WhichOneof("sel")
    if which == "id":
        return IdRef(ref.id)
    if which == "group":
        return GroupRef(ref.group)
    if which == "selector":
        labels = labels_tuple(ref.selector.labels)
        if not labels:
            raise BadRequest("empty label selector: use a group ref to select a whole group")
        return LabelRef(labels)
    raise BadRequest("task ref has no selector set: set one of id, selector or group")


def refs_from_pb(refs: Sequence[pb.TaskRef]) -> list[Ref]:
    """Every ref converted, in order."""
    return [ref_from_pb(r) for r in refs]


class QuerySpec(NamedTuple):
    """A Query's arguments, checked: what the servicer hands the store and the waiters."""

    group: str
    now: int | None  # the request's ``now`` in ns; None: the server's clock
    own_for: int  # ns, never negative; 0 is a peek
    max_tasks: int
    wait: bool


def query_from_pb(request: pb.QueryRequest) -> QuerySpec:
    """A QueryRequest's times converted: a bad ``now`` or a negative ``own_for`` is BadRequest.

    The server's limits (``max_tasks``, the group's length) are
    :meth:`~masstasker.server.limits.Limits.check_query`'s.
    """
    own_for = duration_ns(request.own_for, "own_for") if request.HasField("own_for") else 0
    if own_for < 0:
        raise BadRequest(f"own_for must not be negative (got {own_for} ns)")
    now = timestamp_ns(request.now, "now") if request.HasField("now") else None
    return _new_spec(QuerySpec, (request.group, now, own_for, request.max_tasks, request.wait))


def fill_task(out: pb.Task, task: StoredTask) -> None:
    """Write a stored task into an (empty) Task message in place, without a copy."""
    if task.body:
        out.MergeFromString(task.body)
    out.id = task.id
    out.group = task.group
    seconds, nanos = divmod(task.not_before, _NANOS)
    ts = out.not_before
    ts.seconds = seconds
    ts.nanos = nanos
