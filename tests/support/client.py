"""Helpers of the tests of the client calls (submit, append, status, abort; tests/integration/submit,
append, status and abort): what is stored, checks that a refused call changed nothing, and a simple
processor driven by line numbers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from alya import (
    AlyaError,
    BatchDetails,
    BatchInput,
    BatchJobResult,
    BatchStatus,
    ErrorMessage,
    JobManager,
    SlowQueryResult,
)
from alya.core.names import summary_key
from tests.support.services import sql

APP = "client"
S = BatchStatus


def db_state(database_url: str) -> tuple[Any, ...]:
    """Row counts and a digest of every stored value of batches and batchrows."""
    return tuple(sql(database_url, """
        SELECT (SELECT count(*) FROM batches),
               (SELECT md5(coalesce(string_agg(b::text, '|' ORDER BY b.id), '')) FROM batches b),
               (SELECT count(*) FROM batchrows),
               (SELECT md5(coalesce(string_agg(r::text, '|' ORDER BY r.batch, r.line), '')) FROM batchrows r)
    """)[0])


@contextmanager
def unchanged(database_url: str, jm: JobManager | None = None, batch_id: str | None = None) -> Iterator[None]:
    """The block must leave PostgreSQL (and the batch's cached summary, if given) exactly as it was."""
    before = db_state(database_url)
    cached = _cached(jm, batch_id)
    yield
    assert db_state(database_url) == before
    assert _cached(jm, batch_id) == cached


def _cached(jm: JobManager | None, batch_id: str | None) -> Any:
    if jm is None or batch_id is None:
        return None
    return jm.cache._redis.get(summary_key(batch_id))  # type: ignore[union-attr]


def refused(database_url: str, exc: type[AlyaError], fn: Callable[[], Any], *, jm: JobManager | None = None,
            batch_id: str | None = None) -> AlyaError:
    with unchanged(database_url, jm, batch_id), pytest.raises(exc) as info:
        fn()
    assert isinstance(info.value, AlyaError)
    return info.value


def rows(n: int, start: int = 1) -> list[BatchInput]:
    return [BatchInput(i, {"i": i}) for i in range(start, start + n)]


class Proc:
    """A batch processor: rows whose line is in ``fail`` fail with a message, the others succeed."""

    def __init__(self, fail: set[int] | None = None) -> None:
        self.fail = fail or set()
        self.done: list[BatchDetails] = []

    def do_batch_job(self, initblock: Any, context: dict[str, Any], line: int, input: dict[str, Any]
                     ) -> BatchJobResult:
        if line in self.fail:
            return BatchJobResult(S.FAILED, messages=[ErrorMessage(7, "bad_line", field="i", vals=[str(line)])])
        return BatchJobResult(S.SUCCESS, result={"line": line, "input": input, "user": context.get("user")})

    def mark_done(self, initblock: Any, context: dict[str, Any], details: BatchDetails) -> None:
        self.done.append(details)


class QueryProc:
    def do_slow_query(self, initblock: Any, context: dict[str, Any], input: dict[str, Any]) -> SlowQueryResult:
        if input.get("fail"):
            return SlowQueryResult(S.FAILED, messages=[ErrorMessage(3, "nope")])
        return SlowQueryResult(S.SUCCESS, result={"echo": input, "ctx": context})

    def mark_done(self, initblock: Any, context: dict[str, Any], details: BatchDetails) -> None:
        pass


def run_chunks(jm: JobManager, app: str, op: str, max_chunks: int = 1000) -> int:
    """Process queued rows of (app, op) chunk by chunk until none is left; returns the chunks run."""
    for n in range(max_chunks):
        if jm.engine.process_chunk(app, op).batch is None:
            return n
    raise AssertionError("work never ran out")


def finished(jm: JobManager, op: str, lines: list[int], fail: set[int] | None = None,
             context: dict[str, Any] | None = None) -> str:
    jm.register_batch_processor(APP, op, Proc(fail))
    bid = jm.batch_submit(APP, op, context or {"user": "u1"}, [BatchInput(i, {"i": i}) for i in lines])
    run_chunks(jm, APP, op)
    return bid


def stored(url: str) -> tuple[int, int]:
    """How many batches and rows the database holds."""
    return sql(url, "SELECT (SELECT count(*) FROM batches), (SELECT count(*) FROM batchrows)")[0]  # type: ignore[return-value]
