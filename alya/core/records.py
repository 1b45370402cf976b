"""Typed records of what the store reads, so that no module above it indexes a raw row tuple.

Each record's ``COLUMNS`` is the one place its column list is written (BatchRecord's is made from its
fields, which are BatchDetails' and ``ver``): ``alya.db.store`` substitutes it into the SQL
(``{batch_columns}`` in ``sql/queries.sql``), and ``from_row`` reads the columns in that order.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, ClassVar

from alya.core.models import DETAILS_FIELDS, BatchDetails, BatchOutput, BatchStatus, FileIntake, messages_from_json


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """One row of ``batches``: every field of the contract's BatchDetails (same names), and ``ver``."""

    id: str
    app: str
    op: str
    type: str  # "B" batch, "Q" slow query
    status: BatchStatus
    context: dict[str, Any]
    inputfile: str | None
    reqat: datetime
    doneat: datetime | None
    outputfiles: dict[str, str]
    nrows: int
    nsuccess: int
    nfailed: int
    naborted: int
    ver: int
    error: str | None  # why a failed batch has no summary (it kept failing), else None
    round: int  # 1, plus one per batch_retry_failed
    paused: bool = False  # batch control (alya.batch.control): no new row starts while set
    notbefore: datetime | None = None  # no row starts before it
    deadline: datetime | None = None  # the batch is ended then (aborted, "deadline passed")

    COLUMNS: ClassVar[str]  # the fields above, in their order (set below the class)

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> BatchRecord:
        values = dict(zip(_BATCH_FIELDS, row, strict=True))
        values.update(id=str(values["id"]), status=BatchStatus(values["status"]),
                      outputfiles=values["outputfiles"] or {})
        return cls(**values)

    @property
    def not_before(self) -> datetime | None:
        """``notbefore`` as BatchDetails (and batch_submit) name it."""
        return self.notbefore

    @property
    def is_query(self) -> bool:
        return self.type == "Q"

    def details(self) -> BatchDetails:
        """The contract's view of this batch: a field added to BatchDetails is taken from here by name."""
        return BatchDetails(**{name: getattr(self, name) for name in DETAILS_FIELDS})


_BATCH_FIELDS = tuple(f.name for f in fields(BatchRecord))
BatchRecord.COLUMNS = ", ".join("status::text" if name == "status" else name for name in _BATCH_FIELDS)

@dataclass(frozen=True, slots=True)
class OpenBatch:
    """A batch with rows to claim, as the claim sees it (its context is read once, apart: ``batch_context``)."""

    id: str
    status: BatchStatus
    ver: int
    priority: int = 0

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> OpenBatch:
        return cls(str(row[0]), BatchStatus(row[1]), int(row[2]), int(row[3]) if len(row) > 3 else 0)


@dataclass(frozen=True, slots=True)
class ClaimedRow:
    """A row this worker now holds: its input as JSON text, and the attempt it was claimed at (a write-back
    is accepted only at that attempt)."""

    line: int
    input: str
    attempts: int

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> ClaimedRow:
        return cls(int(row[0]), row[1], int(row[2]))


@dataclass(frozen=True, slots=True)
class RecoveredRow:
    batch: str
    line: int
    status: str  # queued (given to others) or failed (out of attempts)
    worker: str | None

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> RecoveredRow:
        return cls(str(row[0]), int(row[1]), row[2], row[3])


@dataclass(frozen=True, slots=True)
class SlowQueryRow:
    status: BatchStatus
    res: dict[str, Any] | None
    messages: list[dict[str, Any]] | None
    outputfiles: dict[str, str]  # a slow query's output files are stored in its row's blobrows column

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> SlowQueryRow:
        return cls(BatchStatus(row[0]), row[1], row[2], row[3] or {})


def batch_output(row: tuple[Any, ...] | list[Any]) -> BatchOutput:
    """A row of ``batch_rows`` (line, status, res, messages) as the contract's BatchOutput."""
    line, status, res, messages = row
    return BatchOutput(line=line, status=BatchStatus(status), res=res, messages=messages_from_json(messages))


@dataclass(frozen=True, slots=True)
class RowResult:
    """A final row as stored (``batch_rows``): its result and messages as the JSON values PostgreSQL holds,
    which is also the form the done cache keeps (``as_cached``), so a cached row reads back the same."""

    line: int
    status: str
    res: dict[str, Any] | None
    messages: list[dict[str, Any]] | None

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> RowResult:
        return cls(int(row[0]), row[1], row[2], row[3])

    def as_cached(self) -> list[Any]:
        return [self.line, self.status, self.res, self.messages]

    def output(self) -> BatchOutput:
        return BatchOutput(line=self.line, status=BatchStatus(self.status), res=self.res,
                           messages=messages_from_json(self.messages))


@dataclass(frozen=True, slots=True)
class SummaryFailures:
    """A batch's failed summary attempts in a row (failing the same way), and seconds since the first."""

    failures: int
    seconds: float

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> SummaryFailures:
        return cls(int(row[0]), float(row[1]))


@dataclass(frozen=True, slots=True)
class Counts:
    """Rows of a batch by status."""

    queued: int = 0
    inprog: int = 0
    success: int = 0
    failed: int = 0
    aborted: int = 0

    @classmethod
    def from_rows(cls, rows: list[tuple[Any, ...]]) -> Counts:
        return cls(**{status: int(n) for status, n in rows})

    @property
    def final_status(self) -> BatchStatus:
        """The status of a batch whose rows are all final (and that was not aborted)."""
        return BatchStatus.SUCCESS if self.failed == 0 and self.aborted == 0 else BatchStatus.FAILED


@dataclass(frozen=True, slots=True)
class FileRecord:
    """One row of ``batch_files``: a file taken by the intake (see ``alya.batch.intake``)."""

    id: str
    url: str  # where the file was found
    size: int
    version: str  # its ETag, else its modification time
    filetype: str
    status: str  # submitted | rejected
    batch: str | None
    nrows: int
    error: str | None
    dest: str | None  # where it is moved after the commit (None: left where it is)
    movedat: datetime | None
    reqat: datetime

    COLUMNS = "id, url, size, version, filetype, status, batch, nrows, error, dest, movedat, reqat"

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> FileRecord:
        (id_, url, size, version, filetype, status, batch, nrows, error, dest, movedat, reqat) = row
        return cls(str(id_), url, int(size), version, filetype, status, None if batch is None else str(batch),
                   int(nrows), error, dest, movedat, reqat)

    def intake(self) -> FileIntake:
        moved = self.dest is not None and self.movedat is not None
        return FileIntake(url=self.dest if moved and self.dest else self.url, filetype=self.filetype,
                          status=self.status, batch_id=self.batch, size=self.size, error=self.error,
                          reqat=self.reqat, source=self.url, nrows=self.nrows, moved=moved)


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What a write-back did: the batch's status (an abort check), rows written, of those rows written
    after an abort (kept results), and the batch's new version when that moved its counts."""

    status: str | None
    written: int
    late: int
    ver: int | None

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> WriteResult:
        return cls(row[0], int(row[1]), int(row[2]), row[3])


@dataclass(frozen=True, slots=True)
class BatchRef:
    """A batch by id and type (app, op): what the sweeper dispatches."""

    id: str
    app: str
    op: str

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> BatchRef:
        return cls(str(row[0]), row[1], row[2])


@dataclass(frozen=True, slots=True)
class BatchKind:
    """A batch type and kind (B batch, Q slow query) with work to claim."""

    app: str
    op: str
    type: str

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> BatchKind:
        return cls(row[0], row[1], row[2])


@dataclass(frozen=True, slots=True)
class BatchState:
    id: str
    status: str

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> BatchState:
        return cls(str(row[0]), row[1])


@dataclass(frozen=True, slots=True)
class BatchKeyed:
    """The batch that first used an idempotency key."""

    id: str
    op: str
    type: str

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> BatchKeyed:
        return cls(str(row[0]), row[1], row[2])


@dataclass(frozen=True, slots=True)
class AppLoad:
    """An app's rows in progress (all workers, and the asking one) and the live workers: for app limits."""

    total: int
    mine: int
    live_workers: int

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> AppLoad:
        return cls(int(row[0]), int(row[1]), int(row[2]))

    def as_tuple(self) -> tuple[int, int, int]:
        return self.total, self.mine, self.live_workers


@dataclass(frozen=True, slots=True)
class RowsPartition:
    """A range partition of ``batchrows`` (migration 0012): its name and its bounds (batch ids, UUIDv7)."""

    name: str
    lo: str
    hi: str


@dataclass(frozen=True, slots=True)
class PurgeCandidate:
    """A final batch a purge may delete (``alya.batch.retention``): its type, size, files and when it ended."""

    id: str
    app: str
    op: str
    nrows: int
    outputfiles: dict[str, str]
    doneat: datetime

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> PurgeCandidate:
        return cls(str(row[0]), row[1], row[2], int(row[3]), dict(row[4] or {}), row[5])


@dataclass(frozen=True, slots=True)
class Purged:
    """What one purge statement deleted: the batches (ids), their rows and their file-intake records."""

    ids: list[str]
    nrows: int
    nrecords: int

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Purged:
        return cls([str(i) for i in row[0] or []], int(row[1]), int(row[2]))


@dataclass(frozen=True, slots=True)
class FailureLimit:
    """An open batch's failure threshold as rows, its rows, and its failed rows counted up to limit + 1."""

    nrows: int
    limit: int
    failed: int

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> FailureLimit:
        return cls(int(row[0]), int(row[1]), int(row[2]))

    @property
    def passed(self) -> bool:
        """More rows than the limit have failed: the batch stops."""
        return self.failed > self.limit

    def error(self, failed: int) -> str:
        """The batch's ``error`` once stopped (``failed``: the full count)."""
        return f"too many failures: {failed} of {self.nrows} rows (limit {self.limit})"
