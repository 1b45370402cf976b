"""batch_abort and slowquery_abort through the client: queued, held and partly processed batches, an
abort during processing, refusals for finished batches, and concurrent aborts and appends."""

from __future__ import annotations

import threading
from functools import partial
from typing import Any

from alya import (
    AlyaError,
    BatchJobResult,
    BatchNotFound,
    InvalidInput,
    InvalidState,
    JobManager,
)
from tests.support.client import APP, Proc, S, finished, refused, rows, run_chunks, unchanged
from tests.support.config import make_config
from tests.support.services import sql


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


def test_slowquery_abort(jm: JobManager, database_url: str) -> None:
    rid = jm.slowquery_submit(APP, "q", {}, {"a": 1})
    jm.slowquery_abort(rid)
    sq = jm.slowquery_done(rid)
    assert (sq.status, sq.result) == (S.ABORTED, None)
    assert sql(database_url, "SELECT status::text FROM batchrows WHERE batch = %s", rid) == [("aborted",)]
    jm.slowquery_abort(rid)  # idempotent
    refused(database_url, BatchNotFound, lambda: jm.slowquery_abort("2b9fb8f0-0000-4000-8000-000000000000"))
    refused(database_url, BatchNotFound, lambda: jm.slowquery_done("zzz"))
