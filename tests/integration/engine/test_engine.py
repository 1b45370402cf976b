"""Row semantics (results, failures, faults retried then failed), init blocks, slow queries and wait batches,
driven through the engine (one chunk at a time) on real PostgreSQL and Redis; one goes through jm.run and
the Prefect flows. (Summaries and mark_done: tests/integration/finish.)"""

from __future__ import annotations

import time
from typing import Any

import pytest

from alya import BatchStatus, JobManager
from tests.support.config import make_config
from tests.support.procs import Init, Proc, QueryProc, batch_row, drain, rows
from tests.support.services import store_sql


def row_state(jm: JobManager, batch: str) -> dict[int, tuple[str, int, str | None]]:
    found = store_sql(jm.store, "SELECT line, status::text, attempts, doneby FROM batchrows WHERE batch = %s",
                      batch)
    return {line: (st, att, by) for line, st, att, by in found}


def manager(database_url: str, redis_url: str, store_url: str, **cfg: Any) -> JobManager:
    return JobManager(database_url=database_url, redis_url=redis_url, object_store_url=store_url,
                      config=make_config(**cfg))


# ---------------------------------------------------------------------------------------------- rows
def test_success_and_failed_rows_are_stored(jm: JobManager) -> None:
    proc = Proc()
    jm.register_batch_processor("eng", "Mixed", proc)
    data = rows(5) + [(6, {"x": 6, "mode": "fail"})]
    bid = jm.batch_submit("eng", "mixed", {"user": "u1"}, data)
    assert drain(jm, "eng", "mixed") == 6
    done = jm.batch_done(bid)
    assert done.status is BatchStatus.FAILED
    assert (done.nsuccess, done.nfailed, done.naborted) == (5, 1, 0)
    assert [r.line for r in done.rows or []] == [1, 2, 3, 4, 5, 6]
    ok = done.rows[0]  # type: ignore[index]
    assert ok.status is BatchStatus.SUCCESS and ok.res == {"line": 1, "x": 1, "ctx": {"user": "u1"}}
    assert ok.messages == []
    bad = done.rows[5]  # type: ignore[index]
    assert bad.status is BatchStatus.FAILED and bad.res == {"line": 6}
    assert [(m.msgid, m.errcode, m.field, m.vals) for m in bad.messages] == [(7, "bad_value", "x", ["6"])]
    assert len(proc.done) == 1 and proc.done[0].status is BatchStatus.FAILED
    s = jm.batch_status(bid)
    assert (s.status, s.nrows, s.nsuccess, s.nfailed, s.nqueued, s.ninprog) == (BatchStatus.FAILED, 6, 5, 1, 0, 0)


@pytest.mark.parametrize("mode", ["raise", "bad_type", "queued", "inprog"])
def test_faults_are_retried_then_failed(jm: JobManager, mode: str) -> None:
    proc = Proc()
    jm.register_batch_processor("eng", "fault", proc)
    bid = jm.batch_submit("eng", "fault", {}, [(1, {"mode": mode}), (2, {"x": 2})])
    drain(jm, "eng", "fault")
    assert proc.calls[1] == jm.config.max_attempts == 3
    assert proc.calls[2] == 1
    done = jm.batch_done(bid)
    assert done.status is BatchStatus.FAILED and (done.nsuccess, done.nfailed) == (1, 1)
    row = done.rows[0]  # type: ignore[index]
    assert row.status is BatchStatus.FAILED and row.res is None
    assert len(row.messages) == 1 and row.messages[0].errcode == "processing_error"
    assert row_state(jm, bid)[1][1] == 3


def test_max_attempts_is_configurable(database_url: str, redis_url: str, file_store_url: str) -> None:
    jm = manager(database_url, redis_url, file_store_url, max_attempts=1)
    try:
        proc = Proc()
        jm.register_batch_processor("eng", "once", proc)
        bid = jm.batch_submit("eng", "once", {}, [(1, {"mode": "raise"})])
        drain(jm, "eng", "once")
        assert proc.calls[1] == 1
        assert jm.batch_done(bid).rows[0].messages[0].errcode == "processing_error"  # type: ignore[index]
    finally:
        jm.close()


def test_raise_once_then_success(jm: JobManager) -> None:
    proc = Proc()
    jm.register_batch_processor("eng", "flaky", proc)
    bid = jm.batch_submit("eng", "flaky", {}, [(1, {"mode": "raise_once"}), (2, {"x": 2})])
    drain(jm, "eng", "flaky")
    done = jm.batch_done(bid)
    assert done.status is BatchStatus.SUCCESS and done.nsuccess == 2
    assert proc.calls[1] == 2 and done.rows[0].messages == []  # type: ignore[index]
    assert row_state(jm, bid)[1][1] == 2


def test_retry_waits_for_backoff(database_url: str, redis_url: str, file_store_url: str) -> None:
    jm = manager(database_url, redis_url, file_store_url, retry_backoff_sec=30.0)
    try:
        proc = Proc()
        jm.register_batch_processor("eng", "slowretry", proc)
        bid = jm.batch_submit("eng", "slowretry", {}, [(1, {"mode": "raise_once"})])
        drain(jm, "eng", "slowretry")
        assert proc.calls[1] == 1  # not retried before notbefore
        assert row_state(jm, bid)[1][0] == "queued"
        assert store_sql(jm.store, "SELECT notbefore > now() + interval '20 seconds' FROM batchrows "
                         "WHERE batch = %s", bid) == [(True,)]
        store_sql(jm.store, "UPDATE batchrows SET notbefore = now() WHERE batch = %s", bid)
        drain(jm, "eng", "slowretry")
        assert jm.batch_status(bid).status is BatchStatus.SUCCESS
    finally:
        jm.close()


def test_unsafe_and_malformed_blobrows_are_faults(jm: JobManager) -> None:
    proc = Proc()
    jm.register_batch_processor("eng", "unsafe", proc)
    bad = [{"../x": "a"}, {"a/b": "a"}, {"..": "a"}, {"": "a"}, {"ok": 5}]
    data = [(i + 1, {"blobs": b}) for i, b in enumerate(bad)] + [(9, {"blobs": {"ok.txt": " fine "}})]
    bid = jm.batch_submit("eng", "unsafe", {}, data)
    drain(jm, "eng", "unsafe")
    done = jm.batch_done(bid)
    assert [(r.line, r.status.value) for r in done.rows or []] == [
        (1, "failed"), (2, "failed"), (3, "failed"), (4, "failed"), (5, "failed"), (9, "success")]
    assert all(r.messages[0].errcode == "processing_error" for r in (done.rows or [])[:5])
    assert all(proc.calls[i] == 3 for i in range(1, 6))
    assert set(done.outputfiles) == {"ok.txt"}


def test_nul_in_result_is_a_row_fault_not_a_chunk_failure(jm: JobManager) -> None:
    """PostgreSQL cannot store NUL in jsonb: such a row must fail alone, not sink the chunk's write."""
    class NulProc(Proc):
        def do_batch_job(self, initblock: Any, context: dict[str, Any], line: int, input: dict[str, Any]) -> Any:
            from alya import BatchJobResult, ErrorMessage

            if line == 2:
                return BatchJobResult(BatchStatus.FAILED, None, [ErrorMessage(1, "bad", None, ["a\x00b"])])
            if line == 3:
                return BatchJobResult(BatchStatus.SUCCESS, None, blobrows={"f.txt": "a\x00b"})
            return super().do_batch_job(initblock, context, line, input)

    proc = NulProc()
    jm.register_batch_processor("eng", "nul", proc)
    bid = jm.batch_submit("eng", "nul", {}, rows(4))
    drain(jm, "eng", "nul")
    done = jm.batch_done(bid)
    assert done.status is BatchStatus.FAILED
    assert [r.status.value for r in done.rows or []] == ["success", "failed", "failed", "success"]
    assert done.rows[1].messages[0].errcode == "processing_error"  # type: ignore[index]


def test_row_inprog_with_doneby_and_batch_inprog_while_processing(jm: JobManager) -> None:
    seen: list[Any] = []
    bid_box: list[str] = []

    def hook(line: int, input: dict[str, Any]) -> None:
        if line == 2:
            seen.append((row_state(jm, bid_box[0]), batch_row(jm, bid_box[0])["status"]))

    jm.register_batch_processor("eng", "watch", Proc(hook))
    bid = jm.batch_submit("eng", "watch", {}, rows(3))
    bid_box.append(bid)
    assert batch_row(jm, bid)["status"] == "queued"
    drain(jm, "eng", "watch")
    (states, bstatus), = seen
    assert bstatus == "inprog"
    assert states[1][0] == "inprog" and states[2][0] == "inprog" and states[3][0] == "inprog"
    assert all(st[2] == jm.engine.worker_id for st in states.values())
    assert all(st[1] == 1 for st in states.values())
    after = row_state(jm, bid)
    assert all(st == ("success", 1, jm.engine.worker_id) for st in after.values())


# ------------------------------------------------------------------------------------------ init blocks
def test_init_block_created_once_and_reused(database_url: str, redis_url: str, file_store_url: str) -> None:
    jm = manager(database_url, redis_url, file_store_url, batchchunk_nrows=10)
    try:
        init, proc = Init(), Proc()
        jm.register_initializer("eng", init)
        jm.register_batch_processor("eng", "a", proc)
        jm.register_batch_processor("eng", "b", proc)
        b1 = jm.batch_submit("eng", "a", {}, rows(55))
        b2 = jm.batch_submit("eng", "b", {}, rows(25))
        drain(jm, "eng", "a")
        drain(jm, "eng", "b")
        assert init.calls == 1 and proc.blocks_seen == {1}
        assert jm.batch_status(b1).status is BatchStatus.SUCCESS and jm.batch_status(b2).status is BatchStatus.SUCCESS
        # dead block: closed and re-created before the next chunk
        init.blocks[0].alive = False
        b3 = jm.batch_submit("eng", "a", {}, rows(5))
        drain(jm, "eng", "a")
        assert init.calls == 2 and init.blocks[0].closed and not init.blocks[1].closed
        assert proc.blocks_seen == {1, 2}
        assert jm.batch_status(b3).status is BatchStatus.SUCCESS
        jm.engine.shutdown()
        assert init.blocks[1].closed  # closed at shutdown
    finally:
        jm.close()


def test_init_failure_leaves_rows_queued_without_spending_attempts(jm: JobManager,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import alya.engine.producer

    monkeypatch.setattr(alya.engine.producer, "INIT_RETRY_SEC", 0.0)
    init, proc = Init(fail_first=2), Proc()
    jm.register_initializer("eng", init)
    jm.register_batch_processor("eng", "initfail", proc)
    bid = jm.batch_submit("eng", "initfail", {}, rows(150))
    for n in (1, 2):
        rep = jm.engine.process_chunk("eng", "initfail")
        assert rep.nrows == 0 and init.calls == n
        assert all(v == ("queued", 0, None) for v in row_state(jm, bid).values())
    assert sum(proc.calls.values()) == 0
    drain(jm, "eng", "initfail")  # init works now
    assert init.calls == 3
    done = jm.batch_done(bid)
    assert done.status is BatchStatus.SUCCESS and done.nsuccess == 150
    assert all(v[1] == 1 for v in row_state(jm, bid).values())
    assert len(proc.done) == 1


def test_init_failure_is_retried_with_a_growing_delay(jm: JobManager, monkeypatch: pytest.MonkeyPatch) -> None:
    import alya.engine.producer

    monkeypatch.setattr(alya.engine.producer, "INIT_RETRY_SEC", 0.3)
    init = Init(broken=True)
    jm.register_initializer("eng", init)
    jm.register_batch_processor("eng", "backoff", Proc())
    jm.batch_submit("eng", "backoff", {}, rows(5))
    jm.engine.process_chunk("eng", "backoff")
    jm.engine.process_chunk("eng", "backoff")  # within the delay: init() is not called again
    assert init.calls == 1
    assert jm.engine.types_with_work([("eng", "backoff")]) == []  # no flow run for it meanwhile either
    time.sleep(0.35)
    assert jm.engine.types_with_work([("eng", "backoff")]) == [("eng", "backoff")]
    jm.engine.process_chunk("eng", "backoff")
    assert init.calls == 2
    time.sleep(0.35)  # the second delay is twice the first
    jm.engine.process_chunk("eng", "backoff")
    assert init.calls == 2
    time.sleep(0.3)
    init.broken = False
    assert drain(jm, "eng", "backoff") == 5 and init.calls == 3


def test_init_broken_leaves_rows_queued_not_failed(jm: JobManager, monkeypatch: pytest.MonkeyPatch) -> None:
    import alya.engine.producer

    monkeypatch.setattr(alya.engine.producer, "INIT_RETRY_SEC", 0.0)
    init, proc = Init(broken=True), Proc()
    jm.register_initializer("eng", init)
    jm.register_batch_processor("eng", "broken", proc)
    bid = jm.batch_submit("eng", "broken", {}, rows(20))
    for _ in range(5):
        jm.engine.process_chunk("eng", "broken")
    s = jm.batch_status(bid)
    assert s.nqueued == 20 and s.nfailed == 0 and not s.status.is_final
    assert all(v == ("queued", 0, None) for v in row_state(jm, bid).values())
    # mark_done is never lost to a failing init: once init works the batch completes and is notified
    init.broken = False
    drain(jm, "eng", "broken")
    assert jm.batch_status(bid).status is BatchStatus.SUCCESS and len(proc.done) == 1


def test_no_processor_leaves_rows_queued(database_url: str, redis_url: str, file_store_url: str) -> None:
    from alya.engine.maintenance import cleanup

    jm = manager(database_url, redis_url, file_store_url)
    try:
        proc = Proc()
        jm.register_batch_processor("eng", "served", proc)
        orphan = jm.batch_submit("eng", "unserved", {}, rows(5))
        served = jm.batch_submit("eng", "served", {}, rows(5))
        drain(jm, "eng", "served")
        cleanup(jm.engine, types=[("eng", "served")])
        assert jm.batch_status(served).status is BatchStatus.SUCCESS
        s = jm.batch_status(orphan)
        assert s.status is BatchStatus.QUEUED and s.nqueued == 5 and s.nfailed == 0
        with pytest.raises(Exception, match="no processor"):
            jm.engine.process_chunk("eng", "unserved")
        assert all(v == ("queued", 0, None) for v in row_state(jm, orphan).values())
        # a slow query of a batch type registered as B is not this worker's either
        q = jm.slowquery_submit("eng", "served", {}, {"q": 1})
        drain(jm, "eng", "served")
        assert jm.batch_status(q).status is BatchStatus.QUEUED
        assert row_state(jm, q)[0] == ("queued", 0, None)
    finally:
        jm.close()


# ------------------------------------------------------------------------------------------ slow queries
def test_slow_query_result_messages_and_outputfiles(jm: JobManager) -> None:
    qp = QueryProc()
    jm.register_slowquery_processor("eng", "Report", qp)
    req = jm.slowquery_submit("eng", "report", {"user": "ann"}, {"q": "sales"})
    bad = jm.slowquery_submit("eng", "report", {}, {"mode": "fail"})
    boom = jm.slowquery_submit("eng", "report", {}, {"mode": "raise"})
    drain(jm, "eng", "report")
    sq = jm.slowquery_done(req)
    assert sq.status is BatchStatus.SUCCESS
    assert sq.result == {"answer": "sales", "who": "ann"}
    assert [(m.msgid, m.errcode) for m in sq.messages] == [(2, "note")]
    assert sq.outputfiles == {"report.csv": "s3://bucket/some/report.csv"}
    sq = jm.slowquery_done(bad)
    assert sq.status is BatchStatus.FAILED and sq.messages[0].errcode == "bad_input" and sq.outputfiles == {}
    sq = jm.slowquery_done(boom)
    assert sq.status is BatchStatus.FAILED and sq.messages[0].errcode == "processing_error"
    assert sorted(d.id for d in qp.done) == sorted([req, bad, boom])
    assert all(d.type == "Q" for d in qp.done)


def test_slow_query_ends_in_its_write_back_and_the_end_is_flushed(jm: JobManager,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow query's write-back also ends its batch (one transaction less before its client sees the
    answer), and although a write-back commits without waiting for the WAL flush, a transaction that ends
    a batch does wait: what a client is shown as final must survive a server crash."""
    from alya.db.transport import Tx

    real = Tx._execute
    seen: list[tuple[int, str, str]] = []  # (transaction, statement, synchronous_commit after it)

    def execute(self: Tx, name: str, params: dict[str, Any]) -> None:
        real(self, name, params)
        if name in ("write_results", "finish_batch"):
            with self.conn.cursor() as cur:
                cur.execute("SHOW synchronous_commit")
                seen.append((id(self), name, cur.fetchone()[0]))

    monkeypatch.setattr(Tx, "_execute", execute)
    jm.register_slowquery_processor("eng", "durable", QueryProc())
    req = jm.slowquery_submit("eng", "durable", {}, {"q": "x"})
    drain(jm, "eng", "durable")
    assert jm.slowquery_done(req).status is BatchStatus.SUCCESS
    assert [(name, sync) for _, name, sync in seen] == [("write_results", "off"), ("finish_batch", "on")]
    assert seen[0][0] == seen[1][0]  # one transaction


# ------------------------------------------------------------------------------------------ wait batches
def test_wait_batch_is_not_processed_until_wait_off(jm: JobManager) -> None:
    proc = Proc()
    jm.register_batch_processor("eng", "held", proc)
    bid = jm.batch_submit("eng", "held", {}, rows(5), wait=True)
    assert drain(jm, "eng", "held") == 0
    assert jm.batch_status(bid).status is BatchStatus.WAIT
    jm.batch_append(bid, rows(5, start=6), wait=True)
    jm.wait_off(bid)
    drain(jm, "eng", "held")
    s = jm.batch_status(bid)
    assert s.status is BatchStatus.SUCCESS and s.nsuccess == 10


# ------------------------------------------------------------------------------------------ jm.run (Prefect)
@pytest.mark.usefixtures("prefect_harness")
def test_run_until_idle_several_types(database_url: str, redis_url: str, file_store_url: str) -> None:
    jm = manager(database_url, redis_url, file_store_url, batchchunk_nrows=50)
    try:
        init, p1, p2, qp = Init(), Proc(), Proc(), QueryProc()
        jm.register_initializer("runa", init)
        jm.register_batch_processor("runa", "one", p1)
        jm.register_batch_processor("runa", "two", p2)
        jm.register_slowquery_processor("runa", "ask", qp)
        ids = [jm.batch_submit("runa", "one", {}, rows(120)), jm.batch_submit("runa", "one", {}, rows(40)),
               jm.batch_submit("runa", "two", {}, rows(70) + [(71, {"mode": "fail"})])]
        q = jm.slowquery_submit("runa", "ask", {"user": "z"}, {"q": 1})
        # not this worker's: a slow query of a type it serves as a batch type, and an unserved op
        foreign = [jm.slowquery_submit("runa", "one", {}, {"q": 2}), jm.batch_submit("runa", "three", {}, rows(3))]
        jm.run(stop_when_idle=True)
        assert [jm.batch_status(b).status for b in foreign] == [BatchStatus.QUEUED, BatchStatus.QUEUED]
        assert [jm.batch_status(b).status for b in ids] == [BatchStatus.SUCCESS, BatchStatus.SUCCESS,
                                                           BatchStatus.FAILED]
        assert jm.slowquery_done(q).result == {"answer": 1, "who": "z"}
        assert len(p1.done) == 2 and len(p2.done) == 1 and len(qp.done) == 1
        assert init.calls == 1 and init.blocks[0].closed  # one block for the app, closed when run returns
    finally:
        jm.close()
