"""``python -m benchmarks``: run the scenarios, print the table and the targets, write JSON.

Examples::

    python -m benchmarks                       # everything, full sizes (a few minutes)
    python -m benchmarks --quick               # smoke run with small sizes
    python -m benchmarks --scenario lease-64 --scenario batch-lease --json out.json
    python -m benchmarks --scenario lease --profile profiles/   # every lease-* scenario, py-spy on the server
    python -m benchmarks --store postgres      # the PostgreSQL store's scenarios, on a throwaway cluster

The server (and the ceiling server) run as subprocesses on 127.0.0.1,
pinned to the first CPU; the load generators and this process are pinned
to the others. Seeds are fixed; each scenario warms up, repeats, and
reports medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.loadgen import Pool
from benchmarks.procs import ROOT, cpu_plan, pin
from benchmarks.profiles import summarize
from benchmarks.report import check_targets, format_table, format_targets, write_json
from benchmarks.scenarios import SCENARIOS, Context, Row, Sizes

if TYPE_CHECKING:
    from masstasker.testing_postgres import PostgresCluster

__all__ = ["main", "select"]

SEED = 5
_DEFAULT_PROCESSES = 4


def select(names: Sequence[str], scenarios: Sequence[str] = tuple(SCENARIOS)) -> list[str]:
    """Scenario names for ``--scenario`` values: exact names, or a prefix such as ``lease``."""
    if not names:
        return list(scenarios)
    chosen = []
    for name in names:
        matches = [s for s in scenarios if s == name or s.startswith(name + "-")]
        if not matches:
            raise SystemExit(f"unknown scenario {name!r}; choose from: {', '.join(scenarios)}")
        chosen += [m for m in matches if m not in chosen]
    return chosen


def _meta(args: argparse.Namespace, sizes: Sizes, server_cpus: set[int] | None, load_cpus: set[int] | None) -> dict:
    import google.protobuf
    import grpc

    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "command": shlex.join(["python", "-m", "benchmarks", *sys.argv[1:]]),
        "commit": commit,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "cpus": os.cpu_count(),
        "server_cpus": sorted(server_cpus) if server_cpus else None,
        "loadgen_cpus": sorted(load_cpus) if load_cpus else None,
        "loadgen_processes": args.processes,
        "sizes": vars(sizes),
        "seed": SEED,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, run the chosen scenarios, report."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--scenario",
        action="append",
        default=[],
        metavar="NAME",
        help=f"repeatable; a name or a prefix (default: all): {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, one short repeat: a smoke run")
    parser.add_argument(
        "--repeats", type=int, metavar="N", help="windows per server and scenario (default 3; 1 with --quick)"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every result here")
    parser.add_argument("--processes", type=int, default=_DEFAULT_PROCESSES, help="load-generator processes")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the server and the load to separate CPUs")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="py-spy the real server during one window per scenario; raw profiles and summaries here",
    )
    parser.add_argument(
        "--store",
        choices=["memory", "postgres"],
        default="memory",
        help="postgres: the PostgreSQL store's scenarios on a throwaway cluster (benchmarks/pg.py)",
    )
    parser.add_argument("--pg-log", type=Path, metavar="FILE", help="with --store postgres: keep PostgreSQL's log here")
    args = parser.parse_args(argv)

    scenarios = SCENARIOS
    cluster = None
    if args.store == "postgres":
        from benchmarks import pg

        scenarios = pg.PG_SCENARIOS
        # Before pinning this process: PostgreSQL's processes inherit its CPU set, and may use every CPU.
        cluster = pg.start_cluster()
    try:
        return _run(args, scenarios, cluster)
    finally:
        if cluster is not None:
            if args.pg_log:
                args.pg_log.write_bytes(cluster.log.read_bytes())
            cluster.destroy()


def _run(
    args: argparse.Namespace, scenarios: dict[str, Callable[[Any], list[Row]]], cluster: PostgresCluster | None
) -> int:
    names = select(args.scenario, tuple(scenarios))
    sizes = Sizes.quick() if args.quick else Sizes.full()
    if args.repeats:  # more windows on a noisy machine: the medians and the spread firm up
        sizes = dataclasses.replace(sizes, repeats=args.repeats)
    random.seed(SEED)
    server_cpus, load_cpus = cpu_plan(not args.no_pin)
    pin(0, load_cpus)
    meta = _meta(args, sizes, server_cpus, load_cpus)
    meta["store"] = args.store

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    rows: list[Row] = []
    began = time.perf_counter()
    with Pool(max(2, args.processes), load_cpus) as pool:
        if cluster is None:
            ctx = Context(pool, sizes, server_cpus, args.profile, log)
        else:
            from benchmarks.pg import PgContext

            ctx = PgContext(pool, sizes, server_cpus, args.profile, log, cluster=cluster)
        for name in names:
            started = time.perf_counter()
            log(f"{name} ...")
            new = scenarios[name](ctx)
            rows += new
            log(f"{name}: {time.perf_counter() - started:.1f} s")
            log(format_table(new))
    meta["duration_s"] = round(time.perf_counter() - began, 1)
    if cluster is None:
        targets = check_targets(rows)
    else:
        from benchmarks.pg import check_pg_targets

        targets = check_pg_targets(rows)
    print(f"`{meta['command']}` at {meta['commit']}, {meta['duration_s']} s" + (" (quick sizes)" if args.quick else ""))
    print()
    print(format_table(rows))
    print()
    print(format_targets(targets))
    if args.profile and args.profile.is_dir():
        print()
        for raw in sorted(args.profile.glob("*.raw.txt")):
            summary = summarize(raw)
            (raw.parent / raw.name.replace(".raw.txt", ".summary.txt")).write_text(summary + "\n")
            print(summary)
    if args.json:
        write_json(args.json, meta, rows, targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
