"""Reading batches back: batch_status and batch_done while open and once final (small, large and
streamed), batch_rows, batch_list and slowquery_list filters, slowquery_done, and the status-change log
lines."""

from __future__ import annotations

import gc
import json
import tracemalloc

import pytest
import structlog.testing

from alya import (
    BatchDetails,
    BatchDone,
    BatchInput,
    ErrorMessage,
    InvalidInput,
    InvalidState,
    JobManager,
    SlowQueryDone,
)
from alya.core.names import summary_key
from tests.support.client import APP, Proc, QueryProc, S, finished, refused, rows, run_chunks
from tests.support.config import make_config
from tests.support.services import sql


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


def test_slowquery_calls_on_a_batch_id_are_refused(jm: JobManager, database_url: str) -> None:
    bid = jm.batch_submit(APP, "b", {}, rows(2))
    refused(database_url, InvalidState, lambda: jm.slowquery_abort(bid), jm=jm, batch_id=bid)
    jm.batch_abort(bid)
    refused(database_url, InvalidState, lambda: jm.slowquery_done(bid))


def test_batch_rows_streams_a_final_batch_in_line_order(jm: JobManager, database_url: str) -> None:
    """batch_rows gives what batch_done gives, row by row from a server-side cursor; memory stays flat (the
    peak while reading 20,000 rows is a fraction of the materialised list); refused until final."""
    jm.register_batch_processor(APP, "stream", Proc())
    n = 20_000
    bid = jm.batch_submit(APP, "stream", {"c": 1}, [BatchInput(i, {"x": i, "mode": "fail" if i % 7 == 0 else "ok"})
                                                   for i in range(1, n + 1)])
    with pytest.raises(InvalidState, match="once it is final"):
        jm.batch_rows(bid)
    from tests.support.procs import drain

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
