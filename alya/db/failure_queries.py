"""The typed queries of failed rows (failure thresholds, retries, exports of a status's rows): a part of
``alya.db.queries.Queries`` kept in a module of its own (``Queries`` inherits it), named and typed by the same
rules: one method per named query of ``sql/queries.sql``, keyword-only parameters named as the SQL's."""

from __future__ import annotations

from collections.abc import Generator
from contextlib import closing
from decimal import Decimal
from typing import Any

from alya.core.models import BatchOutput
from alya.core.records import BatchRecord, FailureLimit, batch_output
from alya.db.transport import Tx


class FailureQueries:
    """Queries of failed rows, on the transaction of the ``Queries`` that inherits them."""

    _tx: Tx

    def set_failure_limit(self, *, id: str, max_failures: int | None, ratio: float | None) -> None:
        # a ratio as its decimal text: 0.29 stays 0.29 in the numeric column (29 of 100 rows, not 28.99...)
        self._tx.run("set_failure_limit", id=id, max_failures=max_failures,
                     ratio=None if ratio is None else Decimal(repr(ratio)))

    def batch_has_failure_limit(self, *, id: str) -> bool:
        row = self._tx.one("batch_has_failure_limit", id=id)
        return bool(row and row[0])

    def failure_limit(self, *, id: str) -> FailureLimit | None:
        """None: the batch has no threshold, or is no longer open."""
        row = self._tx.one("failure_limit", id=id)
        return None if row is None else FailureLimit.from_row(row)

    def reopen_batch(self, *, id: str) -> BatchRecord | None:
        """The batch as reopened (queued, one round on); None when it was not a final `failed` batch."""
        row = self._tx.one("reopen_batch", id=id)
        return None if row is None else BatchRecord.from_row(row)

    def requeue_rows(self, *, batch: str, status: str) -> int:
        """Rows of ``status`` requeued."""
        return self._tx.run("requeue_rows", batch=batch, status=status)

    def stream_batch_rows_of_status(self, *, id: str, status: str | None,
                                    itersize: int = 5000) -> Generator[BatchOutput, None, None]:
        with closing(self._tx.stream("batch_rows_of_status", itersize, id=id, status=status)) as rows:
            for r in rows:
                yield batch_output(r)

    def stream_batch_inputs(self, *, id: str, status: str | None,
                            itersize: int = 5000) -> Generator[tuple[int, dict[str, Any]], None, None]:
        with closing(self._tx.stream("batch_inputs", itersize, id=id, status=status)) as rows:
            for line, input in rows:
                yield int(line), input

    def batch_input_keys(self, *, id: str, status: str | None) -> list[str]:
        return [str(r[0]) for r in self._tx.all("batch_input_keys", id=id, status=status)]
