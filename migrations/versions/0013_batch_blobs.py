"""``batches.blobs``: whether any row of the batch may have blob rows (lines of output files).

A batch's summary writes its output files from its rows' blob rows, in line order; it read every row of
the batch to find them, also when none had any (84 ms of the 190 ms between a 200,000-row no-op batch's
last row and its final status; about 0.4 s at a million rows). The write-back that stores a row's blob rows
sets the flag in the same statement (once per batch: ``AND NOT blobs``), and the summary's read of blob rows
returns at once for a batch whose flag is unset.

Batches that exist at the upgrade read ``true`` (the column is added with that default, which PostgreSQL
11+ stores once, rewriting nothing); new batches start ``false``.

Revision ID: 0013_batch_blobs
Revises: 0012_partitions
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0013_batch_blobs"
down_revision = "0012_partitions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("batches", sa.Column("blobs", sa.Boolean, nullable=False, server_default=sa.text("true")))
    op.alter_column("batches", "blobs", server_default=sa.text("false"))


def downgrade() -> None:
    op.drop_column("batches", "blobs")
