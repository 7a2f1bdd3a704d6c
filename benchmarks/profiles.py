"""Summaries of py-spy's raw (collapsed-stack) profiles: where the server's time goes.

gRPC's own work is mostly Cython and C, which py-spy (without ``--native``)
does not name: it shows as *self* time of the Python frame that called it,
typically ``Handle._run`` (event-loop callbacks into grpc.aio) and
``Thread.run`` (gRPC's poller thread).

Each line of a raw profile is ``frame;frame;...;leaf COUNT`` with frames
like ``function (file.py:LINE)``. We report, per function (line numbers
dropped), its *self* share (samples where it is the leaf) and its
*total* share (samples where it is anywhere on the stack).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

__all__ = ["summarize"]

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
# Frames every sample passes through (the event loop, the entry point): left out of the inclusive list.
_PLUMBING = ("asyncio/base_events.py", "asyncio/runners.py", "<frozen runpy>", "server/__main__.py", "threading.py")


def _name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match.group("file")
    # Keep the part of the path that says which package it is.
    for marker in ("site-packages/", "masstasker/", "lib/python3"):
        if marker in path:
            path = path[path.index(marker) :]
            break
    return f"{match.group('func')} ({path})"


def summarize(path: Path, top: int = 12) -> str:
    """A short text table of the heaviest functions in one raw profile."""
    self_time: Counter[str] = Counter()
    total_time: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_name(f) for f in stack.split(";") if f]
        samples += n
        self_time[frames[-1]] += n
        for name in set(frames):
            total_time[name] += n
    if not samples:
        return f"{path.name}: no samples"
    lines = [f"{path.name}: {samples} samples", "  self%  total%  function"]
    for name, n in self_time.most_common(top):
        lines.append(f"  {100 * n / samples:5.1f}  {100 * total_time[name] / samples:6.1f}  {name}")
    lines.append("  heaviest by total (inclusive), event-loop plumbing left out:")
    heavy = [(name, n) for name, n in total_time.most_common() if not any(p in name for p in _PLUMBING)]
    for name, n in heavy[:top]:
        lines.append(f"  {100 * self_time[name] / samples:5.1f}  {100 * n / samples:6.1f}  {name}")
    return "\n".join(lines)
