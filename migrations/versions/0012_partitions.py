"""Partitions: ``batchrows`` becomes PARTITION BY RANGE (batch), so that a purge drops whole periods.

New batch ids are UUIDv7 (``alya.core.ids``: the first 48 bits are the submit time), so a range of ids is a
period of submit time; a partition holds one week (``alya.db.partitions``). The table as it was (random v4
ids) becomes the DEFAULT partition ``batchrows_default``: its rows keep working as before (every statement
filters by ``batch``) and go by the batched DELETE as retention purges them; it also catches any id no range
partition covers. The upgrade:

1. locks ``batchrows`` (ACCESS EXCLUSIVE: the whole upgrade is one transaction), drops the counters' triggers
   from it (0011) and renames it and its indexes to ``batchrows_default*``;
2. creates the partitioned ``batchrows`` with the same columns, keys, CHECK, foreign key and partial indexes
   (on a partitioned table they are partitioned indexes: nothing is built yet), and the counters' triggers
   on it (statement-level triggers with transition tables are allowed on a partitioned table and see the
   rows of every partition);
3. creates the range partitions of this week and the next ``AHEAD`` ones, empty, moving into them the rows
   of old batches whose random ids happen to fall in their ranges (an index range scan: a week is 2^-19 of
   the id space, so ~2 of a million old batches);
4. attaches the old table as the DEFAULT partition: its indexes, CHECK and foreign key match the parent's
   and are adopted (no index is rebuilt), but PostgreSQL scans it once to prove that no row belongs to a
   range partition (measured: 0.09 s per million rows). Doing step 3 first makes that one scan, not one per
   partition; the maintenance that creates later partitions pays a scan of the default partition each time,
   which is why it waits while that partition is large (``alya.db.partitions``).

Server-side functions do the DDL that names a partition (``alya_partition_create``, ``_detach``,
``_discard``), so the named SQL of ``alya/db/sql/partitions.sql`` passes names as parameters.

Revision ID: 0012_partitions
Revises: 0011_counters
Create Date: 2026-12-04
"""

from datetime import UTC, datetime

from alembic import op

from alya.core.names import COUNTS_TRIGGERS, COUNTS_TRUNCATE, PARTITION_FUNCTIONS, ROWS_DEFAULT, ROWS_TABLE
from alya.db.partitions import AHEAD, periods

revision = "0012_partitions"
down_revision = "0011_counters"
branch_labels = None
depends_on = None

T, D = ROWS_TABLE, ROWS_DEFAULT
INDEXES = {  # the partial indexes of batchrows (alya.db.schema), created on the parent
    "batchrows_queued": "(batch, line) WHERE status = 'queued'",
    "batchrows_inprog": "(batch) WHERE status = 'inprog'",
    "batchrows_suspect": "(batch, line) WHERE status = 'queued' AND suspect",
    "batchrows_failed": "(batch, line) WHERE status = 'failed'",
}
FINAL = "('success', 'failed', 'aborted')"
_REFERENCING = {"UPDATE": "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
                "DELETE": "REFERENCING OLD TABLE AS old_rows"}

CREATE, DETACH, DISCARD = PARTITION_FUNCTIONS
_PART_INDEXES = "\n".join(  # the body of alya_partition_create creates them on the new table
    "    EXECUTE format('CREATE INDEX %I ON %I " + d.replace("'", "''") + f"', part || '{i[len(T):]}', part);"
    for i, d in INDEXES.items()) + "\n"
_FUNCTIONS = f"""
CREATE FUNCTION {CREATE}(part text, lo uuid, hi uuid) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    opts text;
BEGIN
    IF to_regclass(format('%I', part)) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE {T} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part);
    -- A partitioned table has no storage parameters: a new partition takes the default partition's (the
    -- autovacuum settings an operator gave batchrows before 0012, or gives batchrows_default since).
    SELECT array_to_string(c.reloptions, ', ') INTO opts FROM pg_class c WHERE c.oid = to_regclass('{D}');
    IF opts IS NOT NULL THEN
        EXECUTE format('ALTER TABLE %I SET (%s)', part, opts);
    END IF;
    -- Its indexes named as the parent's (<partition>_queued...): ATTACH adopts them.
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I PRIMARY KEY (batch, line)', part, part || '_pkey');
{{indexes}}    -- Rows the default partition holds in this range (an old random id, a far-off clock) move with it.
    EXECUTE format('WITH m AS (DELETE FROM {D} WHERE batch >= %L AND batch < %L RETURNING *) '
                   'INSERT INTO %I SELECT * FROM m', lo, hi, part);
    EXECUTE format('ALTER TABLE {T} ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', part, lo, hi);
    RETURN true;
END $$;

-- Detach a range partition if every batch of its range is final, ended before `before` and (unless NULL) of
-- `only_app`: returns their rows, or -1 (not all of them are; or no such partition), or -2 (a lock was not
-- had within the caller's lock_timeout: try again later). The partition is locked before the batches are
-- read, so no row can enter it meanwhile: a batch whose record is not committed yet has no row in it (its
-- rows wait for the lock, then go to the default partition once this one is gone). Detached, not dropped:
-- a DROP unlinks the files at commit while it still holds ACCESS EXCLUSIVE on batchrows (218 ms for a
-- million rows, measured; more for more), so the files go in a transaction of their own (below).
CREATE FUNCTION {DETACH}(part text, before timestamptz, only_app text) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    bound text;
    lo uuid;
    hi uuid;
    bad bigint;
    n bigint;
BEGIN
    SELECT pg_get_expr(c.relpartbound, c.oid) INTO bound
    FROM pg_class c JOIN pg_inherits i ON i.inhrelid = c.oid
    WHERE c.relname = part AND c.relnamespace = current_schema()::regnamespace
      AND i.inhparent = '{T}'::regclass;
    IF bound IS NULL OR bound = 'DEFAULT' THEN
        RETURN -1;
    END IF;
    lo := substring(bound FROM $r$FROM \\('([0-9a-f-]+)'\\)$r$)::uuid;
    hi := substring(bound FROM $r$TO \\('([0-9a-f-]+)'\\)$r$)::uuid;
    BEGIN
        EXECUTE format('LOCK TABLE %I IN ACCESS EXCLUSIVE MODE', part);
        SELECT count(*) FILTER (WHERE status NOT IN {FINAL} OR doneat IS NULL OR doneat >= before
                                      OR (only_app IS NOT NULL AND app <> only_app)),
               coalesce(sum(nrows), 0)
          INTO bad, n
        FROM batches WHERE id >= lo AND id < hi;
        IF bad > 0 THEN
            RETURN -1;
        END IF;
        EXECUTE format('ALTER TABLE {T} DETACH PARTITION %I', part);
        RETURN n;
    EXCEPTION WHEN lock_not_available THEN
        RETURN -2;
    END;
END $$;

-- The rest of a detached partition (never any other table): its foreign key first (a brief ACCESS
-- EXCLUSIVE lock on batches, to drop the key's triggers there; no file is unlinked), then, with `fk` false,
-- the table itself, whose files are unlinked while only the table is locked. False: a lock was not had
-- within the caller's lock_timeout, or no such table.
CREATE FUNCTION {DISCARD}(part text, fk boolean) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    c text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_class WHERE relname = part AND relkind = 'r' AND NOT relispartition
                   AND relnamespace = current_schema()::regnamespace AND relname ~ '^{T}_w[0-9]{{8}}$') THEN
        RETURN false;
    END IF;
    IF fk THEN
        FOR c IN SELECT conname FROM pg_constraint WHERE conrelid = to_regclass(format('%I', part))
                                                     AND contype = 'f' LOOP
            EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', part, c);
        END LOOP;
    ELSE
        EXECUTE format('DROP TABLE %I', part);
    END IF;
    RETURN true;
EXCEPTION WHEN lock_not_available THEN
    RETURN false;
END $$;
"""


def upgrade() -> None:
    op.execute(f"LOCK TABLE {T} IN ACCESS EXCLUSIVE MODE")
    for _function, trigger in (*COUNTS_TRIGGERS.values(), COUNTS_TRUNCATE):
        op.execute(f"DROP TRIGGER {trigger} ON {T}")
    op.execute(f"ALTER TABLE {T} RENAME TO {D}")
    for index in ("batchrows_pkey", *INDEXES):
        op.execute(f"ALTER INDEX {index} RENAME TO {index.replace(T, D, 1)}")
    op.execute(f"CREATE TABLE {T} (LIKE {D} INCLUDING DEFAULTS, "
               f"CONSTRAINT batchrows_line_nonneg CHECK (line >= 0)) PARTITION BY RANGE (batch)")
    op.execute(f"ALTER TABLE {T} ADD CONSTRAINT batchrows_pkey PRIMARY KEY (batch, line)")
    op.execute(f"ALTER TABLE {T} ADD CONSTRAINT batchrows_batch_fkey FOREIGN KEY (batch) "
               f"REFERENCES batches (id) ON DELETE CASCADE")
    for index, definition in INDEXES.items():
        columns, where = definition.split(" WHERE ")
        op.execute(f"CREATE INDEX {index} ON {T} {columns} WHERE {where}")
    _count_triggers()
    op.execute(_FUNCTIONS.replace("{indexes}", _PART_INDEXES))
    for name, lo, hi in periods(datetime.now(UTC), AHEAD):
        op.execute(f"SELECT {CREATE}('{name}', '{lo}', '{hi}')")
    op.execute(f"ALTER TABLE {T} ATTACH PARTITION {D} DEFAULT")


def _count_triggers() -> None:
    """The counters' statement triggers (migration 0011) on ``batchrows``: the partitioned parent (upgrade)
    or the plain table again (downgrade)."""
    for event, (function, trigger) in COUNTS_TRIGGERS.items():
        op.execute(f"CREATE TRIGGER {trigger} AFTER {event} ON {T} {_REFERENCING[event]} "
                   f"FOR EACH STATEMENT EXECUTE FUNCTION {function}()")
    function, trigger = COUNTS_TRUNCATE
    op.execute(f"CREATE TRIGGER {trigger} AFTER TRUNCATE ON {T} FOR EACH STATEMENT EXECUTE FUNCTION {function}()")


def downgrade() -> None:
    op.execute(f"LOCK TABLE {T} IN ACCESS EXCLUSIVE MODE")
    op.execute(f"ALTER TABLE {T} DETACH PARTITION {D}")
    op.execute(f"""DO $$ DECLARE p text; BEGIN
        FOR p IN SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                 WHERE i.inhparent = '{T}'::regclass LOOP
            EXECUTE format('INSERT INTO {D} SELECT * FROM %I', p);
        END LOOP; END $$""")
    op.execute(f"DROP TABLE {T}")  # with its partitions and triggers
    for function in PARTITION_FUNCTIONS:
        op.execute(f"DROP FUNCTION {function}")
    op.execute(f"ALTER TABLE {D} RENAME TO {T}")
    for index in ("batchrows_pkey", *INDEXES):
        op.execute(f"ALTER INDEX {index.replace(T, D, 1)} RENAME TO {index}")
    _count_triggers()
