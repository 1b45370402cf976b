"""Storing a new batch inside a caller's transaction: the batch record, its rows streamed through COPY, and
its row count and status, so that ``batch_submit``, ``slowquery_submit`` and the file intake (which commits a
file's record in the same transaction as its batch) store batches the same way."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from alya.core.errors import BatchNotFound, InvalidInput, InvalidState
from alya.core.ids import uuid7
from alya.core.models import BatchStatus
from alya.core.records import BatchRecord
from alya.db.ingest import CopyStream
from alya.db.queries import Queries
from alya.db.store import json_text


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


def insert_batch(q: Queries, app: str, op: str, context: dict[str, Any], pairs: Iterator[tuple[Any, Any]], *,
                 status: BatchStatus, inputfile: str | None, max_rows: int,
                 idempotency_key: str | None = None, priority: int = 0,
                 max_input_bytes: int | None = None,
                 failure_limit: tuple[int | None, float | None] = (None, None),
                 not_before: datetime | None = None, deadline: datetime | None = None) -> NewBatch:
    """Insert a batch of validated (app, op, context) with the rows of ``pairs`` ((line, input), validated
    while they stream). Raises InvalidInput for a bad or missing row; the caller's transaction then holds
    half a batch and must be rolled back (or the caller's savepoint). With an idempotency key this app
    already used, nothing is stored and the first batch is returned (``replayed``; its rows are not read).
    ``not_before``, ``deadline``: validated (``validate.schedule``), stored on the batch record."""
    batch_id = uuid7()  # time-ordered: batchrows is partitioned by ranges of it (migration 0012)
    first = insert_record(q, idempotency_key, id=batch_id, app=app, op=op, type="B",
                          context=json_text(context), inputfile=inputfile, status=status, priority=priority)
    if first is not None:
        return NewBatch(first, app, op, status, 0, 0, replayed=True)
    if not_before is not None or deadline is not None:
        q.set_schedule(id=batch_id, notbefore=not_before, deadline=deadline)
    n = copy_rows(q, batch_id, pairs, max_rows, max_input_bytes)
    if failure_limit != (None, None):  # (rows, fraction): alya.core.validate.max_failures
        q.set_failure_limit(id=batch_id, max_failures=failure_limit[0], ratio=failure_limit[1])
    ver = q.set_nrows_status(id=batch_id, nrows=n, status=status)
    if status is BatchStatus.QUEUED:
        q.notify_work(app, op)
    return NewBatch(batch_id, app, op, status, n, ver)


def insert_slowquery(q: Queries, req_id: str, app: str, op: str, context: dict[str, Any], input: str, *,
                     idempotency_key: str | None = None, priority: int = 10) -> NewBatch:
    """Insert a slow query, queued: a batch of exactly one row (line 0, type Q) whose ``input`` is JSON text.
    Safe to run again on a fresh transaction (``Store.run``): the caller chose ``req_id``. With an
    idempotency key this app already used, nothing is stored and the first one is returned (``replayed``)."""
    queued = BatchStatus.QUEUED
    if idempotency_key is None:
        ver = q.insert_query(id=req_id, app=app, op=op, context=json_text(context), input=input, priority=priority)
        return NewBatch(req_id, app, op, queued, 1, ver)
    first = insert_record(q, idempotency_key, id=req_id, app=app, op=op, type="Q", context=json_text(context),
                          inputfile=None, status=queued, input=input, priority=priority)
    if first is not None:
        return NewBatch(first, app, op, queued, 0, 0, replayed=True)
    q.insert_row(batch=req_id, line=0, input=input)
    q.count_inserted(batch=req_id, n=1)
    ver = q.set_nrows_status(id=req_id, nrows=1, status=queued)
    q.notify_work(app, op)
    return NewBatch(req_id, app, op, queued, 1, ver)


def append_rows(q: Queries, batch_id: str, pairs: Iterator[tuple[Any, Any]], *, max_rows: int,
                wait: bool, max_input_bytes: int | None = None) -> tuple[BatchRecord, int, int]:
    """Add rows to a batch held in ``wait`` (locked meanwhile, so appends queue), then release it unless
    ``wait``. (the batch as it was, its new row total, its new version); ``max_rows``: the batch's limit."""
    rec = locked_batch(q, batch_id)
    if rec.type != "B" or rec.status is not BatchStatus.WAIT:
        raise InvalidState(f"batch {batch_id} is {rec.status.value}: rows are appended only while wait")
    total = rec.nrows + copy_rows(q, batch_id, pairs, max_rows - rec.nrows, max_input_bytes)
    ver = q.set_nrows_status(id=batch_id, nrows=total, status=BatchStatus.WAIT if wait else BatchStatus.QUEUED)
    if not wait:
        q.notify_work(rec.app, rec.op)
    return rec, total, ver


def release_batch(q: Queries, batch_id: str) -> tuple[BatchRecord, int | None]:
    """Release a batch held in ``wait`` to the workers: (the batch as it was, its new version, or None when
    it was already queued: a no-op)."""
    rec = locked_batch(q, batch_id)
    if rec.status is BatchStatus.QUEUED:
        return rec, None
    if rec.status is not BatchStatus.WAIT:
        raise InvalidState(f"batch {batch_id} is {rec.status.value}: only a wait batch can be released")
    ver = q.wait_off(id=batch_id)
    q.notify_work(rec.app, rec.op)
    return rec, ver


def insert_record(q: Queries, key: str | None, *, id: str, app: str, op: str, type: str, context: str,
                  inputfile: str | None, status: BatchStatus, input: str | None = None,
                  priority: int = 0) -> str | None:
    """Insert the batch record; with an idempotency key that this app already used, insert nothing and
    return the first batch's id, if this is the same call (op, type, context, input file and a slow query's
    input; Stripe's rule); anything different is refused, and the refusal says nothing about the first call
    (another caller that guessed or reused a key must not learn or get hold of someone else's batch).
    A concurrent insert of the same key waits on the unique index until the first commits (or rolls back:
    then this one wins)."""
    if key is None:
        q.insert_batch(id=id, app=app, op=op, type=type, context=context, inputfile=inputfile, status=status,
                       priority=priority)
        return None
    for _ in range(3):
        if q.insert_batch_keyed(id=id, app=app, op=op, type=type, context=context, inputfile=inputfile,
                                status=status, key=key, priority=priority):
            return None
        found = q.batch_by_key(app=app, key=key)
        if found is None:
            continue  # the holder of the key was deleted meanwhile: try to take it again
        if not q.keyed_call_matches(id=found.id, op=op, type=type, context=context, inputfile=inputfile,
                                    input=input):
            raise InvalidInput("idempotency key reused with different parameters")
        return found.id
    raise InvalidState(f"idempotency_key {key!r}: its batch keeps appearing and disappearing")


def copy_rows(q: Queries, batch_id: str, pairs: Iterator[tuple[Any, Any]], max_rows: int,
              max_input_bytes: int | None = None) -> int:
    """COPY rows into a batch; returns how many. A batch needs at least one row, each row's input JSON at
    most ``max_input_bytes``."""
    stream = CopyStream(batch_id, pairs, max_rows=max(max_rows, 0),
                        **({} if max_input_bytes is None else {"max_input_bytes": max_input_bytes}))
    q.copy_rows(stream)
    n = stream.count
    if n == 0:
        raise InvalidInput("a batch needs at least one row")
    q.count_inserted(batch=batch_id, n=n)  # the counters (no INSERT trigger: migration 0011)
    return n


def locked_batch(q: Queries, batch_id: str) -> BatchRecord:
    """The batch, locked until the transaction ends (appends, releases and aborts of one batch queue here)."""
    rec = q.lock_batch(id=batch_id)
    if rec is None:
        raise BatchNotFound(f"no batch {batch_id}")
    return rec
