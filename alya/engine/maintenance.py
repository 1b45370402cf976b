"""Recovery as one idempotent ``cleanup()``: run it as often as you like, from as many places as you like
(every worker loop, the scheduled sweeper flow); each step changes only what is still wrong.

Re-dispatching queued batches that have no live flow run is Prefect's business, one layer up: the facade
(``JobManager.cleanup(redispatch=True)``) and the sweeper add it after this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alya.core.errors import AlyaError
from alya.core.logs import get_logger
from alya.core.models import ErrorMessage
from alya.core.names import WORK_CHANNEL
from alya.core.records import RecoveredRow
from alya.db.store import json_text
from alya.engine.engine import Engine


@dataclass
class CleanupReport:
    requeued: int = 0
    failed: int = 0
    summarised: list[str] = field(default_factory=list)
    notified: list[str] = field(default_factory=list)
    dispatched: list[str] = field(default_factory=list)


def cleanup(engine: Engine, types: list[tuple[str, str]] | None = None) -> CleanupReport:
    """1. rows of workers silent for ALYA_RECOVERY_SEC go back to the queue (or fail, out of attempts);
    2. open batches whose rows are all final are summarised (their summary was missed);
    3. mark_done is called for finished batches of ``types`` that were never notified."""
    log = get_logger()
    report = CleanupReport()
    svc = engine.svc
    cfg = svc.config
    fail_messages = json_text([ErrorMessage(msgid=0, errcode="processing_error",
                                            vals=["worker lost while processing the row"]).to_dict()])
    with svc.store.tx() as tx:
        recovered: list[RecoveredRow] = tx.records(RecoveredRow, "recover_rows", sec=cfg.recovery_sec,
                                                   max_attempts=cfg.max_attempts, fail_messages=fail_messages)
        tx.run("forget_dead_workers", sec=cfg.recovery_sec)
        if any(r.status == "queued" for r in recovered):
            tx.one("notify_work", channel=WORK_CHANNEL, payload="*")
    # one log line per batch and worker, not per row (a lost chunk can be 100,000 rows)
    lost: dict[tuple[str, str | None], dict[str, list[int]]] = {}
    for r in recovered:
        if r.status == "failed":
            report.failed += 1
        else:
            report.requeued += 1
        lost.setdefault((r.batch, r.worker), {}).setdefault(r.status, []).append(r.line)
    for (batch, worker), by_status in lost.items():
        for status, lines in by_status.items():
            log.warning("rows_recovered", batch=batch, dead_worker=worker, new=status, rows=len(lines),
                        first_line=min(lines), last_line=max(lines))
    with svc.store.tx() as tx:
        missed = [str(b) for b in tx.column("unsummarised_batches")]
    for batch in missed:
        try:
            if engine.summarise(batch):
                report.summarised.append(batch)
        except AlyaError as exc:
            log.error("summary_failed", batch=batch, error=str(exc))
    for app, op in types or []:
        with svc.store.tx() as tx:
            pending = [str(b) for b in tx.column("unnotified_batches", app=app, op=op)]
        for batch in pending:
            if engine.notify(batch):
                report.notified.append(batch)
    return report
