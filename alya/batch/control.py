"""Batch control: pause and resume a batch (``jm.batch_pause`` / ``jm.batch_resume``), and end a batch at
its deadline (the deadline itself is stored at submit and fired by maintenance: ``alya.engine.maintenance``).

Pausing is a flag on the batch record, not a status: the batch keeps its status (``wait``, ``queued`` or
``inprog``) and its rows keep theirs, so nothing that reads statuses (counts, summaries, recovery, the
cache's version rule) has a new case to handle. What the flag changes is what workers *claim*: the open-batch
listing of the claim, the types with claimable work and the sweeper's redispatch all leave a paused batch
out (``sql/queries.sql``), so no worker claims or spins on it. At the pause's commit a NOTIFY tells every
worker to stop starting the batch's rows it holds and to give the unstarted ones back (``Engine``); rows
already running finish and are written back as usual. A paused batch is never summarised early: its queued
rows are not final, and nothing makes them so until it is resumed (or aborted, or its deadline passes).
"""

from __future__ import annotations

from dataclasses import dataclass

from alya.batch.services import Services
from alya.batch.status import Summary, record_summary
from alya.core.errors import InvalidState
from alya.core.logs import get_logger
from alya.core.records import BatchRecord
from alya.db.batches import locked_batch
from alya.db.queries import Queries

DEADLINE_ERROR = "deadline passed"  # BatchSummary.error of a batch its deadline ended


@dataclass(frozen=True, slots=True)
class Paused:
    """A pause or resume: the batch after it, its summary, and whether this call changed the flag (False:
    it already was so, and nothing was written)."""

    rec: BatchRecord
    summary: Summary
    changed: bool


def set_paused(svc: Services, batch_id: str, paused: bool) -> Paused:
    """Pause (``paused``) or resume a batch. Idempotent: pausing a paused batch (or resuming one that is not
    paused) changes nothing and returns its summary. Refused (``InvalidState``, nothing changed) for a
    final batch, and for a slow query (one row: there is nothing to pause between). ``BatchNotFound`` for an
    unknown id. A resume wakes the type's idle workers (NOTIFY at its commit)."""

    def body(q: Queries) -> Paused:
        rec = locked_batch(q, batch_id)  # the batch row before its rows, as every writer takes them
        what = "paused" if paused else "resumed"
        if rec.type != "B":
            raise InvalidState(f"{batch_id} is a slow query: only batches are {what}")
        if rec.status.is_final:
            raise InvalidState(f"batch {batch_id} already ended {rec.status.value}: it cannot be {what}")
        if rec.paused is paused:
            return Paused(rec, record_summary(q, rec), changed=False)
        q.set_paused(id=batch_id, paused=paused)
        q.notify_paused(batch_id, paused)
        if not paused:
            q.notify_work(rec.app, rec.op)
        now = q.get_batch(id=batch_id)
        assert now is not None  # locked above
        return Paused(now, record_summary(q, now), changed=True)

    done = svc.store.run(body)
    rec = done.rec
    if done.changed:
        get_logger().info("batch_paused" if paused else "batch_resumed", app=rec.app, op=rec.op, batch=rec.id,
                          status=rec.status.value, nqueued=done.summary.value.nqueued,
                          ninprog=done.summary.value.ninprog)
    svc.statuses.put(rec.id, done.summary)
    return done
