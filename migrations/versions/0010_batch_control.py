"""Batch control (issue 20, items 3 and 4): pause and resume, not_before and deadline.

``batches.paused``: no new row of the batch starts while it is set (the claim's open-batch listing leaves the
batch out). ``batches.notbefore``: no row starts before it. ``batches.deadline``: the maintenance leader ends
the batch then (``aborted``, error "deadline passed"); ``batches_deadline`` lets it find due deadlines among
open batches without reading every batch, ``batches_notbefore`` the batches whose start came (to wake the
workers). A batch ended by its deadline gets its ``mark_done`` (a plain abort does not): the partial index of
batches whose mark_done is pending now covers ``aborted`` too (plain aborts set ``notifiedat`` at once, so
they never enter it). Columns with constant defaults or none rewrite nothing on PostgreSQL 11+.

Revision ID: 0010_batch_control
Revises: 0009_batch_control
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_batch_control"
down_revision = "0009_batch_control"
branch_labels = None
depends_on = None

OPEN = "status IN ('wait', 'queued', 'inprog')"


def upgrade() -> None:
    op.add_column("batches", sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.text("false")))
    op.add_column("batches", sa.Column("notbefore", sa.DateTime(timezone=True)))
    op.add_column("batches", sa.Column("deadline", sa.DateTime(timezone=True)))
    op.create_index("batches_deadline", "batches", ["deadline"],
                    postgresql_where=sa.text(f"deadline IS NOT NULL AND {OPEN}"))
    op.create_index("batches_notbefore", "batches", ["notbefore"],
                    postgresql_where=sa.text(f"notbefore IS NOT NULL AND {OPEN}"))
    op.drop_index("batches_unnotified", table_name="batches")
    op.create_index("batches_unnotified", "batches", ["app", "op"],
                    postgresql_where=sa.text("notifiedat IS NULL AND status IN ('success', 'failed', 'aborted')"))


def downgrade() -> None:
    op.drop_index("batches_unnotified", table_name="batches")
    op.create_index("batches_unnotified", "batches", ["app", "op"],
                    postgresql_where=sa.text("notifiedat IS NULL AND status IN ('success', 'failed')"))
    op.drop_index("batches_notbefore", table_name="batches")
    op.drop_index("batches_deadline", table_name="batches")
    op.drop_column("batches", "deadline")
    op.drop_column("batches", "notbefore")
    op.drop_column("batches", "paused")
