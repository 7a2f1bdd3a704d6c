"""Wire messages <-> store values, with the validation docs/api.md asks for.

Everything that can reject a request for its shape lives here and raises
:class:`~masstasker.server.store.BadRequest` with a message naming the field
and the rule.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from masstasker._pb import masstasker_pb2 as pb
from masstasker.server.store import BadRequest, GroupRef, IdRef, LabelRef, Ref, StoredTask, TaskSpec, labels_tuple

__all__ = [
    "MAX_TIMESTAMP_NS",
    "MIN_TIMESTAMP_NS",
    "duration_ns",
    "fill_task",
    "ref_from_pb",
    "spec_from_pb",
    "specs_from_pb",
    "timestamp_ns",
]

_NANOS = 1_000_000_000
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
# Builds a TaskSpec straight from its fields: NamedTuple's generated __new__ is
# Python code, and this runs once per created task (the create-1000 benchmark).
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
    return _new_spec(
        TaskSpec,
        (
            group,
            not_before,
            task.SerializeToString(),
            tuple(sorted(labels.items())) if labels else None,
            task.error != "",
        ),
    )


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
