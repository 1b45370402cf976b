"""Initial schema: batches, batchrows, workers.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STATUS = postgresql.ENUM("wait", "queued", "inprog", "success", "failed", "aborted", name="batch_status")


def upgrade() -> None:
    STATUS.create(op.get_bind(), checkfirst=True)
    status = postgresql.ENUM(name="batch_status", create_type=False)
    op.create_table(
        "batches",
        sa.Column("id", postgresql.UUID(as_uuid=False), primary_key=True),
        sa.Column("app", sa.String(64), nullable=False),
        sa.Column("op", sa.String(64), nullable=False),
        sa.Column("type", sa.String(1), nullable=False),
        sa.Column("context", postgresql.JSONB, nullable=False),
        sa.Column("inputfile", sa.Text),
        sa.Column("status", status, nullable=False),
        sa.Column("reqat", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("doneat", sa.DateTime(timezone=True)),
        sa.Column("outputfiles", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("nrows", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("nsuccess", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("nfailed", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("naborted", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("ver", sa.Integer, nullable=False, server_default=sa.text("1")),
        sa.Column("notifiedat", sa.DateTime(timezone=True)),
        sa.CheckConstraint("op = lower(op)", name="batches_op_lower"),
        sa.CheckConstraint("app ~ '^[a-z][a-z0-9_]*$'", name="batches_app_ident"),
        sa.CheckConstraint("type IN ('B', 'Q')", name="batches_type"),
    )
    op.create_index("batches_app_op_reqat", "batches", ["app", "op", "reqat"])
    op.create_index(
        "batches_open", "batches", ["app", "op", "reqat"],
        postgresql_where=sa.text("status IN ('queued', 'inprog')"),
    )
    op.create_index(
        "batches_unnotified", "batches", ["app", "op"],
        postgresql_where=sa.text("notifiedat IS NULL AND status IN ('success', 'failed')"),
    )
    op.create_table(
        "batchrows",
        sa.Column("batch", postgresql.UUID(as_uuid=False), sa.ForeignKey("batches.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("line", sa.Integer, primary_key=True),
        sa.Column("input", postgresql.JSONB, nullable=False),
        sa.Column("status", status, nullable=False, server_default=sa.text("'queued'")),
        sa.Column("reqat", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("doneat", sa.DateTime(timezone=True)),
        sa.Column("res", postgresql.JSONB),
        sa.Column("blobrows", postgresql.JSONB),
        sa.Column("messages", postgresql.JSONB),
        sa.Column("doneby", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("notbefore", sa.DateTime(timezone=True)),
        sa.CheckConstraint("line >= 0", name="batchrows_line_nonneg"),
    )
    op.create_index("batchrows_queued", "batchrows", ["batch", "line"],
                    postgresql_where=sa.text("status = 'queued'"))
    op.create_index("batchrows_inprog", "batchrows", ["batch"], postgresql_where=sa.text("status = 'inprog'"))
    op.create_table(
        "workers",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("lastseen", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
    )


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_table("batchrows")
    op.drop_table("batches")
    STATUS.drop(op.get_bind(), checkfirst=True)
