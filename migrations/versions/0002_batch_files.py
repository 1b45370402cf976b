"""File intake: the table batch_files (every file taken, keyed by URL, size and version).

Revision ID: 0002_batch_files
Revises: 0001
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002_batch_files"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batch_files",
        sa.Column("id", postgresql.UUID(as_uuid=False), primary_key=True),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("version", sa.Text, nullable=False),
        sa.Column("filetype", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("batch", postgresql.UUID(as_uuid=False), sa.ForeignKey("batches.id", ondelete="SET NULL")),
        sa.Column("nrows", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("error", sa.Text),
        sa.Column("dest", sa.Text),
        sa.Column("movedat", sa.DateTime(timezone=True)),
        sa.Column("reqat", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.CheckConstraint("status IN ('submitted', 'rejected')", name="batch_files_status"),
        sa.UniqueConstraint("url", "size", "version", name="batch_files_file"),
    )
    op.create_index("batch_files_reqat", "batch_files", ["reqat"])


def downgrade() -> None:
    op.drop_table("batch_files")
