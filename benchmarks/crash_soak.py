"""Crash soak: many SIGKILL rounds against one data directory (the CI test runs a few).

Run from the repository root::

    python -m benchmarks.crash_soak --rounds 200
    python -m benchmarks.crash_soak --rounds 50 --fsync batch --clients 8

Each round: clients load the server, it is killed with SIGKILL at a random
moment, restarted on the same directory, and every acknowledged change
must be there, every unanswered RPC applied in full or not at all, no ID
reused (see ``masstasker/_harness/crash.py``). Exits non-zero at the first
violation, after printing it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from masstasker._harness.crash import CrashRounds  # the harness the CI test uses


def main() -> int:
    """Run the rounds; 0 if every one held."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fsync", choices=["always", "batch", "never"], default="always")
    parser.add_argument("--snapshot-min-log-bytes", default="20000", help="small, so rounds cross snapshots")
    parser.add_argument("--max-load", type=float, default=1.0, help="longest load before the kill, seconds")
    parser.add_argument("--data-dir", type=Path, help="default: a temporary directory, removed afterwards")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mt-soak-") as tmp:
        data_dir = args.data_dir or Path(tmp) / "data"
        rounds = CrashRounds(
            data_dir,
            clients=args.clients,
            seed=args.seed,
            server_args=("--fsync", args.fsync, "--snapshot-min-log-bytes", args.snapshot_min_log_bytes),
        )
        started = time.monotonic()
        ops = inflight = applied = 0
        try:
            for number in range(1, args.rounds + 1):
                try:
                    result = rounds.round(max_load=args.max_load)
                except AssertionError as exc:
                    print(f"round {number}: FAILED: {exc}\nserver log: {rounds.log_path}", file=sys.stderr)
                    return 1
                ops += result.ops
                inflight += result.inflight
                applied += result.applied_inflight
                print(
                    f"round {number}: {result.ops} answered RPCs, {result.inflight} unanswered "
                    f"({result.applied_inflight} applied in full, the rest not at all), {result.tasks} tasks"
                )
        finally:
            code = rounds.close()
        torn = rounds.log_path.read_text().count("discarding a torn tail")
        print(
            f"{args.rounds} rounds in {time.monotonic() - started:.0f} s: {ops} answered RPCs all survived; "
            f"{inflight} unanswered ({applied} applied in full); {torn} torn tails discarded; "
            f"clean stop exit code {code}"
        )
        return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
