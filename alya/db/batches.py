"""Storing a new batch inside a caller's transaction: the batch record, its rows streamed through COPY, and
its row count and status, so that ``batch_submit`` and the file intake (which commits a file's record in the
same transaction as its batch) store batches the same way."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from alya.core import names
from alya.core.errors import InvalidInput, InvalidState
from alya.core.models import BatchStatus
from alya.core.records import BatchKeyed
from alya.db.ingest import COPY_ROWS, CopyStream
from alya.db.store import Tx, json_text


@dataclass(frozen=True, slots=True)
class NewBatch:
    """A batch stored by :func:`insert_batch`, as the post-commit steps (cache, dispatch) need it."""

    id: str
    app: str
    op: str
    status: BatchStatus
    nrows: int
    ver: int
    replayed: bool = False  # an earlier submit with the same idempotency key: nothing was stored


def insert_batch(tx: Tx, app: str, op: str, context: dict[str, Any], pairs: Iterator[tuple[Any, Any]], *,
                 status: BatchStatus, inputfile: str | None, max_rows: int,
                 idempotency_key: str | None = None) -> NewBatch:
    """Insert a batch of validated (app, op, context) with the rows of ``pairs`` ((line, input), validated
    while they stream). Raises InvalidInput for a bad or missing row; the caller's transaction then holds
    half a batch and must be rolled back (or the caller's savepoint). With an idempotency key this app
    already used, nothing is stored and the first batch is returned (``replayed``; its rows are not read)."""
    batch_id = str(uuid.uuid4())
    first = insert_record(tx, idempotency_key, id=batch_id, app=app, op=op, type="B",
                          context=json_text(context), inputfile=inputfile, status=status.value)
    if first is not None:
        return NewBatch(first, app, op, status, 0, 0, replayed=True)
    n = copy_rows(tx, batch_id, pairs, max_rows)
    ver = tx.value("set_nrows_status", id=batch_id, nrows=n, status=status.value)
    if status is BatchStatus.QUEUED:
        notify_work(tx, app, op)
    return NewBatch(batch_id, app, op, status, n, int(ver))


def notify_work(tx: Tx, app: str, op: str) -> None:
    """Idle workers wake when this transaction commits (PostgreSQL NOTIFY; see alya.engine.waker)."""
    tx.one("notify_work", channel=names.WORK_CHANNEL, payload=names.work_payload(app, op))


def insert_record(tx: Tx, key: str | None, **batch: Any) -> str | None:
    """Insert the batch record; with an idempotency key that this app already used, insert nothing and
    return the first batch's id (refused if that was another kind of call). A concurrent insert of the
    same key waits on the unique index until the first commits (or rolls back: then this one wins)."""
    if key is None:
        tx.run("insert_batch", **batch)
        return None
    for _ in range(3):
        if tx.one("insert_batch_keyed", key=key, **batch) is not None:
            return None
        found: BatchKeyed | None = tx.record(BatchKeyed, "batch_by_key", app=batch["app"], key=key)
        if found is None:
            continue  # the holder of the key was deleted meanwhile: try to take it again
        first, op, type_ = found.id, found.op, found.type
        if (op, type_) != (batch["op"], batch["type"]):
            kind = "a slow query" if type_ == "Q" else "a batch"
            raise InvalidInput(f"idempotency_key {key!r} of app {batch['app']} was already used by {kind} "
                               f"of op {op}")
        return str(first)
    raise InvalidState(f"idempotency_key {key!r}: its batch keeps appearing and disappearing")


def copy_rows(tx: Tx, batch_id: str, pairs: Iterator[tuple[Any, Any]], max_rows: int) -> int:
    """COPY rows into a batch; returns how many. A batch needs at least one row."""
    stream = CopyStream(batch_id, pairs, max_rows=max(max_rows, 0))
    tx.copy_in(COPY_ROWS, stream)
    n = stream.count
    if n == 0:
        raise InvalidInput("a batch needs at least one row")
    return n
