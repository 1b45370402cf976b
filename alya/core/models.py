"""Value types of the public contract. Frozen dataclasses: they are built millions of times on the hot
path, where pydantic validation would cost more than the work itself."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from datetime import datetime
from typing import Any


class BatchStatus(enum.StrEnum):
    """The one status enum, for batches and for rows (rows never take `wait`)."""

    WAIT = "wait"
    QUEUED = "queued"
    INPROG = "inprog"
    SUCCESS = "success"
    FAILED = "failed"
    ABORTED = "aborted"

    @property
    def is_final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset({BatchStatus.SUCCESS, BatchStatus.FAILED, BatchStatus.ABORTED})


@dataclass(frozen=True, slots=True)
class BatchInput:
    line: int
    input: dict[str, Any] | str | bytes  # an object, or its JSON text


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    msgid: int
    errcode: str
    field: str | None = None
    vals: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"msgid": self.msgid, "errcode": self.errcode}
        if self.field is not None:
            d["field"] = self.field
        if self.vals is not None:
            d["vals"] = list(self.vals)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ErrorMessage:
        return cls(msgid=int(d["msgid"]), errcode=str(d["errcode"]), field=d.get("field"), vals=d.get("vals"))


def messages_from_json(raw: list[dict[str, Any]] | None) -> list[ErrorMessage]:
    return [ErrorMessage.from_dict(m) for m in raw or []]


@dataclass(frozen=True, slots=True)
class BatchJobResult:
    status: BatchStatus
    result: dict[str, Any] | None = None
    messages: list[ErrorMessage] = field(default_factory=list)
    blobrows: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SlowQueryResult:
    status: BatchStatus
    result: dict[str, Any] | None = None
    messages: list[ErrorMessage] = field(default_factory=list)
    outputfiles: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BatchOutput:
    line: int
    status: BatchStatus
    res: dict[str, Any] | None
    messages: list[ErrorMessage]


@dataclass(frozen=True, slots=True)
class BatchDone:
    status: BatchStatus
    rows: Sequence[BatchOutput] | None
    outputfiles: dict[str, str]
    nsuccess: int
    nfailed: int
    naborted: int
    error: str | None = None  # set when the batch failed because its summary kept failing (no output files)


@dataclass(frozen=True, slots=True)
class BatchSummary:
    status: BatchStatus
    outputfiles: dict[str, str]
    nrows: int
    nsuccess: int
    nfailed: int
    naborted: int
    nqueued: int
    ninprog: int
    error: str | None = None  # set when the batch failed because its summary kept failing (no output files)
    paused: bool = False  # batch_pause: no new row starts until batch_resume (False once the batch is final)

    def as_row(self) -> dict[str, Any]:
        """Every field by name, in their order, as JSON values (the status as its text): the cached form, a
        row of a flow run's table in the Prefect UI, and what ``alya status`` shows. A field added to the
        class reaches all three from here."""
        return {name: getattr(self, name) for name in _SUMMARY_FIELDS} | {"status": self.status.value}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> BatchSummary:
        """The summary :meth:`as_row` gave (other keys are ignored; a field with a default may be missing)."""
        values = {name: row[name] for name in _SUMMARY_REQUIRED}
        values.update((name, row[name]) for name in _SUMMARY_OPTIONAL if name in row)
        values["status"] = BatchStatus(values["status"])
        return cls(**values)

    def done(self, rows: Sequence[BatchOutput] | None) -> BatchDone:
        """The BatchDone of this summary, with ``rows`` (None until the batch is final)."""
        return BatchDone(rows=rows, **{name: getattr(self, name) for name in _DONE_FROM_SUMMARY})


@dataclass(frozen=True, slots=True)
class SlowQueryDone:
    status: BatchStatus
    result: dict[str, Any] | None
    messages: list[ErrorMessage]
    outputfiles: dict[str, str]


@dataclass(frozen=True, slots=True)
class BatchDetails:
    id: str
    app: str
    op: str
    type: str
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
    error: str | None = None  # set when the batch failed because its summary kept failing (no output files)
    round: int = 1  # 1, plus one per batch_retry_failed: which summary a mark_done is of
    paused: bool = False  # batch_pause: no new row of it starts until batch_resume
    not_before: datetime | None = None  # batch_submit(not_before=...): no row starts before it
    deadline: datetime | None = None  # batch_submit(deadline=...): the batch is aborted then


_SUMMARY_FIELDS = tuple(f.name for f in fields(BatchSummary))
_SUMMARY_REQUIRED = tuple(f.name for f in fields(BatchSummary) if f.default is MISSING)
_SUMMARY_OPTIONAL = tuple(f.name for f in fields(BatchSummary) if f.default is not MISSING)
_DONE_FROM_SUMMARY = tuple(f.name for f in fields(BatchDone) if f.name != "rows")  # all of them BatchSummary's
DETAILS_FIELDS = tuple(f.name for f in fields(BatchDetails))
"""BatchDetails' fields: a BatchRecord has each of them, and builds its details from this list."""


# ---------------------------------------------------------------------------- file intake
@dataclass(frozen=True, slots=True)
class FileCheck:
    """A file checker's verdict on one file. ``ok=False`` rejects the file (``error`` says why). ``ok=True``
    submits it as a batch of (app, op) with ``context`` (None: the context given to the intake) and ``rows``:
    BatchInputs, (line, input) tuples, a DataFrame or an iterator of DataFrames (each row's columns become
    its input object; line = 1.. in file order, or the column ``line``), or None for the file's own rows
    (``file.frames()``). Rows are read lazily, while they are copied into the batch."""

    ok: bool
    app: str = ""
    op: str = ""
    context: dict[str, Any] | None = None
    rows: Any = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class FileIntake:
    """What happened to one file: ``submitted`` as batch ``batch_id``, or ``rejected`` with ``error``.
    ``url`` is where the file lies now (``<folder>/done/<batch_id>/<name>``, ``<folder>/failed/<name>``, or
    where it was found until it has been moved); ``source`` is where it was found. ``repeat``: the same file
    (URL, size, version) was taken before, and this call submitted nothing: status, ``batch_id`` and
    ``error`` are those of that first take (a repeat of batch ``batch_id``)."""

    url: str
    filetype: str
    status: str  # "submitted" | "rejected"
    batch_id: str | None
    size: int
    error: str | None
    reqat: datetime
    source: str = ""
    nrows: int = 0
    moved: bool = False
    repeat: bool = False


@dataclass(frozen=True, slots=True)
class PurgeReport:
    """What ``batch_purge`` deleted: batches (and slow queries), their rows, their output files in the
    object store (only with ``files=True``), and file-intake records (of the batches, and of rejected files)."""

    nbatches: int = 0
    nrows: int = 0
    nfiles: int = 0
    nrecords: int = 0
