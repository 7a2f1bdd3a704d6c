"""The stored body's byte-level helpers, checked against protobuf's own parser on random tasks."""

from __future__ import annotations

from google.protobuf.any_pb2 import Any
from hypothesis import given, settings
from hypothesis import strategies as st

from masstasker._pb import masstasker_pb2 as pb
from masstasker.server import body
from masstasker.server.convert import body_of

TEXT = st.text(max_size=8)
# Unknown fields a newer peer might send (numbers above Task's), in every wire type, groups included.
UNKNOWN = st.lists(
    st.sampled_from(
        [
            b"\x40\x05",  # field 8, varint
            b"\x49" + b"\x01" * 8,  # field 9, fixed64
            b"\x52\x02hi",  # field 10, length-delimited
            b"\x5d" + b"\x02" * 4,  # field 11, fixed32
            b"\x63\x08\x01\x64",  # field 12, a group holding field 1 = 1
        ]
    ),
    max_size=3,
)


@st.composite
def tasks(draw: st.DrawFn) -> pb.Task:
    task = pb.Task(
        labels=draw(st.dictionaries(TEXT, TEXT, max_size=3)),
        error=draw(TEXT),
        attempts=draw(st.sampled_from([0, 1, 5, 127, 128, 300, 2**32 - 2, 2**32 - 1])),
    )
    if draw(st.booleans()):
        task.data.CopyFrom(Any(type_url="t/x", value=draw(st.binary(max_size=20))))
    for unknown in draw(UNKNOWN):
        task.MergeFromString(unknown)
    return task


def parsed(data: bytes) -> pb.Task:
    return pb.Task.FromString(data)


@settings(max_examples=300, deadline=None)
@given(tasks())
def test_body_parses_as_the_task_and_keeps_the_rule(task: pb.Task) -> None:
    copy = pb.Task()
    copy.CopyFrom(task)
    stored = body_of(copy)
    body.check(stored)
    assert parsed(stored) == task
    assert body.attempts_of(stored) == task.attempts


@settings(max_examples=300, deadline=None)
@given(tasks())
def test_owning_raises_attempts_by_one_and_changes_nothing_else(task: pb.Task) -> None:
    copy = pb.Task()
    copy.CopyFrom(task)
    stored = body.owned_once_more(body_of(copy))
    body.check(stored)
    expected = pb.Task()
    expected.CopyFrom(task)
    expected.attempts = min(task.attempts + 1, 2**32 - 1)
    assert parsed(stored) == expected
    assert parsed(stored).SerializeToString(deterministic=True) == expected.SerializeToString(
        deterministic=True
    )  # unknown fields kept too
    assert body.attempts_of(stored) == expected.attempts


@settings(max_examples=300, deadline=None)
@given(tasks(), TEXT)
def test_error_is_read_and_replaced_in_place(task: pb.Task, error: str) -> None:
    copy = pb.Task()
    copy.CopyFrom(task)
    stored = body_of(copy)
    assert body.error_of(stored) == task.error
    rewritten = body.with_error(stored, error)
    body.check(rewritten)
    expected = pb.Task()
    expected.CopyFrom(task)
    expected.error = error
    assert parsed(rewritten).SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)


def test_check_refuses_attempts_anywhere_but_first() -> None:
    canonical = pb.Task(error="x", attempts=2).SerializeToString()  # protobuf puts field 7 after field 6
    try:
        body.check(canonical)
    except AssertionError:
        pass
    else:
        raise AssertionError("a canonical body with attempts after error passed the check")
