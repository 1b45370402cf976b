"""Summary failures: batches.sumfails, sumerror, sumsince, and the reason a batch failed (error).

A summary that fails (object store refusing the output files, a statement that cannot succeed) used to be
retried for ever, the batch open and stop_when_idle workers never returning. Failures in a row are now
counted with the error they share; one that repeats for ALYA_SUMMARY_GIVEUP_AFTER attempts over at least
ALYA_SUMMARY_GIVEUP_SEC fails the batch with that reason (an outage that ends sooner changes nothing).

Revision ID: 0005_summary_failures
Revises: 0004_suspects
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_summary_failures"
down_revision = "0004_suspects"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("batches", sa.Column("sumfails", sa.Integer, nullable=False, server_default=sa.text("0")))
    op.add_column("batches", sa.Column("sumerror", sa.Text))
    op.add_column("batches", sa.Column("sumsince", sa.DateTime(timezone=True)))
    op.add_column("batches", sa.Column("error", sa.Text))


def downgrade() -> None:
    for column in ("error", "sumsince", "sumerror", "sumfails"):
        op.drop_column("batches", column)
