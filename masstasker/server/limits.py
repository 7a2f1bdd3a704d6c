"""Request limits: what one client may make the server allocate.

gRPC itself enforces the message size (``--max-msg-size``, RESOURCE_EXHAUSTED).
Everything else is checked here, on the parsed message and before any of it
is converted or stored, so a rejected request costs no more than its parse:

- the shape of a request (tasks per Update, bytes per task, group name and
  label sizes, labels per task) is INVALID_ARGUMENT via
  :class:`~masstasker.server.store.BadRequest`: sending it again cannot help;
- waiting Queries, in total and per connection, are RESOURCE_EXHAUSTED via
  :class:`LimitExceeded`: the same call may succeed once others finish.

Every message names the limit and the flag that sets it. Lengths are UTF-8
bytes, as on the wire.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from masstasker._pb import masstasker_pb2 as pb
from masstasker.server.config import Settings
from masstasker.server.store import BadRequest

__all__ = ["LimitExceeded", "Limits"]


class LimitExceeded(Exception):
    """A limit on a shared resource is reached; retrying later may succeed."""


def _utf8_len(text: str) -> int:
    # len() counts code points; only text that might be over a limit is encoded.
    return len(text) if text.isascii() else len(text.encode())


class Limits:
    """The per-request limits of one server, and its count of waiting Queries per connection.

    Each ``check_*`` method raises before the caller allocates anything for
    the request. Use from the server's event loop only.
    """

    def __init__(self, settings: Settings) -> None:
        self.max_update_tasks = settings.max_update_tasks
        self.max_task_bytes = settings.max_task_bytes
        self.max_group_bytes = settings.max_group_bytes
        self.max_labels = settings.max_labels
        self.max_label_key_bytes = settings.max_label_key_bytes
        self.max_label_value_bytes = settings.max_label_value_bytes
        self.max_waiting_queries = settings.max_waiting_queries
        self.max_waiting_per_connection = settings.max_waiting_per_connection
        # A request no bigger than this cannot break any per-task limit, so its
        # tasks need no look at all: the common case costs one comparison.
        # (Each label is a map entry of at least 2 bytes on the wire.)
        self._small_request = min(
            self.max_task_bytes,
            self.max_group_bytes,
            self.max_label_key_bytes,
            self.max_label_value_bytes,
            2 * self.max_labels,
        )
        self._waiting: dict[str, int] = {}

    # -- request shape: INVALID_ARGUMENT ------------------------------------

    def _count(self, what: str, count: int) -> None:
        if count > self.max_update_tasks:
            raise BadRequest(
                f"{what}: {count} is over the limit of {self.max_update_tasks} per request (--max-update-tasks)"
            )

    def check_update(self, request: pb.UpdateRequest, size: int) -> None:
        """Counts first, then each created task. ``size`` is the request's length in bytes. O(tasks)."""
        self._count("created tasks", len(request.created))
        self._count("deleted refs", len(request.deleted))
        self._count("predicates", len(request.predicates))
        if size > self._small_request:
            for i, task in enumerate(request.created):
                self.check_task(task, f"created[{i}]")

    def check_bulk_set(self, request: pb.BulkSetRequest, size: int) -> None:
        """The ref count and the prototype, which is copied into every selected task."""
        self._count("refs", len(request.ref))
        if size > self._small_request:
            self.check_task(request.prototype, "prototype")

    def check_task(self, task: pb.Task, field: str) -> None:
        """One task's size, group name and labels."""
        size = task.ByteSize()
        if size > self.max_task_bytes:
            raise BadRequest(
                f"{field}: the task is {size} bytes, over the limit of {self.max_task_bytes} (--max-task-bytes)"
            )
        self.check_group(task.group, f"{field}.group")
        labels = task.labels
        if labels:
            self.check_labels(labels, f"{field}.labels")

    def check_group(self, group: str, field: str) -> None:
        """A group name's length."""
        if len(group) * 4 > self.max_group_bytes and (length := _utf8_len(group)) > self.max_group_bytes:
            raise BadRequest(
                f"{field}: the group name is {length} bytes, over the limit of {self.max_group_bytes} "
                "(--max-group-bytes)"
            )

    def check_labels(self, labels: Mapping[str, str], field: str) -> None:
        """How many labels, and each key's and value's length."""
        if len(labels) > self.max_labels:
            raise BadRequest(
                f"{field}: {len(labels)} labels, over the limit of {self.max_labels} per task (--max-labels)"
            )
        max_key, max_value = self.max_label_key_bytes, self.max_label_value_bytes
        for key, value in labels.items():
            if len(key) * 4 > max_key and (length := _utf8_len(key)) > max_key:
                raise BadRequest(
                    f"{field}: a key is {length} bytes, over the limit of {max_key} (--max-label-key-bytes)"
                )
            if len(value) * 4 > max_value and (length := _utf8_len(value)) > max_value:
                raise BadRequest(
                    f"{field}[{key[:64]!r}]: the value is {length} bytes, over the limit of {max_value} "
                    "(--max-label-value-bytes)"
                )

    def check_body(self, body: bytes, field: str) -> bytes:
        """A task body built by the server (BulkSet's merge of old task and prototype); returns it."""
        if len(body) > self.max_task_bytes:
            raise BadRequest(
                f"{field}: the rewritten task would be {len(body)} bytes, over the limit of {self.max_task_bytes} "
                "(--max-task-bytes)"
            )
        return body

    # -- waiting Queries: RESOURCE_EXHAUSTED -----------------------------------

    @contextmanager
    def waiting(self, connection: str, total: int) -> Iterator[None]:
        """Hold one waiting-Query slot of ``connection`` while the block runs.

        ``total`` is how many Queries wait now, server-wide.
        """
        if total >= self.max_waiting_queries:
            raise LimitExceeded(
                f"{total} Queries are waiting, the server's limit (--max-waiting-queries); try again later"
            )
        counts = self._waiting
        held = counts.get(connection, 0)
        if held >= self.max_waiting_per_connection:
            raise LimitExceeded(
                f"this connection already has {held} waiting Queries, the limit per connection "
                "(--max-waiting-per-connection); use more connections or fewer waits"
            )
        counts[connection] = held + 1
        try:
            yield
        finally:
            left = counts[connection] - 1
            if left:
                counts[connection] = left
            else:
                del counts[connection]

    def waiting_on(self, connection: str) -> int:
        """How many Queries of this connection wait now."""
        return self._waiting.get(connection, 0)
