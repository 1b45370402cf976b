"""Every refusal of a client call leaves the stored state exactly as it was: bad apps, ops, contexts,
inputs, line numbers, rows, ids; a bad row at the end of a long stream stores nothing."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import pandas as pd
import pytest

from alya import (
    BackendUnavailable,
    BatchInput,
    BatchNotFound,
    InvalidInput,
    JobManager,
)
from tests.support import services
from tests.support.client import APP, refused, rows, unchanged
from tests.support.config import make_config


@pytest.fixture(scope="module")
def shared(template_db: str) -> Iterator[tuple[JobManager, str]]:
    """One database for the refusal tests: a refusal changes nothing, so they can share it (and the
    batches seeded here make "nothing changed" mean something)."""
    name = services.clone_database(template_db)
    url = f"{services.PG_SERVER}/{name}"
    jm = JobManager(database_url=url, redis_url=services.REDIS_URL, object_store_url="memory://alya-refusals",
                    config=make_config())
    jm.batch_submit(APP, "seed", {"a": 1}, rows(10))
    jm.batch_submit(APP, "seed", {}, rows(3), wait=True)
    jm.slowquery_submit(APP, "seed", {}, {"q": 1})
    yield jm, url
    jm.close()
    services.drop_database(name)


BAD_APPS = ["Bad", "1x", "a" * 65, "", "ab-c", "ab c", "app\n", "äpp", None, 5]


BAD_OPS = ["", "1op", "a b", "op\n", "x" * 65, "op/x", None, 3]


BAD_OBJECTS = [[], [1], "[1]", "{bad json", "null", '"text"', "5", 5, None, {1: "int key"}, {"a": object()},
               {"nul": "a\x00b"}, '{"nul": "\\u0000"}', {"k\x00": 1}, b"\xff\xfe"]


@pytest.mark.parametrize("app", BAD_APPS)
def test_bad_app_refused(shared: tuple[JobManager, str], app: Any) -> None:
    jm, database_url = shared
    refused(database_url, InvalidInput, lambda: jm.batch_submit(app, "op", {}, rows(1)))
    refused(database_url, InvalidInput, lambda: jm.slowquery_submit(app, "op", {}, {}))


@pytest.mark.parametrize("op", BAD_OPS)
def test_bad_op_refused(shared: tuple[JobManager, str], op: Any) -> None:
    jm, database_url = shared
    refused(database_url, InvalidInput, lambda: jm.batch_submit(APP, op, {}, rows(1)))
    refused(database_url, InvalidInput, lambda: jm.slowquery_submit(APP, op, {}, {}))


@pytest.mark.parametrize("value", BAD_OBJECTS, ids=repr)
def test_context_and_input_must_be_json_objects(shared: tuple[JobManager, str], value: Any) -> None:
    jm, database_url = shared
    refused(database_url, InvalidInput, lambda: jm.batch_submit(APP, "op", value, rows(1)))
    refused(database_url, InvalidInput, lambda: jm.batch_submit(APP, "op", {}, [BatchInput(1, value)]))
    refused(database_url, InvalidInput, lambda: jm.batch_submit(APP, "op", {}, [*rows(50), BatchInput(51, value)]))
    refused(database_url, InvalidInput, lambda: jm.slowquery_submit(APP, "op", value, {}))
    refused(database_url, InvalidInput, lambda: jm.slowquery_submit(APP, "op", {}, value))


@pytest.mark.parametrize("line", [0, -1, True, False, 1.0, 1.5, "1", None, 2**31, float("nan")], ids=repr)
def test_bad_line_numbers_refused(shared: tuple[JobManager, str], line: Any) -> None:
    jm, database_url = shared
    refused(database_url, InvalidInput, lambda: jm.batch_submit(APP, "op", {}, [BatchInput(line, {})]))
    refused(database_url, InvalidInput, lambda: jm.batch_submit(APP, "op", {}, [(1, {}), (line, {})]))
    df = pd.DataFrame({"line": [1, line], "input": [{}, {}]})
    refused(database_url, InvalidInput, lambda: jm.batch_submit(APP, "op", {}, df))


@pytest.mark.parametrize("bad_rows", [
    [], iter(()), pd.DataFrame({"line": [], "input": []}),            # no rows at all
    [(1, {}), (2, {}), (1, {})],                                      # duplicate line
    None, "rows", b"rows", {"line": 1, "input": {}}, 5,               # not an iterable of rows
    [(1,)], [(1, {}, 3)], [[1, {}]], [{"line": 1, "input": {}}],      # rows of the wrong shape
    pd.DataFrame({"line": [1]}), pd.DataFrame({"input": [{}]}),       # missing columns
], ids=repr)
def test_bad_rows_refused(shared: tuple[JobManager, str], bad_rows: Any) -> None:
    jm, database_url = shared
    refused(database_url, InvalidInput, lambda: jm.batch_submit(APP, "op", {}, bad_rows))


def test_bad_inputfile_refused(shared: tuple[JobManager, str]) -> None:
    jm, database_url = shared
    refused(database_url, InvalidInput, lambda: jm.batch_submit(APP, "op", {}, rows(1), inputfile=5))  # type: ignore[arg-type]


def test_bad_row_at_the_end_of_a_long_stream_stores_nothing(shared: tuple[JobManager, str]) -> None:
    jm, database_url = shared

    def stream(last: Any) -> Iterator[BatchInput]:
        yield from (BatchInput(i, {"i": i, "pad": "x" * 40}) for i in range(1, 50_001))
        yield last

    for last in (BatchInput(50_001, {"nul": "\x00"}), BatchInput(0, {}), BatchInput(7, {}), BatchInput(50_001, "[]")):
        err = refused(database_url, InvalidInput, partial(jm.batch_submit, APP, "op", {}, stream(last)))
        assert not isinstance(err, BackendUnavailable)


def test_error_raised_by_the_callers_iterable_propagates_and_stores_nothing(shared: tuple[JobManager, str]) -> None:
    jm, database_url = shared
    class Boom(Exception):
        pass

    def stream() -> Iterator[BatchInput]:
        yield from rows(20_000)
        raise Boom("the caller's own error")

    with unchanged(database_url), pytest.raises(Boom):
        jm.batch_submit(APP, "op", {}, stream())


def test_unknown_and_malformed_ids(shared: tuple[JobManager, str]) -> None:
    jm, database_url = shared
    ids: list[Any] = ["3fa85f64-5717-4562-b3fc-2c963f66afa6", "not-a-uuid", "", None, 12]
    for bid in ids:
        for call in (jm.batch_status, jm.batch_done, jm.batch_abort, jm.wait_off, jm.slowquery_done,
                     jm.slowquery_abort):
            refused(database_url, BatchNotFound, partial(call, bid))
        refused(database_url, BatchNotFound, partial(jm.batch_append, bid, rows(1)))
