"""The create path's conversion: the inlined loop in specs_from_pb gives what spec_from_pb gives task by task."""

from __future__ import annotations

import pytest
from google.protobuf.any_pb2 import Any
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

from masstasker._pb import masstasker_pb2 as pb
from masstasker.server.convert import ref_from_pb, refs_from_pb, spec_from_pb, specs_from_pb
from masstasker.server.stores.memory.store import BadRequest

_tasks = st.builds(
    lambda task_id, group, seconds, labels, error, attempts, value: pb.Task(
        id=task_id,
        group=group,
        not_before=None if seconds is None else Timestamp(seconds=seconds, nanos=7),
        labels=labels,
        error=error,
        attempts=attempts,
        data=None if value is None else Any(type_url="type.googleapis.com/masstasker.Test", value=value),
    ),
    st.sampled_from([0, 0, 5, 2**64 - 1]),
    st.sampled_from(["", "a", "a", "b", "é" * 3]),
    st.none() | st.integers(0, 2**33),
    st.dictionaries(st.sampled_from(["k", "z", "é"]), st.text(max_size=3), max_size=3),
    st.sampled_from(["", "", "boom"]),
    st.sampled_from([0, 0, 1, 127, 128, 2**32 - 1]),
    st.none() | st.binary(max_size=20),
)


@settings(max_examples=200, deadline=None)
@given(tasks=st.lists(_tasks, max_size=6))
def test_the_loop_agrees_with_one_by_one(tasks: list[pb.Task]) -> None:
    one_by_one = [spec_from_pb(pb.Task.FromString(t.SerializeToString())) for t in tasks]
    together = specs_from_pb([pb.Task.FromString(t.SerializeToString()) for t in tasks])
    assert together == one_by_one
    # Equal group names are one str object, as the store's per-group runs expect of interned names.
    for a in together:
        for b in together:
            assert (a.group is b.group) is (a.group == b.group)


def test_a_bad_not_before_names_the_task() -> None:
    good = pb.Task(group="g")
    bad = pb.Task(group="g", not_before=Timestamp(seconds=-(2**62)))
    with pytest.raises(BadRequest, match=r"^created\[1\]\.not_before: "):
        specs_from_pb([good, bad])


_refs = st.one_of(
    st.integers(0, 2**64 - 1).map(lambda i: pb.TaskRef(id=i)),
    st.just(pb.TaskRef(id=0)),  # set explicitly: the oneof says id, the value is the default
    st.sampled_from(["", "g"]).map(lambda g: pb.TaskRef(group=g)),
    st.dictionaries(st.sampled_from(["k", "z"]), st.text(max_size=2), min_size=1).map(
        lambda labels: pb.TaskRef(selector=pb.LabelSelector(labels=labels))
    ),
)


@settings(max_examples=200, deadline=None)
@given(refs=st.lists(_refs, max_size=5))
def test_refs_agree_with_one_by_one(refs: list[pb.TaskRef]) -> None:
    assert refs_from_pb(refs) == [ref_from_pb(r) for r in refs]


def test_a_ref_without_a_selector_is_refused() -> None:
    with pytest.raises(BadRequest, match="no selector set"):
        refs_from_pb([pb.TaskRef(id=3), pb.TaskRef()])
