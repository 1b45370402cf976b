"""The map of driver errors to alya's (``alya.db.errors``) on errors PostgreSQL raises for real: the same
SQLSTATEs and constraint names as the built ones of tests/unit/test_db_errors.py, and a duplicate line in
a submit's COPY coming out of the store as InvalidInput."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest

from alya.core.errors import AlyaError, BackendUnavailable, DatabaseNotMigrated, InvalidInput
from alya.core.models import BatchStatus
from alya.db.batches import insert_batch
from alya.db.errors import constraint_name, mapped, sqlstate
from alya.db.store import Store

LINES_UNIQUE = "line numbers must be unique within a batch"


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
