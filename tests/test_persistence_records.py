"""The on-disk encoding: round trips at the edges of every field, and frame checks."""

from __future__ import annotations

import io
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from masstasker.server.convert import MAX_TIMESTAMP_NS, MIN_TIMESTAMP_NS
from masstasker.server.durability.files import CorruptFile, FrameReader
from masstasker.server.durability.records import (
    BadFrame,
    decode_change,
    decode_tasks,
    encode_change,
    encode_tasks,
    frame,
    parse_frame_header,
)
from masstasker.server.durability.recovery import _Replay
from masstasker.server.stores.memory.store import (
    MAX_ID,
    BadRequest,
    GroupRef,
    IdRef,
    NotFound,
    Store,
    StoredTask,
    TaskSpec,
)

labels = st.none() | st.lists(st.tuples(st.text(), st.text()), min_size=1, max_size=4).map(lambda p: tuple(sorted(p)))
tasks = st.builds(
    StoredTask,
    st.integers(1, MAX_ID),
    st.text(),
    st.integers(MIN_TIMESTAMP_NS, MAX_TIMESTAMP_NS),
    st.binary(max_size=64),
    labels,
)


def _fields(task: StoredTask) -> tuple[object, ...]:
    return task.id, task.group, task.not_before, task.body, task.labels


@given(st.integers(0, 2**64 - 1), st.lists(st.integers(0, MAX_ID), max_size=5), st.lists(tasks, max_size=5))
def test_change_round_trip(seq: int, removed: list[int], created: list[StoredTask]) -> None:
    record = encode_change(seq, removed, created)
    length, _ = parse_frame_header(record[:12])
    assert length == len(record) - 12
    got_seq, got_removed, got_created = decode_change(record[12:])
    assert (got_seq, list(got_removed)) == (seq, removed)
    assert [_fields(t) for t in got_created] == [_fields(t) for t in created]


@given(st.lists(tasks, max_size=10))
def test_task_chunk_round_trip(chunk: list[StoredTask]) -> None:
    assert [_fields(t) for t in decode_tasks(encode_tasks(chunk))] == [_fields(t) for t in chunk]


def test_stray_or_missing_bytes_are_bad_frames() -> None:
    payload = encode_change(1, [2], [StoredTask(3, "g", 4, b"body", None)])[12:]
    with pytest.raises(BadFrame, match="stray"):
        decode_change(payload + b"\0")
    with pytest.raises(BadFrame, match="malformed"):
        decode_change(payload[:-1])


def _frames(data: bytes, tolerate: bool) -> tuple[list[bytes], int | None]:
    reader = FrameReader(io.BytesIO(data), "f", 0, len(data), tolerate_torn_tail=tolerate)
    return [payload for _, payload in reader], reader.torn_at


def test_frame_reader_tells_torn_tails_from_damage() -> None:
    good = frame(b"first") + frame(b"second")
    assert _frames(good, False) == ([b"first", b"second"], None)
    third = frame(b"third record")
    for tail in (third[:3], third[:14], third[:-1] + b"X", b"\0" * 100):
        assert _frames(good + tail, True) == ([b"first", b"second"], len(good))
        with pytest.raises(CorruptFile, match=f"f: corrupt at byte offset {len(good)}"):
            _frames(good + tail, False)
    # A damaged frame with more data after it is never a torn tail.
    damaged = frame(b"first")[:-1] + b"X" + frame(b"second")
    with pytest.raises(CorruptFile, match="offset 0: payload checksum mismatch"):
        _frames(damaged, True)
    bad_length = b"\xff" + frame(b"first")[1:] + frame(b"second")
    with pytest.raises(CorruptFile, match="offset 0: frame header checksum mismatch"):
        _frames(bad_length, True)


# -- replay: the net effect of records equals applying them one by one --------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("create"), st.integers(1, 3), st.sampled_from(["a", "b"]), st.integers(0, 3)),
        st.tuples(st.just("own"), st.sampled_from(["a", "b"]), st.integers(1, 5)),
        st.tuples(st.just("delete"), st.integers(0, 50)),
        st.tuples(st.just("move"), st.sampled_from(["a", "b"]), st.sampled_from(["a", "b"])),
    ),
    max_size=40,
)


def _run(store: Store, program: list[tuple[Any, ...]]) -> None:
    for op in program:
        if op[0] == "create":
            labels = (("n", str(op[3])),) if op[3] else None
            store.update([TaskSpec(op[2], op[3], b"body", labels)] * op[1])
        elif op[0] == "own":
            store.query(op[1], 10, 5, op[2])
        elif op[0] == "delete":
            ids = [t.id for t in store.all_tasks()]
            if ids:
                store.update([], [IdRef(ids[op[1] % len(ids)])])
        else:
            store.bulk_set([GroupRef(op[1])], group=op[2])


def _dump(store: Store) -> tuple[object, ...]:
    store._check()
    return tuple(_fields(t) for t in store.all_tasks()), store.next_id


@given(ops, ops)
def test_replay_equals_applying_each_record(before: list[tuple[Any, ...]], after: list[tuple[Any, ...]]) -> None:
    live = Store(lambda: 0)
    _run(live, before)
    base = Store(lambda: 0)  # what a snapshot taken here would restore
    base.restore_all(live.all_tasks())
    base.set_next_id(live.next_id)
    records: list[tuple[tuple[int, ...], list[StoredTask]]] = []
    live.listeners.append(lambda removed, created: records.append((tuple(removed), list(created))))
    _run(live, after)
    replay = _Replay(base)
    for removed, created in records:
        replay.apply(removed, created)
    replay.finish()
    assert _dump(base) == _dump(live)


def test_replay_rejects_records_that_do_not_apply() -> None:
    store = Store(lambda: 0)
    store.restore_all([StoredTask(5, "g", 0, b"", None)])
    replay = _Replay(store)
    replay.apply((5,), [StoredTask(6, "g", 0, b"", None)])
    with pytest.raises(NotFound):
        replay.apply((5,), [])  # removed twice
    with pytest.raises(BadRequest):
        replay.apply((), [StoredTask(6, "g", 0, b"", None)])  # an ID again
