"""Idempotent submits: batches.idempotency_key, unique per app where set.

A client's retry of a submit (same app and key) finds the first batch instead of storing a second one. The
key lives on the batch row, so it is kept exactly as long as its batch.

Revision ID: 0003_idempotency
Revises: 0002_batch_files
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_idempotency"
down_revision = "0002_batch_files"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("batches", sa.Column("idempotency_key", sa.Text))
    op.create_index("batches_idempotency", "batches", ["app", "idempotency_key"], unique=True,
                    postgresql_where=sa.text("idempotency_key IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("batches_idempotency", table_name="batches")
    op.drop_column("batches", "idempotency_key")
