"""The only module that talks to PostgreSQL. Queries are SQL in ``sql/queries.sql``, run by name; rows
come back as the typed records of ``alya.core.records`` where a caller needs more than a count or a flag.

psycopg2 is used directly (through SQLAlchemy's pool) because the hot paths need what an ORM hides:
COPY from a stream, server-side cursors, and array parameters for one-statement-per-chunk updates.

Driver errors never leave this module: ``Store.tx`` maps them to alya's errors (``_mapped``), so that
callers catch ``AlyaError`` and nothing else.
"""

from __future__ import annotations

import re
import select
import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager, suppress
from functools import cache
from importlib import resources
from typing import Any, Protocol, TypeVar

import orjson
import psycopg2
import psycopg2.errors
import psycopg2.extras
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

from alya.core.errors import AlyaError, BackendUnavailable, ConnectionLost, DatabaseNotMigrated, InvalidInput
from alya.core.logs import get_logger
from alya.core.records import BatchRecord, FileRecord

psycopg2.extras.register_default_jsonb(loads=orjson.loads, globally=True)
psycopg2.extras.register_default_json(loads=orjson.loads, globally=True)

T = TypeVar("T")
_NAME = re.compile(r"^-- name: (\w+)\s*$", re.M)


@cache
def queries() -> dict[str, str]:
    text = resources.files("alya.db").joinpath("sql/queries.sql").read_text()
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
    that dies later in the transaction is ``ConnectionLost``; ``Store.run`` runs such a body again."""

    def __init__(self, conn: Any, reconnect: Callable[[], Any] | None = None, max_reconnects: int = 0) -> None:
        self.conn = conn
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
        sql = queries()[name]
        if self._reconnect is None:
            self.cur.execute(sql, params)
        else:
            self._first(lambda: self.cur.execute(sql, params))

    def run(self, name: str, **params: Any) -> int:
        self._execute(name, params)
        return int(self.cur.rowcount)

    def one(self, name: str, **params: Any) -> tuple[Any, ...] | None:
        self._execute(name, params)
        return self.cur.fetchone()  # type: ignore[no-any-return]

    def all(self, name: str, **params: Any) -> list[tuple[Any, ...]]:
        self._execute(name, params)
        return self.cur.fetchall()  # type: ignore[no-any-return]

    def record(self, kind: Any, name: str, **params: Any) -> Any:
        """The first row as a typed record (``kind.from_row``), or None."""
        row = self.one(name, **params)
        return None if row is None else kind.from_row(row)

    def value(self, name: str, **params: Any) -> Any:
        """The first column of the first row (None when there is no row): counts, versions, flags."""
        row = self.one(name, **params)
        return None if row is None else row[0]

    def column(self, name: str, **params: Any) -> list[Any]:
        """The first column of every row (ids, mostly)."""
        return [r[0] for r in self.all(name, **params)]

    def records(self, kind: Any, name: str, **params: Any) -> list[Any]:
        return [kind.from_row(r) for r in self.all(name, **params)]

    def stream(self, name: str, itersize: int = 5000, **params: Any) -> Generator[tuple[Any, ...], None, None]:
        """Rows from a server-side cursor, so a million-row result never sits in memory at once.
        Consume it fully or ``close()`` it while the transaction is open."""
        holder: list[Any] = []

        def declare() -> None:
            holder[:] = [self.conn.cursor(name=f"alya_{name}")]
            holder[0].itersize = itersize
            holder[0].execute(queries()[name], params)

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
            raise _mapped(exc) from exc
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


class Store:
    """A connection pool on one database. The URL may be a callable (the embedded default), resolved on
    first use: constructing a JobManager, e.g. when Prefect imports a flow module, touches nothing."""

    def __init__(self, database_url: str | Callable[[], str], pool_size: int = 4) -> None:
        self._url_source = database_url
        self._url: str | None = database_url if isinstance(database_url, str) else None
        self._pool_size = pool_size
        self._capacity = pool_size + 8
        self._engine: Engine | None = None
        self._lock = threading.Lock()

    @property
    def database_url(self) -> str:
        if self._url is None:
            with self._lock:
                if self._url is None:
                    assert callable(self._url_source)
                    self._url = self._url_source()
        return self._url

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            url = self.database_url
            with self._lock:
                if self._engine is None:
                    self._engine = create_engine(
                        sqlalchemy_url(url),
                        poolclass=QueuePool,
                        pool_size=self._pool_size,
                        max_overflow=self._capacity - self._pool_size,
                        # No pre-ping: it costs a round trip per transaction on the hot path. A dead pooled
                        # connection fails its statement with OperationalError instead; that is
                        # BackendUnavailable and the pool drops it (callers on the hot path retry).
                        pool_pre_ping=False,
                        pool_recycle=1800,
                    )
        return self._engine

    def _connect(self) -> Any:
        try:
            return self.engine.raw_connection()
        except Exception as exc:  # sqlalchemy wraps psycopg2.OperationalError
            raise BackendUnavailable(f"PostgreSQL unreachable: {type(exc).__name__}") from exc

    @contextmanager
    def tx(self) -> Iterator[Tx]:
        """A transaction: committed on success, rolled back on any exception."""
        tx = Tx(self._connect(), reconnect=self._connect, max_reconnects=self._capacity + 1)
        try:
            yield tx
            tx.committing = True
            tx.conn.commit()
        except psycopg2.Error as exc:
            lost = is_disconnect(exc, tx.conn)
            _rollback(tx.conn)
            if lost:
                with suppress(Exception):
                    tx.conn.invalidate()  # a dead connection must not go back into the pool
            raise _mapped(exc, lost=lost, at_commit=tx.committing) from exc
        except BaseException:
            _rollback(tx.conn)
            raise
        finally:
            with suppress(Exception):
                tx.conn.close()

    def run(self, body: Callable[[Tx], T], *, readonly: bool = False, attempts: int = 3) -> T:
        """``body(tx)`` in one transaction, committed on success. When the connection is lost before the
        commit was sent (a server restart or a terminated backend mid-transaction), the server has rolled
        the transaction back and nothing happened: ``body`` runs again on a fresh connection, up to
        ``attempts`` times. A ``readonly`` body is run again even when the commit itself was lost.

        ``body`` must be safe to run twice: it may not consume a one-shot iterator (a submit's rows) or
        act outside the transaction."""
        for attempt in range(1, attempts + 1):
            try:
                with self.tx() as tx:
                    return body(tx)
            except ConnectionLost as exc:
                if attempt == attempts or (exc.at_commit and not readonly):
                    raise
                get_logger().info("postgres_reconnect", attempt=attempt, error=str(exc))
        raise AssertionError("unreachable")  # pragma: no cover

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


class Listener:
    """A connection of its own that LISTENs on one channel: ``wait`` returns the payloads of the
    notifications that arrived (committed transactions that called ``notify_work``), or [] on timeout.
    Wake-ups are an optimisation over polling: any failure here is reported and the caller polls."""

    def __init__(self, store: Store, channel: str) -> None:
        self._store = store
        self._channel = channel
        self._conn: Any = None

    def _connect(self) -> Any:
        conn = psycopg2.connect(self._store.database_url)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"LISTEN {self._channel}")  # a fixed identifier from alya.core.names, never user input
        return conn

    def wait(self, timeout: float) -> list[str]:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
            conn = self._conn
            if not conn.notifies and select.select([conn], [], [], max(0.0, timeout)) == ([], [], []):
                return []
            conn.poll()
            payloads = [n.payload for n in conn.notifies]
            conn.notifies.clear()
            return payloads
        except (psycopg2.Error, OSError) as exc:
            self.close()
            raise BackendUnavailable(f"LISTEN {self._channel} failed: {type(exc).__name__}") from exc

    def close(self) -> None:
        if self._conn is not None:
            with suppress(Exception):
                self._conn.close()
            self._conn = None


_DISCONNECT_STATES = ("57P01", "57P02", "57P03")  # admin_shutdown, crash_shutdown, cannot_connect_now


def is_disconnect(exc: BaseException, conn: Any) -> bool:
    """Whether a driver error means the connection is gone (closed by the server, or the server said it
    is ending it: a terminated backend can report that before the socket is seen closed)."""
    if not isinstance(exc, psycopg2.Error):
        return False
    if conn is not None and conn.closed:
        return True
    code = getattr(exc, "pgcode", None) or ""
    return code in _DISCONNECT_STATES or code.startswith("08")


def _mapped(exc: psycopg2.Error, lost: bool = False, at_commit: bool = False) -> AlyaError:
    """The alya error for a driver error (the transaction is already rolled back)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if lost:
        when = "at commit (the commit may or may not have been applied)" if at_commit else \
            "before commit (nothing was stored)"
        return ConnectionLost(f"PostgreSQL connection lost {when}: {type(exc).__name__}: {first}", at_commit)
    if isinstance(exc, psycopg2.errors.UndefinedTable | psycopg2.errors.UndefinedColumn):
        return DatabaseNotMigrated(f"the alya schema is missing or out of date ({first}): run `alya migrate` "
                                   "(or alya.migrate_database(url)) against this database")
    if isinstance(exc, psycopg2.errors.UniqueViolation) and "batchrows" in first + str(exc):
        return InvalidInput("line numbers must be unique within a batch")
    if isinstance(exc, psycopg2.DataError | psycopg2.IntegrityError):
        return InvalidInput(f"refused by the database: {first}")
    if isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError):
        return BackendUnavailable(f"PostgreSQL failed: {type(exc).__name__}: {first}")
    return AlyaError(f"PostgreSQL refused a statement: {type(exc).__name__}: {first}")


def _rollback(conn: Any) -> None:
    with suppress(Exception):
        conn.rollback()


def sqlalchemy_url(url: str) -> str:
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix):]
    return url


def json_text(value: Any) -> str:
    return orjson.dumps(value).decode()
