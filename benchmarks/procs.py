"""Server subprocesses: start, find the port they report, pin, measure, stop.

Servers are started exactly as an operator would start them
(``python -m masstasker.server --port 0``) and we read the port from the
``listening on HOST:PORT`` line they log: never a guessed port.
Measurements come from ``/proc/PID`` so they cost the server nothing.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["ROOT", "ServerProcess", "cpu_plan", "pin"]

#: The repository root (the worktree this file lives in).
ROOT = Path(__file__).resolve().parent.parent

_LISTENING = re.compile(r"listening on (\S+)")
_METRICS = re.compile(r"metrics on http://(\S+)/metrics")
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 15.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def child_env() -> dict[str, str]:
    """The environment for children: this worktree first on the import path."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
    return env


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
    """A server subprocess; ``kind`` is "ceiling" (canned answers) or any other name for MassTasker."""

    def __init__(self, kind: str, *, cpus: set[int] | None, metrics: bool = False, extra: tuple[str, ...] = ()) -> None:
        self.kind = kind
        module = "benchmarks.ceiling" if kind == "ceiling" else "masstasker.server"
        listen_http = "127.0.0.1:0" if metrics else ""
        self.argv = [sys.executable, "-m", module, "--port", "0", "--listen-http", listen_http, "--shutdown-grace", "1"]
        self.argv += extra
        self.cpus = cpus
        self.target = ""
        self.metrics_url: str | None = None
        # Stays open while the server runs (it writes there); closed and removed by stop().
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix=f"masstasker-bench-{kind}-", suffix=".log", delete=False
        )
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The server's process ID."""
        assert self._proc is not None, "not started"
        return self._proc.pid

    def start(self) -> ServerProcess:
        """Start the server and return once it has logged its port."""
        self._proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log, env=child_env(), cwd=ROOT
        )
        pin(self._proc.pid, self.cpus)
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            text = Path(self._log.name).read_text(errors="replace")
            metrics = _METRICS.search(text)
            if metrics:
                self.metrics_url = f"http://{metrics.group(1)}/metrics"
            found = _LISTENING.search(text)
            if found:
                self.target = found.group(1)
                return self
            if self._proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{self.kind} server did not start: {self.argv}\n{self.log_text()[-2000:]}")

    def log_text(self) -> str:
        """Everything the server wrote to stderr so far."""
        return Path(self._log.name).read_text(errors="replace")

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
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """SIGTERM with a short grace, SIGKILL if it hangs; remove the log."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(_STOP_TIMEOUT)
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
