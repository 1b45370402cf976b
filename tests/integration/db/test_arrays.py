"""Array parameters sent as one literal (``alya.db.arrays``): every value a write-back can carry reaches
PostgreSQL as it was, prepared or not: JSON text full of quotes and backslashes, braces and commas, the
word NULL as text (not a NULL), empty strings, newlines, non-ASCII text, None, and any float."""

from __future__ import annotations

import json
import math
from typing import Any

import psycopg2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alya import BatchInput, JobManager
from alya.db.arrays import ArrayLiteral, literals
from alya.db.store import Store

TRICKY = ['{"a": "b\\"c", "d": [1, 2]}', "NULL", "null", "", " ", "a,b", "{x}", '"', "\\", "\\\\n", "'", "''",
          "line\nbreak\ttab", "é, ü, 漢字, 🙂", None, "trailing space ", "\\N"]

# text PostgreSQL can store: no NUL character (alya refuses it before a write-back)
texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)


@pytest.fixture
def conn(database_url: str) -> Any:
    c = psycopg2.connect(database_url)
    c.autocommit = True
    yield c
    c.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.none(), texts), max_size=30))
def test_text_arrays_round_trip(conn: Any, items: list[str | None]) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT %(a)s::text[]", {"a": ArrayLiteral(items)})
        assert cur.fetchone()[0] == items


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(-2**31, 2**31 - 1), max_size=30), st.lists(st.floats(), max_size=30))
def test_number_arrays_round_trip(conn: Any, ints: list[int], floats: list[float]) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT %(i)s::int[], %(f)s::float8[]", literals(i=ints, f=floats))
        got_i, got_f = cur.fetchone()
    assert got_i == ints
    assert len(got_f) == len(floats)
    for a, b in zip(got_f, floats, strict=True):
        assert (math.isnan(a) and math.isnan(b)) or a == b


def test_the_tricky_values_in_a_prepared_statement(database_url: str) -> None:
    """Through the named, prepared write-back path: the stored JSON and NULLs are what was sent."""
    jm = JobManager(database_url=database_url)
    store = Store(database_url)
    try:
        n = len(TRICKY)
        bid = jm.batch_submit("arrays", "b", {}, [BatchInput(i, {"i": i}) for i in range(1, n + 1)])
        for round_ in range(2):  # the second write-back runs the connection's prepared statement
            with store.tx() as q:
                rows = q.claim_rows(batch=bid, n=n if round_ else 1, worker="w", after=0)
            lines = [r.line for r in rows]
            res = [None if TRICKY[i - 1] is None else json.dumps(TRICKY[i - 1]) for i in lines]
            with store.tx() as q:
                written = q.write_results(batch=bid, worker="w", lines=lines, attempts=[r.attempts for r in rows],
                                          statuses=["success"] * len(rows), res=res, messages=res, blobrows=res,
                                          delays=[0.0] * len(rows), finished=[0.0] * len(rows))
            assert written.written == len(rows)
        with store.tx() as q:
            stored = {r.line: r for r in q.batch_rows(id=bid)}
        for i, text in enumerate(TRICKY, 1):
            assert stored[i].res == (None if text is None else text), i  # res: jsonb of the JSON string
    finally:
        store.dispose()
        jm.close()


def test_an_unknown_item_type_is_refused() -> None:
    with pytest.raises(TypeError):
        ArrayLiteral([{"a": 1}])  # type: ignore[list-item]
