"""The typed queries of a slow query's submit (its row, and the whole submit in one statement), a part of
:class:`alya.db.queries.Queries` kept in its own module (that one is at its size limit). The SQL is in
``sql/queries.sql``, next to ``insert_row``; the methods follow the rules of ``alya.db.queries``."""

from __future__ import annotations

from alya.core import names
from alya.db.transport import Tx


class SubmitQueries:
    """Mixed into ``Queries``: a slow query's row, and its one-statement submit."""

    _tx: Tx

    def insert_row(self, *, batch: str, line: int, input: str) -> None:
        """One row (a slow query's, line 0, in the submit with an idempotency key)."""
        self._tx.run("insert_row", batch=batch, line=line, input=input)

    def insert_query(self, *, id: str, app: str, op: str, context: str, input: str, priority: int) -> int:
        """Store a slow query without an idempotency key, queued, in one statement: its record, its row (line
        0), the row's count, and its type's wake-up at the commit. Its version."""
        row = self._tx.one("insert_query", id=id, app=app, op=op, context=context, input=input, priority=priority,
                           channel=names.WORK_CHANNEL, payload=names.work_payload(app, op))
        assert row is not None  # an INSERT … RETURNING that did not raise returned its row
        return int(row[0])
