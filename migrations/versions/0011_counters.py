"""Counters: rows of each batch by status, kept exact by PostgreSQL itself.

``batch_counts`` holds, per batch, status and *shard*, a signed number of rows; a batch's rows in a status
are the sum over its shards. Statement-level AFTER triggers on ``batchrows`` (UPDATE, DELETE) aggregate
their transition tables per (batch, status) and add the difference to the shard of the backend that ran
the statement (``pg_backend_pid()``): one upsert per statement, batch and status touched, never one per
row, and whatever statement moves rows (today's claim, write-back, retry, abort, recovery, purge, and any
statement added later) moves the counters in the same transaction.

Inserts are counted by the two statements that insert, not by a trigger: a submit's COPY would keep every
new row in the trigger's transition table (a tuplestore spilled to disk past work_mem) only to count them,
which cost 35-45 % of submit throughput (measured: 73k-97k against 139k-151k rows/s at 500,000 rows), while
the ingest knows the count exactly (``alya.db.batches``: ``count_inserted`` after the COPY and after a slow
query's row, in the same transaction). ``tests/unit/test_counted_inserts.py`` fails on any other statement
that inserts into ``batchrows``; a batch's end checks the counters against its rows (``counters_drift``).

Why a shard per backend: live backends have distinct pids, so two transactions never wait for each other on
a counter row (many workers writing back rows of one batch do not serialise on it), and a transaction that
touches two batches cannot deadlock with another on counters. Rows per batch grow with the backends that
touched it; maintenance folds an open batch's shards into shard 0 (``alya.db.counters``).

Counter rows have no foreign key: a purge deletes rows and their batch in one statement, and the DELETE
trigger must not write counters for a batch that is gone (it checks); the batch's own DELETE trigger
removes its counter rows.

Upgrade: ``batchrows`` is locked against writes (SHARE ROW EXCLUSIVE, what CREATE TRIGGER takes anyway)
for the whole migration, so the backfill of batches open now (wait, queued, inprog: one scan of their rows)
and the triggers start from the same state; no write slips between them. Final batches read their stored
counts and are not backfilled.

Revision ID: 0011_counters
Revises: 0010_batch_control
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ENUM, UUID

from alya.core.names import COUNTS_BATCH_GONE, COUNTS_TABLE, COUNTS_TRIGGERS, COUNTS_TRUNCATE

revision = "0011_counters"
down_revision = "0010_batch_control"
branch_labels = None
depends_on = None

# One INSERT ... ON CONFLICT per statement: {deltas} yields (batch, status, n) with n <> 0. Not ordered: a
# backend's shard rows are its own (no other transaction writes them, so no lock order to keep), and a
# Sort here is what made the trigger cost 100+ ms (below).
_UPSERT = """
    INSERT INTO {table} AS c (batch, status, shard, n)
    SELECT d.batch, d.status, pg_backend_pid(), d.n FROM ({deltas}) d
    WHERE d.n <> 0
    ON CONFLICT (batch, status, shard) DO UPDATE SET n = c.n + EXCLUDED.n;
"""
# The trigger runs inside the statement's transaction, under its SET LOCALs: the claim's `enable_sort =
# off` gave a Sort node a cost of 10^10, past jit_above_cost, and each claim and write-back then
# JIT-compiled the counter upsert (126 ms a statement, measured). A few rows never need JIT.
_FUNCTION_SETTINGS = "SET jit = off"

_DELTAS = {
    # A row that kept its status counts +1 -1 = 0; only moves remain.
    "UPDATE": """SELECT batch, status, sum(n)::int AS n
                 FROM (SELECT batch, status, 1 AS n FROM new_rows
                       UNION ALL SELECT batch, status, -1 FROM old_rows) m
                 GROUP BY batch, status""",
    # Rows deleted with their batch (a purge, a cascade) leave no counter behind.
    "DELETE": """SELECT g.batch, g.status, g.n
                 FROM (SELECT batch, status, -count(*)::int AS n FROM old_rows GROUP BY batch, status) g
                 WHERE EXISTS (SELECT 1 FROM batches b WHERE b.id = g.batch)""",
}

_REFERENCING = {
    "UPDATE": "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
    "DELETE": "REFERENCING OLD TABLE AS old_rows",
}


def upgrade() -> None:
    op.create_table(
        COUNTS_TABLE,
        sa.Column("batch", UUID(as_uuid=False), nullable=False),
        sa.Column("status", ENUM(name="batch_status", create_type=False), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("batch", "status", "shard", name=f"{COUNTS_TABLE}_pkey"),
    )
    op.execute("LOCK TABLE batchrows IN SHARE ROW EXCLUSIVE MODE")
    for event, (function, trigger) in COUNTS_TRIGGERS.items():
        body = _UPSERT.format(table=COUNTS_TABLE, deltas=_DELTAS[event])
        op.execute(f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql {_FUNCTION_SETTINGS} AS $$\n"
                   f"BEGIN{body}    RETURN NULL;\nEND $$")
        op.execute(f"CREATE TRIGGER {trigger} AFTER {event} ON batchrows {_REFERENCING[event]} "
                   f"FOR EACH STATEMENT EXECUTE FUNCTION {function}()")
    function, trigger = COUNTS_TRUNCATE
    op.execute(f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$\n"
               f"BEGIN DELETE FROM {COUNTS_TABLE}; RETURN NULL; END $$")
    op.execute(f"CREATE TRIGGER {trigger} AFTER TRUNCATE ON batchrows FOR EACH STATEMENT EXECUTE FUNCTION {function}()")
    function, trigger = COUNTS_BATCH_GONE
    op.execute(f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$\n"
               f"BEGIN DELETE FROM {COUNTS_TABLE} WHERE batch IN (SELECT id FROM gone); RETURN NULL; END $$")
    op.execute(f"CREATE TRIGGER {trigger} AFTER DELETE ON batches REFERENCING OLD TABLE AS gone "
               f"FOR EACH STATEMENT EXECUTE FUNCTION {function}()")
    # Backfill (shard 0, which no backend has) the batches open now.
    op.execute(f"""
        INSERT INTO {COUNTS_TABLE} (batch, status, shard, n)
        SELECT r.batch, r.status, 0, count(*) FROM batchrows r
        WHERE r.batch IN (SELECT id FROM batches WHERE status IN ('wait', 'queued', 'inprog'))
        GROUP BY r.batch, r.status""")


def downgrade() -> None:
    for function, trigger in (*COUNTS_TRIGGERS.values(), COUNTS_TRUNCATE):
        op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON batchrows")
        op.execute(f"DROP FUNCTION IF EXISTS {function}()")
    function, trigger = COUNTS_BATCH_GONE
    op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON batches")
    op.execute(f"DROP FUNCTION IF EXISTS {function}()")
    op.drop_table(COUNTS_TABLE)
