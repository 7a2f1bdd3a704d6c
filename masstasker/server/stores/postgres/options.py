"""How to reach PostgreSQL: the DSN, the password, the schema, the pool, and what to log.

The DSN is a libpq URI (``postgresql://user@host/db``) or a key=value string
(``host=/run/postgresql dbname=tasks``); psycopg parses both, and libpq takes
the password from the DSN, ``PGPASSWORD`` or ``~/.pgpass`` as usual. A
``--store-password-file`` wins over all of them. The password is never
logged: :func:`masked` is the only form of the DSN that goes to a log.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from psycopg import conninfo

from masstasker.server.config import DEFAULT_STORE_POOL_SIZE, DEFAULT_STORE_SCHEMA

__all__ = ["DEFAULT_POOL_SIZE", "DEFAULT_SCHEMA", "PgOptions", "masked"]

DEFAULT_SCHEMA = DEFAULT_STORE_SCHEMA
# Enough for a lease cycle's two statements from many workers at once on a small machine; every
# server opens this many, so N servers hold N times this many PostgreSQL backends.
DEFAULT_POOL_SIZE = DEFAULT_STORE_POOL_SIZE
# A statement that takes longer fails (UNAVAILABLE) rather than holding a worker past its deadline.
DEFAULT_STATEMENT_TIMEOUT = 5.0
# How often waiting Queries look again without a notification (a lost one never strands a waiter).
DEFAULT_POLL_INTERVAL = 1.0
# Without notifications (a pooler in transaction mode), look more often.
POLL_ONLY_INTERVAL = 0.25


@dataclass(frozen=True, slots=True)
class PgOptions:
    """Everything the PostgreSQL store is told at start."""

    dsn: str
    schema: str = DEFAULT_SCHEMA
    pool_size: int = DEFAULT_POOL_SIZE
    password_file: str = ""
    poll_only: bool = False
    poll_interval: float = DEFAULT_POLL_INTERVAL
    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT
    connect_timeout: float = 3.0

    def conninfo(self) -> str:
        """The DSN for libpq, with the password file's password if one is given.

        Raises ValueError for a DSN libpq cannot parse (the message never
        contains the password) and OSError for an unreadable password file.
        """
        try:
            params = conninfo.conninfo_to_dict(self.dsn)
        except Exception as exc:
            # From None: libpq's message may quote the part of the DSN holding the password.
            raise ValueError(f"--store: not a PostgreSQL DSN or URI ({type(exc).__name__})") from None
        extra: dict[str, str | int] = {}
        if self.password_file:
            lines = Path(self.password_file).read_text(encoding="utf-8").splitlines()
            if not lines or not lines[0]:
                raise ValueError(f"--store-password-file {self.password_file}: the first line is empty")
            extra["password"] = lines[0]
        if "connect_timeout" not in params:
            extra["connect_timeout"] = max(1, round(self.connect_timeout))
        if "application_name" not in params:
            extra["application_name"] = "masstasker"
        return conninfo.make_conninfo(self.dsn, **extra)

    @property
    def channel(self) -> str:
        """The LISTEN/NOTIFY channel of this schema: a hash, since a channel name is at most 63 bytes."""
        return "masstasker_" + hashlib.sha256(self.schema.encode()).hexdigest()[:20]


def masked(dsn: str) -> str:
    """The DSN with any password replaced by ``***``: safe to log."""
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except Exception:
        return "<unparsable DSN>"
    if "password" in params:
        params["password"] = "***"
    return conninfo.make_conninfo("", **params)
