"""Prometheus metrics: RPC counts and latency, and per-group gauges computed at scrape time.

Each server has its own registry, so several servers can live in one
process (tests). Per-group gauges are read on the server's event loop when
Prometheus scrapes, never on the RPC path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["GroupStats", "RpcMetrics", "StoreCollector"]

#: group -> (tasks, visible now)
GroupStats = dict[str, tuple[int, int]]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_SCRAPE_TIMEOUT = 10.0


class RpcMetrics:
    """Per-method, per-status-code call counts and latencies."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "masstasker_rpc_requests", "RPCs handled, by method and status code", ["method", "code"], registry=registry
        )
        self.latency = Histogram(
            "masstasker_rpc_duration_seconds",
            "RPC handling time, by method and status code (waiting Queries included)",
            ["method", "code"],
            registry=registry,
            buckets=_LATENCY_BUCKETS,
        )

    def observer(self, method: str) -> Callable[[str, float], None]:
        """A cheap ``observe(code, seconds)`` for one method: label children are cached."""
        children: dict[str, tuple[Callable[[], None], Callable[[float], None]]] = {}
        requests, latency = self.requests, self.latency

        def observe(code: str, seconds: float) -> None:
            child = children.get(code)
            if child is None:
                child = children[code] = (
                    requests.labels(method, code).inc,
                    latency.labels(method, code).observe,
                )
            child[0]()
            child[1](seconds)

        return observe


class StoreCollector(Collector):
    """Gauges read from the store on its event loop when scraped (``read`` is a coroutine function)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, read: Callable[[], Coroutine[Any, Any, tuple[GroupStats, int, int]]]
    ) -> None:
        self._loop = loop
        self._read = read

    def collect(self) -> Iterator[Any]:
        groups, waiting, total = asyncio.run_coroutine_threadsafe(self._read(), self._loop).result(_SCRAPE_TIMEOUT)
        num = GaugeMetricFamily("masstasker_num_tasks", "Tasks in each group", labels=["group"])
        visible = GaugeMetricFamily(
            "masstasker_visible_tasks", "Tasks in each group that a Query could get now", labels=["group"]
        )
        for group, (size, seen) in sorted(groups.items()):
            num.add_metric([group], size)
            visible.add_metric([group], seen)
        yield num
        yield visible
        yield GaugeMetricFamily("masstasker_tasks", "Tasks in the store", value=total)
        yield GaugeMetricFamily("masstasker_waiting_queries", "Queries waiting for a task", value=waiting)
