"""The ``masstasker`` command: each subcommand is a thin function over one admin or MassTasker call.

Reads go through the admin API (``masstasker.admin.v1``); changes go through ``Update``/``BulkSet``
with ``masstasker.Client``, each batch atomic. Exit codes are in ``_session`` and docs/operating.md.
"""

from __future__ import annotations

import base64
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from google.protobuf import json_format
from rich.console import Console

from masstasker._pb import masstasker_admin_pb2 as admin_pb
from masstasker._pb import masstasker_pb2 as pb
from masstasker.cli import _render as render
from masstasker.cli._session import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TIMEOUT,
    Connection,
    Session,
    describe_error,
    exit_code_for,
)
from masstasker.cli._watch import wait_empty, watch
from masstasker.client import Create, Delete, MassTaskerError
from masstasker.client.errors import TaskNotFound
from masstasker.operate import STATES, Retry, group_view, parse_labels, parse_state, selector, task_view

__all__ = ["cli", "main"]

DEFAULT_TARGET = "127.0.0.1:50053"
#: Tasks per Update when ``put`` or ``retry`` handles many: each batch is one atomic step.
BATCH = 500


class _State:
    """What the subcommands get from the group's options."""

    def __init__(self) -> None:
        self.connection = Connection(DEFAULT_TARGET)  # replaced by the group's options
        self.out = Console(highlight=False, soft_wrap=False)

    def session(self) -> Session:
        return self.connection.open()


pass_state = click.make_pass_decorator(_State)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


def _labels(ctx: click.Context, param: click.Parameter, value: Sequence[str]) -> dict[str, str]:
    try:
        return parse_labels(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


label_option = click.option(
    "--label", "labels", multiple=True, metavar="K=V", callback=_labels, help="Only tasks with this label (repeatable)."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--target",
    envvar="MASSTASKER_TARGET",
    default=DEFAULT_TARGET,
    show_default=True,
    help="Server HOST:PORT [env MASSTASKER_TARGET].",
)
@click.option("--token", envvar="MASSTASKER_TOKEN", help="Bearer token [env MASSTASKER_TOKEN].")
@click.option(
    "--token-file",
    envvar="MASSTASKER_TOKEN_FILE",
    type=click.Path(dir_okay=False),
    help="Read the bearer token from this file [env MASSTASKER_TOKEN_FILE].",
)
@click.option("--tls-ca", envvar="MASSTASKER_TLS_CA", type=click.Path(dir_okay=False), help="CA to verify the server.")
@click.option(
    "--tls-cert",
    envvar="MASSTASKER_TLS_CLIENT_CERT",
    type=click.Path(dir_okay=False),
    help="Client certificate (mTLS).",
)
@click.option("--tls-key", envvar="MASSTASKER_TLS_CLIENT_KEY", type=click.Path(dir_okay=False), help="Its key.")
@click.option(
    "--timeout", envvar="MASSTASKER_TIMEOUT", type=float, default=10.0, show_default=True, help="Seconds per call."
)
@click.option(
    "--import",
    "imports",
    multiple=True,
    metavar="MODULE",
    help="Import a module of generated protobuf classes so `show` can decode its payloads (repeatable).",
)
@click.version_option(package_name="masstasker")
@click.pass_context
def cli(
    ctx: click.Context,
    target: str,
    token: str | None,
    token_file: str | None,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    timeout: float,
    imports: Sequence[str],
) -> None:
    """Inspect and operate a MassTasker server: groups, tasks, progress, retries.

    Exit codes: 0 done, 1 refused by the server, 2 bad usage, 3 server unreachable, 4 token missing or
    refused, 5 no such task, 6 timed out, 130 interrupted.
    """
    if token_file and not token:
        token = Path(token_file).read_text().strip()
    for module in imports:
        importlib.import_module(module)  # registers its message types in protobuf's default pool
    state = ctx.ensure_object(_State)
    state.connection = Connection(
        target, token=token, tls_ca=tls_ca or "", tls_cert=tls_cert or "", tls_key=tls_key or "", timeout=timeout
    )


# -- reading ---------------------------------------------------------------------------------------------------


@cli.command()
@json_option
@pass_state
def groups(state: _State, as_json: bool) -> int:
    """Every group with its counts, age of the oldest visible task, departure rate and ETA."""
    with state.session() as session:
        reply = session.admin("ListGroups", admin_pb.ListGroupsRequest(), admin_pb.ListGroupsResponse)
    views = [group_view(g) for g in reply.groups]
    if as_json:
        render.print_json(state.out, views)
    else:
        state.out.print(render.group_table(views))
    return EXIT_OK


@cli.command()
@click.argument("group")
@label_option
@click.option("--state", "task_state", type=click.Choice(list(STATES)), default="all", show_default=True)
@click.option("--limit", type=click.IntRange(min=0), default=100, show_default=True, help="At most this many; 0: all.")
@json_option
@pass_state
def ls(state: _State, group: str, labels: dict[str, str], task_state: str, limit: int, as_json: bool) -> int:
    """The tasks of GROUP in queue order (the next one a worker gets comes first)."""
    request = admin_pb.ListTasksRequest(
        group=group,
        page_size=min(limit or 1000, 1000),
        selector=selector(labels),
        state=parse_state(task_state),
    )
    views: list[dict[str, Any]] = []
    with state.session() as session:
        while True:
            reply = session.admin("ListTasks", request, admin_pb.ListTasksResponse)
            views += [task_view(t, s) for t, s in zip(reply.tasks, reply.states, strict=True)]
            if not reply.next_page_token or (limit and len(views) >= limit):
                break
            request.page_token = reply.next_page_token
    views = views[:limit] if limit else views
    if as_json:
        render.print_json(state.out, views)
    else:
        state.out.print(render.task_table(views))
    return EXIT_OK


@cli.command()
@click.argument("task_id", metavar="ID", type=click.IntRange(min=1))
@json_option
@pass_state
def show(state: _State, task_id: int, as_json: bool) -> int:
    """One task with its payload decoded (fields as JSON where the type is known; else base64)."""
    with state.session() as session:
        reply = session.admin("GetTask", admin_pb.GetTaskRequest(id=task_id), admin_pb.GetTaskResponse)
    view = task_view(reply.task, reply.state)
    if as_json:
        render.print_json(state.out, view)
    else:
        state.out.print(render.task_detail(view))
    return EXIT_OK


# -- changing ----------------------------------------------------------------------------------------------------


def _task_from_json(value: Any, group: str) -> pb.Task:
    """A task from its JSON form: ``data`` (an Any: ``@type`` plus fields, or ``@type`` plus ``base64``
    for a type this process does not know), ``labels``, ``not_before`` (RFC 3339), ``error``."""
    if not isinstance(value, dict):
        raise ValueError(f"a task is a JSON object, got {json.dumps(value)[:80]}")
    fields = dict(value)
    if fields.pop("group", group) != group:
        raise ValueError(f"a task names group {value['group']!r} but is put into {group!r}")
    data = fields.pop("data", None)
    task = json_format.ParseDict(fields, pb.Task(group=group))
    if data is not None:
        if isinstance(data, dict) and set(data) == {"@type", "base64"}:
            task.data.type_url = str(data["@type"])
            task.data.value = base64.b64decode(str(data["base64"]), validate=True)
        else:
            json_format.ParseDict(data, task.data)
    return task


@cli.command()
@click.argument("group")
@click.argument("task_json", metavar="[JSON]", required=False)
@click.option("--file", "path", type=click.File("r"), help="Read the task(s) from a file ('-' for stdin).")
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="K=V",
    callback=_labels,
    help="Add this label to each task.",
)
@json_option
@pass_state
def put(state: _State, group: str, task_json: str | None, path: Any, labels: dict[str, str], as_json: bool) -> int:
    """Create tasks in GROUP from JSON: one task object or a list of them, e.g.
    '{"data": {"@type": "type.googleapis.com/masstasker.Test", "foo": "x"}, "labels": {"k": "v"}}'.
    Without JSON: one task with no payload. Prints the new IDs."""
    if task_json is not None and path is not None:
        raise click.UsageError("give the tasks as JSON or --file, not both")
    text = path.read() if path is not None else task_json
    try:
        parsed = json.loads(text) if text is not None else {}
        items = parsed if isinstance(parsed, list) else [parsed]
        tasks = [_task_from_json(item, group) for item in items]
    except (ValueError, json_format.ParseError) as exc:
        raise click.UsageError(f"bad task JSON: {exc}") from exc
    for task in tasks:
        task.labels.update(labels)
    with state.session() as session:
        for start in range(0, len(tasks), BATCH):
            session.client.do(Create(*tasks[start : start + BATCH]), timeout=state.connection.timeout)
    ids = [task.id for task in tasks]
    if as_json:
        render.print_json(state.out, {"ids": ids})
    else:
        state.out.print(f"created {len(ids)} task(s): {' '.join(map(str, ids))}")
    return EXIT_OK


@cli.command()
@click.argument("task_ids", metavar="[ID]...", nargs=-1, type=click.IntRange(min=1))
@click.option("--to", "to_group", required=True, help="The group to move them to.")
@click.option("--from", "from_group", help="Move every task of this group instead of IDs.")
@json_option
@pass_state
def mv(state: _State, task_ids: Sequence[int], to_group: str, from_group: str | None, as_json: bool) -> int:
    """Move tasks (by ID, or a whole group with --from) to another group, in one atomic BulkSet.
    They keep their payload, labels, error and not_before."""
    if bool(task_ids) == (from_group is not None):
        raise click.UsageError("give task IDs or --from GROUP (one of the two)")
    refs = [pb.TaskRef(group=from_group)] if from_group is not None else [pb.TaskRef(id=i) for i in task_ids]
    with state.session() as session:
        reply = session.rpc("BulkSet", pb.BulkSetRequest(ref=refs, prototype=pb.Task(group=to_group)))
    if as_json:
        render.print_json(state.out, {"moved": reply.num_updated})
    else:
        state.out.print(f"moved {reply.num_updated} task(s) to {to_group!r}")
    return EXIT_OK


@cli.command()
@click.argument("task_ids", metavar="[ID]...", nargs=-1, type=click.IntRange(min=1))
@click.option("--group", "group", help="Delete every task of this group instead of IDs.")
@click.option("--yes", is_flag=True, help="Do not ask before deleting a whole group.")
@json_option
@pass_state
def rm(state: _State, task_ids: Sequence[int], group: str | None, yes: bool, as_json: bool) -> int:
    """Delete tasks by ID (all or none: an unknown ID deletes nothing), or a whole group with --group."""
    if bool(task_ids) == (group is not None):
        raise click.UsageError("give task IDs or --group GROUP (one of the two)")
    if group is not None and not yes and not click.confirm(f"delete every task in group {group!r}?"):
        return EXIT_ERROR
    with state.session() as session:
        if group is not None:
            session.rpc("Update", pb.UpdateRequest(deleted=[pb.TaskRef(group=group)]))
        else:
            session.client.do(Delete(*(pb.Task(id=i) for i in task_ids)), timeout=state.connection.timeout)
    what: Any = {"deleted_group": group} if group is not None else {"deleted": list(task_ids)}
    if as_json:
        render.print_json(state.out, what)
    else:
        state.out.print(f"deleted every task in {group!r}" if group is not None else f"deleted {len(task_ids)} task(s)")
    return EXIT_OK


@cli.command()
@click.argument("error_group")
@click.option("--to", "to_group", required=True, help="The group to put the tasks back in.")
@label_option
@click.option("--limit", type=click.IntRange(min=0), default=0, help="At most this many tasks; 0: all.")
@click.option(
    "--batch", type=click.IntRange(1, 10_000), default=BATCH, show_default=True, help="Tasks per atomic step."
)
@json_option
@pass_state
def retry(
    state: _State, error_group: str, to_group: str, labels: dict[str, str], limit: int, batch: int, as_json: bool
) -> int:
    """Move the tasks of ERROR_GROUP back to --to GROUP, visible now, with their error cleared (and their
    attempts reset). Each batch is one atomic Update: its tasks all move, or (if one was changed meanwhile)
    none does and the batch is read again."""
    if error_group == to_group:
        raise click.UsageError("--to must name another group than ERROR_GROUP")
    moved = 0
    with state.session() as session:
        moved = _retry(session, error_group, to_group, labels, limit, batch)
    if as_json:
        render.print_json(state.out, {"retried": moved})
    else:
        state.out.print(f"moved {moved} task(s) from {error_group!r} back to {to_group!r}")
    return EXIT_OK


def _retry(session: Session, source: str, target: str, labels: dict[str, str], limit: int, batch: int) -> int:
    """Page through ``source`` from its head, retrying ``batch`` tasks at a time; how many moved."""
    moved, conflicts = 0, 0
    token = ""
    while not limit or moved < limit:
        size = min(batch, limit - moved) if limit else batch
        request = admin_pb.ListTasksRequest(group=source, page_size=size, page_token=token, selector=selector(labels))
        reply = session.admin("ListTasks", request, admin_pb.ListTasksResponse)
        tasks = list(reply.tasks)
        if tasks:
            try:
                session.client.do(Retry(target, *tasks), timeout=session.connection.timeout)
            except TaskNotFound:
                # A worker or another operator changed one of them: nothing moved; read the page again.
                conflicts += 1
                if conflicts > 10:
                    raise
                continue
            moved += len(tasks)
        if not reply.next_page_token:
            break
        # The moved tasks left the group; the token still points past them, at the rest.
        token = reply.next_page_token
    return moved


# -- progress ---------------------------------------------------------------------------------------------------


@cli.command("watch")
@click.argument("groups_", metavar="[GROUP]...", nargs=-1)
@click.option(
    "--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True, help="Seconds between redraws."
)
@pass_state
def watch_command(state: _State, groups_: Sequence[str], interval: float) -> int:
    """Live progress bars (done/total, departure rate, leased, errors, ETA) until the groups are empty.
    Without GROUP: every group that holds tasks. Ctrl-C stops."""
    with state.session() as session:
        return watch(session, groups_, console=state.out, interval=interval)


@cli.command("wait-empty")
@click.argument("group")
@click.option(
    "--timeout", "limit", type=click.FloatRange(min=0), required=True, help="Give up after this many seconds."
)
@click.option(
    "--interval", type=click.FloatRange(min=0.05), default=0.5, show_default=True, help="Seconds between checks."
)
@pass_state
def wait_empty_command(state: _State, group: str, limit: float, interval: float) -> int:
    """Exit 0 once GROUP holds no task; exit 6 if it still does after --timeout seconds."""
    with state.session() as session:
        left = wait_empty(session, group, timeout=limit, interval=interval)
    if left:
        click.echo(f"group {group!r} still holds {left} task(s) after {limit:g}s", err=True)
        return EXIT_TIMEOUT
    return EXIT_OK


# -- entry point ------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, *, prog_name: str = "masstasker") -> int:
    """Run the command; return its exit code (errors are printed to stderr, never as a traceback)."""
    state = _State()
    try:
        result = cli.main(args=argv, prog_name=prog_name, standalone_mode=False, obj=state)
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        return EXIT_INTERRUPTED
    except (MassTaskerError, ValueError, OSError) as exc:
        click.echo(f"masstasker: {describe_error(exc, state.connection.target)}", err=True)
        return exit_code_for(exc)
    return result if isinstance(result, int) else EXIT_OK


def entry_point() -> None:
    """The ``masstasker`` console script."""
    sys.exit(main())
