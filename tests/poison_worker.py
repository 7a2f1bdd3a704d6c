"""A worker process for tests/test_poison.py: it dies (SIGKILL, no cleanup) whenever it owns the poison task.

Run as ``python tests/poison_worker.py TARGET``. Every other task of group ``work`` is processed by moving
it to ``done`` (one atomic Update, so "processed" is exactly "in done"). It runs until it is killed.
"""

from __future__ import annotations

import os
import signal
import sys

from masstasker import Client, Move, pb, unpack_data

OWN_FOR = 1.0  # seconds: short, so a dead worker's lease expires quickly
MAX_ATTEMPTS = 3


def main(target: str) -> None:
    """Work until killed."""
    with Client(target, max_attempts=MAX_ATTEMPTS, dead_letter="dead", query_retry_pause=0.05) as client:
        while True:
            task = client.query("work", OWN_FOR)
            if unpack_data(task, pb.Test).foo == "poison":
                os.kill(os.getpid(), signal.SIGKILL)  # a segfault, an OOM kill: no chance to clean up
            client.do(Move("done", task))


if __name__ == "__main__":
    main(sys.argv[1])
