"""How a named SQL block is split into statements to prepare (``alya.db.prepared.split``): pure logic."""

from __future__ import annotations

from alya.db.prepared import split


def test_set_statements_stay_plain_and_the_rest_is_numbered() -> None:
    parts = split("claim", """-- a comment; with a semicolon
SET LOCAL synchronous_commit = off;
SELECT 1 FROM t WHERE a = %(a)s;  -- trailing; comment
UPDATE t SET b = %(b)s WHERE a = %(a)s AND c LIKE 'x%%'
RETURNING a;
""")
    assert [p.name for p in parts] == [None, "alya_claim_2", "alya_claim_3"]
    assert parts[0].text == "SET LOCAL synchronous_commit = off"
    assert parts[1].body == "SELECT 1 FROM t WHERE a = $1" and parts[1].params == ("a",)
    # one name, one number, in order of first use; psycopg2's %% is a plain % once the text is sent as is
    assert parts[2].body == "UPDATE t SET b = $1 WHERE a = $2 AND c LIKE 'x%'\nRETURNING a"
    assert parts[2].params == ("b", "a")
    assert parts[2].text.endswith("'x%%'\nRETURNING a")  # run through psycopg2 with parameters: kept


def test_a_single_statement_is_named_after_its_block() -> None:
    (part,) = split("get_batch", "SELECT * FROM batches WHERE id = %(id)s;")
    assert part.name == "alya_get_batch" and part.body == "SELECT * FROM batches WHERE id = $1"


def test_a_marked_block_and_other_statements_stay_plain() -> None:
    assert all(p.name is None for p in split("x", "-- prepare: no\nSELECT %(a)s;"))
    assert [p.name for p in split("sp", "SAVEPOINT alya_savepoint;")] == [None]
    assert [p.name for p in split("l", "LOCK TABLE t; with q AS (SELECT 1) SELECT * FROM q")] == [None, "alya_l_2"]
