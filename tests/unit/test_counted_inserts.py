"""Inserts into ``batchrows`` are counted by the statements that insert (migration 0011 has no INSERT
trigger: a COPY's transition table cost 35-45 % of submit throughput). So the ways to insert rows are
fixed here: the slow query's ``insert_row`` and the ingest's COPY, each followed by ``count_inserted`` in
the same function, and ``insert_query`` (a slow query in one statement), which counts its row itself. A new
way fails this test until it counts its rows too."""

from __future__ import annotations

import re
from pathlib import Path

import alya
from alya.db.ingest import COPY_ROWS
from alya.db.transport import named_sql

ROOT = Path(alya.__file__).parent


def test_only_known_statements_insert_rows() -> None:
    inserting = sorted(name for name, sql in named_sql().items()
                       if re.search(r"INSERT\s+INTO\s+batchrows\b", sql, re.IGNORECASE))
    assert inserting == ["insert_query", "insert_row"]
    counts_itself = named_sql()["insert_query"]
    assert re.search(r"INSERT INTO batch_counts .* 'queued', pg_backend_pid\(\), 1 FROM b", counts_itself)
    assert COPY_ROWS.startswith("COPY batchrows ")
    copies = [p for p in ROOT.rglob("*.py") if re.search(r"COPY\s+batchrows\b", p.read_text())]
    assert [p.relative_to(ROOT).as_posix() for p in copies] == ["db/ingest.py"]


def test_every_insert_is_counted_where_it_is_made() -> None:
    callers = {p.relative_to(ROOT).as_posix(): p.read_text() for p in ROOT.rglob("*.py")
               if re.search(r"\.(insert_row|copy_rows)\(", p.read_text())}
    assert set(callers) == {"db/batches.py"}, sorted(callers)
    for func in re.split(r"\ndef ", callers["db/batches.py"]):
        if re.search(r"\.(insert_row|copy_rows)\(", func):
            assert "count_inserted(" in func, func.splitlines()[0]
