"""The one map of driver errors to alya's (``alya.db.errors``): by SQLSTATE and constraint name, never by
message text. Built psycopg2 errors (pure), and the same errors raised for real by PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import psycopg2
import psycopg2.errors
import pytest

from alya.core.errors import AlyaError, BackendUnavailable, ConnectionLost, DatabaseNotMigrated, InvalidInput
from alya.core.models import BatchStatus
from alya.db.batches import insert_batch
from alya.db.errors import constraint_name, is_disconnect, mapped, sqlstate
from alya.db.store import Store

LINES_UNIQUE = "line numbers must be unique within a batch"


def built(cls: type[psycopg2.Error], code: str | None, constraint: str | None = None,
          message: str = "some server message") -> psycopg2.Error:
    """A psycopg2 error as the driver raises it: ``pgcode`` and ``diag`` are read-only on real ones, so a
    subclass supplies them."""
    attrs: dict[str, Any] = {"pgcode": code, "diag": SimpleNamespace(constraint_name=constraint)}
    return type(f"Built{cls.__name__}", (cls,), attrs)(message)


@pytest.mark.parametrize(("cls", "code", "constraint", "expected", "text"), [
    (psycopg2.errors.UniqueViolation, "23505", "batchrows_pkey", InvalidInput, LINES_UNIQUE),
    (psycopg2.errors.UniqueViolation, "23505", "batch_files_file", InvalidInput, "refused by the database"),
    (psycopg2.errors.CheckViolation, "23514", "batchrows_line_nonneg", InvalidInput, "refused by the database"),
    (psycopg2.errors.InvalidTextRepresentation, "22P02", None, InvalidInput, "refused by the database"),
    (psycopg2.errors.UndefinedTable, "42P01", None, DatabaseNotMigrated, "alya migrate"),
    (psycopg2.errors.UndefinedColumn, "42703", None, DatabaseNotMigrated, "alya migrate"),
    (psycopg2.errors.QueryCanceled, "57014", None, BackendUnavailable, "PostgreSQL failed"),
    (psycopg2.errors.DeadlockDetected, "40P01", None, BackendUnavailable, "PostgreSQL failed"),
    (psycopg2.errors.LockNotAvailable, "55P03", None, BackendUnavailable, "PostgreSQL failed"),
    (psycopg2.errors.TooManyConnections, "53300", None, BackendUnavailable, "PostgreSQL failed"),
    (psycopg2.errors.SyntaxError, "42601", None, AlyaError, "refused a statement"),
    (psycopg2.errors.InternalError_, "XX000", None, AlyaError, "refused a statement"),
    (psycopg2.OperationalError, None, None, BackendUnavailable, "PostgreSQL failed"),  # libpq: no server heard
    (psycopg2.InterfaceError, None, None, BackendUnavailable, "PostgreSQL failed"),  # connection already closed
    (psycopg2.ProgrammingError, None, None, AlyaError, "refused a statement"),
])
def test_errors_map_by_sqlstate_and_constraint(cls: type[psycopg2.Error], code: str | None, constraint: str | None,
                                               expected: type[AlyaError], text: str) -> None:
    err = mapped(built(cls, code, constraint))
    assert type(err) is expected and text in str(err)


def test_the_message_text_plays_no_part() -> None:
    """A translated message (lc_messages) or one that happens to mention a table changes nothing."""
    named = built(psycopg2.errors.UniqueViolation, "23505", "batchrows_pkey", "doppelter Schlüsselwert")
    assert str(mapped(named)) == LINES_UNIQUE
    other = built(psycopg2.errors.UniqueViolation, "23505", "batch_files_file", 'unique "batchrows_pkey" batchrows')
    assert str(mapped(other)) != LINES_UNIQUE


def test_a_lost_connection_is_connection_lost_whatever_the_error() -> None:
    err = mapped(built(psycopg2.errors.SyntaxError, "42601"), lost=True, at_commit=True)
    assert isinstance(err, ConnectionLost) and err.at_commit and "may or may not" in str(err)
    err = mapped(built(psycopg2.OperationalError, None), lost=True)
    assert isinstance(err, ConnectionLost) and not err.at_commit and "nothing was stored" in str(err)


@pytest.mark.parametrize(("code", "closed", "gone"), [
    ("57P01", False, True), ("57P02", False, True), ("57P03", False, True), ("08006", False, True),
    ("57014", False, False), (None, False, False), (None, True, True), ("42601", True, True),
])
def test_is_disconnect(code: str | None, closed: bool, gone: bool) -> None:
    assert is_disconnect(built(psycopg2.OperationalError, code), SimpleNamespace(closed=closed)) is gone


def test_only_driver_errors_are_disconnects() -> None:
    assert not is_disconnect(ValueError("x"), SimpleNamespace(closed=True))


# ------------------------------------------------------------------ raised for real
@pytest.fixture
def conn(database_url: str) -> Iterator[Any]:
    c = psycopg2.connect(database_url)
    c.autocommit = True
    yield c
    c.close()


def raised(conn: Any, sql: str, *params: Any) -> psycopg2.Error:
    with pytest.raises(psycopg2.Error) as info, conn.cursor() as cur:
        cur.execute(sql, params)
    return info.value


def test_real_errors_map_as_built_ones(conn: Any) -> None:
    bid = str(uuid.uuid4())
    with conn.cursor() as cur:
        cur.execute("INSERT INTO batches (id, app, op, type, context, status, nrows) "
                    "VALUES (%s, 'errs', 'op', 'B', '{}', 'wait', 0)", (bid,))
        cur.execute("INSERT INTO batchrows (batch, line, input) VALUES (%s, 1, '{}')", (bid,))
        cur.execute("INSERT INTO batch_files (id, url, size, version, filetype, status) "
                    "VALUES (%s, 'file:///x', 1, 'v', 't', 'rejected')", (str(uuid.uuid4()),))

    dup_line = raised(conn, "INSERT INTO batchrows (batch, line, input) VALUES (%s, 1, '{}')", bid)
    assert (sqlstate(dup_line), constraint_name(dup_line)) == ("23505", "batchrows_pkey")
    assert str(mapped(dup_line)) == LINES_UNIQUE

    dup_file = raised(conn, "INSERT INTO batch_files (id, url, size, version, filetype, status) "
                            "VALUES (%s, 'file:///x', 1, 'v', 't', 'rejected')", str(uuid.uuid4()))
    assert (sqlstate(dup_file), constraint_name(dup_file)) == ("23505", "batch_files_file")
    assert isinstance(mapped(dup_file), InvalidInput) and str(mapped(dup_file)) != LINES_UNIQUE

    negative = raised(conn, "INSERT INTO batchrows (batch, line, input) VALUES (%s, -1, '{}')", bid)
    assert constraint_name(negative) == "batchrows_line_nonneg" and isinstance(mapped(negative), InvalidInput)

    assert isinstance(mapped(raised(conn, "SELECT 1 / 0")), InvalidInput)
    assert isinstance(mapped(raised(conn, "SELECT * FROM no_such_table")), DatabaseNotMigrated)
    assert isinstance(mapped(raised(conn, "SELECT no_such_column FROM batches")), DatabaseNotMigrated)
    syntax = mapped(raised(conn, "SELEC 1"))
    assert type(syntax) is AlyaError
    with conn.cursor() as cur:
        cur.execute("SET statement_timeout = 50")
    assert isinstance(mapped(raised(conn, "SELECT pg_sleep(5)")), BackendUnavailable)


def test_the_store_maps_a_duplicate_line_in_a_copy(database_url: str) -> None:
    """Through the store, as a submit meets it: the COPY's unique violation comes out as InvalidInput."""
    store = Store(database_url)
    try:
        with pytest.raises(InvalidInput, match=LINES_UNIQUE), store.tx() as q:
            new = insert_batch(q, "errs", "op", {}, iter([(1, {"a": 1}), (2, {}), (1, {"a": 2})]),
                               status=BatchStatus.WAIT, inputfile=None, max_rows=10)
            assert new.nrows == 3  # not reached: the duplicate is found at the end of the COPY
    finally:
        store.dispose()
