"""The tables as SQLAlchemy metadata: the reference the Alembic migrations are checked against.

Queries do not go through these objects (they live as SQL in ``sql/queries.sql``); the metadata exists so
that a test can prove that ``migrate_database`` produces exactly this schema.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

metadata = MetaData()

STATUS_VALUES = ("wait", "queued", "inprog", "success", "failed", "aborted")
batch_status = Enum(*STATUS_VALUES, name="batch_status")

batches = Table(
    "batches",
    metadata,
    Column("id", UUID(as_uuid=False), primary_key=True),
    Column("app", String(64), nullable=False),
    Column("op", String(64), nullable=False),
    Column("type", String(1), nullable=False),
    Column("context", JSONB, nullable=False),
    Column("inputfile", Text),
    Column("status", batch_status, nullable=False),
    Column("reqat", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("doneat", DateTime(timezone=True)),
    Column("outputfiles", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("nrows", Integer, nullable=False, server_default=text("0")),
    Column("nsuccess", Integer, nullable=False, server_default=text("0")),
    Column("nfailed", Integer, nullable=False, server_default=text("0")),
    Column("naborted", Integer, nullable=False, server_default=text("0")),
    # Bumped by every status change: the Redis cache keeps the highest version it has seen, so a slow
    # writer can never put an older status over a newer one.
    Column("ver", Integer, nullable=False, server_default=text("1")),
    # Set when mark_done was claimed (or is not due, as for aborted batches): it is called at most once.
    Column("notifiedat", DateTime(timezone=True)),
    # A client's key for its submit: a retry with the same (app, key) finds this batch (migration 0003).
    Column("idempotency_key", Text),
    # Summary failures in a row, the error they share and when the first of them happened: a summary that
    # keeps failing the same way for ALYA_SUMMARY_GIVEUP_AFTER attempts and ALYA_SUMMARY_GIVEUP_SEC fails
    # the batch, its reason in `error` (migration 0005).
    Column("sumfails", Integer, nullable=False, server_default=text("0")),
    Column("sumerror", Text),
    Column("sumsince", DateTime(timezone=True)),
    Column("error", Text),
    # Higher first among queued work; slow queries default to 10, batches to 0 (migration 0007).
    Column("priority", SmallInteger, nullable=False, server_default=text("0")),
    # Past this many failed rows (or this fraction of the batch's rows) the batch stops; a retry round counts
    # its own failures. ``round``: 1, plus one per batch_retry_failed (migration 0009).
    Column("max_failures", Integer),
    Column("max_failure_ratio", Numeric),
    Column("round", Integer, nullable=False, server_default=text("1")),
    CheckConstraint("(max_failures IS NULL OR max_failures >= 0) AND (max_failure_ratio IS NULL OR "
                    "(max_failure_ratio > 0 AND max_failure_ratio < 1)) AND (max_failures IS NULL OR "
                    "max_failure_ratio IS NULL)", name="batches_failure_limit"),
    # Batch control (migration 0010): no new row starts while paused, nor before notbefore; the maintenance
    # leader ends the batch at its deadline.
    Column("paused", Boolean, nullable=False, server_default=text("false")),
    Column("notbefore", DateTime(timezone=True)),
    Column("deadline", DateTime(timezone=True)),
    CheckConstraint("op = lower(op)", name="batches_op_lower"),
    CheckConstraint("app ~ '^[a-z][a-z0-9_]*$'", name="batches_app_ident"),
    CheckConstraint("type IN ('B', 'Q')", name="batches_type"),
    Index("batches_app_op_reqat", "app", "op", "reqat"),
    Index(
        "batches_open",
        "app",
        "op",
        "reqat",
        postgresql_where=text("status IN ('queued', 'inprog')"),
    ),
    Index(
        "batches_idempotency",
        "app",
        "idempotency_key",
        unique=True,
        postgresql_where=text("idempotency_key IS NOT NULL"),
    ),
    Index(
        "batches_unnotified",
        "app",
        "op",
        postgresql_where=text("notifiedat IS NULL AND status IN ('success', 'failed', 'aborted')"),
    ),
    # A purge finds final batches finished before a date (migration 0008).
    Index("batches_final_doneat", "doneat", "id", postgresql_where=text("status IN ('success', 'failed', 'aborted')")),
    # Due deadlines and starts among open batches (migration 0010).
    Index("batches_deadline", "deadline",
          postgresql_where=text("deadline IS NOT NULL AND status IN ('wait', 'queued', 'inprog')")),
    Index("batches_notbefore", "notbefore",
          postgresql_where=text("notbefore IS NOT NULL AND status IN ('wait', 'queued', 'inprog')")),
)

batchrows = Table(
    "batchrows",
    metadata,
    # The natural key: every index costs on each of a row's three writes (insert, claim, result), so
    # there is no surrogate rowid.
    Column("batch", UUID(as_uuid=False), ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True),
    Column("line", Integer, primary_key=True),
    Column("input", JSONB, nullable=False),
    Column("status", batch_status, nullable=False, server_default=text("'queued'")),
    Column("reqat", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("doneat", DateTime(timezone=True)),
    Column("res", JSONB),
    Column("blobrows", JSONB),
    Column("messages", JSONB),
    Column("doneby", Text),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("notbefore", DateTime(timezone=True)),
    # Held by a worker that died: run alone from now on, so that a death while holding it is its own.
    Column("suspect", Boolean, nullable=False, server_default=text("false")),
    CheckConstraint("line >= 0", name="batchrows_line_nonneg"),
    # The claim scans this in line order with FOR UPDATE SKIP LOCKED: 10x faster than without it.
    Index("batchrows_queued", "batch", "line", postgresql_where=text("status = 'queued'")),
    # Recovery and "is anything still running" only ever look at in-progress rows.
    Index("batchrows_inprog", "batch", postgresql_where=text("status = 'inprog'")),
    Index("batchrows_suspect", "batch", "line", postgresql_where=text("status = 'queued' AND suspect")),
    # The failure threshold counts failed rows, a retry requeues them: only failed rows (migration 0009).
    Index("batchrows_failed", "batch", "line", postgresql_where=text("status = 'failed'")),
    # One partition per week of batch ids (UUIDv7), plus a DEFAULT one (migration 0012, alya.db.partitions):
    # a purge drops whole weeks. Partitions are made by maintenance, not declared here.
    postgresql_partition_by="RANGE (batch)",
)

# Rows of each batch by status: a signed number per (batch, status, shard), summed on read, kept by
# statement-level triggers on batchrows (migration 0011; alya.db.counters). No foreign key: see the migration.
batch_counts = Table(
    "batch_counts",
    metadata,
    Column("batch", UUID(as_uuid=False), primary_key=True),
    Column("status", batch_status, primary_key=True),
    Column("shard", Integer, primary_key=True),
    Column("n", Integer, nullable=False),
)

maintenance_leases = Table(
    "maintenance_leases",
    metadata,
    Column("duty", Text, primary_key=True),
    Column("holder", Text, nullable=False),
    Column("expires", DateTime(timezone=True), nullable=False),
)

workers = Table(
    "workers",
    metadata,
    Column("id", Text, primary_key=True),
    Column("host", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("lastseen", DateTime(timezone=True), nullable=False, server_default=text("now()")),
)

# File intake: every file taken from a folder or submitted by URL. (url, size, version) identifies one file
# (version: its ETag, else its modification time), so the same file is taken once however many scans see
# it; the record commits in the same transaction as the file's batch, before the file is moved to `dest`.
batch_files = Table(
    "batch_files",
    metadata,
    Column("id", UUID(as_uuid=False), primary_key=True),
    Column("url", Text, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("version", Text, nullable=False),
    Column("filetype", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("batch", UUID(as_uuid=False), ForeignKey("batches.id", ondelete="SET NULL")),
    Column("nrows", Integer, nullable=False, server_default=text("0")),
    Column("error", Text),
    # Where the file goes after the commit (NULL: it stays where it is, as with file_submit); movedat is
    # set once it is there. A record with dest and no movedat is a move that a crash interrupted.
    Column("dest", Text),
    Column("movedat", DateTime(timezone=True)),
    Column("reqat", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    CheckConstraint("status IN ('submitted', 'rejected')", name="batch_files_status"),
    UniqueConstraint("url", "size", "version", name="batch_files_file"),
    Index("batch_files_reqat", "reqat"),
    # Deleting (or purging) a batch finds its records by this, not by a scan of every record (migration 0008).
    Index("batch_files_batch", "batch"),
)
