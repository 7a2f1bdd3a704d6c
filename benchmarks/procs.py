"""Server subprocesses: start, find the port they report, pin, measure, stop.

Servers are started exactly as an operator would start them
(``python -m masstasker.server --port 0``) and we read the port from the
``listening on HOST:PORT`` line they log: never a guessed port (MassTasker's
own launcher, ``masstasker.testing.ServerProcess``, does both).
Measurements come from ``/proc/PID`` so they cost the server nothing.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

from masstasker.testing import ServerProcess as Launched

__all__ = ["ROOT", "ServerProcess", "cpu_plan", "cpu_seconds", "pin"]

#: The repository root (the worktree this file lives in).
ROOT = Path(__file__).resolve().parent.parent

_METRICS = re.compile(r"metrics on http://(\S+)/metrics")
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 15.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds these processes (all threads) have used so far, from /proc; one gone counts 0."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / _CLK_TCK


def child_pythonpath() -> str:
    """``PYTHONPATH`` for children: this worktree first on the import path."""
    path = os.environ.get("PYTHONPATH", "")
    return str(ROOT) + (os.pathsep + path if path else "")


def cpu_plan(pin_cpus: bool) -> tuple[set[int] | None, set[int] | None]:
    """(server CPUs, load-generator CPUs): one core for the server, the rest for load.

    None means "do not pin" (pinning off, or a single-core machine).
    """
    cpus = sorted(os.sched_getaffinity(0))
    if not pin_cpus or len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


def pin(pid: int, cpus: set[int] | None) -> None:
    """Restrict a process (and its future threads) to ``cpus``; None leaves it alone."""
    if cpus:
        os.sched_setaffinity(pid, cpus)


class ServerProcess:
    """A server subprocess; ``kind`` is "ceiling" (canned answers) or any other name for MassTasker.

    Started by MassTasker's own launcher (``masstasker.testing.ServerProcess``), pinned to ``cpus`` from
    its first instruction by ``taskset``, so every thread it ever starts stays there.
    """

    def __init__(self, kind: str, *, cpus: set[int] | None, metrics: bool = False, extra: tuple[str, ...] = ()) -> None:
        self.kind = kind
        module = "benchmarks.ceiling" if kind == "ceiling" else "masstasker.server"
        self.command = (sys.executable, "-m", module)
        listen_http = "127.0.0.1:0" if metrics else ""
        self.args = ("--host", "127.0.0.1", "--port", "0", "--listen-http", listen_http, "--shutdown-grace", "1")
        self.args += extra
        self.cpus = cpus
        self.target = ""
        self.metrics_url: str | None = None
        self._server: Launched | None = None

    @property
    def pid(self) -> int:
        """The server's process ID."""
        assert self._server is not None, "not started"
        return self._server.pid

    def start(self) -> ServerProcess:
        """Start the server and return once it has logged its port."""
        prefix = ("taskset", "--cpu-list", ",".join(map(str, sorted(self.cpus)))) if self.cpus else ()
        # The ceiling server lives in this repository: children find it first on their import path.
        env = {"PYTHONPATH": child_pythonpath()}
        server = Launched(*self.args, command=self.command, prefix=prefix, loopback=False, env=env)
        self._server = server
        try:
            self.target = server.wait_serving(_START_TIMEOUT)
        except RuntimeError:
            self.stop()
            raise
        metrics = next((m for line in server.log if (m := _METRICS.search(line))), None)
        if metrics:
            self.metrics_url = f"http://{metrics.group(1)}/metrics"
        return self

    def log_text(self) -> str:
        """Everything the server wrote to stderr so far."""
        return "\n".join(self._server.log) if self._server is not None else ""

    def _status(self, field: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def rss_bytes(self) -> int:
        """Resident set size now (VmRSS)."""
        return self._status("VmRSS") * 1024

    def threads(self) -> int:
        """How many threads the server has now."""
        return self._status("Threads")

    def cpu_seconds(self) -> float:
        """User + system CPU time the server has used so far."""
        return cpu_seconds([self.pid])

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self._server is not None and self._server.returncode is None

    def stop(self) -> None:
        """SIGTERM with a short grace, SIGKILL if it hangs."""
        if self._server is not None:
            self._server.stop(_STOP_TIMEOUT)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
