"""Batch control: a failure threshold per batch, retry rounds, and an index of failed rows.

- ``batches.max_failures`` (rows) or ``batches.max_failure_ratio`` (a fraction of the batch's rows, numeric so
  that 0.29 of 100 rows is 29, not 28.999...): once more rows than that have failed, the batch stops
  (``batch_submit(max_failures=...)``). At most one of the two is set.
- ``batches.round``: 1, then one more per ``batch_retry_failed``; ``mark_done``'s details carry it.
- ``batchrows_failed``: a partial index of failed rows, so that the threshold check counts at most
  limit + 1 index entries (not the batch's rows) and a retry finds the failed rows directly. It holds only
  failed rows, so it costs nothing on the write path of rows that succeed. Built inside the migration's
  transaction: its build holds write-backs for as long as one scan of ``batchrows`` takes (measured: 0.2 s
  for 1,000,000 rows on a loaded 2-core machine; for hundreds of millions, migrate while workers are stopped,
  or build it ``CONCURRENTLY`` by hand first).
  Adding nullable columns and a column with a constant default rewrites nothing (PostgreSQL 11+).

Revision ID: 0009_batch_control
Revises: 0008_retention
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_batch_control"
down_revision = "0008_retention"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("batches", sa.Column("max_failures", sa.Integer))
    op.add_column("batches", sa.Column("max_failure_ratio", sa.Numeric))
    op.add_column("batches", sa.Column("round", sa.Integer, nullable=False, server_default=sa.text("1")))
    op.create_check_constraint(
        "batches_failure_limit", "batches",
        "(max_failures IS NULL OR max_failures >= 0) AND (max_failure_ratio IS NULL OR "
        "(max_failure_ratio > 0 AND max_failure_ratio < 1)) AND (max_failures IS NULL OR max_failure_ratio IS NULL)")
    op.create_index("batchrows_failed", "batchrows", ["batch", "line"], postgresql_where=sa.text("status = 'failed'"))


def downgrade() -> None:
    op.drop_index("batchrows_failed", table_name="batchrows")
    op.drop_constraint("batches_failure_limit", "batches", type_="check")
    op.drop_column("batches", "round")
    op.drop_column("batches", "max_failure_ratio")
    op.drop_column("batches", "max_failures")
