"""The connection pool on alya's database, and its transactions: ``Store.tx()`` and ``Store.run(body)``
hand out a ``Queries`` (``alya.db.queries``), the typed queries of one transaction. The SQL lives in
``sql/queries.sql``; the transport that runs it (``alya.db.transport.Tx``) stays inside ``alya.db``.

Driver errors never leave ``alya.db``: ``Store.tx`` maps them to alya's errors (``alya.db.errors``), so that
callers catch ``AlyaError`` and nothing else.
"""

from __future__ import annotations

import select
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

import orjson
import psycopg2
import psycopg2.extras
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

from alya.core.errors import BackendUnavailable, ConnectionLost
from alya.core.logs import get_logger
from alya.db import prepared
from alya.db.errors import is_disconnect, mapped
from alya.db.queries import Queries
from alya.db.transport import Tx

psycopg2.extras.register_default_jsonb(loads=orjson.loads, globally=True)
psycopg2.extras.register_default_json(loads=orjson.loads, globally=True)

T = TypeVar("T")


class Store:
    """A connection pool on one database. The URL may be a callable (the embedded default), resolved on
    first use: constructing a JobManager, e.g. when Prefect imports a flow module, touches nothing."""

    def __init__(self, database_url: str | Callable[[], str], pool_size: int = 4, prepare: bool = True) -> None:
        self._url_source = database_url
        self.prepare = prepare  # ALYA_PREPARED_STATEMENTS (alya.db.prepared)
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
    def tx(self) -> Iterator[Queries]:
        """A transaction, as typed queries: committed on success, rolled back on any exception."""
        tx = Tx(self._connect(), reconnect=self._connect, max_reconnects=self._capacity + 1, prepare=self.prepare)
        try:
            yield Queries(tx)
            tx.committing = True
            tx.conn.commit()
        except psycopg2.Error as exc:
            lost = is_disconnect(exc, tx.conn)
            _rollback(tx.conn)
            if lost:
                with suppress(Exception):
                    tx.conn.invalidate()  # a dead connection must not go back into the pool
            elif tx.prepare and not tx.committing and prepared.stale(exc):
                prepared.reset(tx.conn)  # nothing ran: like a connection lost before commit, run it again
                raise ConnectionLost(f"PostgreSQL dropped this connection's prepared statements ({type(exc).__name__});"
                                     " they are prepared again", False) from exc
            raise mapped(exc, lost=lost, at_commit=tx.committing) from exc
        except BaseException:
            _rollback(tx.conn)
            raise
        finally:
            with suppress(Exception):
                tx.conn.close()

    def run(self, body: Callable[[Queries], T], *, readonly: bool = False, attempts: int = 3) -> T:
        """``body(q)`` in one transaction, committed on success. When the connection is lost before the
        commit was sent (a server restart or a terminated backend mid-transaction), the server has rolled
        the transaction back and nothing happened: ``body`` runs again on a fresh connection, up to
        ``attempts`` times. A ``readonly`` body is run again even when the commit itself was lost.

        ``body`` must be safe to run twice: it may not consume a one-shot iterator (a submit's rows) or
        act outside the transaction."""
        for attempt in range(1, attempts + 1):
            try:
                with self.tx() as q:
                    return body(q)
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
