"""Prometheus metrics of the data directory: fsync latency, snapshots, log growth, and whether it still works.

Registered on the server's own registry by :meth:`.Persistence.register_metrics`.
The gauges are read when Prometheus scrapes (from the metrics thread: two
plain attribute reads, no lock needed); the histograms are observed where
the work happens.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["DurabilityMetrics", "error_name"]

# From a RAM-backed disk (tens of microseconds) to a struggling network volume (seconds).
_FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
_SNAPSHOT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def error_name(exc: BaseException) -> str:
    """A short, bounded name for what broke the log: ``ENOSPC``, ``EIO``, else the exception's type."""
    number = getattr(exc, "errno", None)
    if isinstance(number, int) and number in errno.errorcode:
        return errno.errorcode[number]
    return type(exc).__name__


class DurabilityMetrics(Collector):
    """The histograms to observe, and a collector for the gauges ``read()`` returns.

    ``read()`` gives ``(failure or None, log bytes written since the last snapshot)``.
    """

    def __init__(self, registry: CollectorRegistry, read: Callable[[], tuple[BaseException | None, int]]) -> None:
        self._read = read
        self.fsync_seconds = Histogram(
            "masstasker_wal_fsync_seconds",
            "Time each fsync of the write-ahead log took (one fsync covers a group of records)",
            registry=registry,
            buckets=_FSYNC_BUCKETS,
        )
        self.snapshot_seconds = Histogram(
            "masstasker_snapshot_duration_seconds",
            "Time to take a snapshot: the capture on the event loop plus writing it in a thread",
            registry=registry,
            buckets=_SNAPSHOT_BUCKETS,
        )
        registry.register(self)

    def collect(self) -> Iterator[Any]:
        failure, log_bytes = self._read()
        yield GaugeMetricFamily(
            "masstasker_wal_bytes_since_snapshot",
            "Bytes of write-ahead log written since the last snapshot (what a restart replays)",
            value=log_bytes,
        )
        yield GaugeMetricFamily(
            "masstasker_durability_ok",
            "1 while changes are made durable; 0 once a log write or fsync failed (the server then exits)",
            value=0 if failure is not None else 1,
        )
        lost = GaugeMetricFamily(
            "masstasker_durability_lost",
            "1, labelled with the error, once a log write or fsync failed",
            labels=["error"],
        )
        if failure is not None:
            lost.add_metric([error_name(failure)], 1)
        yield lost
