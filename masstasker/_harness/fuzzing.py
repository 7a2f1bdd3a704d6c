"""Hostile input for the MassTasker service, shared by tests/test_fuzz.py and scripts/fuzz.py.

Three families of requests, each sent as raw bytes through a generic unary
call (no serializers, so nothing on the client side can refuse them):

- :func:`messages`: well-formed protobuf messages with arbitrary field
  values (timestamps and durations far out of range, negative or huge,
  empty and enormous repeated fields, deep and unknown ``Any`` payloads);
- :func:`wire_messages`: byte strings built from each message's descriptor
  at the wire level, so strings carry invalid UTF-8, fields come with the
  wrong wire type, overlong varints, unknown fields and deeply nested groups;
- :func:`raw_bytes`: anything at all.

:func:`call` sends one and returns the status code; :data:`FINE` lists the
codes a healthy server may answer with. Anything else (INTERNAL, UNKNOWN,
UNAVAILABLE, a non-waiting call running into its deadline) is a crash.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import strategies as st

from masstasker._pb import masstasker_pb2 as pb

__all__ = ["FINE", "METHODS", "call", "messages", "raw_bytes", "requests", "wire_messages"]

METHODS: dict[str, type[Message]] = {
    "Update": pb.UpdateRequest,
    "Query": pb.QueryRequest,
    "BulkSet": pb.BulkSetRequest,
    "Debug": pb.DebugRequest,
}

FINE = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)

# A Query that waits is expected to run into this deadline; everything else must answer well before CALL_TIMEOUT.
WAIT_TIMEOUT = 0.05
CALL_TIMEOUT = 10.0

# -- values at the edges -----------------------------------------------------------------------------------------

INT64 = (-(2**63), 2**63 - 1)
INT32 = (-(2**31), 2**31 - 1)
_TS_EDGES = [-62_135_596_801, -62_135_596_800, -1, 0, 1, 1_700_000_000, 253_402_300_799, 253_402_300_800]


def _int(lo: int, hi: int, edges: list[int] | None = None) -> st.SearchStrategy[int]:
    points = [v for v in [lo, lo + 1, -1, 0, 1, hi - 1, hi, *(edges or [])] if lo <= v <= hi]
    return st.one_of(st.sampled_from(points), st.integers(lo, hi))


uint64 = _int(0, 2**64 - 1, [2**63, 2**63 - 1])
uint32 = _int(0, 2**32 - 1, [1000, 1001])
seconds = _int(*INT64, [*_TS_EDGES, 315_576_000_000, 315_576_000_001, -315_576_000_000])
nanos = _int(*INT32, [999_999_999, 1_000_000_000, -999_999_999, -1_000_000_000])
# Protobuf strings cannot hold lone surrogates (UTF-8 cannot encode them); invalid UTF-8 is the wire
# strategies' job.
text = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=40),
    st.sampled_from(["", "g", "main", "errors", "\x00", "é" * 300, "g" * 2000]),
)
small_groups = st.sampled_from(["", "g", "jobs", "errors"])


@st.composite
def _ts(draw: st.DrawFn, target: Message) -> None:
    target.seconds = draw(seconds)  # type: ignore[attr-defined]
    target.nanos = draw(nanos)  # type: ignore[attr-defined]


def _any_payload() -> st.SearchStrategy[tuple[str, bytes]]:
    """(type_url, value): unknown types, garbage, and Anys nested in Anys, deeply."""
    leaf = st.tuples(st.one_of(text, st.just("type.googleapis.com/masstasker.Test")), st.binary(max_size=64))

    def nest(inner: st.SearchStrategy[tuple[str, bytes]]) -> st.SearchStrategy[tuple[str, bytes]]:
        def wrap(pair: tuple[str, bytes]) -> tuple[str, bytes]:
            any_ = pb.Task().data
            any_.type_url, any_.value = pair
            return "type.googleapis.com/google.protobuf.Any", any_.SerializeToString()

        return inner.map(wrap)

    deep = st.tuples(leaf, st.integers(0, 200)).map(lambda p: _nest_n(p[0], p[1]))
    return st.one_of(leaf, st.recursive(leaf, nest, max_leaves=8), deep)


def _nest_n(pair: tuple[str, bytes], depth: int) -> tuple[str, bytes]:
    type_url, value = pair
    for _ in range(depth):
        any_ = pb.Task().data
        any_.type_url, any_.value = type_url, value
        type_url, value = "type.googleapis.com/google.protobuf.Any", any_.SerializeToString()
    return type_url, value


@st.composite
def tasks(draw: st.DrawFn) -> pb.Task:
    """A Task with anything in it."""
    task = pb.Task()
    if draw(st.booleans()):
        task.id = draw(uint64)
    task.group = draw(st.one_of(small_groups, text))
    if draw(st.booleans()):
        task.data.type_url, task.data.value = draw(_any_payload())
    for key, value in draw(st.dictionaries(text, text, max_size=4)).items():
        task.labels[key] = value
    if draw(st.booleans()):
        draw(_ts(task.not_before))
    if draw(st.booleans()):
        task.error = draw(text)
    return task


@st.composite
def refs(draw: st.DrawFn) -> pb.TaskRef:
    """A TaskRef: by ID, group or selector, or with nothing selected."""
    ref = pb.TaskRef()
    kind = draw(st.sampled_from(["id", "small_id", "group", "selector", "none"]))
    if kind == "id":
        ref.id = draw(uint64)
    elif kind == "small_id":
        ref.id = draw(st.integers(0, 50))
    elif kind == "group":
        ref.group = draw(st.one_of(small_groups, text))
    elif kind == "selector":
        ref.selector.SetInParent()
        for key, value in draw(st.dictionaries(text, text, max_size=3)).items():
            ref.selector.labels[key] = value
    return ref


def _repeated(element: st.SearchStrategy[Any], tiny: object) -> st.SearchStrategy[list[Any]]:
    """Empty, a few, or (rarely) enormous: copies of one tiny element, so drawing and sending stay cheap."""
    return st.one_of(
        st.lists(element, max_size=5),
        st.sampled_from([1000, 100_001]).map(lambda n: [tiny] * n),
    )


@st.composite
def update_requests(draw: st.DrawFn) -> pb.UpdateRequest:
    request = pb.UpdateRequest()
    request.created.extend(draw(_repeated(tasks(), pb.Task())))
    request.deleted.extend(draw(_repeated(refs(), pb.TaskRef(id=1))))
    request.predicates.extend(draw(_repeated(st.one_of(uint64, st.integers(0, 50)), 1)))
    return request


@st.composite
def query_requests(draw: st.DrawFn) -> pb.QueryRequest:
    request = pb.QueryRequest(group=draw(st.one_of(small_groups, text)), wait=draw(st.booleans()))
    if draw(st.booleans()):
        request.own_for.seconds = draw(seconds)
        request.own_for.nanos = draw(nanos)
    if draw(st.booleans()):
        draw(_ts(request.now))
    request.max_tasks = draw(st.one_of(st.integers(0, 3), uint32))
    return request


@st.composite
def bulk_set_requests(draw: st.DrawFn) -> pb.BulkSetRequest:
    request = pb.BulkSetRequest()
    request.ref.extend(draw(_repeated(refs(), pb.TaskRef(group="g"))))
    if draw(st.booleans()):
        request.prototype.CopyFrom(draw(tasks()))
    return request


@st.composite
def debug_requests(draw: st.DrawFn) -> pb.DebugRequest:
    return pb.DebugRequest(group=draw(st.one_of(small_groups, text)), limit=draw(st.one_of(st.integers(0, 5), uint64)))


_MESSAGES: dict[str, st.SearchStrategy[Message]] = {
    "Update": update_requests(),
    "Query": query_requests(),
    "BulkSet": bulk_set_requests(),
    "Debug": debug_requests(),
}


def messages(method: str) -> st.SearchStrategy[bytes]:
    """Well-formed requests for ``method`` with arbitrary field values, serialized."""
    return _MESSAGES[method].map(lambda m: m.SerializeToString())


# -- the wire level ----------------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _overlong(value: int, extra: int) -> bytes:
    """A varint padded with redundant continuation bytes (valid for some parsers, not others)."""
    plain = bytearray(_varint(value))
    plain[-1] |= 0x80
    return bytes(plain) + b"\x80" * max(extra - 1, 0) + b"\x00"


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


_VARINT_TYPES = {
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_BOOL,
    FieldDescriptor.TYPE_ENUM,
}


def _field(descriptor: FieldDescriptor, depth: int) -> st.SearchStrategy[bytes]:
    number = descriptor.number
    right: st.SearchStrategy[bytes]
    if descriptor.type in _VARINT_TYPES:
        right = st.one_of(
            st.integers(-(2**63), 2**64 - 1).map(lambda v: _key(number, 0) + _varint(v)),
            st.tuples(uint64, st.integers(1, 6)).map(lambda p: _key(number, 0) + _overlong(*p)),
        )
    elif descriptor.type == FieldDescriptor.TYPE_MESSAGE:
        inner = _wire(descriptor.message_type, depth + 1) if depth < 6 else st.binary(max_size=32)
        right = inner.map(lambda b: _key(number, 2) + _varint(len(b)) + b)
    else:  # strings and bytes: any bytes at all, invalid UTF-8 included
        right = st.one_of(
            st.binary(max_size=64),
            st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"ok\x80ok", b"\xf4\x90\x80\x80", b"\x00"]),
        ).map(lambda b: _key(number, 2) + _varint(len(b)) + b)
    wrong = st.one_of(  # the right number with the wrong wire type, or a lying length
        st.binary(max_size=8).map(lambda b: _key(number, 1) + b.ljust(8, b"\0")),
        st.binary(max_size=4).map(lambda b: _key(number, 5) + b.ljust(4, b"\0")),
        st.integers(0, 2**64 - 1).map(lambda n: _key(number, 2) + _varint(n) + b"short"),
        st.just(_key(number, 0) + _varint(1) if descriptor.type not in _VARINT_TYPES else _key(number, 2) + b"\x01x"),
    )
    return st.one_of(right, right, right, wrong)


def _unknown() -> st.SearchStrategy[bytes]:
    """Fields the schema does not have: every wire type, and groups nested past any parser's depth limit."""
    number = st.integers(16, 2**29 - 1)
    return st.one_of(
        st.tuples(number, uint64).map(lambda p: _key(p[0], 0) + _varint(p[1])),
        st.tuples(number, st.binary(max_size=32)).map(lambda p: _key(p[0], 2) + _varint(len(p[1])) + p[1]),
        st.tuples(number, st.integers(1, 300)).map(lambda p: _key(p[0], 3) * p[1] + _key(p[0], 4) * p[1]),
        st.tuples(number, st.integers(1, 300)).map(lambda p: _key(p[0], 3) * p[1]),  # never closed
        st.tuples(number, st.binary(min_size=4, max_size=4)).map(lambda p: _key(p[0], 5) + p[1]),
        st.tuples(st.integers(0, 2**32), st.sampled_from([6, 7])).map(lambda p: _varint(p[0] << 3 | p[1])),
    )


@functools.cache  # strategies are immutable: build each (message, depth) once
def _wire(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[bytes]:
    fields = [_field(f, depth) for f in descriptor.fields]
    if descriptor.full_name == "google.protobuf.Any" and depth < 12:  # an Any that holds an Any that holds…
        fields.append(st.deferred(lambda: _wire(descriptor, depth + 1)).map(lambda b: _key(2, 2) + _varint(len(b)) + b))
    one = st.one_of(*fields, _unknown()) if fields else _unknown()
    return st.lists(one, max_size=6 if depth < 3 else 2).map(b"".join)


def wire_messages(method: str) -> st.SearchStrategy[bytes]:
    """Requests for ``method`` built field by field at the wire level, breaking every rule once in a while."""
    return _wire(METHODS[method].DESCRIPTOR)


def raw_bytes() -> st.SearchStrategy[bytes]:
    """Any bytes."""
    return st.one_of(st.binary(max_size=256), st.binary(min_size=256, max_size=8192))


def requests(method: str) -> st.SearchStrategy[bytes]:
    """All three families for ``method``."""
    return st.one_of(messages(method), wire_messages(method), raw_bytes())


# -- sending -----------------------------------------------------------------------------------------------------


def _waits(method: str, data: bytes) -> bool:
    """Whether the server may rightly hold this call until its deadline (a Query with ``wait`` set)."""
    if method != "Query":
        return False
    try:
        return pb.QueryRequest.FromString(data).wait
    except DecodeError:
        return False


def call(
    channel: grpc.Channel,
    method: str,
    data: bytes,
    metadata: list[tuple[str, str]] | None = None,
    also: frozenset[grpc.StatusCode] = frozenset(),
) -> grpc.StatusCode:
    """Send ``data`` to ``method`` as is; return the status code. AssertionError on a crash.

    ``also``: codes that are fine here besides :data:`FINE` (UNAUTHENTICATED, with tokens on).
    """
    waits = _waits(method, data)
    send: Callable[..., bytes] = channel.unary_unary(
        f"/masstasker.MassTasker/{method}", None, None
    )  # bytes in, bytes out
    try:
        send(data, timeout=WAIT_TIMEOUT if waits else CALL_TIMEOUT, metadata=metadata)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        if code in FINE or code in also or (waits and code == grpc.StatusCode.DEADLINE_EXCEEDED):
            return code
        raise AssertionError(f"{method} answered {code.name}: {exc.details()!r} to {data[:200]!r}") from None
    return grpc.StatusCode.OK
