"""Maintenance leases: which worker does each maintenance duty now, until when.

Maintenance (recovery, missed summaries, pending mark_done calls) is done by one worker at a time per duty.
A lease row names the holder and when its lease ends; the holder renews it every tick, and any worker takes
it once it has expired. A session-level advisory lock was tried first and rejected: a holder cut off from
the network keeps its session (and so the lock) for as long as PostgreSQL, or a proxy in between, keeps the
connection open, while a lease runs out by itself.

Revision ID: 0006_maintenance_leases
Revises: 0005_summary_failures
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_maintenance_leases"
down_revision = "0005_summary_failures"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "maintenance_leases",
        sa.Column("duty", sa.Text, primary_key=True),
        sa.Column("holder", sa.Text, nullable=False),
        sa.Column("expires", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("maintenance_leases")
