"""The dashboard's WSGI app: three pages, a JSON API over the admin API, live events, and actions.

Pages (``/``, ``/group?name=G``, ``/task?id=N``) are one static shell whose script draws the page for
its URL, so each view has an address that ordinary links reach. The JSON API under ``/api/`` answers
from the admin API's handlers (``bridge.Calls``); ``/api/events`` streams the live statistics as
server-sent events, twice a second. Actions (``POST /api/retry|move|delete``) go through the server's
own ``Update``/``BulkSet`` handlers, one atomic step per batch, and need ``--dashboard read-write``
plus, when the server has tokens, ``Authorization: Bearer <token>``. A POST must be JSON: a form on
another site cannot send that without a CORS preflight, which this app never grants.

Nothing here builds HTML from data: the API returns JSON, and the script puts every string from a
task into the page with ``textContent``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import grpc
from google.protobuf.duration_pb2 import Duration

from masstasker._pb import masstasker_admin_pb2 as admin_pb
from masstasker._pb import masstasker_pb2 as pb
from masstasker.client._ops import build_update
from masstasker.operate import Retry, group_view, parse_labels, parse_state, selector, task_view
from masstasker.server.auth import TokenSet
from masstasker.server.dashboard.bridge import CallFailed, Calls, Snapshots

__all__ = ["MODES", "Dashboard"]

log = logging.getLogger("masstasker.server")

MODES = ("read-only", "read-write", "off")
#: Seconds between live updates. With statistics at most ``Snapshots``' 0.5 s old, a page is at most
#: about a second behind the server.
EVENT_INTERVAL = 0.5
#: A live stream ends after this long; the page reconnects at once. Bounds every stream's thread.
EVENT_STREAM_SECONDS = 300.0
#: Live streams open at once; more are refused (503) so that browsers cannot use up the threads.
MAX_STREAMS = 64
#: Groups per page of the overview, tasks per page of a group page.
GROUP_PAGE = 50
TASK_PAGE = 50
#: Tasks per atomic Update when an action covers a whole group.
ACTION_BATCH = 500
#: The last hour, one point a minute (overview sparklines) or every ten seconds (a group's chart).
HISTORY = Duration(seconds=3600)
OVERVIEW_STEP = Duration(seconds=60)
GROUP_STEP = Duration(seconds=10)

_ADMIN = "/masstasker.admin.v1.Admin/"
_MASSTASKER = "/masstasker.MassTasker/"
_PAGES = {"/", "/group", "/task"}
_STATIC = {
    "/static/dashboard.js": "application/javascript; charset=utf-8",
    "/static/dashboard.css": "text/css; charset=utf-8",
}
_HTTP_STATUS = {
    grpc.StatusCode.NOT_FOUND: "404 Not Found",
    grpc.StatusCode.INVALID_ARGUMENT: "400 Bad Request",
    grpc.StatusCode.FAILED_PRECONDITION: "409 Conflict",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "429 Too Many Requests",
    grpc.StatusCode.UNAVAILABLE: "503 Service Unavailable",
    grpc.StatusCode.UNIMPLEMENTED: "501 Not Implemented",
    grpc.StatusCode.UNAUTHENTICATED: "401 Unauthorized",
}
# Pages and scripts come only from here; nothing is fetched from elsewhere, nothing inline runs.
_SECURITY_HEADERS = [
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
]

StartResponse = Callable[..., Any]


class HttpError(Exception):
    """Answer with ``status`` and a JSON ``{"error": message}``."""

    def __init__(self, status: str, message: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


def _static(name: str) -> bytes:
    return (resources.files(__package__) / "static" / name).read_bytes()


class Dashboard:
    """The dashboard as a WSGI app (``dashboard(environ, start_response)``)."""

    def __init__(
        self,
        calls: Calls,
        *,
        mode: str,
        tokens: TokenSet | None,
        read_tokens: TokenSet | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """``tokens`` guard actions (None: no token needed); ``read_tokens`` guard reading (--metrics-auth)."""
        if mode not in MODES[:2]:
            raise ValueError(f"dashboard mode must be one of {MODES[:2]}, got {mode!r}")
        self.calls = calls
        self.mode = mode
        self.tokens = tokens
        self.read_tokens = read_tokens
        self.snapshots = Snapshots(calls)
        self.clock = clock
        self.stopping = threading.Event()
        self._streams = threading.BoundedSemaphore(MAX_STREAMS)
        self._shell = _static("index.html")
        self._files = {path: _static(path.rpartition("/")[2]) for path in _STATIC}

    def close(self) -> None:
        """End the live streams (the HTTP server is shutting down)."""
        self.stopping.set()

    # -- WSGI ----------------------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        try:
            if method in ("GET", "HEAD"):
                if path in _PAGES:
                    return self._send(start_response, "200 OK", "text/html; charset=utf-8", self._shell)
                if path in _STATIC:
                    return self._send(start_response, "200 OK", _STATIC[path], self._files[path])
                if path == "/api/events":
                    self._authorize_read(environ)
                    return self._events(environ, start_response)
                if path == "/api/info":  # before any token: the page needs it to know to ask for one
                    return self._json(start_response, self.info())
                reader = self._readers().get(path)
                if reader is not None:
                    self._authorize_read(environ)
                    return self._json(start_response, reader(_query(environ)))
            elif method == "POST":
                action = self._actions().get(path)
                if action is not None:
                    self._authorize_write(environ)
                    return self._json(start_response, action(_body(environ)))
                raise HttpError("404 Not Found", f"no action at {path}")
            else:
                raise HttpError("405 Method Not Allowed", f"{method} is not supported")
            raise HttpError("404 Not Found", f"nothing at {path}")
        except HttpError as exc:
            return self._error(start_response, exc.status, exc.message, exc.headers)
        except CallFailed as exc:
            return self._error(start_response, _HTTP_STATUS.get(exc.code, "500 Internal Server Error"), exc.details)
        except ValueError as exc:
            return self._error(start_response, "400 Bad Request", str(exc))

    def _send(self, start_response: StartResponse, status: str, kind: str, body: bytes) -> list[bytes]:
        start_response(
            status,
            [
                ("Content-Type", kind),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
                *_SECURITY_HEADERS,
            ],
        )
        return [body]

    def _json(self, start_response: StartResponse, value: Any) -> list[bytes]:
        return self._send(start_response, "200 OK", "application/json", json.dumps(value).encode())

    def _error(
        self, start_response: StartResponse, status: str, message: str, headers: Iterable[tuple[str, str]] = ()
    ) -> list[bytes]:
        body = json.dumps({"error": message}).encode()
        start_response(
            status,
            [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers, *_SECURITY_HEADERS],
        )
        return [body]

    # -- who may do what -----------------------------------------------------------------------------------

    def _authorize_read(self, environ: dict[str, Any]) -> None:
        if self.read_tokens is not None:
            _check(self.read_tokens, environ)

    def _authorize_write(self, environ: dict[str, Any]) -> None:
        if self.mode != "read-write":
            raise HttpError("403 Forbidden", "the dashboard is read-only: start the server with --dashboard read-write")
        if "application/json" not in environ.get("CONTENT_TYPE", ""):
            raise HttpError("415 Unsupported Media Type", "actions take a JSON body (Content-Type: application/json)")
        if self.tokens is not None:
            _check(self.tokens, environ)

    # -- reading: the admin API ----------------------------------------------------------------------------

    def _readers(self) -> dict[str, Callable[[dict[str, str]], Any]]:
        return {
            "/api/groups": self.groups,
            "/api/history": self.history,
            "/api/group": self.group,
            "/api/tasks": self.tasks,
            "/api/task": self.task,
        }

    def info(self) -> dict[str, Any]:
        """What the page needs to know before it draws: may it act, must it send a token."""
        return {
            "mode": self.mode,
            "actions_need_token": self.tokens is not None,
            "reading_needs_token": self.read_tokens is not None,
        }

    def groups(self, query: dict[str, str]) -> dict[str, Any]:
        """A page of the overview: groups whose name contains ``filter``, from ``offset``, with totals."""
        return self._overview(self.snapshots.latest(), query)

    def _overview(self, snapshot: admin_pb.ListGroupsResponse, query: dict[str, str]) -> dict[str, Any]:
        needle = query.get("filter", "")
        offset = _int(query, "offset", 0, 0, 10**9)
        limit = _int(query, "limit", GROUP_PAGE, 1, 500)
        matching = [g for g in snapshot.groups if needle in g.group] if needle else list(snapshot.groups)
        totals = {name: 0 for name in ("total", "visible", "leased", "scheduled", "errors")}
        for stats in snapshot.groups:
            for name in totals:
                totals[name] += getattr(stats, name)
        return {
            "now": snapshot.now.ToMilliseconds() / 1000,
            "count": len(matching),
            "all_groups": len(snapshot.groups),
            "offset": offset,
            "limit": limit,
            "totals": totals,
            "groups": [group_view(g) for g in matching[offset : offset + limit]],
        }

    def history(self, query: dict[str, str]) -> dict[str, Any]:
        """The last hour of the named groups' counters, one point a minute (the overview's sparklines);
        ``groups`` is a JSON list of names."""
        names = query.get("groups", "")
        groups = json.loads(names) if names else []
        if not isinstance(groups, list) or len(groups) > 500 or not all(isinstance(g, str) for g in groups):
            raise ValueError("groups is a JSON list of at most 500 group names")
        series = {}
        for name in groups:
            reply = self.calls.call(
                _ADMIN + "GetGroup",
                admin_pb.GetGroupRequest(group=name, history=HISTORY, step=OVERVIEW_STEP),
                admin_pb.GetGroupResponse,
            )
            series[name] = group_view(reply.group)["history"]
        return {"history": series}

    def group(self, query: dict[str, str]) -> dict[str, Any]:
        """One group's statistics and the last hour of its counters."""
        reply = self.calls.call(
            _ADMIN + "GetGroup",
            admin_pb.GetGroupRequest(group=query.get("name", ""), history=HISTORY, step=GROUP_STEP),
            admin_pb.GetGroupResponse,
        )
        return {"now": reply.now.ToMilliseconds() / 1000, "group": group_view(reply.group)}

    def tasks(self, query: dict[str, str]) -> dict[str, Any]:
        """A page of a group's tasks in queue order (``page_token`` from the previous page)."""
        labels = parse_labels(line.strip() for line in query.get("labels", "").splitlines() if line.strip())
        request = admin_pb.ListTasksRequest(
            group=query.get("group", ""),
            page_size=_int(query, "page_size", TASK_PAGE, 1, 1000),
            page_token=query.get("page_token", ""),
            selector=selector(labels),
            state=parse_state(query.get("state", "all") or "all"),
        )
        reply = self.calls.call(_ADMIN + "ListTasks", request, admin_pb.ListTasksResponse)
        return {
            "tasks": [task_view(t, s) for t, s in zip(reply.tasks, reply.states, strict=True)],
            "next_page_token": reply.next_page_token,
        }

    def task(self, query: dict[str, str]) -> dict[str, Any]:
        """One task, its payload decoded."""
        task_id = _int(query, "id", 0, 1, 2**64 - 1)
        reply = self.calls.call(_ADMIN + "GetTask", admin_pb.GetTaskRequest(id=task_id), admin_pb.GetTaskResponse)
        return {"task": task_view(reply.task, reply.state)}

    # -- live ------------------------------------------------------------------------------------------------

    def _events(self, environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        if not self._streams.acquire(blocking=False):
            raise HttpError(
                "503 Service Unavailable", f"at most {MAX_STREAMS} live pages at once", [("Retry-After", "5")]
            )
        query = _query(environ)
        start_response(
            "200 OK",
            [
                ("Content-Type", "text/event-stream; charset=utf-8"),
                ("Cache-Control", "no-store"),
                ("X-Accel-Buffering", "no"),  # a proxy in front must not hold the stream back
                *_SECURITY_HEADERS,
            ],
        )
        return self._stream(query)

    def _stream(self, query: dict[str, str]) -> Iterator[bytes]:
        group = query.get("group")
        ends = time.monotonic() + EVENT_STREAM_SECONDS
        try:
            yield b"retry: 1000\n\n"
            while not self.stopping.is_set() and time.monotonic() < ends:
                try:
                    snapshot = self.snapshots.latest()
                    if group is None:
                        event = self._overview(snapshot, query)
                    else:  # a group or task page: just that group
                        found = next((g for g in snapshot.groups if g.group == group), None)
                        stats = group_view(found or admin_pb.GroupStats(group=group))
                        event = {"now": snapshot.now.ToMilliseconds() / 1000, "group": stats}
                    yield b"event: stats\ndata: " + json.dumps(event).encode() + b"\n\n"
                except CallFailed as exc:
                    yield b"event: problem\ndata: " + json.dumps({"error": exc.details}).encode() + b"\n\n"
                self.stopping.wait(EVENT_INTERVAL)
        finally:
            self._streams.release()

    # -- actions: Update and BulkSet -------------------------------------------------------------------------

    def _actions(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {"/api/retry": self.retry, "/api/move": self.move, "/api/delete": self.delete}

    def retry(self, body: dict[str, Any]) -> dict[str, Any]:
        """Move tasks (``ids``, or every task of ``group``) to ``to``, visible now, their error cleared."""
        to = _text(body, "to")
        if "ids" in body:
            tasks = [self.task_message(task_id) for task_id in _ids(body)]
            if any(task.group == to for task in tasks):
                raise ValueError("a task is already in the group to retry it into")
            self._update(Retry(to, *tasks))
            return {"retried": len(tasks)}
        source = _text(body, "group")
        if source == to:
            raise ValueError("retry into another group than the one the tasks are in")
        moved, token = 0, ""
        for _ in range(10**6 // ACTION_BATCH):  # bounded: a million tasks per click
            request = admin_pb.ListTasksRequest(group=source, page_size=ACTION_BATCH, page_token=token)
            reply = self.calls.call(_ADMIN + "ListTasks", request, admin_pb.ListTasksResponse)
            if reply.tasks:
                self._update(Retry(to, *reply.tasks))
                moved += len(reply.tasks)
            if not reply.next_page_token:
                break
            token = reply.next_page_token
        return {"retried": moved}

    def move(self, body: dict[str, Any]) -> dict[str, Any]:
        """Move tasks (``ids``, or every task of ``group``) to ``to`` in one BulkSet."""
        to = _text(body, "to")
        refs = [pb.TaskRef(id=i) for i in _ids(body)] if "ids" in body else [pb.TaskRef(group=_text(body, "group"))]
        request = pb.BulkSetRequest(ref=refs, prototype=pb.Task(group=to))
        reply = self.calls.call(_MASSTASKER + "BulkSet", request, pb.BulkSetResponse)
        return {"moved": reply.num_updated}

    def delete(self, body: dict[str, Any]) -> dict[str, Any]:
        """Delete tasks (``ids``: all or none) or every task of ``group``, in one Update."""
        refs = [pb.TaskRef(id=i) for i in _ids(body)] if "ids" in body else [pb.TaskRef(group=_text(body, "group"))]
        self.calls.call(_MASSTASKER + "Update", pb.UpdateRequest(deleted=refs), pb.UpdateResponse)
        return {"deleted": len(refs) if "ids" in body else None}

    def task_message(self, task_id: int) -> pb.Task:
        """The task with this ID (NOT_FOUND -> 404)."""
        reply = self.calls.call(_ADMIN + "GetTask", admin_pb.GetTaskRequest(id=task_id), admin_pb.GetTaskResponse)
        return reply.task

    def _update(self, *ops: Any) -> None:
        plan = build_update(ops, self.clock())
        self.calls.call(_MASSTASKER + "Update", plan.request, pb.UpdateResponse)


def _check(tokens: TokenSet, environ: dict[str, Any]) -> None:
    problem = tokens.check(environ.get("HTTP_AUTHORIZATION"))
    if problem is not None:
        raise HttpError("401 Unauthorized", problem, [("WWW-Authenticate", 'Bearer realm="masstasker"')])


def _query(environ: dict[str, Any]) -> dict[str, str]:
    parsed = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    return {key: values[-1] for key, values in parsed.items()}


_MAX_BODY = 1024 * 1024


def _body(environ: dict[str, Any]) -> dict[str, Any]:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise ValueError("bad Content-Length") from None
    if not 0 < length <= _MAX_BODY:
        raise ValueError(f"an action takes a JSON object of at most {_MAX_BODY} bytes")
    value = json.loads(environ["wsgi.input"].read(length))
    if not isinstance(value, dict):
        raise ValueError("an action takes a JSON object")
    return value


def _int(query: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name, "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name} must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise ValueError(f"{name!r} must be a string")
    return value


def _ids(body: dict[str, Any]) -> list[int]:
    ids = body.get("ids")
    if not isinstance(ids, list) or not ids or len(ids) > ACTION_BATCH:
        raise ValueError(f"'ids' must be a list of 1 to {ACTION_BATCH} task IDs")
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 < i < 2**64 for i in ids):
        raise ValueError("'ids' must hold positive integers")
    return ids
