"""Driver errors as alya's errors, in one place, so that nothing above ``alya.db`` ever catches psycopg2.

Errors are told apart by their SQLSTATE (the five-character code PostgreSQL sends with every error, psycopg2's
``exc.pgcode``) and, where one SQLSTATE means different things to alya, by the constraint it names
(``exc.diag.constraint_name``). Never by message text: that changes with the server's version and its
``lc_messages``, and a test of it silently stops matching. Only errors raised by the client library itself
(a connection that could not be made or is closed) carry no SQLSTATE; they are told apart by class.
"""

from __future__ import annotations

from typing import Any

import psycopg2

from alya.core.errors import AlyaError, BackendUnavailable, ConnectionLost, DatabaseNotMigrated, InvalidInput
from alya.core.names import parent_constraint

# Statements of a schema that is missing or older than this code: undefined_table, undefined_column.
NOT_MIGRATED = frozenset({"42P01", "42703"})

# A value or row the database refuses: data_exception (22), integrity_constraint_violation (23).
REFUSED_CLASSES = frozenset({"22", "23"})

# The server or the connection failing, not the statement: the classes psycopg2 raises as OperationalError
# (connection exception, invalid statement/transaction/authorization state, invalid cursor name,
# transaction rollback (deadlock, serialization), insufficient resources, program limit exceeded, object
# not in prerequisite state (lock not available), operator intervention (query canceled, admin shutdown),
# system error, foreign data wrapper).
UNAVAILABLE_CLASSES = frozenset({"08", "26", "27", "28", "34", "40", "53", "54", "55", "57", "58", "HV"})

# admin_shutdown, crash_shutdown, cannot_connect_now: the server is ending this connection.
DISCONNECT_STATES = frozenset({"57P01", "57P02", "57P03"})

UNIQUE_VIOLATION = "23505"

# (SQLSTATE, constraint) whose meaning is the caller's mistake, said in the caller's terms.
CONSTRAINTS: dict[tuple[str, str], str] = {
    # batchrows is keyed by (batch, line): a COPY or insert of a line twice
    (UNIQUE_VIOLATION, "batchrows_pkey"): "line numbers must be unique within a batch",
}


def sqlstate(exc: BaseException) -> str | None:
    """The error's SQLSTATE, or None for an error raised by the client library itself."""
    code = getattr(exc, "pgcode", None)
    return code if isinstance(code, str) and code else None


def constraint_name(exc: BaseException) -> str | None:
    """The constraint's name as the models declare it: a partition of batchrows reports its own
    (``batchrows_w20261130_pkey``), which is named after the parent's (``batchrows_pkey``)."""
    diag = getattr(exc, "diag", None)
    name = getattr(diag, "constraint_name", None) if diag is not None else None
    return parent_constraint(name) if isinstance(name, str) and name else None


def is_disconnect(exc: BaseException, conn: Any) -> bool:
    """Whether a driver error means the connection is gone (closed by the server, or the server said it
    is ending it: a terminated backend can report that before the socket is seen closed)."""
    if not isinstance(exc, psycopg2.Error):
        return False
    if conn is not None and conn.closed:
        return True
    code = sqlstate(exc) or ""
    return code in DISCONNECT_STATES or code.startswith("08")


def mapped(exc: psycopg2.Error, lost: bool = False, at_commit: bool = False) -> AlyaError:
    """The alya error for a driver error (the transaction is already rolled back). ``lost``: the
    connection is gone (``is_disconnect``); ``at_commit``: it went while the COMMIT was under way."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if lost:
        when = "at commit (the commit may or may not have been applied)" if at_commit else \
            "before commit (nothing was stored)"
        return ConnectionLost(f"PostgreSQL connection lost {when}: {type(exc).__name__}: {first}", at_commit)
    code = sqlstate(exc)
    if code is None:  # raised by libpq/psycopg2 itself: no server was heard
        if isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError):
            return BackendUnavailable(f"PostgreSQL failed: {type(exc).__name__}: {first}")
        return AlyaError(f"PostgreSQL refused a statement: {type(exc).__name__}: {first}")
    if code in NOT_MIGRATED:
        return DatabaseNotMigrated(f"the alya schema is missing or out of date ({first}): run `alya migrate` "
                                   "(or alya.migrate_database(url)) against this database")
    said = CONSTRAINTS.get((code, constraint_name(exc) or ""))
    if said is not None:
        return InvalidInput(said)
    if code[:2] in REFUSED_CLASSES:
        return InvalidInput(f"refused by the database: {first}")
    if code[:2] in UNAVAILABLE_CLASSES:
        return BackendUnavailable(f"PostgreSQL failed: {type(exc).__name__}: {first}")
    return AlyaError(f"PostgreSQL refused a statement: {type(exc).__name__}: {first}")
