"""Request limits: what one client may make the server allocate.

gRPC itself enforces the message size (``--max-msg-size``, RESOURCE_EXHAUSTED),
which bounds everything a single request can make the server hold while it
is handled. The limits here bound what a request may leave behind or ask for:

- the counts (tasks, refs, predicates per request, tasks per Query) are
  checked on the parsed message, before anything is converted;
- each task's payload, group name and labels are checked on the converted
  :class:`~masstasker.server.stores.memory.store.TaskSpec`, before the store sees it (the
  conversion is bounded by the message size, and checking its result is
  nearly free: a few ``len()`` calls, no protobuf access);
- all are INVALID_ARGUMENT via :class:`~masstasker.server.stores.memory.store.BadRequest`,
  since sending the same request again cannot help. The limits on waiting
  Queries, which a later call may pass, are
  :class:`~masstasker.server.admission.WaitingAdmission`'s.

Every message names the limit and the flag that sets it. Lengths are UTF-8
bytes, as on the wire. A request no bigger than a limit cannot break it, so
the per-task loop is skipped for small requests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from masstasker._pb import masstasker_pb2 as pb
from masstasker.server.config import Settings
from masstasker.server.stores.memory.store import BadRequest, TaskSpec

__all__ = ["Limits"]


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


class Limits:
    """The per-request limits of one server, read from its settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Each label is a map entry of at least 2 bytes on the wire, so a request
        # of N bytes carries at most N // 2 labels per task.
        self._labels_matter = min(settings.max_label_key_bytes, settings.max_label_value_bytes, 2 * settings.max_labels)

    def _count(self, what: str, count: int) -> None:
        limit = self.settings.max_update_tasks
        if count > limit:
            raise BadRequest(f"{what}: {count} is over the limit of {limit} per request (--max-update-tasks)")

    def check_update(self, request: pb.UpdateRequest) -> None:
        """How many created tasks, deleted refs and predicates: call before converting any. O(1)."""
        self._count("created tasks", len(request.created))
        self._count("deleted refs", len(request.deleted))
        self._count("predicates", len(request.predicates))

    def check_specs(self, specs: Sequence[TaskSpec], size: int, field: str = "created") -> None:
        """Each converted task's payload, group and labels; ``size`` is the request's length. O(tasks)."""
        settings = self.settings
        max_payload, max_group = settings.max_payload_bytes, settings.max_group_bytes
        labels_matter = self._labels_matter
        if size <= max_payload and size <= max_group and size <= labels_matter:
            return
        group_quarter = max_group // 4  # a name of at most this many characters fits in any encoding
        for i, spec in enumerate(specs):
            # The labels are part of the payload, so a small payload cannot break a label limit.
            payload = len(spec.body)
            if payload > labels_matter:
                if payload > max_payload:
                    raise BadRequest(
                        f"{field}[{i}]: the payload (data, labels, error) is {payload} bytes, over the limit of "
                        f"{max_payload} (--max-payload-bytes)"
                    )
                if spec.labels:
                    self.check_labels(spec.labels, f"{field}[{i}].labels")
            if len(spec.group) > group_quarter:
                self.check_group(spec.group, f"{field}[{i}].group")

    def check_query(self, request: pb.QueryRequest) -> None:
        """How many tasks a Query asks for, and its group's length. O(1)."""
        limit = self.settings.max_query_tasks
        if request.max_tasks > limit:
            raise BadRequest(
                f"max_tasks {request.max_tasks} is above the server's limit of {limit} (--max-query-tasks)"
            )
        self.check_group(request.group, "group")

    def check_bulk_set(self, request: pb.BulkSetRequest) -> None:
        """The ref count, and the prototype's group and labels (its payload: :meth:`check_body`)."""
        self._count("refs", len(request.ref))
        proto = request.prototype
        self.check_group(proto.group, "prototype.group")
        if proto.labels:
            self.check_labels(tuple(proto.labels.items()), "prototype.labels")

    def check_group(self, group: str, field: str) -> None:
        """A group name's length."""
        limit = self.settings.max_group_bytes
        if len(group) * 4 > limit and (length := _utf8_len(group)) > limit:
            raise BadRequest(
                f"{field}: the group name is {length} bytes, over the limit of {limit} (--max-group-bytes)"
            )

    def check_labels(self, labels: Sequence[tuple[str, str]] | Mapping[str, str], field: str) -> None:
        """How many labels, and each key's and value's length."""
        settings = self.settings
        pairs = labels.items() if isinstance(labels, Mapping) else labels
        if len(pairs) > settings.max_labels:
            raise BadRequest(
                f"{field}: {len(pairs)} labels, over the limit of {settings.max_labels} per task (--max-labels)"
            )
        max_key, max_value = settings.max_label_key_bytes, settings.max_label_value_bytes
        for key, value in pairs:
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
        """A payload built by the server (BulkSet's merge of old task and prototype); returns it."""
        limit = self.settings.max_payload_bytes
        if len(body) > limit:
            raise BadRequest(
                f"{field}: the payload (data, labels, error) would be {len(body)} bytes, over the limit of "
                f"{limit} (--max-payload-bytes)"
            )
        return body
