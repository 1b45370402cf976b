"""The client side of the contract on the real PostgreSQL and Redis: every call, and every refusal leaving
the stored state exactly as it was."""

from __future__ import annotations

import gc
import json
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, cast

import pandas as pd
import pytest
import redis
import structlog.testing

from alya import (
    AlyaError,
    BackendUnavailable,
    BatchDetails,
    BatchDone,
    BatchInput,
    BatchJobResult,
    BatchNotFound,
    BatchStatus,
    BatchSummary,
    ErrorMessage,
    InvalidInput,
    InvalidState,
    JobManager,
    ProcessorNotFound,
    SlowQueryDone,
    SlowQueryResult,
)
from alya.core.names import summary_key
from tests import services
from tests.conftest import make_config
from tests.services import sql

APP = "client"
S = BatchStatus


# ---------------------------------------------------------------------------------------------- helpers


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


# ---------------------------------------------------------------------------------------------- submit
def test_submit_batchinputs_stores_batch_and_rows(jm: JobManager, database_url: str) -> None:
    bid = jm.batch_submit(APP, "MixedCase", {"user": "u1", "n": [1, 2]}, rows(5))
    (app, op, type_, status, context, inputfile, nrows), = sql(
        database_url, "SELECT app, op, type, status::text, context, inputfile, nrows FROM batches WHERE id = %s", bid)
    assert (app, op, type_, status, inputfile, nrows) == (APP, "mixedcase", "B", "queued", None, 5)
    assert context == {"user": "u1", "n": [1, 2]}
    stored = sql(database_url, "SELECT line, input, status::text, attempts FROM batchrows WHERE batch = %s "
                               "ORDER BY line", bid)
    assert stored == [(i, {"i": i}, "queued", 0) for i in range(1, 6)]
    s = jm.batch_status(bid)
    assert isinstance(s, BatchSummary)
    assert (s.status, s.nrows, s.nqueued, s.ninprog, s.nsuccess, s.nfailed, s.naborted) == (S.QUEUED, 5, 5, 0, 0, 0, 0)
    assert s.outputfiles == {}


def test_submit_tuples_json_text_and_inputfile(jm: JobManager, database_url: str) -> None:
    bid = jm.batch_submit(APP, "op", '{"user": "u2"}', [(3, '{"a": 1}'), (1, {"b": [True, None]}), (2, b'{"c": 2}')],
                          inputfile="uploads/in.csv")
    assert sql(database_url, "SELECT context, inputfile FROM batches WHERE id = %s", bid) == [
        ({"user": "u2"}, "uploads/in.csv")]
    assert sql(database_url, "SELECT line, input FROM batchrows WHERE batch = %s ORDER BY line", bid) == [
        (1, {"b": [True, None]}), (2, {"c": 2}), (3, {"a": 1})]


def test_submit_dataframe(jm: JobManager, database_url: str) -> None:
    df = pd.DataFrame({"line": [10, 20, 30], "input": [{"x": 1}, '{"x": 2}', {"x": "three"}], "extra": [1, 2, 3]})
    bid = jm.batch_submit(APP, "df", {}, df)
    assert jm.batch_status(bid).nrows == 3
    assert sql(database_url, "SELECT line, input FROM batchrows WHERE batch = %s ORDER BY line", bid) == [
        (10, {"x": 1}), (20, {"x": 2}), (30, {"x": "three"})]


def test_submit_values_survive_copy_escaping(jm: JobManager, database_url: str) -> None:
    """COPY text format gives tab, newline and backslash meanings: every value must arrive unchanged."""
    tricky: list[dict[str, Any]] = [
        {"tab": "a\tb", "nl": "x\ny\r\n", "bs": "C:\\dir\\n", "q": "\"quoted\" 'single'"},
        {"uni": "żółć 日本 🙂", "ctrl": "\x01\x1f\x7f", "ls": "\u2028\u2029", "empty": ""},
        {"nested": {"deep": [[{"k": "\\\\"}]]}, "num": 1.5e300, "neg": -0, "big": 2**62, "null": None},
        {"\\N": "\\N", "key\twith\ttabs": "\\.", "dot": "."},
        {"not_nul": "\\u0000", "also_not": "\\\\u0000 \\x00"},  # backslash-u text, not a NUL character
    ]
    bid = jm.batch_submit(APP, "escapes", {"ctx": "\t\\\n"}, [BatchInput(i + 1, v) for i, v in enumerate(tricky)])
    got = sql(database_url, "SELECT input FROM batchrows WHERE batch = %s ORDER BY line", bid)
    assert [g[0] for g in got] == tricky
    assert sql(database_url, "SELECT context FROM batches WHERE id = %s", bid) == [({"ctx": "\t\\\n"},)]


def test_submit_wait_holds_batch(jm: JobManager) -> None:
    jm.register_batch_processor(APP, "held", Proc())
    bid = jm.batch_submit(APP, "held", {}, rows(3), wait=True)
    s = jm.batch_status(bid)
    assert (s.status, s.nrows) == (S.WAIT, 3)
    assert run_chunks(jm, APP, "held") == 0  # workers do not see a wait batch
    assert jm.batch_status(bid).status is S.WAIT


def test_submit_max_line_and_large_line_numbers(jm: JobManager, database_url: str) -> None:
    bid = jm.batch_submit(APP, "op", {}, [BatchInput(2**31 - 1, {}), BatchInput(1, {})])
    assert sql(database_url, "SELECT max(line) FROM batchrows WHERE batch = %s", bid) == [(2**31 - 1,)]


def test_submit_app_of_64_chars_is_accepted(jm: JobManager) -> None:
    app = "a" * 64
    bid = jm.batch_submit(app, "o" * 64, {}, rows(1))
    assert [d.id for d in jm.batch_list(app)] == [bid]


def test_status_changes_are_logged_with_app_op_and_batch(jm: JobManager) -> None:
    with structlog.testing.capture_logs() as logs:
        bid = jm.batch_submit(APP, "logged", {}, rows(2), wait=True)
        jm.batch_append(bid, rows(1, start=3))
        jm.batch_abort(bid)
    changes = [(e["app"], e["op"], e.get("old"), e["new"]) for e in logs
               if e["event"] == "status_change" and e.get("batch") == bid]
    assert changes == [(APP, "logged", None, "wait"), (APP, "logged", "wait", "queued"),
                       (APP, "logged", "queued", "aborted")]
    json.dumps(logs, default=str)  # every field renders as JSON


# ---------------------------------------------------------------------------------------------- append / wait_off
def test_append_and_release(jm: JobManager, database_url: str) -> None:
    bid = jm.batch_submit(APP, "app", {}, rows(3), wait=True)
    assert jm.batch_append(bid, rows(2, start=4), wait=True) == 5
    assert jm.batch_status(bid).status is S.WAIT
    df = pd.DataFrame({"line": [6, 7], "input": [{"i": 6}, {"i": 7}]})
    assert jm.batch_append(bid, df, wait=True) == 7
    assert jm.batch_append(bid, [(8, '{"i": 8}')]) == 8  # wait=False releases it
    s = jm.batch_status(bid)
    assert (s.status, s.nrows, s.nqueued) == (S.QUEUED, 8, 8)
    assert sql(database_url, "SELECT nrows, status::text FROM batches WHERE id = %s", bid) == [(8, "queued")]
    assert sql(database_url, "SELECT array_agg(line ORDER BY line) FROM batchrows WHERE batch = %s", bid) == [
        (list(range(1, 9)),)]
    # no longer wait: appending is refused and changes nothing
    refused(database_url, InvalidState, lambda: jm.batch_append(bid, rows(1, start=9)), jm=jm, batch_id=bid)


def test_batchrowmax_enforced_on_submit_and_across_appends(database_url: str, redis_url: str,
                                                           file_store_url: str) -> None:
    jm = JobManager(database_url=database_url, redis_url=redis_url, object_store_url=file_store_url,
                    config=make_config(batchrowmax=5))
    try:
        refused(database_url, InvalidInput, lambda: jm.batch_submit(APP, "op", {}, rows(6)))
        bid = jm.batch_submit(APP, "op", {}, rows(3), wait=True)
        refused(database_url, InvalidInput, lambda: jm.batch_append(bid, rows(3, start=4)), jm=jm, batch_id=bid)
        assert jm.batch_append(bid, rows(2, start=4), wait=True) == 5
        refused(database_url, InvalidInput, lambda: jm.batch_append(bid, rows(1, start=6)), jm=jm, batch_id=bid)
        assert jm.wait_off(bid) == 5
        assert jm.batch_submit(APP, "op", {}, rows(5))
    finally:
        jm.close()


def test_append_refusals(jm: JobManager, database_url: str) -> None:
    bid = jm.batch_submit(APP, "app", {}, rows(3), wait=True)
    cases: list[tuple[Any, type[AlyaError]]] = [
        (rows(1, start=2), InvalidInput),                       # line already in the batch
        ([], InvalidInput),                                     # nothing to append
        ([BatchInput(9, cast(Any, [1]))], InvalidInput),        # input not an object
        ([BatchInput(0, {})], InvalidInput),                    # line out of range
    ]
    for bad, exc in cases:
        refused(database_url, exc, partial(jm.batch_append, bid, bad), jm=jm, batch_id=bid)
    refused(database_url, BatchNotFound, lambda: jm.batch_append("00000000-0000-0000-0000-000000000000", rows(1)))
    refused(database_url, BatchNotFound, lambda: jm.batch_append("nope", rows(1)))
    qid = jm.slowquery_submit(APP, "q", {}, {})
    refused(database_url, InvalidState, lambda: jm.batch_append(qid, rows(1)), jm=jm, batch_id=qid)
    assert jm.batch_status(bid).nrows == 3


def test_wait_off(jm: JobManager, database_url: str) -> None:
    jm.register_batch_processor(APP, "wo", Proc())
    bid = jm.batch_submit(APP, "wo", {}, rows(250), wait=True)
    assert jm.wait_off(bid) == 250
    assert jm.batch_status(bid).status is S.QUEUED
    with unchanged(database_url, jm, bid):
        assert jm.wait_off(bid) == 250  # queued: no-op
    jm.engine.process_chunk(APP, "wo")  # one chunk of 100: the batch is now inprog
    assert sql(database_url, "SELECT status::text FROM batches WHERE id = %s", bid) == [("inprog",)]
    refused(database_url, InvalidState, lambda: jm.wait_off(bid))
    run_chunks(jm, APP, "wo")
    assert jm.batch_status(bid).status is S.SUCCESS
    refused(database_url, InvalidState, lambda: jm.wait_off(bid))
    aborted = jm.batch_submit(APP, "wo2", {}, rows(1), wait=True)
    jm.batch_abort(aborted)
    refused(database_url, InvalidState, lambda: jm.wait_off(aborted))
    refused(database_url, BatchNotFound, lambda: jm.wait_off("8d3e4a0c-0000-4000-8000-000000000000"))
    refused(database_url, BatchNotFound, lambda: jm.wait_off("not-a-uuid"))


# ---------------------------------------------------------------------------------------------- status / done
def test_status_and_done_while_open(jm: JobManager) -> None:
    jm.register_batch_processor(APP, "open", Proc())
    bid = jm.batch_submit(APP, "open", {}, rows(250))
    done = jm.batch_done(bid)
    assert isinstance(done, BatchDone)
    assert (done.status, done.rows, done.nsuccess, done.nfailed, done.naborted) == (S.QUEUED, None, 0, 0, 0)
    jm.engine.process_chunk(APP, "open")
    jm.cache.delete(summary_key(bid))  # counts move between cache periods; read them fresh
    s = jm.batch_status(bid)
    assert (s.status, s.nsuccess, s.nqueued, s.ninprog) == (S.INPROG, 100, 150, 0)
    assert jm.batch_done(bid).rows is None


def test_done_of_finished_batches(jm: JobManager, database_url: str) -> None:
    proc = Proc()
    jm.register_batch_processor(APP, "fin", proc)
    bid = jm.batch_submit(APP, "fin", {"user": "ann"}, [BatchInput(i, {"i": i}) for i in (5, 3, 250, 1, 120)])
    run_chunks(jm, APP, "fin")
    done = jm.batch_done(bid)
    assert (done.status, done.nsuccess, done.nfailed, done.naborted) == (S.SUCCESS, 5, 0, 0)
    assert done.rows is not None
    assert [r.line for r in done.rows] == [1, 3, 5, 120, 250]
    assert all(r.status is S.SUCCESS and r.messages == [] for r in done.rows)
    assert done.rows[0].res == {"line": 1, "input": {"i": 1}, "user": "ann"}
    assert jm.batch_done(bid) == done  # second call (cached) is the same
    s = jm.batch_status(bid)
    assert (s.status, s.nrows, s.nsuccess, s.nqueued, s.ninprog) == (S.SUCCESS, 5, 5, 0, 0)
    assert [d.id for d in proc.done] == [bid]

    fid = finished(jm, "fin2", list(range(1, 8)), fail={2, 6})
    done = jm.batch_done(fid)
    assert (done.status, done.nsuccess, done.nfailed, done.naborted) == (S.FAILED, 5, 2, 0)
    assert done.rows is not None
    failed = [r for r in done.rows if r.status is S.FAILED]
    assert [r.line for r in failed] == [2, 6]
    assert failed[0].res is None
    assert failed[0].messages == [ErrorMessage(7, "bad_line", field="i", vals=["2"])]


def test_done_of_large_batch_is_streamed_in_line_order(database_url: str, redis_url: str,
                                                      file_store_url: str) -> None:
    jm = JobManager(database_url=database_url, redis_url=redis_url, object_store_url=file_store_url,
                    config=make_config(batchchunk_nrows=1000, done_cache_rows=10))
    try:
        bid = finished(jm, "large", list(range(3000, 0, -1)), fail={17})
        done = jm.batch_done(bid)
        assert done.rows is not None and [r.line for r in done.rows] == list(range(1, 3001))
        assert (done.status, done.nsuccess, done.nfailed) == (S.FAILED, 2999, 1)
    finally:
        jm.close()


# ---------------------------------------------------------------------------------------------- abort
def test_abort_queued_batch(jm: JobManager, database_url: str) -> None:
    bid = jm.batch_submit(APP, "ab", {}, rows(4))
    s = jm.batch_abort(bid)
    assert (s.status, s.nrows, s.naborted, s.nsuccess, s.nfailed, s.nqueued, s.ninprog) == (S.ABORTED, 4, 4, 0, 0, 0, 0)
    assert sql(database_url, "SELECT status::text, count(*), count(doneat) FROM batchrows WHERE batch = %s "
                             "GROUP BY 1", bid) == [("aborted", 4, 4)]
    assert sql(database_url, "SELECT status::text, naborted, doneat IS NOT NULL FROM batches WHERE id = %s",
               bid) == [("aborted", 4, True)]
    with unchanged(database_url):
        assert jm.batch_abort(bid) == s  # idempotent
    done = jm.batch_done(bid)
    assert done.status is S.ABORTED and done.rows is not None
    assert [(r.line, r.status) for r in done.rows] == [(i, S.ABORTED) for i in range(1, 5)]


def test_abort_wait_batch(jm: JobManager) -> None:
    bid = jm.batch_submit(APP, "ab", {}, rows(2), wait=True)
    assert jm.batch_abort(bid).status is S.ABORTED


def test_abort_partly_processed_batch_counts_add_up(jm: JobManager, database_url: str) -> None:
    jm.register_batch_processor(APP, "part", Proc(fail={3}))
    bid = jm.batch_submit(APP, "part", {}, rows(250))
    jm.engine.process_chunk(APP, "part")
    s = jm.batch_abort(bid)
    assert s.status is S.ABORTED
    assert (s.nsuccess, s.nfailed, s.naborted) == (99, 1, 150)
    assert s.nsuccess + s.nfailed + s.naborted == s.nrows == 250
    assert sql(database_url, "SELECT nsuccess, nfailed, naborted FROM batches WHERE id = %s", bid) == [(99, 1, 150)]
    assert run_chunks(jm, APP, "part") == 0  # nothing left to claim
    done = jm.batch_done(bid)
    assert (done.nsuccess, done.nfailed, done.naborted) == (99, 1, 150)
    assert done.rows is not None and len(done.rows) == 250


def test_abort_during_processing_wins_over_the_late_results(jm: JobManager, database_url: str) -> None:
    """A chunk in progress when the batch is aborted: its rows are aborted; the worker's answers for rows
    whose call returned before the abort committed keep their results (their write-back comes after),
    the row whose call made the abort and the rows never started stay aborted."""
    holder: dict[str, str] = {}

    class AbortMidway(Proc):
        def do_batch_job(self, initblock: Any, context: dict[str, Any], line: int, input: dict[str, Any]
                         ) -> BatchJobResult:
            if line == 150:
                holder["summary"] = str(jm.batch_abort(holder["bid"]).naborted)
            return super().do_batch_job(initblock, context, line, input)

    jm.register_batch_processor(APP, "midway", AbortMidway())
    holder["bid"] = bid = jm.batch_submit(APP, "midway", {}, rows(250))
    run_chunks(jm, APP, "midway")
    assert holder["summary"] == "150"  # the whole second chunk (inprog) and the third (queued)
    done = jm.batch_done(bid)
    assert done.rows is not None
    by_line = {r.line: r.status for r in done.rows}
    assert {by_line[n] for n in range(1, 101)} == {S.SUCCESS}
    assert by_line[150] is S.ABORTED and {by_line[n] for n in range(201, 251)} == {S.ABORTED}
    assert {by_line[n] for n in range(101, 201)} <= {S.SUCCESS, S.ABORTED}
    statuses = list(by_line.values())
    assert (done.status, done.nsuccess, done.nfailed, done.naborted) == (
        S.ABORTED, statuses.count(S.SUCCESS), 0, statuses.count(S.ABORTED))
    assert sql(database_url, "SELECT count(*) FROM batchrows WHERE batch = %s AND res IS NOT NULL", bid) == [
        (done.nsuccess,)]


def test_abort_refused_for_finished_batches(jm: JobManager, database_url: str) -> None:
    ok = finished(jm, "fa", [1, 2])
    bad = finished(jm, "fb", [1, 2], fail={1})
    for bid in (ok, bad):
        refused(database_url, InvalidState, partial(jm.batch_abort, bid), jm=jm, batch_id=bid)
    refused(database_url, BatchNotFound, lambda: jm.batch_abort("6f1c1b1e-0000-4000-8000-000000000000"))
    refused(database_url, BatchNotFound, lambda: jm.batch_abort("x"))


def test_concurrent_aborts_and_appends_serialise(database_url: str, redis_url: str, file_store_url: str) -> None:
    jm = JobManager(database_url=database_url, redis_url=redis_url, object_store_url=file_store_url,
                    config=make_config(batchrowmax=50))
    try:
        bid = jm.batch_submit(APP, "conc", {}, rows(10), wait=True)
        results: list[Any] = []
        start = threading.Barrier(8)

        def append(k: int) -> None:
            start.wait()
            try:
                results.append(jm.batch_append(bid, rows(10, start=100 * (k + 1)), wait=True))
            except AlyaError as exc:
                results.append(exc)

        threads = [threading.Thread(daemon=True, target=append, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ok = sorted(r for r in results if isinstance(r, int))
        assert ok == [20, 30, 40, 50]  # the batch lock serialises appends; the limit holds across them
        assert all(isinstance(r, InvalidInput) for r in results if not isinstance(r, int))
        assert sql(database_url, "SELECT nrows, (SELECT count(*) FROM batchrows WHERE batch = %s) FROM batches "
                                 "WHERE id = %s", bid, bid) == [(50, 50)]

        summaries: list[Any] = []

        def abort() -> None:
            start.wait()
            summaries.append(jm.batch_abort(bid))

        threads = [threading.Thread(daemon=True, target=abort) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(summaries) == 8
        assert all((s.status, s.naborted, s.nrows) == (S.ABORTED, 50, 50) for s in summaries)
        assert sql(database_url, "SELECT status::text, naborted FROM batches WHERE id = %s", bid) == [("aborted", 50)]
    finally:
        jm.close()


# ---------------------------------------------------------------------------------------------- lists
def test_batch_list_filters(jm: JobManager, database_url: str) -> None:
    a1 = jm.batch_submit(APP, "OpA", {"k": 1}, rows(2), inputfile="f.csv")
    a2 = jm.batch_submit(APP, "opa", {}, rows(1))
    b1 = jm.batch_submit(APP, "opb", {}, rows(1))
    jm.batch_submit("otherapp", "opa", {}, rows(1))
    q1 = jm.slowquery_submit(APP, "opa", {}, {"q": 1})
    old = jm.batch_submit(APP, "opa", {}, rows(1))
    sql(database_url, "UPDATE batches SET reqat = now() - interval '10 days' WHERE id = %s", old)

    got = jm.batch_list(APP)
    assert [d.id for d in got] == [b1, a2, a1]  # newest first; the 10-day-old one is out; no slow query
    assert all(isinstance(d, BatchDetails) and d.type == "B" and d.app == APP for d in got)
    d = next(d for d in got if d.id == a1)
    assert (d.op, d.status, d.context, d.inputfile, d.nrows, d.doneat, d.outputfiles) == (
        "opa", S.QUEUED, {"k": 1}, "f.csv", 2, None, {})
    assert {d.id for d in jm.batch_list(APP, op="OPA")} == {a1, a2}
    assert {d.id for d in jm.batch_list(APP, op="opa", age_days=30)} == {a1, a2, old}
    assert jm.batch_list(APP, op="nothing") == []
    assert [d.id for d in jm.slowquery_list(APP)] == [q1]
    assert [d.id for d in jm.slowquery_list(APP, "OpA")] == [q1]
    assert jm.slowquery_list(APP, "opb") == []
    assert jm.slowquery_list(APP)[0].type == "Q"
    assert jm.batch_list(APP, age_days=0) == []  # nothing is younger than zero days
    for bad_call in (lambda: jm.batch_list("Bad"), lambda: jm.batch_list(APP, op="1x"),
                     lambda: jm.batch_list(APP, age_days=-1), lambda: jm.slowquery_list(APP, age_days="7"),  # type: ignore[arg-type]
                     lambda: jm.batch_list(APP, age_days=True), lambda: jm.batch_list(APP, age_days=1.5)):  # type: ignore[arg-type]
        refused(database_url, InvalidInput, bad_call)
    assert {d.id for d in jm.batch_list(APP, age_days=10**12)} == {a1, a2, b1, old}  # "everything"


# ---------------------------------------------------------------------------------------------- slow queries
def test_slowquery_lifecycle(jm: JobManager, database_url: str) -> None:
    jm.register_slowquery_processor(APP, "Lookup", QueryProc())
    rid = jm.slowquery_submit(APP, "Lookup", '{"user": "bo"}', '{"id": 42}')
    assert sql(database_url, "SELECT op, type, nrows, context FROM batches WHERE id = %s", rid) == [
        ("lookup", "Q", 1, {"user": "bo"})]
    assert sql(database_url, "SELECT line, input FROM batchrows WHERE batch = %s", rid) == [(0, {"id": 42})]
    sq = jm.slowquery_done(rid)
    assert isinstance(sq, SlowQueryDone)
    assert (sq.status, sq.result, sq.messages, sq.outputfiles) == (S.QUEUED, None, [], {})
    run_chunks(jm, APP, "lookup")
    sq = jm.slowquery_done(rid)
    assert (sq.status, sq.result, sq.messages) == (S.SUCCESS, {"echo": {"id": 42}, "ctx": {"user": "bo"}}, [])
    refused(database_url, InvalidState, lambda: jm.slowquery_abort(rid))

    fid = jm.slowquery_submit(APP, "lookup", {}, {"fail": True})
    run_chunks(jm, APP, "lookup")
    sq = jm.slowquery_done(fid)
    assert (sq.status, sq.result, sq.messages) == (S.FAILED, None, [ErrorMessage(3, "nope")])


def test_slowquery_abort(jm: JobManager, database_url: str) -> None:
    rid = jm.slowquery_submit(APP, "q", {}, {"a": 1})
    jm.slowquery_abort(rid)
    sq = jm.slowquery_done(rid)
    assert (sq.status, sq.result) == (S.ABORTED, None)
    assert sql(database_url, "SELECT status::text FROM batchrows WHERE batch = %s", rid) == [("aborted",)]
    jm.slowquery_abort(rid)  # idempotent
    refused(database_url, BatchNotFound, lambda: jm.slowquery_abort("2b9fb8f0-0000-4000-8000-000000000000"))
    refused(database_url, BatchNotFound, lambda: jm.slowquery_done("zzz"))


def test_slowquery_calls_on_a_batch_id_are_refused(jm: JobManager, database_url: str) -> None:
    bid = jm.batch_submit(APP, "b", {}, rows(2))
    refused(database_url, InvalidState, lambda: jm.slowquery_abort(bid), jm=jm, batch_id=bid)
    jm.batch_abort(bid)
    refused(database_url, InvalidState, lambda: jm.slowquery_done(bid))


# ---------------------------------------------------------------------------------------------- refusals
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


def test_ids_are_accepted_in_any_uuid_spelling(jm: JobManager) -> None:
    bid = jm.batch_submit(APP, "op", {}, rows(1))
    assert jm.batch_status(bid.upper()).nrows == 1
    assert jm.batch_status("{" + bid + "}").nrows == 1


def test_database_unreachable_is_backend_unavailable(redis_url: str, file_store_url: str) -> None:
    with structlog.testing.capture_logs() as logs:
        jm = JobManager(database_url="postgresql://postgres:s3cret@127.0.0.1:1/none", redis_url=redis_url,
                        object_store_url=file_store_url, config=make_config())
        try:
            with pytest.raises(BackendUnavailable) as e1:
                jm.batch_submit(APP, "op", {}, rows(1))
            with pytest.raises(BackendUnavailable) as e2:
                jm.batch_status("3fa85f64-5717-4562-b3fc-2c963f66afa6")
        finally:
            jm.close()
    assert "s3cret" not in f"{e1.value} {e2.value} {logs!r}"


def test_dead_pooled_connections_are_replaced(jm: JobManager, database_url: str) -> None:
    """A server restart or idle timeout kills pooled connections; the next calls must not fail for it."""
    bid = jm.batch_submit(APP, "op", {}, rows(2))
    held = [jm.store.engine.raw_connection() for _ in range(3)]  # fill the pool with several connections
    for c in held:
        c.close()
    killed = sql(database_url, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                               "WHERE datname = current_database() AND pid <> pg_backend_pid()")[0][0]
    assert killed >= 3
    for _ in range(4):
        assert [d.id for d in jm.batch_list(APP)] == [bid]
    assert jm.batch_abort(bid).status is S.ABORTED


# ---------------------------------------------------------------------------------------------- setup & registry
def test_from_env(monkeypatch: pytest.MonkeyPatch, database_url: str, redis_url: str, file_store_url: str) -> None:
    monkeypatch.setenv("ALYA_DATABASE_URL", database_url)
    monkeypatch.setenv("ALYA_REDIS_URL", redis_url)
    monkeypatch.setenv("ALYA_OBJECT_STORE_URL", file_store_url)
    monkeypatch.setenv("ALYA_BATCHROWMAX", "2")
    monkeypatch.setenv("ALYA_BATCHSTATUS_CACHEDUR_SEC", "7")
    jm = JobManager.from_env()
    try:
        assert (jm.config.batchrowmax, jm.cache.ttl, jm.cache.final_ttl) == (2, 7, 700)
        refused(database_url, InvalidInput, lambda: jm.batch_submit(APP, "op", {}, rows(3)))
        bid = jm.batch_submit(APP, "op", {}, rows(2))
        assert cast(int, redis.Redis.from_url(redis_url).ttl(summary_key(bid))) <= 7
    finally:
        jm.close()


def test_registration(jm: JobManager) -> None:
    with pytest.raises(InvalidInput):
        jm.register_batch_processor("Bad", "op", Proc())
    with pytest.raises(InvalidInput):
        jm.register_batch_processor(APP, "op", cast(Any, QueryProc()))  # no do_batch_job
    with pytest.raises(InvalidInput):
        jm.register_slowquery_processor(APP, "op", cast(Any, Proc()))  # no do_slow_query
    with pytest.raises(InvalidInput):
        jm.register_initializer(APP, object())  # type: ignore[arg-type]
    with pytest.raises(ProcessorNotFound):
        jm.engine.process_chunk(APP, "unregistered")

    errors: list[BaseException] = []

    def register(k: int) -> None:
        try:
            for i in range(50):
                jm.register_batch_processor(APP, f"t{k}_{i}", Proc())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(daemon=True, target=register, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({(r.app, r.op) for r in jm.registry.batch_types()} & {(APP, f"t{k}_{i}") for k in range(8)
                                                                     for i in range(50)}) == 400


# ---------------------------------------------------------------------------------------------- volume
def test_submit_200k_rows_from_a_generator_in_bounded_memory(jm: JobManager, database_url: str) -> None:
    n = 200_000

    def gen() -> Iterator[BatchInput]:
        for i in range(1, n + 1):
            yield BatchInput(i, {"i": i, "name": f"row {i}", "tags": ["a", "b"]})

    # What materialising the rows would cost, measured the same way.
    gc.collect()
    tracemalloc.start()
    sample = [BatchInput(i, {"i": i, "name": f"row {i}", "tags": ["a", "b"]}) for i in range(1, 20_001)]
    materialised = tracemalloc.get_traced_memory()[0] * (n // len(sample))
    del sample
    tracemalloc.stop()

    gc.collect()
    tracemalloc.start()
    t0 = time.monotonic()
    bid = jm.batch_submit(APP, "big", {}, gen())
    elapsed = time.monotonic() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert jm.batch_status(bid).nrows == n
    assert sql(database_url, "SELECT count(*), min(line), max(line) FROM batchrows WHERE batch = %s", bid) == [
        (n, 1, n)]
    assert peak < materialised / 10, (peak, materialised)
    assert peak < 16 * 2**20, peak
    assert elapsed < 60, elapsed  # a sanity bound, not a benchmark (tracemalloc slows allocation)
    print(f"200k rows: {elapsed:.1f} s, peak {peak / 2**20:.1f} MiB vs {materialised / 2**20:.0f} MiB materialised")


def test_batch_rows_streams_a_final_batch_in_line_order(jm: JobManager, database_url: str) -> None:
    """batch_rows gives what batch_done gives, row by row from a server-side cursor; memory stays flat (the
    peak while reading 20,000 rows is a fraction of the materialised list); refused until final."""
    jm.register_batch_processor(APP, "stream", Proc())
    n = 20_000
    bid = jm.batch_submit(APP, "stream", {"c": 1}, [BatchInput(i, {"x": i, "mode": "fail" if i % 7 == 0 else "ok"})
                                                   for i in range(1, n + 1)])
    with pytest.raises(InvalidState, match="once it is final"):
        jm.batch_rows(bid)
    from tests.procs import drain

    drain(jm, APP, "stream")
    done = jm.batch_done(bid)
    assert done.rows is not None

    gc.collect()
    tracemalloc.start()
    listed = jm.batch_done(bid).rows
    materialised = tracemalloc.get_traced_memory()[1]
    del listed
    tracemalloc.stop()

    gc.collect()
    tracemalloc.start()
    count, lines_in_order, last = 0, True, 0
    for row, expected in zip(jm.batch_rows(bid), done.rows, strict=True):
        assert row == expected
        lines_in_order = lines_in_order and row.line > last
        last, count = row.line, count + 1
    streamed = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == n and lines_in_order
    assert streamed < materialised / 3, (streamed, materialised)

    # Closing early ends its read transaction: nothing is left open on the server.
    it = jm.batch_rows(bid)
    assert next(it).line == 1
    it.close()
    assert sql(database_url, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                             "AND state = 'idle in transaction'") == [(0,)]
