"""Every SQL statement the PostgreSQL store runs, by name, each with the index that serves it.

The schema name is configurable, so the statements are templates with a
``{schema}`` placeholder, rendered once per store by :func:`render` with the
name quoted as an identifier. Every value is a bound parameter: nothing a
client sends is ever spliced into SQL text.

Columns of ``tasks`` (see :mod:`.schema`): ``grp`` is the group name's UTF-8
bytes (``bytea``: PostgreSQL ``text`` cannot hold the NUL character that a
protobuf string may contain); ``nb_s``/``nb_ns`` is ``not_before`` as
seconds and nanoseconds (a Timestamp spans years 1 to 9999, which nanoseconds
in one ``bigint`` cannot); ``body`` is the serialized Task without id, group
and not_before, exactly what the in-memory store keeps; ``labels`` is the
label pairs, each encoded by :func:`~.codec.label_element`, for selectors.

Indexes: ``tasks_pkey`` (id); ``tasks_queue`` (grp, nb_s, nb_ns, id), the
group's queue order; ``tasks_labels``, GIN on labels where there are any.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import LiteralString

from psycopg import sql

__all__ = ["Statements", "render"]

# -- Query ------------------------------------------------------------------

# tasks_queue: equality on grp, range on (nb_s, nb_ns) read in index order, stops after LIMIT.
PEEK_HEAD = """
SELECT id, nb_s, nb_ns, body FROM {schema}.tasks
WHERE grp = %(grp)b AND (nb_s, nb_ns) <= (%(now_s)b::int8, %(now_ns)b::int4)
ORDER BY grp, nb_s, nb_ns, id LIMIT %(n)b
"""

# tasks_queue, as PEEK_HEAD; rows another transaction holds are skipped, never waited for, so two
# servers never lease the same task and never block each other. Delete and re-create in one
# statement (one implicit transaction, one round trip); nextval() runs after the sort, so new IDs
# follow queue order. Group size is unchanged: no group_counts row.
OWN_HEAD = """
WITH head AS (
    SELECT id FROM {schema}.tasks
    WHERE grp = %(grp)b AND (nb_s, nb_ns) <= (%(now_s)b::int8, %(now_ns)b::int4)
    ORDER BY grp, nb_s, nb_ns, id LIMIT %(n)b
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM {schema}.tasks t USING head WHERE t.id = head.id
    RETURNING t.id, t.nb_s, t.nb_ns, t.body, t.labels
)
INSERT INTO {schema}.tasks (id, grp, nb_s, nb_ns, body, labels)
SELECT nextval('{schema}.task_ids'), %(grp)b, %(until_s)b::int8, %(until_ns)b::int4, body, labels
FROM gone ORDER BY nb_s, nb_ns, id
RETURNING id, body
"""

# tasks_pkey. A waiter's caller went away while its lease was committing: the lease is undone by
# re-creating the tasks visible at the waiter's now (new IDs, as a disown would).
GIVE_BACK = """
WITH gone AS (
    DELETE FROM {schema}.tasks WHERE id = ANY(%(ids)b::int8[]) RETURNING id, grp, body, labels
)
INSERT INTO {schema}.tasks (id, grp, nb_s, nb_ns, body, labels)
SELECT nextval('{schema}.task_ids'), grp, %(now_s)b::int8, %(now_ns)b::int4, body, labels FROM gone ORDER BY id
"""

# tasks_queue: the first task of the group that is not visible yet (for a waiter's timer).
NEXT_HIDDEN = """
SELECT nb_s, nb_ns FROM {schema}.tasks
WHERE grp = %(grp)b AND (nb_s, nb_ns) > (%(now_s)b::int8, %(now_ns)b::int4)
ORDER BY grp, nb_s, nb_ns, id LIMIT 1
"""

# -- Update and BulkSet -----------------------------------------------------------

# tasks_pkey. KEY SHARE blocks a concurrent DELETE of these rows until we commit, and lets
# other readers and predicate holders through.
LOCK_PREDICATES = """
SELECT id FROM {schema}.tasks WHERE id = ANY(%(ids)b::int8[]) FOR KEY SHARE
"""

# tasks_pkey. Each statement that changes a group's size records the change in group_counts in
# the same statement (so in the same transaction), one row per group.
DELETE_BY_IDS = """
WITH gone AS (
    DELETE FROM {schema}.tasks WHERE id = ANY(%(ids)b::int8[]) RETURNING id, grp
), counted AS (
    INSERT INTO {schema}.group_counts (grp, n) SELECT grp, -count(*) FROM gone GROUP BY grp
)
SELECT id FROM gone
"""

# tasks_queue (leading column grp).
DELETE_BY_GROUPS = """
WITH gone AS (
    DELETE FROM {schema}.tasks WHERE grp = ANY(%(groups)b::bytea[]) RETURNING id, grp
), counted AS (
    INSERT INTO {schema}.group_counts (grp, n) SELECT grp, -count(*) FROM gone GROUP BY grp
)
SELECT id FROM gone
"""

# tasks_labels (GIN, partial: the labels IS NOT NULL term lets the planner use it).
DELETE_BY_LABELS = """
WITH gone AS (
    DELETE FROM {schema}.tasks WHERE labels IS NOT NULL AND labels @> %(labels)b::text[] RETURNING id, grp
), counted AS (
    INSERT INTO {schema}.group_counts (grp, n) SELECT grp, -count(*) FROM gone GROUP BY grp
)
SELECT id FROM gone
"""

# BulkSet reads what it rewrites: the same three selections, whole rows, locked.
# tasks_pkey.
TAKE_BY_IDS = """
WITH gone AS (
    DELETE FROM {schema}.tasks WHERE id = ANY(%(ids)b::int8[]) RETURNING *
), counted AS (
    INSERT INTO {schema}.group_counts (grp, n) SELECT grp, -count(*) FROM gone GROUP BY grp
)
SELECT id, grp, nb_s, nb_ns, body, labels FROM gone
"""

# tasks_queue (leading column grp).
TAKE_BY_GROUPS = """
WITH gone AS (
    DELETE FROM {schema}.tasks WHERE grp = ANY(%(groups)b::bytea[]) RETURNING *
), counted AS (
    INSERT INTO {schema}.group_counts (grp, n) SELECT grp, -count(*) FROM gone GROUP BY grp
)
SELECT id, grp, nb_s, nb_ns, body, labels FROM gone
"""

# tasks_labels.
TAKE_BY_LABELS = """
WITH gone AS (
    DELETE FROM {schema}.tasks WHERE labels IS NOT NULL AND labels @> %(labels)b::text[] RETURNING *
), counted AS (
    INSERT INTO {schema}.group_counts (grp, n) SELECT grp, -count(*) FROM gone GROUP BY grp
)
SELECT id, grp, nb_s, nb_ns, body, labels FROM gone
"""

# No index read: one insert per row (tasks_pkey, tasks_queue, and tasks_labels for labelled
# tasks). nextval() runs in ORDER BY order, so IDs increase in request order. A task's labels
# arrive as one space-separated string: arrays of arrays must be rectangular, label sets are not.
INSERT_TASKS = """
WITH new AS (
    INSERT INTO {schema}.tasks (id, grp, nb_s, nb_ns, body, labels)
    SELECT nextval('{schema}.task_ids'), g, s, ns, b, string_to_array(l, ' ')
    FROM unnest(%(groups)b::bytea[], %(nb_s)b::int8[], %(nb_ns)b::int4[], %(bodies)b::bytea[], %(labels)b::text[])
        WITH ORDINALITY AS u(g, s, ns, b, l, ord)
    ORDER BY ord
    RETURNING id, grp
), counted AS (
    INSERT INTO {schema}.group_counts (grp, n) SELECT grp, count(*) FROM new GROUP BY grp
)
SELECT id FROM new
"""

# No table: one notification per distinct group, sent when the transaction commits.
NOTIFY_GROUPS = """
SELECT pg_notify(%(channel)b, g) FROM unnest(%(groups)b::text[]) AS g
"""

# -- Debug and metrics --------------------------------------------------------------

# One statement, so one snapshot: the page and the count agree. tasks_queue for the page, in order
# (LIMIT NULL: the whole group); group_counts for the count. The count comes on every row, and on
# one row of NULLs when the group is empty.
DEBUG_GROUP = """
WITH total AS (
    SELECT coalesce(sum(n), 0)::int8 AS n FROM {schema}.group_counts WHERE grp = %(grp)b
), page AS (
    SELECT id, nb_s, nb_ns, body FROM {schema}.tasks WHERE grp = %(grp)b
    ORDER BY grp, nb_s, nb_ns, id LIMIT %(limit)b
)
SELECT total.n, page.id, page.nb_s, page.nb_ns, page.body FROM total LEFT JOIN page ON true
ORDER BY page.nb_s, page.nb_ns, page.id
"""

# As DEBUG_GROUP, every group: tasks_pkey for the page, in ID order.
DEBUG_ALL = """
WITH total AS (
    SELECT coalesce(sum(n), 0)::int8 AS n FROM {schema}.group_counts
), page AS (
    SELECT id, grp, nb_s, nb_ns, body FROM {schema}.tasks ORDER BY id LIMIT %(limit)b
)
SELECT total.n, page.id, page.grp, page.nb_s, page.nb_ns, page.body FROM total LEFT JOIN page ON true
ORDER BY page.id
"""

# group_counts: small (compacted) and unindexed; a sequential scan of it. Per group, the tasks not
# yet visible (usually few: the leased ones) are counted from tasks_queue; visible = size - hidden.
# Never a scan of the visible backlog. One statement: sizes and hidden counts from one snapshot.
GROUP_STATS = """
WITH sizes AS (
    SELECT grp, sum(n)::int8 AS n FROM {schema}.group_counts GROUP BY grp HAVING sum(n) <> 0
)
SELECT grp, n, (
    SELECT count(*) FROM {schema}.tasks t
    WHERE t.grp = sizes.grp AND (t.nb_s, t.nb_ns) > (%(now_s)b::int8, %(now_ns)b::int4)
)::int8
FROM sizes
"""

# group_counts against a count of the tasks table (tasks_queue, whole), in one snapshot: only for the
# tests' consistency check, never on a request path. Rows where the two disagree.
COUNTS_DISAGREE = """
WITH counted AS (
    SELECT grp, sum(n)::int8 AS n FROM {schema}.group_counts GROUP BY grp HAVING sum(n) <> 0
), actual AS (
    SELECT grp, count(*)::int8 AS n FROM {schema}.tasks GROUP BY grp
)
SELECT coalesce(counted.grp, actual.grp), counted.n, actual.n
FROM counted FULL JOIN actual ON counted.grp = actual.grp
WHERE counted.n IS DISTINCT FROM actual.n
"""

# group_counts: fold every delta row into one row per group. Safe to run concurrently from
# several servers: a row deleted by the other one is skipped, never counted twice.
COMPACT_COUNTS = """
WITH gone AS (
    DELETE FROM {schema}.group_counts RETURNING grp, n
)
INSERT INTO {schema}.group_counts (grp, n)
SELECT grp, sum(n) FROM gone GROUP BY grp HAVING sum(n) <> 0
"""

# group_counts: how many rows compaction would fold (to decide whether to compact).
COUNT_ROWS = """
SELECT count(*) FROM {schema}.group_counts
"""

# -- connections ---------------------------------------------------------------------

PING = "SELECT 1"


@dataclass(frozen=True, slots=True)
class Statements:
    """The statements above with the schema name filled in, ready to execute."""

    peek_head: LiteralString
    own_head: LiteralString
    next_hidden: LiteralString
    give_back: LiteralString
    lock_predicates: LiteralString
    delete_by_ids: LiteralString
    delete_by_groups: LiteralString
    delete_by_labels: LiteralString
    take_by_ids: LiteralString
    take_by_groups: LiteralString
    take_by_labels: LiteralString
    insert_tasks: LiteralString
    notify_groups: LiteralString
    debug_group: LiteralString
    debug_all: LiteralString
    group_stats: LiteralString
    compact_counts: LiteralString
    count_rows: LiteralString
    counts_disagree: LiteralString


def quote_schema(schema: str) -> str:
    """The schema name as a quoted SQL identifier (any name, quotes and all, is safe)."""
    return sql.Identifier(schema).as_string(None)


def render(schema: str) -> Statements:
    """Every statement with ``{schema}`` replaced by the quoted schema name."""
    quoted = quote_schema(schema)
    # Inside nextval('...') the name is a string literal holding a (quoted) identifier.
    seq_literal = quoted.replace("'", "''")
    values = {}
    for field in fields(Statements):
        template: str = globals()[field.name.upper()]
        text = template.replace("nextval('{schema}.", "nextval('" + seq_literal + ".")
        # The one place a name is put into SQL text: quoted as an identifier just above.
        values[field.name] = text.replace("{schema}", quoted).strip()
    return Statements(**values)
