"""A stored task's body: the serialized ``Task`` without ``id``, ``group`` and ``not_before``.

The store keeps bodies as opaque bytes and never parses the payload, with two exceptions it needs
for poison tasks: ``attempts`` (field 7), which every owning Query raises by one, and ``error``
(field 6), which a dead-lettered task gets a message appended to.

Owning is the hot path (the lease-cycle benchmarks), so the body keeps one rule that makes raising
``attempts`` O(1) instead of a parse and a re-serialization: **a non-zero ``attempts`` is the body's
first field and appears nowhere else.** A protobuf parser accepts fields in any order, so such a body
parses as exactly the same ``Task``; responses are re-serialized canonically from it. Everything that
builds a body from a message goes through :func:`encode` (``convert`` and the BulkSet merge do), and
:func:`check` (run by the store's ``_check`` in the tests) asserts the rule.

No protobuf runtime here: only the wire format, so the store stays free of generated code.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = [
    "MAX_ATTEMPTS",
    "attempts_of",
    "check",
    "dead_letter_message",
    "encode",
    "error_of",
    "owned_once_more",
    "parked_body",
    "with_error",
]

MAX_ATTEMPTS = 2**32 - 1
"""``attempts`` is a uint32: raising it stops here rather than wrapping to 0."""

_ATTEMPTS_TAG = 7 << 3  # field 7, wire type 0 (varint): 0x38
_ERROR_TAG = 6 << 3 | 2  # wire type 2 (length-delimited): 0x32


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    """The varint at ``data[i:]`` and the index after it; ValueError if it runs past the end."""
    result = shift = 0
    while True:
        if i >= len(data):
            raise ValueError("truncated varint")
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, i
        shift += 7


# The prefixes for the counts a task actually reaches, built once: owning then costs one concatenation.
_PREFIXES = [bytes([_ATTEMPTS_TAG]) + _varint(n) for n in range(129)]


def _prefix(attempts: int) -> bytes:
    return _PREFIXES[attempts] if attempts < 129 else bytes([_ATTEMPTS_TAG]) + _varint(attempts)


def encode(attempts: int, rest: bytes) -> bytes:
    """A body from ``attempts`` and the serialization of the other fields (which must not hold field 7)."""
    return _prefix(attempts) + rest if attempts else rest


def attempts_of(body: bytes) -> int:
    """How many times the task was owned. O(1). Total, as :func:`owned_once_more` is."""
    if len(body) < 2 or body[0] != _ATTEMPTS_TAG:
        return 0
    try:
        return _read_varint(body, 1)[0]
    except ValueError:
        return 0


def owned_once_more(body: bytes) -> bytes:
    """The body with ``attempts`` one higher (saturating at the uint32 maximum). O(1) plus a copy.

    Total, like the PostgreSQL store's ``owned_once_more``: bytes that do not start with a whole
    ``attempts`` field (never a body made by :func:`encode`) get one in front, as a body without one does.
    """
    if len(body) < 2 or body[0] != _ATTEMPTS_TAG:
        return _PREFIXES[1] + body
    count = body[1]
    if count < 0x80:  # one-byte count: the common case
        return _PREFIXES[count + 1] + body[2:]
    try:
        count, end = _read_varint(body, 1)
    except ValueError:
        return _PREFIXES[1] + body
    return _prefix(min(count + 1, MAX_ATTEMPTS)) + body[end:]


def _fields(body: bytes) -> Iterator[tuple[int, int, int]]:
    """``(tag, start, end)`` of each top-level field, in order; ValueError if malformed.

    Tags, not field numbers: a field 6 or 7 sent with another wire type is an unknown field to
    protobuf, and stays one here.
    """
    i = 0
    size = len(body)
    while i < size:
        start = i
        tag, i = _read_varint(body, i)
        i = _skip(body, tag, i)
        yield tag, start, i


def _skip(body: bytes, tag: int, i: int) -> int:
    """The index after the value of a field with ``tag`` whose value starts at ``i``."""
    wire_type = tag & 7
    if wire_type == 0:
        i = _read_varint(body, i)[1]
    elif wire_type == 1:
        i += 8
    elif wire_type == 2:
        length, i = _read_varint(body, i)
        i += length
    elif wire_type == 5:
        i += 4
    elif wire_type == 3:  # a group (proto2, only ever an unknown field here): skip to its end tag
        while True:
            inner, i = _read_varint(body, i)
            if inner == (tag & ~7) | 4:
                break
            i = _skip(body, inner, i)
    else:
        raise ValueError(f"unexpected wire type {wire_type}")
    if i > len(body):
        raise ValueError("truncated field")
    return i


def error_of(body: bytes) -> str:
    """The task's ``error`` (the last occurrence wins, as when parsing). O(fields)."""
    error = b""
    for tag, start, end in _fields(body):
        if tag == _ERROR_TAG:
            error = body[_read_varint(body, start + 1)[1] : end]
    return error.decode("utf-8", "replace")


def with_error(body: bytes, error: str) -> bytes:
    """The body with ``error`` replaced (``attempts`` stays first). O(fields)."""
    kept = [body[start:end] for tag, start, end in _fields(body) if tag != _ERROR_TAG]
    text = error.encode()
    return b"".join(kept) + bytes([_ERROR_TAG]) + _varint(len(text)) + text


def dead_letter_message(attempts: int) -> str:
    """The ``error`` a task parked in a dead-letter group gets (appended to any it had)."""
    return f"dead-lettered: owned {attempts} times without completing (max_attempts reached)"


def parked_body(body: bytes, attempts: int) -> bytes:
    """The body of a task moved to a dead-letter group: ``attempts`` kept, the reason added to ``error``."""
    reason = dead_letter_message(attempts)
    previous = error_of(body)
    return with_error(body, f"{previous}; {reason}" if previous else reason)


def check(body: bytes) -> None:
    """Assert the body's rule: at most one ``attempts``, first when present, never an explicit 0."""
    places = [start for tag, start, _ in _fields(body) if tag == _ATTEMPTS_TAG]
    assert places in ([], [0]), f"attempts at offsets {places} of the body, not only first"
    assert not places or attempts_of(body) > 0, "an explicit attempts of 0 in the body"
