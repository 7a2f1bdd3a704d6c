"""``watch`` and ``wait-empty``: poll the admin API until groups drain.

``watch`` draws one rich progress bar per group. A queue has no fixed size, so a bar's length is what
departed since the watch began plus what is still in the group: the bar fills as tasks leave and
stretches when new ones arrive. Rate and ETA are the server's (see docs/operating.md for how they are
computed and when they mislead).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from google.protobuf.duration_pb2 import Duration
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from masstasker._pb import masstasker_admin_pb2 as admin_pb
from masstasker.cli._render import duration, rate
from masstasker.cli._session import Session
from masstasker.operate import group_view

__all__ = ["wait_empty", "watch"]


def _progress(console: Console) -> Progress:
    # markup=False everywhere a group name goes: it is data, not rich markup.
    return Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(bar_width=40),
        TextColumn("{task.fields[done]:>,}/{task.fields[size]:<,}", markup=False),
        TextColumn("{task.fields[rate]:>10}", markup=False),
        TextColumn("leased {task.fields[leased]:>,}", markup=False),
        TextColumn("errors {task.fields[errors]:>,}", markup=False),
        TextColumn("ETA {task.fields[eta]}", markup=False),
        console=console,
        auto_refresh=False,
    )


def watch(
    session: Session,
    groups: Sequence[str],
    *,
    console: Console,
    interval: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Draw the groups' progress every ``interval`` seconds until each is empty; the exit code (0).

    With no ``groups``: every group that holds tasks, including ones that appear while watching.
    """
    named = list(groups)
    baseline: dict[str, int] = {}  # departed counter when the group was first seen
    rows: dict[str, TaskID] = {}
    with _progress(console) as progress:
        while True:
            listing = session.admin("ListGroups", admin_pb.ListGroupsRequest(), admin_pb.ListGroupsResponse)
            stats = {g.group: group_view(g) for g in listing.groups}
            shown = named or [name for name, view in stats.items() if view["total"] or name in rows]
            for name in shown:
                view = stats.get(name) or _empty(name)
                done = view["departed"] - baseline.setdefault(name, view["departed"])
                size = done + view["total"]
                fields: dict[str, Any] = {
                    "done": done,
                    "size": size,
                    "rate": rate(view["departure_rate"]),
                    "leased": view["leased"],
                    "errors": view["errors"],
                    "eta": duration(view["eta"]) if view["total"] else "done",
                }
                # An empty group is a full bar: nothing is left to do.
                total, completed = (size, done) if size else (1, 1)
                if name not in rows:
                    rows[name] = progress.add_task(name or '""', total=total, completed=completed, **fields)
                else:
                    progress.update(rows[name], total=total, completed=completed, **fields)
            progress.refresh()
            if all(not (stats.get(name) or _empty(name))["total"] for name in shown):
                break
            sleep(interval)
    if not shown:
        console.print("no group holds tasks")
    return 0


def _empty(name: str) -> dict[str, Any]:
    return group_view(admin_pb.GroupStats(group=name))


def wait_empty(
    session: Session,
    group: str,
    *,
    timeout: float,
    interval: float = 0.5,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Poll ``group`` until it holds no task; how many it still holds when ``timeout`` runs out (0 if empty)."""
    deadline = monotonic() + timeout
    # The counter history is for charts: ask for one second of it, not the default hour.
    request = admin_pb.GetGroupRequest(group=group, history=Duration(seconds=1))
    while True:
        reply = session.admin("GetGroup", request, admin_pb.GetGroupResponse)
        left = reply.group.total
        if left == 0:
            return 0
        remaining = deadline - monotonic()
        if remaining <= 0:
            return int(left)
        sleep(min(interval, remaining))
