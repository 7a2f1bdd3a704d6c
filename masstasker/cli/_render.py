"""How the command prints: rich tables for people, JSON for scripts.

Every string that comes from a task (group names, labels, errors, payloads) goes into a table as a
``rich.text.Text``, never as markup, so a label such as ``[bold]`` or an escape sequence prints as
what it is.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["duration", "group_table", "print_json", "rate", "task_detail", "task_table"]


def print_json(console: Console, value: Any) -> None:
    """``value`` as indented JSON on stdout, unstyled (safe to pipe into jq)."""
    console.file.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def duration(seconds: float | None) -> str:
    """``1h02m``, ``3m05s``, ``42s``, or ``-`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours >= 48:
        return f"{hours // 24}d{hours % 24:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def rate(per_second: float) -> str:
    """Tasks per second, with enough digits to tell a trickle from nothing."""
    if per_second >= 100:
        return f"{per_second:,.0f}/s"
    if per_second >= 1:
        return f"{per_second:.1f}/s"
    if per_second > 0:
        return f"{per_second * 60:.1f}/min"
    return "0/s"


def _labels(labels: dict[str, str]) -> Text:
    return Text(", ".join(f"{k}={v}" for k, v in labels.items()))


def group_table(groups: Iterable[dict[str, Any]]) -> Table:
    """The ``groups`` table: one row per group, counts then speed."""
    table = Table(box=None, header_style="bold")
    for name, justify in (
        ("GROUP", "left"),
        ("TOTAL", "right"),
        ("VISIBLE", "right"),
        ("LEASED", "right"),
        ("SCHEDULED", "right"),
        ("ERRORS", "right"),
        ("OLDEST", "right"),
        ("RATE", "right"),
        ("ETA", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for group in groups:
        table.add_row(
            Text(group["group"] or '""'),
            f"{group['total']:,}",
            f"{group['visible']:,}",
            f"{group['leased']:,}",
            f"{group['scheduled']:,}",
            Text(f"{group['errors']:,}", style="red" if group["errors"] else ""),
            duration(group["oldest_visible_age"]),
            rate(group["departure_rate"]),
            duration(group["eta"]),
        )
    return table


def _payload_type(task: dict[str, Any]) -> str:
    data = task["data"]
    return str(data["type_url"]).rpartition("/")[2] if data else ""


def task_table(tasks: Iterable[dict[str, Any]]) -> Table:
    """The ``ls`` table: tasks in queue order."""
    table = Table(box=None, header_style="bold")
    columns = ["ID", "STATE", "NOT BEFORE", "ATTEMPTS", "TYPE", "LABELS", "ERROR"]
    for name in columns:
        table.add_column(name, overflow="fold" if name in ("LABELS", "ERROR") else "ellipsis")
    for task in tasks:
        table.add_row(
            str(task["id"]),
            task["state"] or "",
            task["not_before"],
            str(task["attempts"]),
            Text(_payload_type(task)),
            _labels(task["labels"]),
            Text(task["error"], style="red"),
        )
    return table


def task_detail(task: dict[str, Any]) -> Table:
    """``show``: one task, field by field, its payload decoded."""
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("id", str(task["id"]))
    table.add_row("group", Text(task["group"] or '""'))
    table.add_row("state", task["state"] or "")
    table.add_row("not_before", task["not_before"])
    table.add_row("attempts", str(task["attempts"]))
    table.add_row("labels", _labels(task["labels"]))
    table.add_row("error", Text(task["error"], style="red"))
    data = task["data"]
    if data is None:
        table.add_row("data", "(none)")
    else:
        table.add_row("data type", Text(data["type_url"]))
        if data["fields"] is not None:
            table.add_row("data", Text(json.dumps(data["fields"], indent=2, ensure_ascii=False)))
        else:
            table.add_row("data (base64)", Text(data["base64"]))
    return table
