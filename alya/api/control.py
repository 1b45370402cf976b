"""Batch control on the facade: pause, resume and abort (``JobManager`` inherits them from
:class:`BatchControl`; ``alya/api/client.py`` is at its size limit). The work is the batch layer's
(``alya.batch.control``, ``alya.batch.finish``); what is done here is Prefect's part, after the commit:
cancelling an aborted batch's flow runs, starting one for a resumed batch (``ALYA_DISPATCH=prefect``).

``not_before`` and ``deadline`` are arguments of ``batch_submit``: ``not_before`` holds the batch's rows
(status ``queued``) until then: workers leave the batch out of their claims and are woken by the maintenance
leader when it comes (``alya.engine.maintenance``, duty ``schedule``); ``deadline`` ends the batch then,
``aborted`` with error "deadline passed": rows not yet final become ``aborted``, the output files of the
finished rows are written and ``mark_done`` is called once (unlike a plain abort).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from alya.batch.control import set_paused
from alya.core import validate
from alya.core.models import BatchStatus, BatchSummary
from alya.core.names import dispatch_key

if TYPE_CHECKING:
    from alya.batch.finish import Finisher
    from alya.batch.services import Services
    from alya.prefect.dispatch import Dispatcher


class BatchControl:
    """Mixed into ``JobManager``, whose ``services``, ``dispatcher`` and ``_finisher`` it uses."""

    services: Services
    dispatcher: Dispatcher | None
    _finisher: Finisher

    def batch_pause(self, batch_id: str) -> BatchSummary:
        """No new row of the batch starts until ``batch_resume``: rows already running finish and are
        recorded; workers give back the rows they hold unstarted. Pausing a paused batch returns its summary
        and changes nothing. ``InvalidState`` for a final batch or a slow query; ``BatchNotFound``."""
        return set_paused(self.services, validate.batch_id(batch_id), True).summary.value

    def batch_resume(self, batch_id: str) -> BatchSummary:
        """Let a paused batch's rows start again: its workers are woken (NOTIFY at the commit), and with
        ALYA_DISPATCH=prefect a flow run is created for it. Resuming a batch that is not paused changes
        nothing. ``InvalidState`` for a final batch or a slow query; ``BatchNotFound``."""
        done = set_paused(self.services, validate.batch_id(batch_id), False)
        rec = done.rec
        if done.changed and self.dispatcher is not None and rec.status is not BatchStatus.WAIT:
            self.dispatcher.start_batch(rec.app, rec.op, rec.id, key=dispatch_key(rec.id, f"resume:{rec.ver}"))
        return done.summary.value

    def _abort(self, batch_id: str, type_: str | None) -> BatchSummary:
        """The abort is the batch layer's (``Finisher.abort``), also of a paused batch; its flow runs are
        cancelled here, after the commit (Prefect is this layer's business)."""
        aborted = self._finisher.abort(validate.batch_id(batch_id), type_)
        s = aborted.summary.value
        if aborted.now and self.dispatcher is not None:
            self.dispatcher.cancel_batch(aborted.rec.id)  # never raises: the abort is committed
        return s
