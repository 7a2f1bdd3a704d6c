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
# follow queue order. The copies are marked leased and keep their error flag; the group's size is
# unchanged, so its group_counts row (one, whatever the batch) only counts them as owned. The copy's
# attempts is one higher (owned_once_more: schema version 3).
OWN_HEAD = """
WITH head AS (
    SELECT id FROM {schema}.tasks
    WHERE grp = %(grp)b AND (nb_s, nb_ns) <= (%(now_s)b::int8, %(now_ns)b::int4)
    ORDER BY grp, nb_s, nb_ns, id LIMIT %(n)b
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM {schema}.tasks t USING head WHERE t.id = head.id
    RETURNING t.id, t.nb_s, t.nb_ns, t.body, t.labels, t.has_error
), new AS (
    INSERT INTO {schema}.tasks (id, grp, nb_s, nb_ns, body, labels, leased, has_error)
    SELECT nextval('{schema}.task_ids'), %(grp)b, %(until_s)b::int8, %(until_ns)b::int4,
        {schema}.owned_once_more(body), labels, true, has_error
    FROM gone ORDER BY nb_s, nb_ns, id
    RETURNING id, body
), counted AS (
    INSERT INTO {schema}.group_counts (grp, n, owned, at_s)
    SELECT %(grp)b, 0, count(*), %(at_s)b::int8 FROM new HAVING count(*) > 0
)
SELECT id, body FROM new
"""

# tasks_queue, as OWN_HEAD, from just after the key (after_s, after_ns, after_id): the head's rows,
# locked, for a Query with max_attempts, which reads each task's attempts before it owns or parks
# it and may read past parked tasks (keyset pages, never OFFSET).
LOCK_HEAD = """
SELECT id, nb_s, nb_ns, body, labels, has_error FROM {schema}.tasks
WHERE grp = %(grp)b AND (nb_s, nb_ns) <= (%(now_s)b::int8, %(now_ns)b::int4)
    AND (nb_s, nb_ns, id) > (%(after_s)b::int8, %(after_ns)b::int4, %(after_id)b::int8)
ORDER BY grp, nb_s, nb_ns, id LIMIT %(n)b
FOR UPDATE SKIP LOCKED
"""

# tasks_pkey. A waiter's caller went away while its lease was committing: the lease is undone by
# re-creating the tasks visible at the waiter's now (new IDs, as a disown would).
GIVE_BACK = """
WITH gone AS (
    DELETE FROM {schema}.tasks WHERE id = ANY(%(ids)b::int8[]) RETURNING id, grp, body, labels, has_error
)
INSERT INTO {schema}.tasks (id, grp, nb_s, nb_ns, body, labels, has_error)
SELECT nextval('{schema}.task_ids'), grp, %(now_s)b::int8, %(now_ns)b::int4, body, labels, has_error
FROM gone ORDER BY id
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

# tasks_pkey. Each statement that changes tasks records the change in group_counts in the same
# statement (so in the same transaction), one row per group touched: the size and error deltas, and
# the counters, at the second of the change (at_s, the server's clock). A deletion counts as a
# departure; INSERT_TASKS takes back the ones its creations rewrite. Python needs each removed row's
# group, key, lease flag and labels to pair creations with the tasks they replace.
DELETE_BY_IDS = """
WITH gone AS (
    DELETE FROM {schema}.tasks WHERE id = ANY(%(ids)b::int8[]) RETURNING id, grp, nb_s, nb_ns, leased, labels, has_error
), counted AS (
    INSERT INTO {schema}.group_counts (grp, n, errors, departed, at_s)
    SELECT grp, -count(*), -count(*) FILTER (WHERE has_error), count(*), %(at_s)b::int8 FROM gone GROUP BY grp
)
SELECT id, grp, nb_s, nb_ns, leased, labels FROM gone
"""

# tasks_pkey. A lease's commit (an Update deleting one ID and nothing else): as DELETE_BY_IDS, returning
# only whether the row was there (nothing to pair it with).
DELETE_ONE = """
WITH gone AS (
    DELETE FROM {schema}.tasks WHERE id = %(id)b::int8 RETURNING grp, has_error
), counted AS (
    INSERT INTO {schema}.group_counts (grp, n, errors, departed, at_s)
    SELECT grp, -1, -count(*) FILTER (WHERE has_error), 1, %(at_s)b::int8 FROM gone GROUP BY grp
)
SELECT count(*) FROM gone
"""

# tasks_queue (leading column grp).
DELETE_BY_GROUPS = """
WITH gone AS (
    DELETE FROM {schema}.tasks WHERE grp = ANY(%(groups)b::bytea[])
    RETURNING id, grp, nb_s, nb_ns, leased, labels, has_error
), counted AS (
    INSERT INTO {schema}.group_counts (grp, n, errors, departed, at_s)
    SELECT grp, -count(*), -count(*) FILTER (WHERE has_error), count(*), %(at_s)b::int8 FROM gone GROUP BY grp
)
SELECT id, grp, nb_s, nb_ns, leased, labels FROM gone
"""

# tasks_labels (GIN, partial: the labels IS NOT NULL term lets the planner use it).
DELETE_BY_LABELS = """
WITH gone AS (
    DELETE FROM {schema}.tasks WHERE labels IS NOT NULL AND labels @> %(labels)b::text[]
    RETURNING id, grp, nb_s, nb_ns, leased, labels, has_error
), counted AS (
    INSERT INTO {schema}.group_counts (grp, n, errors, departed, at_s)
    SELECT grp, -count(*), -count(*) FILTER (WHERE has_error), count(*), %(at_s)b::int8 FROM gone GROUP BY grp
)
SELECT id, grp, nb_s, nb_ns, leased, labels FROM gone
"""

# BulkSet reads what it rewrites: the same three selections, whole rows, locked.
# tasks_pkey.
TAKE_BY_IDS = """
WITH gone AS (
    DELETE FROM {schema}.tasks WHERE id = ANY(%(ids)b::int8[]) RETURNING *
), counted AS (
    INSERT INTO {schema}.group_counts (grp, n, errors, departed, at_s)
    SELECT grp, -count(*), -count(*) FILTER (WHERE has_error), count(*), %(at_s)b::int8 FROM gone GROUP BY grp
)
SELECT id, grp, nb_s, nb_ns, leased, labels, body, has_error FROM gone
"""

# tasks_queue (leading column grp).
TAKE_BY_GROUPS = """
WITH gone AS (
    DELETE FROM {schema}.tasks WHERE grp = ANY(%(groups)b::bytea[]) RETURNING *
), counted AS (
    INSERT INTO {schema}.group_counts (grp, n, errors, departed, at_s)
    SELECT grp, -count(*), -count(*) FILTER (WHERE has_error), count(*), %(at_s)b::int8 FROM gone GROUP BY grp
)
SELECT id, grp, nb_s, nb_ns, leased, labels, body, has_error FROM gone
"""

# tasks_labels.
TAKE_BY_LABELS = """
WITH gone AS (
    DELETE FROM {schema}.tasks WHERE labels IS NOT NULL AND labels @> %(labels)b::text[] RETURNING *
), counted AS (
    INSERT INTO {schema}.group_counts (grp, n, errors, departed, at_s)
    SELECT grp, -count(*), -count(*) FILTER (WHERE has_error), count(*), %(at_s)b::int8 FROM gone GROUP BY grp
)
SELECT id, grp, nb_s, nb_ns, leased, labels, body, has_error FROM gone
"""

# No index read: one insert per row (tasks_pkey, tasks_queue, and tasks_labels for labelled
# tasks). nextval() runs in ORDER BY order, so IDs increase in request order. A task's labels
# arrive as one space-separated string: arrays of arrays must be rectangular, label sets are not.
# Python says which rows carry a lease over and which have an error (NULL arrays when none does: unnest
# pads them with NULLs, read as false, and a plain create sends no flags), and, per group, how many of
# the created rows rewrite a task this transaction removed (neither created nor departed: the
# deletion counted them as departed, this row takes that back) and how many an owning Query owned.
INSERT_TASKS = """
WITH new AS (
    INSERT INTO {schema}.tasks (id, grp, nb_s, nb_ns, body, labels, leased, has_error)
    SELECT nextval('{schema}.task_ids'), g, s, ns, b, string_to_array(l, ' '), coalesce(le, false), coalesce(e, false)
    FROM unnest(
        %(groups)b::bytea[], %(nb_s)b::int8[], %(nb_ns)b::int4[], %(bodies)b::bytea[], %(labels)b::text[],
        %(leased)b::bool[], %(errors)b::bool[]
    ) WITH ORDINALITY AS u(g, s, ns, b, l, le, e, ord)
    ORDER BY ord
    RETURNING id, grp, has_error
), paired AS (
    SELECT * FROM unnest(%(pair_groups)b::bytea[], %(rewrites)b::int8[], %(owned)b::int8[]) AS p(grp, rewrites, owned)
), counted AS (
    INSERT INTO {schema}.group_counts (grp, n, errors, created, owned, departed, at_s)
    SELECT new.grp, count(*), count(*) FILTER (WHERE new.has_error),
        count(*) - coalesce(min(paired.rewrites), 0), coalesce(min(paired.owned), 0),
        -coalesce(min(paired.rewrites), 0), %(at_s)b::int8
    FROM new LEFT JOIN paired ON paired.grp = new.grp GROUP BY new.grp
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

# -- the admin API (statistics and listings) ---------------------------------------------------

# For the admin statements below: a group's tasks not visible yet, split by their lease flag (tasks_queue
# from now on: usually few, the leases), and its head's not_before (one probe of tasks_queue). {grp} is
# the group's column or parameter.
_HIDDEN_AND_HEAD = """CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE t.leased)::int8 AS leased, count(*)::int8 AS n FROM {schema}.tasks t
    WHERE t.grp = {grp} AND (t.nb_s, t.nb_ns) > (%(now_s)b::int8, %(now_ns)b::int4)
) hidden
LEFT JOIN LATERAL (
    SELECT t.nb_s, t.nb_ns FROM {schema}.tasks t WHERE t.grp = {grp}
    ORDER BY t.grp, t.nb_s, t.nb_ns, t.id LIMIT 1
) head ON true
"""


# One statement, one snapshot, one row per group, never a scan of the visible backlog:
# group_counts (small: compacted) summed per group; the tasks not visible yet counted from
# tasks_queue and split by their lease flag (usually few: the leases); the head's key by one probe
# of tasks_queue; the counters of the seconds [from_s, to_s] from the journal rows (a scan of
# group_counts) and group_history's per-second rows (group_history_recent), as arrays per group.
ADMIN_GROUPS = (
    """
WITH sums AS (
    SELECT grp, sum(n)::int8 AS n, sum(errors)::int8 AS errors, sum(created)::int8 AS created,
        sum(owned)::int8 AS owned, sum(departed)::int8 AS departed
    FROM {schema}.group_counts GROUP BY grp
), recent AS (
    SELECT grp, s, sum(c)::int8 AS c, sum(o)::int8 AS o, sum(d)::int8 AS d FROM (
        SELECT grp, at_s AS s, created AS c, owned AS o, departed AS d FROM {schema}.group_counts
        WHERE at_s BETWEEN %(from_s)b::int8 AND %(to_s)b::int8
        UNION ALL
        SELECT grp, period, created, owned, departed FROM {schema}.group_history
        WHERE width = 1 AND period BETWEEN %(from_s)b::int8 AND %(to_s)b::int8
    ) r GROUP BY grp, s
), rates AS (
    SELECT grp, array_agg(s ORDER BY s) AS s, array_agg(c ORDER BY s) AS c, array_agg(o ORDER BY s) AS o,
        array_agg(d ORDER BY s) AS d
    FROM recent GROUP BY grp
)
SELECT sums.grp, sums.n, sums.errors, sums.created, sums.owned, sums.departed, hidden.leased, hidden.n,
    head.nb_s, head.nb_ns, rates.s, rates.c, rates.o, rates.d
FROM sums
LEFT JOIN rates ON rates.grp = sums.grp
"""
    + _HIDDEN_AND_HEAD.replace("{grp}", "sums.grp")
    + """ORDER BY sums.grp
"""
)

# As ADMIN_GROUPS for one group (one row, zeros for a group never seen), with its whole kept history:
# the journal rows and group_history's rows (primary key), summed per (width, period), oldest first.
ADMIN_GROUP = """
WITH sums AS (
    SELECT coalesce(sum(n), 0)::int8 AS n, coalesce(sum(errors), 0)::int8 AS errors,
        coalesce(sum(created), 0)::int8 AS created, coalesce(sum(owned), 0)::int8 AS owned,
        coalesce(sum(departed), 0)::int8 AS departed
    FROM {schema}.group_counts WHERE grp = %(grp)b
), kept AS (
    SELECT w, p, sum(c)::int8 AS c, sum(o)::int8 AS o, sum(d)::int8 AS d FROM (
        SELECT 1 AS w, at_s AS p, created AS c, owned AS o, departed AS d FROM {schema}.group_counts
        WHERE grp = %(grp)b AND at_s IS NOT NULL
        UNION ALL
        SELECT width, period, created, owned, departed FROM {schema}.group_history WHERE grp = %(grp)b
    ) r GROUP BY w, p
), history AS (
    SELECT array_agg(w ORDER BY p, w DESC) AS w, array_agg(p ORDER BY p, w DESC) AS p,
        array_agg(c ORDER BY p, w DESC) AS c, array_agg(o ORDER BY p, w DESC) AS o,
        array_agg(d ORDER BY p, w DESC) AS d
    FROM kept
)
SELECT sums.n, sums.errors, sums.created, sums.owned, sums.departed, hidden.leased, hidden.n,
    head.nb_s, head.nb_ns, history.w, history.p, history.c, history.o, history.d
FROM sums CROSS JOIN history
""" + _HIDDEN_AND_HEAD.replace("{grp}", "%(grp)b")

# ADMIN_GROUPS with every group's whole kept history instead of the recent seconds (ListGroups asked
# for history): group_history read whole (primary key order), as ADMIN_GROUP's arrays per group.
ADMIN_GROUPS_HISTORY = (
    """
WITH sums AS (
    SELECT grp, sum(n)::int8 AS n, sum(errors)::int8 AS errors, sum(created)::int8 AS created,
        sum(owned)::int8 AS owned, sum(departed)::int8 AS departed
    FROM {schema}.group_counts GROUP BY grp
), kept AS (
    SELECT grp, w, p, sum(c)::int8 AS c, sum(o)::int8 AS o, sum(d)::int8 AS d FROM (
        SELECT grp, 1 AS w, at_s AS p, created AS c, owned AS o, departed AS d FROM {schema}.group_counts
        WHERE at_s IS NOT NULL
        UNION ALL
        SELECT grp, width, period, created, owned, departed FROM {schema}.group_history
    ) r GROUP BY grp, w, p
), history AS (
    SELECT grp, array_agg(w ORDER BY p, w DESC) AS w, array_agg(p ORDER BY p, w DESC) AS p,
        array_agg(c ORDER BY p, w DESC) AS c, array_agg(o ORDER BY p, w DESC) AS o,
        array_agg(d ORDER BY p, w DESC) AS d
    FROM kept GROUP BY grp
)
SELECT sums.grp, sums.n, sums.errors, sums.created, sums.owned, sums.departed, hidden.leased, hidden.n,
    head.nb_s, head.nb_ns, history.w, history.p, history.c, history.o, history.d
FROM sums
LEFT JOIN history ON history.grp = sums.grp
"""
    + _HIDDEN_AND_HEAD.replace("{grp}", "sums.grp")
    + """ORDER BY sums.grp
"""
)

# A page of a group's tasks: the candidates are at most `scan` tasks after a key (the page token's, or
# the state's lower bound: one row comparison, so that both bounds bound the index scan) and up to the
# state's upper bound of not_before, in queue order (tasks_queue, or tasks_errors for the error state),
# numbered; a hit passes the state's lease filter and the label selector. Returned: the hits, and the
# last candidate if the bound is reached, at most `page` rows. The scan streams: it stops as soon as
# that many rows are found, so an unfiltered page reads page rows, a filtered one at most `scan`.
_PAGE = """
    ORDER BY grp, nb_s, nb_ns, id LIMIT %(scan)b
) candidates
WHERE hit OR rn = %(scan)b
ORDER BY nb_s, nb_ns, id LIMIT %(page)b
"""

_CANDIDATES = """
SELECT id, nb_s, nb_ns, leased, body, hit, rn FROM (
    SELECT id, nb_s, nb_ns, leased, body,
        (%(leased)b::bool IS NULL OR leased = %(leased)b::bool)
            AND (%(labels)b::text[] IS NULL OR (labels IS NOT NULL AND labels @> %(labels)b::text[])) AS hit,
        row_number() OVER (ORDER BY nb_s, nb_ns, id) AS rn
    FROM {schema}.tasks
    WHERE grp = %(grp)b AND (nb_s, nb_ns, id) > (%(after_s)b::int8, %(after_ns)b::int4, %(after_id)b::int8)
        AND (nb_s, nb_ns) <= (%(high_s)b::int8, %(high_ns)b::int4)"""

LIST_TASKS = _CANDIDATES + _PAGE

# tasks_errors (partial: tasks with an error only), as LIST_TASKS.
LIST_ERROR_TASKS = _CANDIDATES + " AND has_error" + _PAGE

# tasks_pkey.
GET_TASK = """
SELECT grp, nb_s, nb_ns, body, leased FROM {schema}.tasks WHERE id = %(id)b
"""

# For the tests' invariant check only (scans both tables): per group, the statistics kept against a
# count of the tasks table, where they disagree or break an invariant.
STATS_DISAGREE = """
WITH counted AS (
    SELECT grp, sum(n)::int8 AS n, sum(errors)::int8 AS errors, sum(created)::int8 AS created,
        sum(owned)::int8 AS owned, sum(departed)::int8 AS departed
    FROM {schema}.group_counts GROUP BY grp
), actual AS (
    SELECT grp, count(*)::int8 AS n, count(*) FILTER (WHERE has_error)::int8 AS errors FROM {schema}.tasks GROUP BY grp
)
SELECT coalesce(counted.grp, actual.grp), counted.n, actual.n, counted.errors, actual.errors,
    counted.created, counted.owned, counted.departed
FROM counted FULL JOIN actual ON counted.grp = actual.grp
WHERE coalesce(counted.n, 0) <> coalesce(actual.n, 0) OR coalesce(counted.errors, 0) <> coalesce(actual.errors, 0)
    OR counted.created < 0 OR counted.owned < 0 OR counted.departed < 0
    OR counted.n - counted.created + counted.departed < 0
"""

# For the tests' invariant check only: every task's error flag and body (to compare with body.py).
ERROR_FLAGS = """
SELECT id, body, has_error FROM {schema}.tasks
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

# group_counts: fold every delta row into one base row per group (at_s NULL), and the journal rows'
# counters into group_history's per-second rows. Run under COMPACT_LOCK (one server at a time); a
# group without tasks and without history is forgotten (its counters restart at zero), as the
# in-memory store forgets a group idle for a day.
COMPACT_COUNTS = """
WITH gone AS (
    DELETE FROM {schema}.group_counts RETURNING grp, n, errors, created, owned, departed, at_s
), kept AS (
    SELECT grp, sum(n) AS n, sum(errors) AS errors, sum(created) AS created, sum(owned) AS owned,
        sum(departed) AS departed
    FROM gone GROUP BY grp
), folded AS (
    INSERT INTO {schema}.group_counts (grp, n, errors, created, owned, departed)
    SELECT grp, n, errors, created, owned, departed FROM kept
    WHERE n <> 0 OR errors <> 0 OR EXISTS (SELECT 1 FROM {schema}.group_history h WHERE h.grp = kept.grp)
        OR EXISTS (SELECT 1 FROM gone WHERE gone.grp = kept.grp AND gone.at_s IS NOT NULL)
), seconds AS (
    INSERT INTO {schema}.group_history AS h (grp, width, period, created, owned, departed)
    SELECT grp, 1, at_s, sum(created), sum(owned), sum(departed) FROM gone WHERE at_s IS NOT NULL
    GROUP BY grp, at_s HAVING sum(created) <> 0 OR sum(owned) <> 0 OR sum(departed) <> 0
    ORDER BY grp, at_s
    ON CONFLICT (grp, width, period) DO UPDATE SET created = h.created + excluded.created,
        owned = h.owned + excluded.owned, departed = h.departed + excluded.departed
)
SELECT count(*) FROM gone
"""

# group_history_recent: per-second rows older than an hour become per-minute rows (period: the
# minute's first second), in one statement.
TRIM_SECONDS = """
WITH old AS (
    DELETE FROM {schema}.group_history WHERE width = 1 AND period < %(before)b::int8
    RETURNING grp, period, created, owned, departed
)
INSERT INTO {schema}.group_history AS h (grp, width, period, created, owned, departed)
SELECT grp, 60, period - period %% 60, sum(created), sum(owned), sum(departed) FROM old
GROUP BY grp, period - period %% 60 ORDER BY 1, 3
ON CONFLICT (grp, width, period) DO UPDATE SET created = h.created + excluded.created,
    owned = h.owned + excluded.owned, departed = h.departed + excluded.departed
"""

# group_history_recent: per-minute rows older than a day are dropped.
TRIM_MINUTES = """
DELETE FROM {schema}.group_history WHERE width = 60 AND period < %(before)b::int8
"""

# One compactor at a time (a transaction-level advisory lock; the others skip their turn).
COMPACT_LOCK = """
SELECT pg_try_advisory_xact_lock(hashtextextended(%(key)b, 0))
"""

# group_counts: how many rows compaction would fold, and the oldest journal row's second.
COUNT_ROWS = """
SELECT count(*), min(at_s) FROM {schema}.group_counts
"""

# -- connections ---------------------------------------------------------------------

PING = "SELECT 1"


@dataclass(frozen=True, slots=True)
class Statements:
    """The statements above with the schema name filled in, ready to execute."""

    peek_head: LiteralString
    own_head: LiteralString
    lock_head: LiteralString
    next_hidden: LiteralString
    give_back: LiteralString
    lock_predicates: LiteralString
    delete_by_ids: LiteralString
    delete_one: LiteralString
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
    admin_groups: LiteralString
    admin_group: LiteralString
    admin_groups_history: LiteralString
    list_tasks: LiteralString
    list_error_tasks: LiteralString
    get_task: LiteralString
    stats_disagree: LiteralString
    error_flags: LiteralString
    compact_counts: LiteralString
    trim_seconds: LiteralString
    trim_minutes: LiteralString
    compact_lock: LiteralString
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
