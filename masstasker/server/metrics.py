"""Prometheus metrics: RPC counts and latency, and per-group statistics computed at scrape time.

Each server has its own registry, so several servers can live in one
process (tests). Per-group statistics are read on the server's event loop
when Prometheus scrapes, never on the RPC path, from the store's
incremental state (:class:`~masstasker.server.stats.GroupStats`): a scrape
costs O(groups x log n), never a scan of the tasks.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from masstasker.server.stats import GroupStats

__all__ = ["GROUP_METRICS", "RpcMetrics", "StoreCollector", "StoreReading"]

#: What a scrape reads: every group's statistics, the waiting Queries, the tasks in the store.
StoreReading = tuple[Sequence[GroupStats], int, int]

#: The per-group metrics, as exposed (counters with their ``_total``), with their help text.
GROUP_METRICS = {
    "masstasker_num_tasks": "Tasks in each group",
    "masstasker_visible_tasks": "Tasks in each group that a Query could get now",
    "masstasker_leased_tasks": "Tasks in each group owned by a Query whose lease has not expired",
    "masstasker_scheduled_tasks": "Tasks in each group waiting for a later not_before, not leased",
    "masstasker_error_tasks": "Tasks in each group with a non-empty error",
    "masstasker_oldest_visible_age_seconds": "Age of the oldest visible task of each group (0: none)",
    "masstasker_eta_seconds": "Seconds until each group is empty at its smoothed departure rate (absent: unknown)",
    "masstasker_created_total": "Tasks created into each group (including moved in)",
    "masstasker_owned_total": "Tasks owned from each group by a Query",
    "masstasker_departed_total": "Tasks that left each group (deleted or moved out)",
}
_NANOS = 1e9

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_SCRAPE_TIMEOUT = 10.0
# The buckets' ``le`` labels as prometheus_client writes them ("0.0005", "1.0", "+Inf").
_BUCKET_LABELS = (*(repr(float(bound)) for bound in _LATENCY_BUCKETS), "+Inf")


class RpcMetrics(Collector):
    """Per-method, per-status-code call counts and latencies.

    Counted in plain Python numbers by the event loop and turned into metric
    families only when scraped: prometheus_client's ``Counter.inc`` and
    ``Histogram.observe`` take a lock per value and scan the buckets in Python,
    about 2 µs per RPC, which the one-connection lease-cycle benchmark showed
    in its ratio to the ceiling (docs/performance.md). A scrape from the HTTP
    thread may see an RPC's sum before its count, as prometheus_client's own
    histograms may; counts are never torn (the total is the buckets' sum).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        # (method, code) -> [sum of seconds, count per bucket..., count above the last bound]
        self._series: dict[tuple[str, str], list[float]] = {}
        registry.register(self)

    def observer(self, method: str) -> Callable[[str, float], None]:
        """A cheap ``observe(code, seconds)`` for one method, to call from the event loop."""
        series = self._series
        by_code: dict[str, list[float]] = {}
        bounds = _LATENCY_BUCKETS
        width = len(bounds) + 1

        def observe(code: str, seconds: float) -> None:
            counts = by_code.get(code)
            if counts is None:
                counts = by_code[code] = series.setdefault((method, code), [0.0] * (width + 1))
            counts[0] += seconds
            counts[1 + bisect_left(bounds, seconds)] += 1

        return observe

    def collect(self) -> Iterator[Any]:
        """The request counter and the latency histogram, from a snapshot of the counts."""
        requests = CounterMetricFamily(
            "masstasker_rpc_requests", "RPCs handled, by method and status code", labels=["method", "code"]
        )
        latency = HistogramMetricFamily(
            "masstasker_rpc_duration_seconds",
            "RPC handling time, by method and status code (waiting Queries included)",
            labels=["method", "code"],
        )
        for (method, code), counts in sorted(list(self._series.items())):
            seconds, *per_bucket = list(counts)  # list(): one step under the GIL, so no count is torn
            cumulative, buckets = 0.0, []
            for label, n in zip(_BUCKET_LABELS, per_bucket, strict=True):
                cumulative += n
                buckets.append((label, cumulative))
            requests.add_metric([method, code], cumulative)
            latency.add_metric([method, code], buckets, seconds)
        yield requests
        yield latency


def _gauge(name: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, GROUP_METRICS[name], labels=["group"])


def _counter(name: str) -> CounterMetricFamily:
    return CounterMetricFamily(name.removesuffix("_total"), GROUP_METRICS[name], labels=["group"])


class StoreCollector(Collector):
    """Per-group statistics read from the store on its event loop when scraped."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read: Callable[[], Coroutine[Any, Any, StoreReading]]) -> None:
        self._loop = loop
        self._read = read

    def collect(self) -> Iterator[Any]:
        groups, waiting, total = asyncio.run_coroutine_threadsafe(self._read(), self._loop).result(_SCRAPE_TIMEOUT)
        yield GaugeMetricFamily("masstasker_tasks", "Tasks in the store", value=total)
        yield GaugeMetricFamily("masstasker_waiting_queries", "Queries waiting for a task", value=waiting)
        num, visible, leased, scheduled, errors, age, eta = (_gauge(name) for name in list(GROUP_METRICS)[:7])
        created, owned, departed = (_counter(name) for name in list(GROUP_METRICS)[7:])
        for stats in groups:
            labels = [stats.group]
            num.add_metric(labels, stats.total)
            visible.add_metric(labels, stats.visible)
            leased.add_metric(labels, stats.leased)
            scheduled.add_metric(labels, stats.scheduled)
            errors.add_metric(labels, stats.errors)
            age.add_metric(labels, (stats.oldest_visible_age or 0) / _NANOS)
            remaining = stats.eta
            if remaining is not None:
                eta.add_metric(labels, remaining / _NANOS)
            created.add_metric(labels, stats.created)
            owned.add_metric(labels, stats.owned)
            departed.add_metric(labels, stats.departed)
        yield from (num, visible, leased, scheduled, errors, age, eta, created, owned, departed)
