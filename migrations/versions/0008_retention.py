"""Retention: indexes that make purging old batches cheap.

``batches_final_doneat`` (doneat of final batches) lets a purge find the batches finished before a date
without reading every batch. ``batch_files_batch``: deleting a batch sets (and a purge deletes) the
file-intake records that point at it; without an index on ``batch_files.batch`` each deleted batch cost a
sequential scan of every file record ever taken. Both tables are small next to ``batchrows``; the index
builds hold a short lock on them (plain CREATE INDEX, run inside Alembic's transaction).

Revision ID: 0008_retention
Revises: 0007_priority
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_retention"
down_revision = "0007_priority"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("batches_final_doneat", "batches", ["doneat", "id"],
                    postgresql_where=sa.text("status IN ('success', 'failed', 'aborted')"))
    op.create_index("batch_files_batch", "batch_files", ["batch"])


def downgrade() -> None:
    op.drop_index("batch_files_batch", table_name="batch_files")
    op.drop_index("batches_final_doneat", table_name="batches")
