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
from masstasker.server import body
from masstasker.server.stores.memory.store import (
    NANOS_PER_SECOND,
    BadRequest,
    DeadLetter,
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
    "body_of",
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
    error = task.error != ""  # before body_of() consumes the task
    return _new_spec(TaskSpec, (group, not_before, body_of(task), labels_tuple(labels) if labels else None, error))


def body_of(task: pb.Task) -> bytes:
    """A task's stored body (it must have no id, group or not_before); ``task`` is consumed.

    ``attempts`` goes first, as :mod:`masstasker.server.body` requires, so owning can raise it in O(1).
    """
    attempts = task.attempts
    if not attempts:
        return task.SerializeToString()
    task.ClearField("attempts")
    return body.encode(attempts, task.SerializeToString())


def specs_from_pb(tasks: Sequence[pb.Task]) -> list[TaskSpec]:
    """Every created task converted as :func:`spec_from_pb` converts one, in order; an error names the task's index.

    The steps of :func:`spec_from_pb` and :func:`body_of` are inlined (a create of 1,000 tasks runs
    them 1,000 times, and two calls per task were a tenth of its conversion), and a step is skipped
    where it cannot change anything: clearing an ``id`` of 0, interning the group name of the task
    before again. ``tests/test_convert.py`` checks that both give the same specs.
    """
    specs: list[TaskSpec] = []
    append = specs.append
    encode = body.encode
    new_spec = _new_spec
    previous = ""  # the group name of the task before, interned
    try:
        for task in tasks:
            if task.HasField("not_before"):
                not_before: int | None = timestamp_ns(task.not_before, "not_before")
                task.ClearField("not_before")
            else:
                not_before = None
            labels = task.labels
            group = task.group
            if group != previous:
                previous = _intern(group)
            if task.id:
                task.ClearField("id")
            task.ClearField("group")
            error = task.error != ""
            attempts = task.attempts
            if attempts:
                task.ClearField("attempts")
                stored = encode(attempts, task.SerializeToString())
            else:
                stored = task.SerializeToString()
            append(new_spec(TaskSpec, (previous, not_before, stored, labels_tuple(labels) if labels else None, error)))
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
    # ID refs inline: every worker's commit is one, and this runs on every Update. A non-zero ``id`` can
    # only be the oneof's set member, so reading it first spares WhichOneof (a quarter of the
    # conversion of a 100-task completion); an ``id`` of 0 may be unset and goes the long way.
    out: list[Ref] = []
    append = out.append
    for r in refs:
        task_id = r.id
        append(IdRef(task_id) if task_id else ref_from_pb(r))
    return out


class QuerySpec(NamedTuple):
    """A Query's arguments, checked: what the servicer hands the store and the waiters."""

    group: str
    now: int | None  # the request's ``now`` in ns; None: the server's clock
    own_for: int  # ns, never negative; 0 is a peek
    max_tasks: int
    wait: bool
    dead_letter: DeadLetter | None  # None: no max_attempts


def query_from_pb(request: pb.QueryRequest) -> QuerySpec:
    """A QueryRequest's times converted: a bad ``now`` or a negative ``own_for`` is BadRequest, and so is
    ``max_attempts`` without a ``dead_letter_group`` or with the queried group as one.

    The server's limits (``max_tasks``, the group's length) are
    :meth:`~masstasker.server.limits.Limits.check_query`'s.
    """
    own_for = duration_ns(request.own_for, "own_for") if request.HasField("own_for") else 0
    if own_for < 0:
        raise BadRequest(f"own_for must not be negative (got {own_for} ns)")
    now = timestamp_ns(request.now, "now") if request.HasField("now") else None
    group = request.group
    max_attempts = request.max_attempts
    dead_letter = None
    if max_attempts:
        dead_letter_group = request.dead_letter_group
        if not dead_letter_group:
            raise BadRequest(
                f"max_attempts is {max_attempts} but dead_letter_group is empty: name the group poison tasks go to"
            )
        if dead_letter_group == group:
            raise BadRequest(f"dead_letter_group must be another group than the one queried (both are {group!r})")
        # The parked tasks' group: one str object, as for created tasks.
        dead_letter = DeadLetter(max_attempts, _intern(dead_letter_group))
    return _new_spec(QuerySpec, (group, now, own_for, request.max_tasks, request.wait, dead_letter))


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
