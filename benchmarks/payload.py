"""The tasks the benchmarks create, and the requests they send, built once.

Every benchmark task carries the same payload: a ``google.protobuf.Any``
holding a :class:`masstasker.Test` whose serialized value is exactly
:data:`PAYLOAD_VALUE_BYTES` bytes, with the usual type URL, and no labels.
That is what "a 20-byte payload" means throughout the results.
"""

from __future__ import annotations

from google.protobuf.any_pb2 import Any as AnyPb
from google.protobuf.duration_pb2 import Duration

from masstasker._pb import masstasker_pb2 as pb

__all__ = [
    "PAYLOAD_VALUE_BYTES",
    "create_request",
    "delete_request",
    "payload",
    "query_request",
    "sample_task",
]

PAYLOAD_VALUE_BYTES = 20
_TYPE_URL = "type.googleapis.com/masstasker.Test"


def payload(text: str = "") -> AnyPb:
    """An Any holding ``Test(foo=text)``, padded so the value is exactly 20 bytes."""
    # Test.foo: 1 tag byte + 1 length byte + the string.
    body = text.ljust(PAYLOAD_VALUE_BYTES - 2, ".")
    value = pb.Test(foo=body).SerializeToString()
    assert len(value) == PAYLOAD_VALUE_BYTES or len(text) > PAYLOAD_VALUE_BYTES - 2, value
    return AnyPb(type_url=_TYPE_URL, value=value)


def sample_task(task_id: int = 0, group: str = "bench") -> pb.Task:
    """A task shaped like the ones the benchmarks store (for canned answers)."""
    task = pb.Task(id=task_id, group=group, data=payload())
    task.not_before.seconds = 1_700_000_000
    return task


def create_request(group: str, count: int, text: str = "") -> bytes:
    """An UpdateRequest creating ``count`` tasks in ``group``, serialized."""
    task = pb.Task(group=group, data=payload(text))
    return pb.UpdateRequest(created=[task] * count).SerializeToString()


def delete_request(ids: list[int]) -> bytes:
    """An UpdateRequest deleting these IDs, serialized."""
    return pb.UpdateRequest(deleted=[pb.TaskRef(id=i) for i in ids]).SerializeToString()


def query_request(group: str, *, own_for_s: float = 0.0, max_tasks: int = 0, wait: bool = False) -> bytes:
    """A QueryRequest, serialized; ``own_for_s`` 0 is a peek."""
    request = pb.QueryRequest(group=group, max_tasks=max_tasks, wait=wait)
    if own_for_s:
        request.own_for.CopyFrom(Duration(seconds=int(own_for_s), nanos=round(own_for_s % 1 * 1e9)))
    return request.SerializeToString()
