"""Results as a table, the issue's targets checked against them, and JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.scenarios import Row

__all__ = ["Target", "check_targets", "format_table", "format_targets", "write_json"]


@dataclass
class Target:
    """One figure the issue asks for, and whether this run met it."""

    name: str
    measured: float
    limit: float
    op: str  # ">=", "<=" or "<", as the issue words it
    unit: str

    @property
    def met(self) -> bool | None:
        """None when the figure was not measured in this run."""
        if math.isnan(self.measured):
            return None
        return _OPS[self.op](self.measured, self.limit)


_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
}


def _find(rows: Sequence[Row], scenario: str, server: str = "real") -> Row | None:
    return next((r for r in rows if r.scenario == scenario and r.server == server), None)


def _get(rows: Sequence[Row], scenario: str, pick: Callable[[Row], float], server: str = "real") -> float:
    row = _find(rows, scenario, server)
    if row is None:
        return float("nan")
    try:
        return float(pick(row))
    except (KeyError, ZeroDivisionError):
        return float("nan")


def check_targets(rows: Sequence[Row]) -> list[Target]:
    """Every target of the issue, from whatever scenarios ran."""
    big = next((r for r in rows if r.scenario.startswith("query-head-") and "vs_small_group" in r.extra), None)
    waiting = _find(rows, "waiters-wakeup")
    extra = waiting.extra if waiting else {}
    thread_growth = extra.get("threads_waiting", math.nan) - extra.get("threads_before", math.nan)
    vs_ceiling = _get(rows, "lease-64", lambda r: r.extra["vs_ceiling"])
    one_conn = _get(rows, "lease-64-1conn", lambda r: r.extra["vs_ceiling"])
    head_ratio = big.extra["vs_small_group"] if big else math.nan
    return [
        Target("lease-64: real / ceiling throughput", vs_ceiling, 0.8, ">=", "ratio"),
        Target("lease-64-1conn (one connection): real / ceiling throughput", one_conn, 0.8, ">=", "ratio"),
        Target(
            "batch lease: tasks leased+committed per s",
            _get(rows, "batch-lease", lambda r: r.tasks_s),
            50_000,
            ">=",
            "tasks/s",
        ),
        Target(
            "create-1000: tasks created per s", _get(rows, "create-1000", lambda r: r.tasks_s), 300_000, ">=", "tasks/s"
        ),
        Target("query head: big group / 10-task group", head_ratio, 0.8, ">=", "ratio"),
        Target(
            "memory: RSS bytes per task", _get(rows, "memory", lambda r: r.extra["bytes_per_task"]), 300, "<=", "B/task"
        ),
        Target("waiters: other RPCs' p99", _get(rows, "waiters-other-rpcs", lambda r: r.p99_ms), 50, "<", "ms"),
        Target("waiters: wake-up p99", _get(rows, "waiters-wakeup", lambda r: r.p99_ms), 20, "<", "ms"),
        # "No thread per waiter": a handful of new threads is gRPC's pool, one per waiter would be thousands.
        Target("waiters: threads added while waiting", thread_growth, 16, "<", "threads"),
        Target("waiters: server RSS at peak", extra.get("rss_peak_mib", math.nan), 1024, "<", "MiB"),
    ]


def _num(value: float, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _notes(row: Row) -> str:
    notes = []
    e = row.extra
    if "vs_ceiling" in e:
        notes.append(f"{e['vs_ceiling']:.2f}x ceiling")
        if len(e.get("vs_ceiling_repeats", ())) > 1:
            notes.append("repeats " + " ".join(f"{x:.2f}" for x in e["vs_ceiling_repeats"]))
        if "cpu_per_op_vs_ceiling" in e:
            notes.append(f"CPU/op ceiling/real {e['cpu_per_op_vs_ceiling']:.2f}")
    if "server_cpu_us_per_op" in e:
        notes.append(f"{e['server_cpu_us_per_op']:.0f} us server CPU/op")
    if "vs_small_group" in e:
        notes.append(f"{e['vs_small_group']:.2f}x the 10-task group")
    if "bytes_per_task" in e:
        notes.append(
            f"{e['tasks']:,} tasks: RSS {e['rss_before_mib']:.0f} -> {e['rss_after_mib']:.0f} MiB, "
            f"{e['bytes_per_task']:.0f} B/task (load {e['load_s']:.1f} s)"
        )
    if "woken" in e:
        notes.append(
            f"{e['waiting']:.0f} waiting; {e['woken']}/{e['created']} woken, {e['still_waiting']:.0f} still waiting, "
            f"threads {e['threads_before']}->{e['threads_waiting']}, RSS peak {e['rss_peak_mib']:.0f} MiB, "
            f"registered in {e['register_s']:.1f} s"
        )
    if "summary" in e:
        notes.append(e["summary"])
    if row.errors:
        notes.append("errors " + ", ".join(f"{k} {v}" for k, v in sorted(row.errors.items())))
    return "; ".join(notes)


def format_table(rows: Sequence[Row]) -> str:
    """A Markdown table: medians over repeats."""
    head = "| scenario | server | workers | calls/s | tasks/s | p50 ms | p99 ms | server CPU | loadgen CPU | notes |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r.scenario} | {r.server} | {r.workers:,} | {_num(r.ops_s)} | {_num(r.tasks_s)} | "
            f"{_num(r.p50_ms, 2)} | {_num(r.p99_ms, 2)} | {_num(r.server_cpu, 2)} | {_num(r.loadgen_cpu, 2)} | "
            f"{_notes(r)} |"
        )
    return "\n".join(lines)


def format_targets(targets: Sequence[Target]) -> str:
    """A Markdown table of the targets: measured, limit, met."""
    lines = ["| target | measured | limit | met |", "|---|---|---|---|"]
    for t in targets:
        digits = 2 if t.unit == "ratio" else 1 if t.unit == "ms" else 0
        met = {True: "yes", False: "NO", None: "not run"}[t.met]
        lines.append(f"| {t.name} | {_num(t.measured, digits)} {t.unit} | {t.op} {t.limit:,} | {met} |")
    return "\n".join(lines)


def write_json(path: Path, meta: dict[str, Any], rows: Sequence[Row], targets: Sequence[Target]) -> None:
    """Everything, every repeat included, as JSON (NaN written as null)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    document = {
        "meta": meta,
        "results": [clean(dataclasses.asdict(r)) for r in rows],
        "targets": [clean({**dataclasses.asdict(t), "met": t.met}) for t in targets],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
