"""Hypothesis fuzzing of what callers hand in: contexts, inputs (dicts and JSON text), line
numbers, unicode, NUL, NaN and Infinity, huge integers, nesting. Every submit or append either raises
InvalidInput and stores nothing, or stores exactly what was given and reads back equal. Processor results
go through ``validate.json_text_strict`` with the same rule (refused, or written back equal)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from alya import BatchInput, InvalidInput, JobManager
from alya.core.validate import MAX_LINE, json_text_strict
from tests.support.config import make_config
from tests.support.services import sql

APP = "fuzz"
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])

special_text = st.sampled_from(["", "\x00", "a\x00b", "\\u0000", "\\", '"', "\ud800", "é", "😀", "\u2028", "null",
                                "NaN", "\t\n\r"])
texts = st.one_of(st.text(max_size=12), special_text)
numbers = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.integers(),  # beyond 64 bits too
    st.sampled_from([2**63, 2**64, -(2**63) - 1, 0, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e300, 5e-324, 1.7976931348623157e308]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(texts, inner, max_size=4),
), max_leaves=12)
wild_objects = st.dictionaries(st.one_of(texts, st.integers(0, 3)), values, max_size=5)
# Mostly storable, so that both outcomes are well explored: any unicode but NUL and lone surrogates,
# finite floats, 64-bit integers.
good_text = st.text(alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12)
good_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False,
              allow_infinity=False), good_text),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(good_text, inner, max_size=4)),
    max_leaves=12)
good_objects = st.dictionaries(good_text, good_values, max_size=5)
objects = st.one_of(good_objects, good_objects, wild_objects)


def storable(v: Any) -> bool:
    """The oracle, written independently of alya: what JSON and PostgreSQL jsonb can hold exactly."""
    if v is None or isinstance(v, bool):
        return True
    if isinstance(v, int):
        return -(2**63) <= v <= 2**64 - 1
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, str):
        if "\x00" in v:
            return False
        try:
            v.encode()
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(v, list):
        return all(storable(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and storable(k) and storable(x) for k, x in v.items())
    return False


def as_text(value: dict[str, Any]) -> str | None:
    """The JSON text a client might send for ``value`` (NaN and Infinity as JavaScript writes them)."""
    try:
        return json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        return None


def parsed(text: str) -> Any:
    """What a JSON text means, by the stdlib's reading; None when it holds NaN/Infinity or is not JSON."""
    try:
        return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except ValueError:
        return None


def expected_from_text(text: str) -> tuple[bool, Any]:
    """A JSON text is accepted when it is an object and every number is one orjson reads exactly as
    the stdlib does (integers beyond 64 bits become floats in orjson: compare what orjson reads)."""
    value = parsed(text)
    if not isinstance(value, dict) or not storable_text(value):
        return False, None
    return True, orjson.loads(text)


def storable_text(v: Any) -> bool:
    """As ``storable``, but big integers in text are fine (read as floats) unless that float overflows."""
    if isinstance(v, int) and not isinstance(v, bool):
        if -(2**63) <= v <= 2**64 - 1:
            return True
        try:
            return math.isfinite(float(v))
        except OverflowError:
            return False
    if isinstance(v, list):
        return all(storable_text(x) for x in v)
    if isinstance(v, dict):
        return all(storable(k) and storable_text(x) for k, x in v.items())
    return storable(v)


def same(a: Any, b: Any) -> bool:
    """Equal as JSON: jsonb keeps numbers as decimals, so a float written as 6.303795836671231e+16 comes
    back as the integer 63037958366712310, the same JSON number (and the same float once converted)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b)
    return type(a) is type(b) and a == b


def same_rows(got: list[tuple[int, Any]], want: list[tuple[int, Any]]) -> bool:
    want = sorted(want, key=lambda r: r[0])
    return [g[0] for g in got] == [w[0] for w in want] and all(same(g[1], w[1]) for g, w in zip(got, want, strict=True))


def lines_ok(lines: list[Any]) -> bool:
    return (len(lines) > 0 and all(type(n) is int and 1 <= n <= MAX_LINE for n in lines)
            and len(set(lines)) == len(lines))


line_numbers = st.one_of(st.integers(1, 50), st.integers(-3, MAX_LINE + 3), st.sampled_from([0, MAX_LINE, True]))


@st.composite
def submissions(draw: Any) -> tuple[Any, list[tuple[Any, Any]], bool, list[Any]]:
    """(expected context, [(line, input as given)], (context ok, rows ok), (context as given,
    [(line, expected input)]))."""
    context: Any = draw(objects)
    expected_ctx = context
    if draw(st.booleans()) and (text := as_text(context)) is not None:
        ctx_ok, expected_ctx = expected_from_text(text)
        context = text
    else:
        ctx_ok = storable(context)
    n = draw(st.integers(0, 4))
    if draw(st.integers(0, 3)):
        start = draw(st.one_of(st.integers(1, 100), st.just(MAX_LINE - n + 1)))
        lines: list[Any] = [start + i for i in range(n)]
    else:
        lines = draw(st.lists(line_numbers, min_size=n, max_size=n))
    ok = lines_ok(lines)
    rows, expected_rows = [], []
    for line in lines:
        value: Any = draw(objects)
        expected = value
        if draw(st.integers(0, 3)) == 0 and (text := as_text(value)) is not None:
            accepted, expected = expected_from_text(text)
            value, ok = text, ok and accepted
        else:
            ok = ok and storable(value)
        rows.append((line, value))
        expected_rows.append((line, expected))
    return expected_ctx, rows, (ctx_ok, ok), (context, expected_rows)


@pytest.fixture
def client(database_url: str, file_store_url: str) -> Iterator[JobManager]:
    jm = JobManager(database_url=database_url, object_store_url=file_store_url, config=make_config())
    yield jm
    jm.close()


def counts(url: str) -> tuple[int, int]:
    return sql(url, "SELECT (SELECT count(*) FROM batches), (SELECT count(*) FROM batchrows)")[0]  # type: ignore[return-value]


def stored_inputs(url: str, batch_id: str) -> list[tuple[int, Any]]:
    return [(line, orjson.loads(text)) for line, text in
            sql(url, "SELECT line, input::text FROM batchrows WHERE batch = %s ORDER BY line", batch_id)]


def as_rows(rows: list[tuple[Any, Any]], kind: int) -> list[Any]:
    if kind == 0:
        return rows
    return [BatchInput(line, value) for line, value in rows]


@FUZZ
@given(sub=submissions(), kind=st.integers(0, 1))
def test_submit_refuses_or_stores_exactly(client: JobManager, database_url: str, sub: Any, kind: int) -> None:
    expected_ctx, rows, (ctx_ok, rows_ok), (context, expected_rows) = sub
    ok = ctx_ok and rows_ok
    before = counts(database_url)
    try:
        bid = client.batch_submit(APP, "op", context, as_rows(rows, kind))
    except InvalidInput:
        event("refused")
        assert not ok, f"refused a good submit: {context!r} {rows!r}"
        assert counts(database_url) == before
        return
    event("stored")
    assert ok, f"stored a bad submit: {context!r} {rows!r}"
    assert counts(database_url) == (before[0] + 1, before[1] + len(rows))
    details = next(d for d in client.batch_list(APP) if d.id == bid)
    assert same(details.context, expected_ctx)
    assert same_rows(stored_inputs(database_url, bid), expected_rows)


@FUZZ
@given(sub=submissions())
def test_append_refuses_or_stores_exactly(client: JobManager, database_url: str, sub: Any) -> None:
    _, rows, (_, ok), (_, expected_rows) = sub
    # Lines above 50 are clear of the held batch's line 1000000 (appends may not reuse a line).
    bid = client.batch_submit(APP, "op", {}, [BatchInput(1_000_000, {"held": True})], wait=True)
    before = counts(database_url)
    try:
        total = client.batch_append(bid, as_rows(rows, 0), wait=True)
    except InvalidInput:
        assert not ok or any(line == 1_000_000 for line, _ in rows)
        assert counts(database_url) == before
        assert client.batch_status(bid).nrows == 1
        return
    assert ok
    assert total == 1 + len(rows)
    assert same_rows(stored_inputs(database_url, bid), [*expected_rows, (1_000_000, {"held": True})])


@FUZZ
@given(value=st.one_of(objects, values))
def test_results_are_refused_or_written_back_equal(value: Any) -> None:
    try:
        text = json_text_strict(value)
    except InvalidInput:
        assert not storable(value)
        return
    assert storable(value)
    assert orjson.loads(text) == value
