"""The PostgreSQL schema and its versioned migrations.

Every server runs :func:`migrate` at start, inside one transaction holding an
advisory lock derived from the schema name: servers starting together queue
on the lock, the first applies what is missing, the others then find the
schema current. A schema newer than this server knows is refused
(:class:`SchemaTooNew`) rather than used half-understood.

Each migration is a list of statements; ``{schema}`` is replaced by the
quoted schema name. Never edit a released migration: add the next one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from masstasker.server.stores.postgres.statements import quote_schema

__all__ = ["MIGRATIONS", "SchemaTooNew", "SchemaVersion", "migrate"]

# Tasks are deleted and re-created on every lease, so the table churns like a queue: vacuum it
# often (1 % dead rows rather than 20 %), or dead index entries pile up ahead of every group's head.
_TASKS_STORAGE = (
    "autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000, "
    "autovacuum_vacuum_insert_scale_factor = 0.05, autovacuum_analyze_scale_factor = 0.05, "
    "autovacuum_vacuum_cost_delay = 0"
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: tasks, their ID sequence and indexes.
    (
        """CREATE TABLE {schema}.tasks (
            id bigint PRIMARY KEY,
            grp bytea NOT NULL,
            nb_s bigint NOT NULL,
            nb_ns integer NOT NULL CHECK (nb_ns >= 0 AND nb_ns < 1000000000),
            body bytea NOT NULL,
            labels text[]
        ) WITH ("""
        + _TASKS_STORAGE
        + ")",
        "CREATE INDEX tasks_queue ON {schema}.tasks (grp, nb_s, nb_ns, id)",
        "CREATE INDEX tasks_labels ON {schema}.tasks USING gin (labels) WHERE labels IS NOT NULL",
        "CREATE SEQUENCE {schema}.task_ids AS bigint MINVALUE 1",
    ),
    # 2: per-group sizes kept as delta rows, so a metrics scrape never counts the tasks table.
    (
        "CREATE TABLE {schema}.group_counts (grp bytea NOT NULL, n bigint NOT NULL)",
        "INSERT INTO {schema}.group_counts (grp, n) SELECT grp, count(*) FROM {schema}.tasks GROUP BY grp",
    ),
    # 3: attempts. A body keeps a non-zero attempts as its first field (tag 0x38, then a varint), the
    # rule of masstasker.server.body; owning raises it in SQL, in the statement that re-creates the task.
    (
        # The rare case, a count of 127 or more (a varint of two bytes or more), saturating at 2**32 - 1.
        """CREATE FUNCTION {schema}.owned_once_more_long(body bytea) RETURNS bytea
        LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
        DECLARE
            i integer := 1;
            b integer;
            shift integer := 0;
            n bigint := 0;
            prefix bytea := '\\x38'::bytea;
        BEGIN
            LOOP
                IF i >= length(body) THEN  -- not a whole varint (never a real body): as if no attempts
                    RETURN '\\x3801'::bytea || body;
                END IF;
                b := get_byte(body, i);
                n := n | ((b & 127)::bigint << shift);
                i := i + 1;
                EXIT WHEN b < 128;
                shift := shift + 7;
            END LOOP;
            n := least(n + 1, 4294967295);
            WHILE n >= 128 LOOP
                prefix := prefix || set_byte('\\x00'::bytea, 0, ((n & 127) | 128)::integer);
                n := n >> 7;
            END LOOP;
            RETURN prefix || set_byte('\\x00'::bytea, 0, n::integer) || substring(body FROM i + 1);
        END
        $$""",
        # The common cases inline (a SQL function the planner can inline): no attempts yet, or fewer than 127.
        # CASE tests in order, so get_byte never reads past the end of an empty body.
        """CREATE FUNCTION {schema}.owned_once_more(body bytea) RETURNS bytea
        LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
        SELECT CASE
            WHEN length(body) < 2 THEN '\\x3801'::bytea || body
            WHEN get_byte(body, 0) <> 56 THEN '\\x3801'::bytea || body
            WHEN get_byte(body, 1) < 127
                THEN set_byte('\\x3800'::bytea, 1, get_byte(body, 1) + 1) || substring(body FROM 3)
            ELSE {schema}.owned_once_more_long(body)
        END
        $$""",
    ),
    # 4: group statistics (issue 12): per task, whether it carries a lease and whether it has an error;
    # per group, the error count and the created/owned/departed counters as delta columns of
    # group_counts (at_s: the second of the change; NULL on compacted base rows), their history, and
    # when the counters began. Tasks leased before this upgrade count as scheduled until they expire.
    (
        "ALTER TABLE {schema}.tasks ADD COLUMN leased boolean NOT NULL DEFAULT false, "
        "ADD COLUMN has_error boolean NOT NULL DEFAULT false",
        # Whether a body (masstasker.server.body: a serialized Task without id, group and not_before)
        # has a non-empty error, field 6 (tag 0x32), the last occurrence winning, as error_of reads it.
        # Only the upgrade of existing rows uses it: new rows get the flag from the server.
        """CREATE FUNCTION {schema}.body_has_error(body bytea) RETURNS boolean
        LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
        DECLARE
            size integer := length(body);
            i integer := 0;
            b integer;
            shift integer;
            tag bigint;
            len bigint;
            depth integer := 0;  -- inside a (proto2) group: its fields are not the task's
            found boolean := false;
        BEGIN
            WHILE i < size LOOP
                tag := 0;
                shift := 0;
                LOOP
                    IF i >= size OR shift > 56 THEN RETURN false; END IF;  -- malformed (never a real body)
                    b := get_byte(body, i);
                    i := i + 1;
                    tag := tag | ((b & 127)::bigint << shift);
                    EXIT WHEN b < 128;
                    shift := shift + 7;
                END LOOP;
                CASE tag & 7
                    WHEN 0 THEN
                        LOOP
                            IF i >= size THEN RETURN false; END IF;
                            b := get_byte(body, i);
                            i := i + 1;
                            EXIT WHEN b < 128;
                        END LOOP;
                    WHEN 1 THEN i := i + 8;
                    WHEN 5 THEN i := i + 4;
                    WHEN 2 THEN
                        len := 0;
                        shift := 0;
                        LOOP
                            IF i >= size OR shift > 56 THEN RETURN false; END IF;
                            b := get_byte(body, i);
                            i := i + 1;
                            len := len | ((b & 127)::bigint << shift);
                            EXIT WHEN b < 128;
                            shift := shift + 7;
                        END LOOP;
                        IF len > size - i THEN RETURN false; END IF;
                        IF tag = 50 AND depth = 0 THEN found := len > 0; END IF;
                        i := i + len::integer;
                    WHEN 3 THEN depth := depth + 1;
                    WHEN 4 THEN depth := depth - 1;
                    ELSE RETURN false;
                END CASE;
                IF i > size THEN RETURN false; END IF;
            END LOOP;
            RETURN found;
        END
        $$""",
        # A body without the byte 0x32 has no error field: only the others are walked.
        "UPDATE {schema}.tasks SET has_error = true "
        "WHERE position('\\x32'::bytea IN body) > 0 AND {schema}.body_has_error(body)",
        "ALTER TABLE {schema}.group_counts ADD COLUMN errors bigint NOT NULL DEFAULT 0, "
        "ADD COLUMN created bigint NOT NULL DEFAULT 0, ADD COLUMN owned bigint NOT NULL DEFAULT 0, "
        "ADD COLUMN departed bigint NOT NULL DEFAULT 0, ADD COLUMN at_s bigint",
        "INSERT INTO {schema}.group_counts (grp, n, errors) "
        "SELECT grp, 0, count(*) FROM {schema}.tasks WHERE has_error GROUP BY grp",
        # ListTasks with the error state reads only the tasks with an error, in queue order.
        "CREATE INDEX tasks_errors ON {schema}.tasks (grp, nb_s, nb_ns, id) WHERE has_error",
        # width 1: a second's increments (kept an hour); width 60: a minute's (kept a day), period
        # being its first second.
        """CREATE TABLE {schema}.group_history (
            grp bytea NOT NULL,
            width integer NOT NULL CHECK (width IN (1, 60)),
            period bigint NOT NULL,
            created bigint NOT NULL,
            owned bigint NOT NULL,
            departed bigint NOT NULL,
            PRIMARY KEY (grp, width, period)
        )""",
        # The rates of every group read the last minutes of per-second rows; trimming reads the oldest.
        "CREATE INDEX group_history_recent ON {schema}.group_history (width, period)",
        # Set by the first server that opens the schema at this version, on its clock.
        "ALTER TABLE {schema}.schema_version ADD COLUMN stats_since bigint",
    ),
)

LATEST = len(MIGRATIONS)


class SchemaTooNew(Exception):
    """The database's schema was made by a newer server than this one."""


@dataclass(frozen=True, slots=True)
class SchemaVersion:
    """What :func:`migrate` found and left."""

    found: int  # 0: the schema did not exist
    now: int

    @property
    def created(self) -> bool:
        """True when this call created the schema (the first start on this database)."""
        return self.found == 0


def _lock_key(schema: str) -> str:
    return "masstasker schema " + schema


async def migrate(conn: psycopg.AsyncConnection[Any], schema: str, *, target: int = LATEST) -> SchemaVersion:
    """Bring ``schema`` to version ``target`` (default: the latest) in one locked transaction.

    ``conn`` must be in autocommit mode. Raises :class:`SchemaTooNew` when
    the schema's version is above ``target``'s and above what this server
    knows.
    """
    if not 0 < target <= LATEST:
        raise ValueError(f"no schema version {target} (this server knows 1 to {LATEST})")
    quoted = quote_schema(schema)
    async with conn.transaction():
        # hashtextextended: a stable 64-bit key for any schema name.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (_lock_key(schema),))
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {quoted}.schema_version (only_row boolean PRIMARY KEY DEFAULT true "
            "CHECK (only_row), version integer NOT NULL, bootstrapped boolean NOT NULL DEFAULT false)"
        )
        cur = await conn.execute(f"SELECT version FROM {quoted}.schema_version")
        row = await cur.fetchone()
        found = int(row[0]) if row else 0
        if found > LATEST:
            raise SchemaTooNew(
                f"PostgreSQL schema {schema!r} is at version {found}, newer than this server knows ({LATEST}): "
                "upgrade this server, or point it at another schema with --store-schema"
            )
        for version in range(found + 1, target + 1):
            for statement in MIGRATIONS[version - 1]:
                await conn.execute(statement.replace("{schema}", quoted))
        now = max(found, target)
        if found == 0:
            await conn.execute(f"INSERT INTO {quoted}.schema_version (version) VALUES (%s)", (now,))
        elif now != found:
            await conn.execute(f"UPDATE {quoted}.schema_version SET version = %s", (now,))
    return SchemaVersion(found, now)


async def stats_since(conn: psycopg.AsyncConnection[Any], schema: str, now: int) -> int:
    """When the schema's counters began (ns since the epoch): ``now`` if no server said so before."""
    quoted = quote_schema(schema)
    await conn.execute(f"UPDATE {quoted}.schema_version SET stats_since = %s WHERE stats_since IS NULL", (now,))
    row = await (await conn.execute(f"SELECT stats_since FROM {quoted}.schema_version")).fetchone()
    assert row is not None
    return int(row[0])


async def claim_bootstrap(conn: psycopg.AsyncConnection[Any], schema: str) -> bool:
    """True exactly once per schema: the caller then creates the bootstrap task.

    Mirrors a data directory's first start: after that, an empty bootstrap
    group means the job consumed the task.
    """
    quoted = quote_schema(schema)
    cur = await conn.execute(
        f"UPDATE {quoted}.schema_version SET bootstrapped = true WHERE NOT bootstrapped RETURNING true"
    )
    return (await cur.fetchone()) is not None
