"""A /metrics scrape and a Debug call on a PostgreSQL-backed server holding a million tasks.

``python -m benchmarks.pg_scrape`` starts a throwaway cluster and a real server process on it
(``--store``), creates ``--tasks`` tasks in four groups through gRPC (10,000 per Update), leases
1,000 of them (hidden tasks are what a scrape counts), then times ``--scrapes`` scrapes of /metrics
over HTTP and as many ``Debug(limit=10)`` calls. The issue's target: a scrape under 100 ms at
1,000,000 tasks, because group sizes come from ``group_counts``, never from counting the tasks table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import urllib.request
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python benchmarks/pg_scrape.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from google.protobuf.duration_pb2 import Duration

from masstasker._pb import masstasker_pb2 as pb
from masstasker._pb import masstasker_pb2_grpc as pb_grpc
from masstasker.testing import run_server_process
from masstasker.testing_postgres import PostgresCluster

__all__ = ["main"]

_BATCH = 10_000
_GROUPS = 4


def _ms(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    return f"median {statistics.median(ordered) * 1e3:.1f} ms, max {ordered[-1] * 1e3:.1f} ms"


def main(argv: list[str] | None = None) -> int:
    """Run once and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--scrapes", type=int, default=20)
    args = parser.parse_args(argv)
    with (
        PostgresCluster() as cluster,
        run_server_process("--store", cluster.dsn, "--listen-http", "127.0.0.1:0", "--max-msg-size", "67108864") as srv,
    ):
        metrics_url = srv.expect(r"metrics on (http://\S+)").group(1)
        with grpc.insecure_channel(srv.target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            stub = pb_grpc.MassTaskerStub(channel)
            start = time.perf_counter()
            for done in range(0, args.tasks, _BATCH):
                count = min(_BATCH, args.tasks - done)
                tasks = [pb.Task(group=f"g{i % _GROUPS}", error="x" * 20) for i in range(count)]
                stub.Update(pb.UpdateRequest(created=tasks), timeout=120)
            created = time.perf_counter() - start
            rate = args.tasks / created
            print(f"created {args.tasks:,} tasks in {created:.1f} s ({rate:,.0f} tasks/s, {_BATCH:,} per Update)")
            for _ in range(10):
                stub.Query(pb.QueryRequest(group="g0", own_for=Duration(seconds=3600), max_tasks=100), timeout=60)
            cluster.psql("VACUUM ANALYZE masstasker.tasks")
            scrapes = []
            for _ in range(args.scrapes):
                began = time.perf_counter()
                with urllib.request.urlopen(metrics_url, timeout=60) as response:
                    page = response.read().decode()
                scrapes.append(time.perf_counter() - began)
            line = next(line for line in page.splitlines() if line.startswith('masstasker_visible_tasks{group="g0"}'))
            print(f"/metrics scrape ({args.scrapes}x): {_ms(scrapes)}; {line}")
            debugs = []
            for _ in range(args.scrapes):
                began = time.perf_counter()
                response = stub.Debug(pb.DebugRequest(group="g1", limit=10), timeout=60)
                debugs.append(time.perf_counter() - began)
            print(f"Debug(group, limit=10) ({args.scrapes}x): {_ms(debugs)}; num_tasks {response.num_tasks:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
