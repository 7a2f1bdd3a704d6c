"""A throwaway PostgreSQL cluster for tests and benchmarks, and the pytest fixtures built on it.

``PostgresCluster`` runs ``initdb`` into a temporary directory and starts a private server that listens
only on a Unix socket in that directory (``listen_addresses=''``), so it never touches a system database
and never competes for a TCP port. ``fsync`` and ``synchronous_commit`` stay on (PostgreSQL's defaults)
unless the caller overrides them: benchmarks must measure real commits.

PostgreSQL refuses to run as root. When this process is root (CI), the cluster runs as an unprivileged
system user (``postgres`` if it exists, else ``nobody``) through ``setpriv``, and the directory is
handed to that user. Connecting back over the socket needs no password: the
cluster trusts local connections, which only reach it through its private directory.

Registered as a pytest plugin (entry point ``masstasker_postgres``), it provides:

``postgresql_cluster``
    The session's ``PostgresCluster`` (started on first use, stopped at the end of the session).
``postgresql_dsn``
    Its libpq key=value DSN: ``host=<socket dir> port=5432 dbname=postgres user=postgres``.
``postgresql_schema``
    A schema name no other test uses, dropped after the test: a fresh, isolated store per test at the
    cost of a name (``CREATE DATABASE`` per test would be far slower).

Nothing heavy is imported here: no driver, no server. SQL for set-up and clean-up runs through ``psql``,
which ships with the server binaries.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

__all__ = [
    "PostgresCluster",
    "PostgresNotFound",
    "find_postgres_bin",
    "fresh_schema_name",
    "postgresql_cluster",
    "postgresql_dsn",
    "postgresql_schema",
    "quote_ident",
]

# The superuser initdb creates, and the database every cluster has.
SUPERUSER = "postgres"
DATABASE = "postgres"
# Only names the socket file (.s.PGSQL.5432) inside the private directory: it cannot clash.
PORT = 5432
# Generous: initdb and start both fsync, and the machine may be loaded.
TIMEOUT = 120.0
# Enough for two servers' pools, 64 benchmark workers and a LISTEN connection at once.
DEFAULT_SETTINGS: Mapping[str, str] = {"max_connections": "200"}


class PostgresNotFound(RuntimeError):
    """PostgreSQL's server binaries (``initdb``, ``pg_ctl``) are not installed."""


def find_postgres_bin() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl``: from ``PATH``, else the newest Debian install."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(os.path.realpath(on_path)).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    if candidates:
        return Path(candidates[-1]).parent
    raise PostgresNotFound(
        "PostgreSQL server binaries not found (initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin); "
        "install them, e.g. `apt-get install postgresql-15`"
    )


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged account to run PostgreSQL as, or None when this process is not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PostgresNotFound("running as root and neither a 'postgres' nor a 'nobody' account exists")


class PostgresCluster:
    """A private PostgreSQL cluster in a temporary directory; use as a context manager or call
    ``start()`` and ``destroy()``.

    ``settings`` are passed to the server as ``-c name=value`` on every start (added to
    ``DEFAULT_SETTINGS``), e.g. ``{"synchronous_commit": "off"}`` or ``{"autovacuum_naptime": "1"}``.
    """

    def __init__(self, settings: Mapping[str, str] | None = None, *, base_dir: str | None = None) -> None:
        self.bin = find_postgres_bin()
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self._account = _run_as()
        self.dir = Path(tempfile.mkdtemp(prefix="masstasker-pg-", dir=base_dir))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self._initialized = False
        if self._account is not None:
            os.chown(self.dir, self._account.pw_uid, self._account.pw_gid)

    # -- connection strings -------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """A libpq key=value DSN for the superuser: ``host=<dir> port=5432 dbname=postgres user=postgres``."""
        return self.dsn_for(DATABASE)

    def dsn_for(self, dbname: str) -> str:
        """The DSN of another database in this cluster."""
        return f"host={_dsn_value(str(self.dir))} port={PORT} dbname={_dsn_value(dbname)} user={SUPERUSER}"

    @property
    def uri(self) -> str:
        """The same as a ``postgresql://`` URI (the socket directory percent-encoded as the host)."""
        host = urllib.parse.quote(str(self.dir), safe="")
        return f"postgresql://{SUPERUSER}@{host}:{PORT}/{DATABASE}"

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> PostgresCluster:
        """Create the cluster on first call, then start it and wait until it accepts connections."""
        if not self._initialized:
            self._pg(
                "initdb",
                "--pgdata",
                str(self.data),
                "--username",
                SUPERUSER,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
                "--no-instructions",
            )
            self._initialized = True
        self._pg_ctl("start", "--log", str(self.log), "--options", self._options())
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: roll back sessions and checkpoint; ``immediate``: crash-like)."""
        if self.running:
            self._pg_ctl("stop", "--mode", mode)

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart -m fast``: every connection is dropped, the server comes back on the same socket."""
        self._pg_ctl("restart", "--mode", mode, "--log", str(self.log), "--options", self._options())

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend: a power cut as far as the clients can tell.

        ``start()`` afterwards runs crash recovery; committed transactions survive it.
        """
        pid = self.postmaster_pid()
        if pid is None:
            return
        # Every child calls setsid(), so the cluster is the postmaster and its children, not a process
        # group; list the children before the postmaster dies and they are re-parented.
        victims = [pid, *_children(pid)]
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + TIMEOUT
        # Wait until they are reaped, not merely dead: the next postmaster treats a zombie's pid in the
        # socket lock file as a live rival and refuses to start.
        while not all(_gone(victim) for victim in victims):
            if time.monotonic() > deadline:
                raise TimeoutError(f"PostgreSQL processes {victims} survived SIGKILL")
            time.sleep(0.02)
        # A stale postmaster.pid would make the next start wait for a dead process's shared memory.
        with contextlib.suppress(FileNotFoundError):
            (self.data / "postmaster.pid").unlink()

    def destroy(self) -> None:
        """Stop the server if it runs (immediately: nothing here needs to be kept) and delete everything."""
        if self.running:
            try:
                self.stop("immediate")
            except RuntimeError:
                self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # -- state --------------------------------------------------------------------------------------

    def postmaster_pid(self) -> int | None:
        """The running postmaster's process id, from ``postmaster.pid``, or None when it is not running."""
        try:
            first_line = (self.data / "postmaster.pid").read_text().split("\n", 1)[0]
        except FileNotFoundError:
            return None
        pid = int(first_line)
        return pid if _alive(pid) else None

    @property
    def running(self) -> bool:
        """Whether the postmaster is alive."""
        return self.postmaster_pid() is not None

    def pids(self) -> list[int]:
        """The postmaster and all its children (backends, autovacuum, WAL writer...): for CPU accounting."""
        pid = self.postmaster_pid()
        return [] if pid is None else [pid, *_children(pid)]

    # -- SQL through psql (no driver needed) --------------------------------------------------------

    def psql(self, sql: str, *, dbname: str = DATABASE) -> str:
        """Run ``sql`` with ``psql`` and return its unaligned, tuples-only output; raise on any error."""
        done = subprocess.run(
            [str(self.bin / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", self.dsn_for(dbname)],
            input=sql,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def create_database(self, name: str) -> str:
        """``CREATE DATABASE name`` and return its DSN."""
        self.psql(f"CREATE DATABASE {quote_ident(name)}")
        return self.dsn_for(name)

    def drop_schema(self, name: str, *, dbname: str = DATABASE) -> None:
        """``DROP SCHEMA IF EXISTS name CASCADE``."""
        self.psql(f"DROP SCHEMA IF EXISTS {quote_ident(name)} CASCADE", dbname=dbname)

    # -- internals ----------------------------------------------------------------------------------

    def _options(self) -> str:
        # Settings as server options; each value quoted so spaces or commas in it survive.
        opts = ["-c listen_addresses=''", f"-c unix_socket_directories='{self.dir}'", f"-p {PORT}"]
        opts += [f"-c {name}='{value}'" for name, value in self.settings.items()]
        return " ".join(opts)

    def _pg_ctl(self, *args: str) -> None:
        self._pg("pg_ctl", "--pgdata", str(self.data), "--wait", "--timeout", str(int(TIMEOUT)), *args)

    def _as_account(self) -> list[str]:
        return _setpriv(self._account) if self._account is not None else []

    def _pg(self, program: str, *args: str) -> None:
        # Output to a file, not a pipe: a postmaster started by pg_ctl inherits pg_ctl's stdout and would
        # hold a pipe open for its whole life, so reading it to the end would never finish.
        with tempfile.TemporaryFile("w+") as out:
            done = subprocess.run(
                [*self._as_account(), str(self.bin / program), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=TIMEOUT + 10,
                check=False,
                cwd=self.dir,
                # Locale and timezone of the calling shell must not leak into the cluster's defaults.
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"},
            )
            out.seek(0)
            output = out.read()
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""
            raise RuntimeError(f"{program} {' '.join(args)} failed ({done.returncode}):\n{output}\n{log}")


def _setpriv(account: pwd.struct_passwd) -> list[str]:
    """``setpriv`` switching to ``account``: the switch happens after exec, in setpriv.

    Not subprocess's ``user=``/``group=``: those switch in the forked child
    before exec, which rules out vfork, and a forked copy of a process with
    gRPC threads busy (a test holding calls in flight) can crash there (SIGSEGV).
    """
    return ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups", "--"]


def _dsn_value(value: str) -> str:
    """A libpq key=value DSN value: bare when plain, else single-quoted with ``\\`` and ``'`` escaped."""
    if value and all(c.isalnum() or c in "/_-.:" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quote_ident(name: str) -> str:
    """An SQL identifier, double-quoted so any name is taken literally."""
    return '"' + name.replace('"', '""') + '"'


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is not serving.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _children(parent: int) -> list[int]:
    """Live (non-zombie) child processes of ``parent``, read from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        # After the command come state, then ppid.
        if int(fields[1]) == parent and fields[0] != "Z":
            found.append(int(entry))
    return found


# -- pytest plugin ----------------------------------------------------------------------------------

_schema_numbers = itertools.count(1)


def fresh_schema_name(prefix: str = "t") -> str:
    """A schema name unique in this cluster for this session (process id and a counter)."""
    return f"{prefix}_{os.getpid()}_{next(_schema_numbers)}"


@pytest.fixture(scope="session")
def postgresql_cluster() -> Iterator[PostgresCluster]:
    """The session's throwaway PostgreSQL cluster (Unix socket only; fsync and synchronous_commit on)."""
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def postgresql_dsn(postgresql_cluster: PostgresCluster) -> str:
    """The DSN of the session's cluster: ``host=<dir> port=5432 dbname=postgres user=postgres``."""
    return postgresql_cluster.dsn


@pytest.fixture
def postgresql_schema(postgresql_cluster: PostgresCluster) -> Iterator[str]:
    """A schema name no other test uses; the schema (if the test created it) is dropped afterwards."""
    name = fresh_schema_name()
    yield name
    if postgresql_cluster.running:
        postgresql_cluster.drop_schema(name)
