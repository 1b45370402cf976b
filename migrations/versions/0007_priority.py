"""Batch priority: batches.priority, higher first among queued work (slow queries default to 10).

A small integer on the batch record, fixed at submit: the claim orders a type's open batches by it and the
worker's row pool takes rows by it (with a reserved share for lower priorities, so nothing starves). Adding
a column with a constant default rewrites nothing on PostgreSQL 11+: instant on a table of any size.

Revision ID: 0007_priority
Revises: 0006_maintenance_leases
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_priority"
down_revision = "0006_maintenance_leases"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("batches", sa.Column("priority", sa.SmallInteger, nullable=False, server_default=sa.text("0")))


def downgrade() -> None:
    op.drop_column("batches", "priority")
