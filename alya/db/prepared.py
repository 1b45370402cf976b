"""Server-side prepared statements for the named SQL (``sql/*.sql``), one set per pooled connection.

Why: psycopg2 sends every statement as text, so PostgreSQL plans it again at every call. Since
``batchrows`` is partitioned (migration 0012), planning is most of a hot statement's cost: the claim's
list of open batches took 2.3 ms, 1.7 of them planning over the week partitions, and a slow query on an idle
worker runs about twenty statements. Prepared once per connection, a statement is planned once (PostgreSQL
keeps a generic plan with run-time partition pruning when it is as cheap as the custom ones, else
re-plans; either way the parse and analysis are done).

How: each statement of a named block that is a SELECT, WITH, INSERT, UPDATE or DELETE becomes
``PREPARE alya_<name>_<i> AS …`` with ``$n`` parameters, the first time a connection runs it; what
follows is ``EXECUTE alya_<name>_<i>(%(p)s::type, …)``, the block's other statements (``SET LOCAL``) kept as
they are, all in one round trip as before. The parameters' types come from ``pg_prepared_statements`` and
are written out as casts, so a value means what it meant in the plain statement (an ``ARRAY['…']`` of
text into a ``uuid[]`` parameter is not an implicit cast).

Off (``ALYA_PREPARED_STATEMENTS=off``) behind a pooler in transaction mode (PgBouncer), where the next
transaction may run on a server connection that never saw the ``PREPARE``.

A statement that must stay plain carries ``-- prepare: no`` in its block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

_PARAM = re.compile(r"%\((\w+)\)s")
_COMMENT = re.compile(r"--[^\n]*")
_PREPARABLE = ("SELECT", "WITH", "INSERT", "UPDATE", "DELETE")
NO_PREPARE = "-- prepare: no"
CACHE_KEY = "alya_prepared"  # in the pooled connection's ``info`` (cleared when SQLAlchemy reconnects)


@dataclass(frozen=True)
class Part:
    """One statement of a named block: its text as psycopg2 runs it, and, when it can be prepared, the
    name it is prepared under, its text with ``$n`` parameters and the parameter names in ``$n`` order."""

    text: str
    name: str | None = None
    body: str | None = None
    params: tuple[str, ...] = ()


def split(name: str, sql: str) -> tuple[Part, ...]:
    """The block's statements, each marked preparable or not. Comments are dropped first (a ``;`` in one
    would split a statement); none of alya's statements has a ``;`` or ``--`` inside a string."""
    plain = NO_PREPARE in sql
    code = _COMMENT.sub("", sql)
    texts = [s.strip() for s in code.split(";") if s.strip()]
    parts = []
    for i, text in enumerate(texts, 1):
        if plain or text.split(None, 1)[0].upper() not in _PREPARABLE:
            parts.append(Part(text))
            continue
        names: list[str] = []

        def number(m: re.Match[str], names: list[str] = names) -> str:
            if m.group(1) not in names:
                names.append(m.group(1))
            return f"${names.index(m.group(1)) + 1}"

        body = _PARAM.sub(number, text).replace("%%", "%")
        parts.append(Part(text, f"alya_{name}_{i}" if len(texts) > 1 else f"alya_{name}", body, tuple(names)))
    return tuple(parts)


@cache
def parts_of(name: str, sql: str) -> tuple[Part, ...]:
    return split(name, sql)


def executable(cur: Any, cache_: dict[str, str], name: str, sql: str) -> str:
    """The text to run for block ``name`` on the connection of ``cur`` (whose prepared statements are in
    ``cache_``): prepares its statements there the first time (three round trips, once per connection)."""
    text = cache_.get(name)
    if text is not None:
        return text
    parts = parts_of(name, sql)
    todo = [p for p in parts if p.name is not None]
    if not todo:
        text = sql
    else:
        types = _types(cur, [p.name for p in todo if p.name])
        missing = [p for p in todo if p.name not in types]  # (one prepared before a failure: kept, not again)
        if missing:
            cur.execute(";\n".join(f"PREPARE {p.name} AS {p.body}" for p in missing))
            types = _types(cur, [p.name for p in todo if p.name])
        out = []
        for p in parts:
            if p.name is None:
                out.append(p.text)
                continue
            args = ", ".join(f"%({n})s::{t}" for n, t in zip(p.params, types[p.name], strict=True))
            out.append(f"EXECUTE {p.name}({args})" if p.params else f"EXECUTE {p.name}")
        text = ";\n".join(out)
    cache_[name] = text
    return text


def _types(cur: Any, names: list[str]) -> dict[str, list[str]]:
    """Parameter types of the prepared statements of these names that exist on the connection."""
    cur.execute("SELECT name, parameter_types::text[] FROM pg_prepared_statements WHERE name = ANY(%s)", (names,))
    return {n: list(t or []) for n, t in cur.fetchall()}


def stale(exc: Exception) -> bool:
    """Whether a statement failed because the connection's prepared statements are gone (``DEALLOCATE ALL``
    or ``DISCARD ALL`` behind alya's back, a pooler that moved the session) or their plans no longer fit the
    tables (a migration changed a result's columns under a live process). Nothing ran: prepare again."""
    code = getattr(exc, "pgcode", None)
    return code == "26000" or (code == "0A000" and "cached plan must not change result type" in str(exc))


def reset(conn: Any) -> None:
    """After :func:`stale` (the transaction rolled back): drop the connection's prepared statements, here and
    on the server, so that the next transaction prepares them again."""
    forget(conn)
    try:
        with conn.cursor() as cur:
            cur.execute("DEALLOCATE ALL")
        conn.commit()
    except Exception:  # the connection is unusable: the pool's next use finds out, as for any dead one
        pass


def forget(conn: Any) -> None:
    """The connection's prepared statements are gone or stale (``DEALLOCATE ALL`` was sent): prepare again."""
    info = getattr(conn, "info", None)
    if isinstance(info, dict):
        info.pop(CACHE_KEY, None)


def cache_of(conn: Any) -> dict[str, str] | None:
    """The prepared-statement cache of a pooled connection; None for a connection that has no ``info``
    dictionary of its own (a bare psycopg2 connection: its statements run plain)."""
    info = getattr(conn, "info", None)
    if not isinstance(info, dict):
        return None
    found = info.get(CACHE_KEY)
    if found is None:
        found = info[CACHE_KEY] = {}
    return found  # type: ignore[no-any-return]
