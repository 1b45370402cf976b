"""The typed query layer (``alya.db.queries``) against ``sql/queries.sql``, and the rule that no code above
``alya.db`` names a query by string. Pure: no service needed (the SQL is read from the package)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import alya
from alya.db.queries import Queries, check_methods, query_methods, unmatched
from alya.db.transport import OWN_STATEMENTS, named_sql

ALYA = Path(alya.__file__).parent
REPO = ALYA.parent

# Transport verbs that take a query name: ``x.run("name", ...)``, ``x.record(Kind, "name", ...)``.
VERBS = frozenset({"run", "one", "all", "record", "records", "value", "column", "stream", "copy_in"})

# Code allowed to name queries by string.
EXEMPT = (
    "alya/db/",  # the query layer and its transport
)
SCANNED = ("alya", "flows", "bench", "tests")


def test_every_named_query_has_a_method_and_every_method_a_query() -> None:
    check_methods()
    assert unmatched(named_sql()) == ([], [])
    assert set(query_methods().values()) | OWN_STATEMENTS == set(named_sql())


def test_a_query_without_a_method_fails_the_check() -> None:
    sql = {*named_sql(), "brand_new_query"}
    assert unmatched(sql) == (["brand_new_query"], [])
    with pytest.raises(RuntimeError, match="brand_new_query"):
        check_methods(sql)


def test_a_method_without_its_query_fails_the_check() -> None:
    """A misspelt method is a method whose query does not exist (and the query then has no method)."""
    sql = set(named_sql()) - {"claim_rows", "batch_blobrows"}
    assert unmatched(sql) == ([], ["claim_rows", "stream_batch_blobrows"])
    with pytest.raises(RuntimeError, match="claim_rows"):
        check_methods(sql)


def _literal_queries(fn: ast.FunctionDef) -> list[str]:
    """The query names a method passes to its transport (``self._tx.<verb>("name", ...)``)."""
    found = []
    for node in ast.walk(fn):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "_tx"
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append(node.args[0].value)
    return found


def test_each_method_runs_the_query_of_its_name() -> None:
    """The name ties a method to its SQL: a method running another query's SQL would pass the check above."""
    tree = ast.parse(Path(inspect.getfile(Queries)).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Queries")
    methods = {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}
    expected = {**query_methods(), "_notify": "notify_work"}
    for name, fn in methods.items():
        literals = _literal_queries(fn)
        if name in expected and name not in ("notify_work", "savepoint"):  # via _notify; via the transport
            assert literals == [expected[name]], (name, literals)
        elif name not in expected:
            assert literals == [], (name, literals)  # helpers take the name as given
    assert _literal_queries(methods["_notify"]) == ["notify_work"]


def test_parameters_are_keyword_only_and_named_as_in_the_sql() -> None:
    for method, query in query_methods().items():
        if method in ("notify_work", "savepoint"):  # the channel and payload are the method's to choose
            continue
        params = inspect.signature(getattr(Queries, method)).parameters
        names = {p for p in params if p not in ("self", "itersize")}
        assert all(params[p].kind is inspect.Parameter.KEYWORD_ONLY for p in names), method
        expected = set(re.findall(r"%\((\w+)\)s", named_sql()[query]))
        if method == "write_results":
            expected.add("finished")  # taken for symmetry with write_results_late
        if method == "insert_query":  # it notifies as notify_work does: channel and payload from alya.core.names
            expected -= {"channel", "payload"}
        assert names == expected, (method, names ^ expected)


def test_the_notify_methods_are_the_only_ways_to_notify() -> None:
    """Four meanings, one statement: every payload comes from alya.core.names inside Queries."""
    assert {m for m in dir(Queries) if m.startswith("notify")} == {"notify_work", "notify_any_work", "notify_abort",
                                                                   "notify_paused"}
    assert [p.name for p in inspect.signature(Queries.notify_work).parameters.values()] == ["self", "app", "op"]


# ------------------------------------------------------------------ no query named by string above alya.db
def string_queries(source: str, where: str) -> list[str]:
    """Transport calls in ``source`` that name a query of sql/queries.sql by a string literal."""
    known = set(named_sql())
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in VERBS:
            for arg in node.args[:2]:  # record(Kind, "name") names it second
                if isinstance(arg, ast.Constant) and arg.value in known:
                    found.append(f"{where}:{node.lineno} .{node.func.attr}({arg.value!r})")
    return found


def test_the_scan_finds_transport_calls_by_name() -> None:
    source = 'tx.run("forget_worker", id=1)\nq.record(Kind, "get_batch", id=2)\nq.one("notify_work")\nx.run(f)\n'
    assert [f.split(" ")[1] for f in string_queries(source, "s")] == [
        ".run('forget_worker')", ".record('get_batch')", ".one('notify_work')"]


def test_no_query_is_named_by_string_outside_alya_db() -> None:
    """Above alya.db, queries are methods: a query named by string is a misspelling waiting to happen."""
    offenders = []
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if not rel.startswith(EXEMPT):
                offenders += string_queries(path.read_text(), rel)
    assert not offenders, offenders


def test_the_transport_stays_inside_alya_db() -> None:
    """Above alya.db a transaction is a Queries: nothing there imports the transport (tests/faults.py's
    statement hook is the one seam the tests use)."""
    offenders = []
    for path in sorted(ALYA.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("alya/db/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{rel}:{node.lineno}" for m in modules if m == "alya.db.transport"]
    assert not offenders, offenders
