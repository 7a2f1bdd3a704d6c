"""The dashboard under a big store: page and API latency, and the longest event-loop pause while serving it.

    python -m benchmarks.dashboard                     # 1,000,000 tasks in one group + 1,000 groups
    python -m benchmarks.dashboard --big 100000 --groups 100 --requests 20    # a quick run

The server runs in this process (``BackgroundServer``) so that a probe coroutine on its event loop can
measure how late the loop wakes it: every ``PROBE`` seconds it sleeps and records the lateness, which
is how long something held the loop. The HTTP load comes from a separate process (no GIL shared with
the server other than the dashboard's own threads, as in production): for each page, ``--requests``
sequential fetches of the page's shell and of every API call the page makes, while ``--streams`` live
pages (server-sent events) stay open. Printed: per endpoint p50/p95/max, per page the p95 of the sum
of its calls, the live updates' interval, and the loop's longest pause during the dashboard phase.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import statistics
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from masstasker import Client, new_task
from masstasker._pb import masstasker_pb2 as pb
from masstasker.server import BackgroundServer, Settings
from masstasker.server.app import tune_gc

PROBE = 0.002  # seconds between loop-lag probes
BATCH = 20_000  # tasks per Update while loading


class LagProbe:
    """A coroutine on the server's loop that records how late each ``asyncio.sleep(PROBE)`` wakes up."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.busy: list[float] = []  # the loop thread's CPU time in each interval: its own work
        self.recording = False
        self.stopped = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopped:
            start, cpu = loop.time(), time.thread_time()
            await asyncio.sleep(PROBE)
            if self.recording:
                self.samples.append(loop.time() - start - PROBE)
                self.busy.append(time.thread_time() - cpu)


def load(target: str, big: int, groups: int, per_group: int) -> dict[str, Any]:
    """``big`` tasks in group ``big`` (some leased, some failed, two label values) and ``groups - 1`` more."""
    with Client(target) as client:
        for start in range(0, big, BATCH):
            client.create(
                *(
                    new_task("big", pb.Test(foo=str(i)), labels={"shard": str(i % 2)})
                    for i in range(start, min(big, start + BATCH))
                )
            )
        client.create(*(pb.Task(group="big", error="failed for the benchmark") for _ in range(1000)))
        client.query_many("big", 1000, 600)  # 1,000 leased
        names = [f"group-{n:04d}" for n in range(groups - 1)]
        for start in range(0, len(names), 100):
            client.create(*(new_task(name) for name in names[start : start + 100] for _ in range(per_group)))
        sample = client.peek("big")
    return {"groups": ["big", *names], "task_id": sample.id}


def _get(base: str, path: str) -> tuple[float, bytes]:
    start = time.perf_counter()
    with urllib.request.urlopen(base + path, timeout=30) as response:
        body = response.read()
    return time.perf_counter() - start, body


def _stream(base: str, path: str, seconds: float, gaps: list[float]) -> None:
    """Read a live page's events for ``seconds``; record the time between them."""
    end = time.monotonic() + seconds
    with urllib.request.urlopen(base + path, timeout=30) as response:
        last = None
        while time.monotonic() < end:
            line = response.readline()
            if not line:
                return
            if line.startswith(b"event: stats"):
                now = time.monotonic()
                if last is not None:
                    gaps.append(now - last)
                last = now


def client_load(base: str, groups: list[str], task_id: int, requests: int, streams: int, queue: Any) -> None:
    """The browser side, in its own process: open live pages, then time every page's calls."""
    page_groups = json.dumps(groups[:50])
    deep_token = ""
    quote = urllib.parse.quote
    # A token a few pages into the big group, to time a deep page too.
    for _ in range(5):
        _, body = _get(base, f"/api/tasks?group=big&page_token={quote(deep_token)}")
        deep_token = json.loads(body)["next_page_token"]
    big = ["/group?name=big", "/api/info", "/api/group?name=big"]
    pages: dict[str, list[str]] = {
        "overview": ["/", "/api/info", "/api/groups", f"/api/history?groups={quote(page_groups)}"],
        "overview, filtered": ["/", "/api/info", "/api/groups?filter=group-09"],
        "overview, page 20": ["/", "/api/info", "/api/groups?offset=950"],
        "group (1M tasks)": [*big, "/api/tasks?group=big"],
        "group, deep page": [*big, f"/api/tasks?group=big&page_token={quote(deep_token)}"],
        "group, label filter": [*big, "/api/tasks?group=big&labels=shard%3D1"],
        "group, errors only": [*big, "/api/tasks?group=big&state=error"],
        "group, leased only": [*big, "/api/tasks?group=big&state=leased"],
        "small group": [
            "/group?name=group-0500",
            "/api/info",
            "/api/group?name=group-0500",
            "/api/tasks?group=group-0500",
        ],
        "task": [f"/task?id={task_id}", "/api/info", f"/api/task?id={task_id}"],
    }
    gaps: list[float] = []
    duration = 5.0 + requests * len(pages) * 0.1
    readers = [
        threading.Thread(
            target=_stream,
            args=(base, "/api/events" if i % 2 else "/api/events?group=big", duration, gaps),
            daemon=True,
        )
        for i in range(streams)
    ]
    for reader in readers:
        reader.start()
    endpoint: dict[str, list[float]] = {}
    page_times: dict[str, list[float]] = {}
    for _ in range(requests):
        for page, paths in pages.items():
            total = 0.0
            for path in paths:
                seconds, _ = _get(base, path)
                endpoint.setdefault(path.split("?")[0] if path.startswith("/api") else "(page shell)", []).append(
                    seconds
                )
                total += seconds
            page_times.setdefault(page, []).append(total)
    for reader in readers:
        reader.join(duration + 30)
    queue.put({"endpoint": endpoint, "pages": page_times, "gaps": gaps})


_gc_started = [0.0]


def _gc_timer(phase: str, info: dict[str, Any], pauses: list[float]) -> None:
    """Record how long each full (generation 2) collection takes: it stops every thread, the loop's too."""
    if info.get("generation") != 2:
        return
    if phase == "start":
        _gc_started[0] = time.perf_counter()
    else:
        pauses.append(time.perf_counter() - _gc_started[0])


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", type=int, default=1_000_000, help="tasks in the one big group")
    parser.add_argument("--groups", type=int, default=1000, help="groups in all")
    parser.add_argument("--per-group", type=int, default=10, help="tasks in each small group")
    parser.add_argument("--requests", type=int, default=40, help="fetches of each page")
    parser.add_argument("--streams", type=int, default=8, help="live pages open meanwhile")
    parser.add_argument("--baseline", type=float, default=20.0, help="seconds of probing with no traffic first")
    args = parser.parse_args()

    probe = LagProbe()
    settings = Settings(port=0, listen_http="127.0.0.1:0", dashboard="read-only", max_update_tasks=BATCH)
    with BackgroundServer(settings) as server:
        assert server.server is not None
        base = f"http://127.0.0.1:{server.server.http_port}"
        started = time.perf_counter()
        data = load(server.target, args.big, args.groups, args.per_group)
        print(
            f"loaded {args.big + 1000:,} tasks in 'big' and {args.groups - 1:,} more groups "
            f"in {time.perf_counter() - started:.1f} s"
        )
        tune_gc()  # as the masstasker-server command does
        pauses: list[float] = []
        gc.callbacks.append(lambda phase, info: _gc_timer(phase, info, pauses))
        asyncio.run_coroutine_threadsafe(probe.run(), server._loop)
        _get(base, "/api/groups")  # warm-up
        # First the same probe with no dashboard traffic: what the machine itself does to the loop.
        probe.recording = True
        time.sleep(args.baseline)
        idle, idle_busy = probe.samples, probe.busy
        probe.samples, probe.busy = [], []
        queue: Any = multiprocessing.get_context("spawn").Queue()
        worker = multiprocessing.get_context("spawn").Process(
            target=client_load, args=(base, data["groups"], data["task_id"], args.requests, args.streams, queue)
        )
        worker.start()
        results = queue.get(timeout=3600)
        worker.join(60)
        probe.recording = False
        probe.stopped = True

    print(f"\n{'endpoint':<22} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    for name, values in sorted(results["endpoint"].items()):
        print(
            f"{name:<22} {len(values):>5} {statistics.median(values) * 1e3:>8.1f} {_p(values, 0.95) * 1e3:>8.1f} "
            f"{max(values) * 1e3:>8.1f}"
        )
    print(f"\n{'page (all its calls)':<22} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    for name, values in results["pages"].items():
        print(
            f"{name:<22} {len(values):>5} {statistics.median(values) * 1e3:>8.1f} {_p(values, 0.95) * 1e3:>8.1f} "
            f"{max(values) * 1e3:>8.1f}"
        )
    gaps = results["gaps"]
    if gaps:
        print(
            f"\nlive updates: {len(gaps)} events on {args.streams} streams, interval median "
            f"{statistics.median(gaps):.2f} s, max {max(gaps):.2f} s"
        )
    busy = probe.busy
    print(
        f"the loop thread's own work between probes: p99 {_p(busy, 0.99) * 1e3:.2f} ms, "
        f"longest {max(busy) * 1e3:.1f} ms (CPU time: excludes waiting for the GIL or a CPU)"
    )
    if pauses:
        print(f"full garbage collections meanwhile: {len(pauses)}, longest {max(pauses) * 1e3:.1f} ms")
    lags = probe.samples
    print(
        f"event loop idle (no dashboard traffic, {args.baseline:g} s): lateness p99 {_p(idle, 0.99) * 1e3:.2f} ms, "
        f"longest pause {max(idle) * 1e3:.1f} ms; own work longest {max(idle_busy) * 1e3:.1f} ms"
    )
    print(
        f"event loop while serving: {len(lags):,} probes every {PROBE * 1e3:.0f} ms, lateness p50 "
        f"{statistics.median(lags) * 1e3:.2f} ms, p99 {_p(lags, 0.99) * 1e3:.2f} ms, "
        f"longest pause {max(lags) * 1e3:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
