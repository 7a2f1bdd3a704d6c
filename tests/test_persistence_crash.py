"""Crash safety: a server subprocess under concurrent load, SIGKILLed at random moments, many rounds.

After each restart every acknowledged change is present, the one unanswered
RPC of each client is applied in full or not at all, and no ID is reused
(see ``masstasker._harness.crash``). ``benchmarks/crash_soak.py`` runs the same rounds
for longer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from masstasker._harness.crash import CrashRounds

CI_ROUNDS = 8


@pytest.mark.parametrize(
    ("fsync", "snapshot_bytes"),
    [("always", "20000"), ("batch", "20000")],
)
def test_sigkill_under_load_loses_nothing_acknowledged(tmp_path: Path, fsync: str, snapshot_bytes: str) -> None:
    rounds = CrashRounds(
        tmp_path / "data",
        clients=4,
        seed=len(fsync),
        server_args=("--fsync", fsync, "--snapshot-min-log-bytes", snapshot_bytes),
    )
    try:
        results = [rounds.round() for _ in range(CI_ROUNDS)]
    finally:
        code = rounds.close()
    assert code == 0
    assert sum(r.ops for r in results) > 0
    assert "snapshot at record" in rounds.log_path.read_text()  # the rounds crossed snapshots too
