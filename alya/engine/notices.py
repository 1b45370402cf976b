"""What an abort or pause notice (PostgreSQL NOTIFY, delivered by :class:`~alya.engine.waker.Waker`) does to
the claims this process holds: their unstarted rows stop being started at once, instead of at the claim's
next write-back. Any database role may NOTIFY, so each notice is checked against PostgreSQL first: a forged
one drops nothing."""

from __future__ import annotations

import threading
from typing import Any

from alya.core.errors import AlyaError
from alya.core.models import BatchStatus
from alya.db.store import Store
from alya.engine.identity import Identity
from alya.engine.producer import Producer


class Notices:
    def __init__(self, store: Store, producer: Producer, wake: threading.Condition, identity: Identity) -> None:
        self.store = store
        self.producer = producer
        self._wake = wake  # the claim loops' condition: woken so they give back the cancelled rows now
        self.identity = identity

    @property
    def log(self) -> Any:
        return self.identity.log

    def abort_notified(self, batch: str) -> None:
        """An abort was committed (NOTIFY): stop starting the batch's rows now. The next write-back of its
        claims sees the abort and keeps the results of rows that finished before it. Any database role may
        NOTIFY: the batch's status is checked first, so a forged notice drops nothing."""
        claims = self.producer.claims_of(batch)
        if claims and not self._aborted_in_db(batch):
            self.log.warning("abort_notice_ignored", batch=batch, reason="the batch is not aborted")
            return
        for c in claims:
            c.cancelled = True
        if claims:
            self.log.info("abort_notified", batch=batch, claims=len(claims))
            with self._wake:
                self._wake.notify_all()

    def pause_notified(self, batch: str, paused: bool) -> None:
        """A pause (or resume) was committed (NOTIFY): stop starting the batch's rows held here; their
        unstarted rows are given back when their claims end (running rows finish and are written back).
        A claim that raced the pause (its statement read the batch before the pause committed) is cancelled
        when it registers (``Producer.pause_noticed``). Checked in PostgreSQL first, as an abort notice."""
        if paused and not self._paused_in_db(batch):
            self.log.warning("pause_notice_ignored", batch=batch, reason="the batch is not paused")
            return
        claims = self.producer.pause_noticed(batch, paused)
        if paused and claims:
            for c in claims:
                c.cancelled = True
            self.log.info("pause_notified", batch=batch, claims=len(claims))
            with self._wake:
                self._wake.notify_all()

    def _paused_in_db(self, batch: str) -> bool:
        try:
            with self.store.tx() as tx:
                rec = tx.get_batch(id=batch)
        except AlyaError:
            return False
        return rec is not None and rec.paused and not rec.status.is_final

    def _aborted_in_db(self, batch: str) -> bool:
        """Whether PostgreSQL holds the batch as ended (aborted, or stopped past its failure threshold: no
        open row left), or no longer holds it. Unknown (the database unreachable): not taken on trust;
        every write-back checks for an abort itself, so a real abort still stops the batch's rows at the
        next write-back."""
        try:
            with self.store.tx() as tx:
                status = next((s.status for s in tx.batch_statuses(ids=[batch])), None)
                # Stopped past its failure threshold, its summary under way: no row of it is open any more
                # (a batch with rows held here has open rows, so a forged notice cannot pass this either).
                return status is None or BatchStatus(status).is_final or not tx.has_open_rows(id=batch)
        except AlyaError:
            return False

