"""A MassTasker server as a subprocess: start it, read its log, wait until it serves, signal it, stop it.

The one launcher behind ``masstasker.testing.run_server_process`` (the
``masstasker_server_process`` fixture), the repository's own CLI, packaging
and crash tests, and the benchmarks. Only the standard library: importing it
loads neither gRPC nor pytest.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["LOOPBACK_FLAGS", "SERVER_COMMAND", "START_TIMEOUT", "STOP_TIMEOUT", "ServerProcess", "run_server_process"]

# How long a server may take to start before a test fails instead of hanging.
START_TIMEOUT = 30.0
# How long a SIGTERMed server process may take to shut down gracefully before it is killed.
STOP_TIMEOUT = 15.0
#: What runs unless told otherwise.
SERVER_COMMAND = (sys.executable, "-m", "masstasker.server")
#: Put before the caller's arguments (which can override them): a free port on loopback, no metrics listener.
LOOPBACK_FLAGS = ("--host", "127.0.0.1", "--port", "0", "--listen-http", "")
_LISTENING = re.compile(r"listening on (\S+)")
# The directory that holds the masstasker package, so a child finds this copy of it even from a source tree.
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


def _environment(extra: Mapping[str, str] | None) -> dict[str, str]:
    # Our own MASSTASKER_* variables would configure the child behind the caller's back: only ``extra`` may.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASSTASKER_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


class ServerProcess:
    """A server subprocess whose stderr is read line by line into :attr:`log` (and ``log_file``, if given).

    It starts at construction; :meth:`wait_serving` waits for its ``listening on HOST:PORT`` line and
    fills in :attr:`host` and :attr:`port` (the port the server reports: never a guessed free one). As a
    context manager it is stopped on exit (SIGTERM, a grace period, then SIGKILL).

    ``args`` follow ``command`` (default ``python -m masstasker.server``) and, unless ``loopback=False``,
    :data:`LOOPBACK_FLAGS`. ``env`` adds to (or overrides) the inherited environment, from which every
    ``MASSTASKER_*`` variable is removed. ``prefix`` goes before the command, e.g. ``("taskset", "-c", "0")``.
    """

    def __init__(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        log_file: str | os.PathLike[str] | None = None,
        command: Sequence[str] = SERVER_COMMAND,
        prefix: Sequence[str] = (),
        loopback: bool = True,
    ) -> None:
        """Start the process; see the class docstring for the arguments."""
        self.argv = [*prefix, *command, *(LOOPBACK_FLAGS if loopback else ()), *args]
        self.log: list[str] = []  # stderr lines so far, without their newlines
        self.host = ""
        self.port = 0
        self._changed = threading.Condition()  # a line arrived, or the output ended
        self._ended = False
        self._cursor = 0  # where expect() looks next
        self._log_file = open(log_file, "a", encoding="utf-8") if log_file is not None else None  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                encoding="utf-8",
                errors="replace",  # a log line is for reading; never fail on its bytes
                env=_environment(env),
            )
        except BaseException:
            if self._log_file is not None:
                self._log_file.close()
            raise
        self._reader = threading.Thread(target=self._read, name=f"server-stderr-{self.pid}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        # Drain for the process's whole life, or a chatty server would block on a full pipe.
        assert self.process.stderr is not None
        for line in self.process.stderr:
            if self._log_file is not None:
                self._log_file.write(line)
                self._log_file.flush()
            with self._changed:
                self.log.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        """The process ID."""
        return self.process.pid

    @property
    def target(self) -> str:
        """``HOST:PORT`` to dial, once :meth:`wait_serving` returned."""
        if not self.port:
            raise RuntimeError("the server has not reported its address yet: call wait_serving() first")
        return f"{self.host}:{self.port}"

    @property
    def returncode(self) -> int | None:
        """The exit code, or None while it runs."""
        return self.process.poll()

    def wait_for_line(
        self, pattern: str | re.Pattern[str], timeout: float, *, start: int = 0
    ) -> tuple[int, re.Match[str]]:
        """The first log line from index ``start`` on that matches ``pattern``: ``(index, match)``.

        Waits at most ``timeout`` seconds; raises RuntimeError (with the log so far) on timeout or when the
        process's output ends without such a line.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = start
        with self._changed:
            while True:
                while index < len(self.log):
                    match = regex.search(self.log[index])
                    if match:
                        return index, match
                    index += 1
                remaining = deadline - time.monotonic()
                if self._ended or remaining <= 0:
                    why = self._end_state() if self._ended else f"not within {timeout} s"
                    raise RuntimeError(f"no log line matching {regex.pattern!r} ({why}):\n" + "\n".join(self.log))
                self._changed.wait(remaining)

    def _end_state(self) -> str:
        try:
            return f"exit code {self.process.wait(STOP_TIMEOUT)}"
        except subprocess.TimeoutExpired:
            return "it closed its output"

    def expect(self, pattern: str | re.Pattern[str], timeout: float = START_TIMEOUT) -> re.Match[str]:
        """The next log line matching ``pattern`` after the one the last ``expect`` matched (like pexpect)."""
        index, match = self.wait_for_line(pattern, timeout, start=self._cursor)
        self._cursor = index + 1
        return match

    def wait_serving(self, timeout: float = START_TIMEOUT) -> str:
        """Wait for the ``listening on`` line; set :attr:`host` and :attr:`port`; return :attr:`target`.

        Raises RuntimeError saying the server did not start (with its log) if it exits or times out first.
        """
        try:
            _, match = self.wait_for_line(_LISTENING, timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"masstasker server did not start: {self.argv}: {exc}") from None
        host, _, port = match.group(1).rpartition(":")
        self.host, self.port = host, int(port)
        return self.target

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` (e.g. ``signal.SIGHUP``) if the process still runs."""
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the process to exit; its exit code (negative: the signal that ended it)."""
        return self.process.wait(timeout)

    def kill(self) -> int:
        """SIGKILL (no chance to flush or clean up) and wait; the exit code."""
        self.send_signal(signal.SIGKILL)
        return self._finish(self.process.wait(STOP_TIMEOUT))

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, up to ``timeout`` seconds to shut down gracefully, then SIGKILL; the exit code."""
        self.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(STOP_TIMEOUT)
        return self._finish(code)

    def _finish(self, code: int) -> int:
        # The process is gone: its output ends, so the reader returns; then nothing writes the log file.
        self._reader.join(STOP_TIMEOUT)
        if self.process.stderr is not None:
            self.process.stderr.close()
        if self._log_file is not None:
            self._log_file.close()
        return code

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<ServerProcess pid={self.pid} target={self.host}:{self.port} returncode={self.returncode}>"


@contextlib.contextmanager
def run_server_process(
    *args: str,
    timeout: float = START_TIMEOUT,
    env: Mapping[str, str] | None = None,
    log_file: str | os.PathLike[str] | None = None,
    command: Sequence[str] = SERVER_COMMAND,
    prefix: Sequence[str] = (),
    loopback: bool = True,
) -> Iterator[ServerProcess]:
    """Start a :class:`ServerProcess` (same arguments), yield it once it serves, stop it on exit.

    By default that is ``python -m masstasker.server --host 127.0.0.1 --port 0 --listen-http '' *args``.
    Raises RuntimeError (with the server's log) if it does not serve within ``timeout`` seconds.
    """
    with ServerProcess(*args, env=env, log_file=log_file, command=command, prefix=prefix, loopback=loopback) as server:
        server.wait_serving(timeout)
        yield server
