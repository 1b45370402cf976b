"""The typed queries of batch control (pause and resume, not_before and deadline: ``alya.batch.control``),
a part of :class:`alya.db.queries.Queries` kept in its own module (that one is at its size limit). The SQL
is in ``sql/queries.sql``, section "batch control"; the methods follow the rules of ``alya.db.queries``."""

from __future__ import annotations

from datetime import datetime

from alya.core import names
from alya.db.transport import Tx


class ControlQueries:
    """Mixed into ``Queries``: one typed method per batch-control query, on the same transaction."""

    _tx: Tx

    def _notify(self, payload: str) -> None:
        raise NotImplementedError  # Queries' own

    def set_schedule(self, *, id: str, notbefore: datetime | None, deadline: datetime | None) -> None:
        self._tx.run("set_schedule", id=id, notbefore=notbefore, deadline=deadline)

    def set_paused(self, *, id: str, paused: bool) -> int:
        """The batch's new version (the caller holds it locked)."""
        row = self._tx.one("set_paused", id=id, paused=paused)
        assert row is not None, f"no batch {id}"
        return int(row[0])

    def due_deadlines(self) -> list[str]:
        return [str(r[0]) for r in self._tx.all("due_deadlines")]

    def started_types(self, *, sec: float) -> list[tuple[str, str]]:
        """(app, op) of open batches whose not_before came within the last ``sec`` seconds."""
        return [(r[0], r[1]) for r in self._tx.all("started_types", sec=sec)]

    def notify_paused(self, batch_id: str, paused: bool) -> None:
        """The batch was paused (workers stop starting its rows at once) or resumed (they may start them
        again); a resume also needs ``notify_work`` to wake idle workers."""
        self._notify(names.pause_payload(batch_id) if paused else names.resume_payload(batch_id))
