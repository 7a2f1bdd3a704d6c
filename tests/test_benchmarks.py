"""Smoke test for the benchmark suite: it runs end to end and its output makes sense.

No timing is asserted (the machine is noisy and this is not a benchmark
run); only that a quick run against real servers produces the table, the
targets and a JSON document with plausible numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_produces_sane_results(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-m", "benchmarks", "--quick", "--scenario", "lease-16", "--scenario", "memory"]
    done = subprocess.run(
        [*argv, "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=45, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| lease-16 | real |" in done.stdout and "| lease-16 | ceiling |" in done.stdout
    assert "| target |" in done.stdout

    document = json.loads(out.read_text())
    assert document["meta"]["sizes"]["repeats"] == 1
    rows = {(r["scenario"], r["server"]): r for r in document["results"]}
    assert set(rows) == {("lease-16", "real"), ("lease-16", "ceiling"), ("memory", "real")}
    for key in [("lease-16", "real"), ("lease-16", "ceiling")]:
        row = rows[key]
        assert row["ops_s"] > 0 and row["tasks_s"] == row["ops_s"], row
        assert 0 < row["p50_ms"] <= row["p99_ms"], row
        assert row["errors"] == {}, row
    assert rows[("lease-16", "real")]["extra"]["vs_ceiling"] > 0
    memory = rows[("memory", "real")]["extra"]
    assert memory["tasks"] == document["meta"]["sizes"]["memory_tasks"]
    assert memory["rss_after_mib"] > memory["rss_before_mib"]
    targets = {t["name"]: t for t in document["targets"]}
    assert targets["lease-64: real / ceiling throughput"]["met"] is None  # not run
    assert targets["memory: RSS bytes per task"]["met"] in (True, False)


def test_in_process_cpu_benchmark_runs(tmp_path: Path) -> None:
    """benchmarks/inproc.py, tiny: every operation and its statistics-off variant print a figure.

    It compares this checkout with itself through ``--tree`` (two rounds), as it compares two checkouts.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    small = ["--repeats", "1", "--cycles", "20", "--batches", "2", "--creates", "2", "--statistics-cost"]
    argv = [sys.executable, str(ROOT / "benchmarks" / "inproc.py"), *small, "--tree", str(ROOT), "--rounds", "2"]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    names = [line.split()[0] for line in done.stdout.splitlines()]
    assert names == ["lease", "lease-nostats", "batch", "batch-nostats", "create", "create-nostats"], done.stdout
    for line in done.stdout.splitlines():
        figure = float(line.split()[1])
        assert figure > 0, line
        assert "1.000x of" in line, line  # one tree: its own reference
