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
