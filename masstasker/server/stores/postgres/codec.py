"""Store values <-> PostgreSQL column values, byte for byte.

A protobuf string is any valid UTF-8, NUL included; PostgreSQL ``text``
refuses NUL. So group names are stored as their UTF-8 bytes (``bytea``), and
label pairs, which need an array type with a GIN index, as hexadecimal text:
both round-trip every string protobuf accepts, and neither is ever part of
the SQL text.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "ALL_GROUPS",
    "group_bytes",
    "group_from_bytes",
    "label_element",
    "labels_column",
    "notify_payload",
    "payload_group",
    "split_ns",
]

_NANOS = 1_000_000_000
# NOTIFY payloads must be shorter than 8000 bytes; a longer group name wakes every group instead.
_MAX_PAYLOAD = 7999
#: The notification payload that means "look at every group".
ALL_GROUPS = "*"


def group_bytes(group: str) -> bytes:
    """A group name as stored."""
    return group.encode()


def group_from_bytes(value: bytes) -> str:
    """A stored group name back as the client sent it."""
    return bytes(value).decode()


def label_element(key: str, value: str) -> str:
    """One label pair as an element of the ``labels`` array: hex(key) ':' hex(value)."""
    return key.encode().hex() + ":" + value.encode().hex()


def labels_column(labels: Iterable[tuple[str, str]] | None) -> str | None:
    """A task's label pairs as the space-separated elements INSERT_TASKS splits, or None."""
    if not labels:
        return None
    return " ".join(label_element(k, v) for k, v in labels)


def split_ns(ns: int) -> tuple[int, int]:
    """Nanoseconds since the epoch as (seconds, nanoseconds 0..999,999,999), the two columns."""
    return divmod(ns, _NANOS)


def join_ns(seconds: int, nanos: int) -> int:
    """The two columns back as nanoseconds since the epoch."""
    return seconds * _NANOS + nanos


def notify_payload(group: str) -> str:
    """The NOTIFY payload naming a group: its UTF-8 bytes in hex (payloads are text, no NUL)."""
    payload = group.encode().hex()
    return payload if len(payload) <= _MAX_PAYLOAD else ALL_GROUPS


def payload_group(payload: str) -> str | None:
    """The group a notification names, or None for "every group" (or a payload we did not send)."""
    if payload == ALL_GROUPS:
        return None
    try:
        return bytes.fromhex(payload).decode()
    except ValueError:
        return None
