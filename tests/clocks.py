"""A clock the tests move by hand, shared by the store, statistics, waiter and admin tests."""

from __future__ import annotations

import threading


class HandClock:
    """Nanoseconds since the epoch that change only when the test says; safe to read from a server's thread."""

    def __init__(self, now: int) -> None:
        self.now = now
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            return self.now

    def advance(self, ns: int) -> None:
        """Move the clock ``ns`` nanoseconds on."""
        with self._lock:
            self.now += ns
