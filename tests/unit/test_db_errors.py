"""The one map of driver errors to alya's (``alya.db.errors``): by SQLSTATE and constraint name, never by
message text. Built psycopg2 errors, no server. (The same errors raised for real by PostgreSQL:
tests/integration/db/test_real_db_errors.py.)"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import psycopg2
import psycopg2.errors
import pytest

from alya.core.errors import AlyaError, BackendUnavailable, ConnectionLost, DatabaseNotMigrated, InvalidInput
from alya.db.errors import is_disconnect, mapped

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
