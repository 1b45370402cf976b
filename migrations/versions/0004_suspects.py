"""Suspect rows: batchrows.suspect, and a partial index of the queued suspects.

A worker that dies holding many rows cannot say which one killed it. Its rows go back to the queue as
suspects, without spending an attempt; a suspect is then run alone (its worker holds nothing else), so a
death while holding it is that row's, and only then does it spend an attempt.

Revision ID: 0004_suspects
Revises: 0003_idempotency
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_suspects"
down_revision = "0003_idempotency"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("batchrows", sa.Column("suspect", sa.Boolean, nullable=False, server_default=sa.text("false")))
    op.create_index("batchrows_suspect", "batchrows", ["batch", "line"],
                    postgresql_where=sa.text("status = 'queued' AND suspect"))


def downgrade() -> None:
    op.drop_index("batchrows_suspect", table_name="batchrows")
    op.drop_column("batchrows", "suspect")
