"""Array parameters sent as one array literal (``'{1,2,3}'``) instead of psycopg2's ``ARRAY[1,2,3]``.

Why: a write-back passes eight arrays of up to a chunk's rows. psycopg2 writes a list as ``ARRAY[…]`` with
one quoted SQL literal per item, built item by item in the worker, and PostgreSQL then parses each item as
an expression of the statement's text. Measured on the no-op path, that quoting was about a quarter of a
worker's CPU (py-spy, GIL held), with both cores busy. One literal per array is built with a ``join`` and
read by PostgreSQL's array input function, which is what the statements' casts (``::int[]``, ``::text[]``)
then see anyway: the same values, typed by the same casts.

Only lists of ``int``, ``float``, ``str`` or ``None`` (NULL): what the hot statements pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from psycopg2.extensions import ISQLQuote, QuotedString


class ArrayLiteral:
    """A list as one array literal; adapted by psycopg2 through ``__conform__`` (quoted for the connection's
    encoding and ``standard_conforming_strings`` by psycopg2's own ``QuotedString``)."""

    __slots__ = ("_quoted", "text")

    def __init__(self, items: Sequence[int | float | str | None]) -> None:
        self.text = "{" + ",".join(_item(x) for x in items) + "}"
        self._quoted = QuotedString(self.text)

    def __conform__(self, proto: Any) -> ArrayLiteral | None:
        return self if proto is ISQLQuote else None

    def prepare(self, conn: Any) -> None:
        self._quoted.prepare(conn)

    def getquoted(self) -> bytes:
        return self._quoted.getquoted()  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"ArrayLiteral({self.text[:60]!r})"


def _item(x: int | float | str | None) -> str:
    if x is None:
        return "NULL"
    if isinstance(x, bool):  # (a bool is an int: say it as PostgreSQL does)
        return "t" if x else "f"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        return repr(x) if math.isfinite(x) else ("Infinity" if x > 0 else "-Infinity")
    if isinstance(x, str):
        return '"' + x.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"an array item must be int, float, str or None, not {type(x).__name__}")


def literals(**arrays: Sequence[int | float | str | None]) -> dict[str, ArrayLiteral]:
    """Keyword arrays as array literals, for a named statement's parameters."""
    return {k: ArrayLiteral(v) for k, v in arrays.items()}
