"""Storing a new batch inside a caller's transaction: the batch record, its rows streamed through COPY, and
its row count and status, so that ``batch_submit`` and the file intake (which commits a file's record in the
same transaction as its batch) store batches the same way."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from alya import names
from alya.errors import InvalidInput
from alya.ingest import COPY_ROWS, CopyStream
from alya.models import BatchStatus
from alya.store import Tx, json_text


@dataclass(frozen=True, slots=True)
class NewBatch:
    """A batch stored by :func:`insert_batch`, as the post-commit steps (cache, dispatch) need it."""

    id: str
    app: str
    op: str
    status: BatchStatus
    nrows: int
    ver: int


def insert_batch(tx: Tx, app: str, op: str, context: dict[str, Any], pairs: Iterator[tuple[Any, Any]], *,
                 status: BatchStatus, inputfile: str | None, max_rows: int) -> NewBatch:
    """Insert a batch of validated (app, op, context) with the rows of ``pairs`` ((line, input), validated
    while they stream). Raises InvalidInput for a bad or missing row; the caller's transaction then holds
    half a batch and must be rolled back (or the caller's savepoint)."""
    batch_id = str(uuid.uuid4())
    tx.run("insert_batch", id=batch_id, app=app, op=op, type="B", context=json_text(context),
           inputfile=inputfile, status=status.value)
    n = copy_rows(tx, batch_id, pairs, max_rows)
    ver = tx.one("set_nrows_status", id=batch_id, nrows=n, status=status.value)[0]  # type: ignore[index]
    if status is BatchStatus.QUEUED:
        notify_work(tx, app, op)
    return NewBatch(batch_id, app, op, status, n, int(ver))


def notify_work(tx: Tx, app: str, op: str) -> None:
    """Idle workers wake when this transaction commits (PostgreSQL NOTIFY; see alya.waker)."""
    tx.one("notify_work", channel=names.WORK_CHANNEL, payload=names.work_payload(app, op))


def copy_rows(tx: Tx, batch_id: str, pairs: Iterator[tuple[Any, Any]], max_rows: int) -> int:
    """COPY rows into a batch; returns how many. A batch needs at least one row."""
    stream = CopyStream(batch_id, pairs, max_rows=max(max_rows, 0))
    tx.copy_in(COPY_ROWS, stream)
    n = stream.count
    if n == 0:
        raise InvalidInput("a batch needs at least one row")
    return n
