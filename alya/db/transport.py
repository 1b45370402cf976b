"""The transport under ``alya.db.queries``: one open transaction on a pooled psycopg2 connection, which runs
the named SQL of ``sql/queries.sql`` and hands back raw rows. Private to ``alya.db``: everything above it
gets typed values from ``Queries``, never a tuple, and never names a query by string.

psycopg2 is used directly (through SQLAlchemy's pool) because the hot paths need what an ORM hides:
COPY from a stream, server-side cursors, and array parameters for one-statement-per-chunk updates.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager, suppress
from functools import cache
from importlib import resources
from typing import Any, Protocol

import psycopg2

from alya.core.records import BatchRecord, FileRecord
from alya.db import prepared
from alya.db.errors import is_disconnect, mapped

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.M)

# Named statements the transport runs itself (a savepoint's end), not a query of the repository.
OWN_STATEMENTS = frozenset({"rollback_to_savepoint", "release_savepoint"})


SQL_FILES = ("queries.sql", "partitions.sql")  # partitions.sql: alya.db.partitions (migration 0012)


@cache
def named_sql() -> dict[str, str]:
    """Every ``-- name:`` block of ``sql/queries.sql`` and of the files of other roles (``SQL_FILES``) by
    name, with the records' column lists filled in."""
    text = "\n".join(resources.files("alya.db").joinpath(f"sql/{f}").read_text() for f in SQL_FILES)
    text = text.replace("{batch_columns}", BatchRecord.COLUMNS).replace("{file_columns}", FileRecord.COLUMNS)
    parts = _NAME.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


class Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class Tx:
    """One open transaction: run named queries on it.

    Pooled connections are not pinged (a round trip per transaction). Instead, when the *first* statement
    of a transaction finds its connection dead (server restart, idle timeout, failover), nothing has
    happened in the transaction yet: the connection is dropped from the pool and the statement is run
    on the next one (after a restart every pooled connection is dead; each fails at once). A connection
    that dies later in the transaction is ``ConnectionLost``; ``Store.run`` runs such a body again.

    Every named statement goes through ``_execute(name, params)``: the one seam where the tests inject
    faults and count statements."""

    def __init__(self, conn: Any, reconnect: Callable[[], Any] | None = None, max_reconnects: int = 0,
                 prepare: bool = False) -> None:
        self.conn = conn
        self.prepare = prepare  # named statements as server-side prepared statements (alya.db.prepared)
        self.cur = conn.cursor()
        self._reconnect = reconnect
        self._max_reconnects = max_reconnects
        self.committing = False  # set just before COMMIT is sent: a failure after it is ambiguous

    def _first(self, statement: Callable[[], None]) -> None:
        """Run the transaction's first statement, on the next pooled connection while the one in hand
        turns out dead."""
        if self._reconnect is None:
            statement()
            return
        reconnect, self._reconnect = self._reconnect, None
        for attempt in range(self._max_reconnects + 1):
            try:
                statement()
                return
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                # A live connection means a real error (timeout, cancel); so does running out of tries.
                if not is_disconnect(exc, self.conn) or attempt == self._max_reconnects:
                    raise
                with suppress(Exception):
                    self.conn.invalidate()  # never back into the pool
                self.conn = reconnect()
                self.cur = self.conn.cursor()

    def _execute(self, name: str, params: dict[str, Any]) -> None:
        sql = named_sql()[name]
        if self._reconnect is None:
            self.cur.execute(self._text(name, sql), params)
        else:
            self._first(lambda: self.cur.execute(self._text(name, sql), params))

    def _text(self, name: str, sql: str) -> str:
        """What to send for the named block on the connection in hand (it changes on a reconnect)."""
        if not self.prepare:
            return sql
        cache = prepared.cache_of(self.conn)
        return sql if cache is None else prepared.executable(self.cur, cache, name, sql)

    def run(self, name: str, **params: Any) -> int:
        """The statement's row count (rows inserted, updated, deleted)."""
        self._execute(name, params)
        return int(self.cur.rowcount)

    def one(self, name: str, **params: Any) -> tuple[Any, ...] | None:
        self._execute(name, params)
        return self.cur.fetchone()  # type: ignore[no-any-return]

    def all(self, name: str, **params: Any) -> list[tuple[Any, ...]]:
        self._execute(name, params)
        return self.cur.fetchall()  # type: ignore[no-any-return]

    def stream(self, name: str, itersize: int = 5000, **params: Any) -> Generator[tuple[Any, ...], None, None]:
        """Rows from a server-side cursor, so a million-row result never sits in memory at once.
        Consume it fully or ``close()`` it while the transaction is open."""
        holder: list[Any] = []

        def declare() -> None:
            holder[:] = [self.conn.cursor(name=f"alya_{name}")]
            holder[0].itersize = itersize
            holder[0].execute(named_sql()[name], params)

        self._first(declare)
        with holder[0] as cur:
            yield from cur

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested transaction: an exception inside undoes only what was done inside, and the transaction
        goes on (the file intake records a rejected file in the transaction whose batch insert failed).
        Driver errors come out mapped, as from ``Store.tx``; if the connection itself is gone, rolling
        back to the savepoint fails too and the mapped error still comes out (the caller's tx then ends)."""
        self._execute("savepoint", {})
        try:
            yield
        except psycopg2.Error as exc:
            with suppress(psycopg2.Error):
                self._execute("rollback_to_savepoint", {})
            raise mapped(exc) from exc
        except BaseException:
            with suppress(psycopg2.Error):
                self._execute("rollback_to_savepoint", {})
            raise
        self._execute("release_savepoint", {})

    def copy_in(self, sql: str, stream: Readable) -> None:
        """COPY from a stream. A stream that raises (a bad row, the caller's own iterable failing) abandons
        the COPY, which psycopg2 reports as QueryCanceled: what really happened is raised instead (the
        stream keeps it in ``error``), and the transaction is rolled back on the way out."""
        self._reconnect = None
        try:
            self.cur.copy_expert(sql, stream, size=1 << 18)
        except psycopg2.Error:
            error = getattr(stream, "error", None)
            if error is not None:
                raise error from None
            raise
