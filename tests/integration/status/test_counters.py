"""Counters (migration 0011, ``alya.db.counters``): the rows of each batch by status, kept by PostgreSQL
triggers, equal a recount of the rows after every kind of transition (submit, append, slow query, claim,
write-back, retry, release, recovery, a worker killed holding rows, abort, a late write-back after an abort,
purge, a cascading delete) and at every moment a concurrent reader can observe; compaction keeps the sums;
``batch_status`` of an open batch reads them."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from alya import BatchStatus, JobManager
from alya.engine.maintenance import cleanup
from tests.support.procs import (
    Proc,
    QueryProc,
    kill_when_busy,
    manager,
    rows,
    run_claim,
    spawn_worker,
    states,
    worker_processes,
)
from tests.support.services import store_sql

# Counters and a recount of every batch's rows, in one statement (one snapshot): any difference.
DRIFT = """
WITH c AS (SELECT batch, status::text, sum(n) AS n FROM batch_counts GROUP BY 1, 2 HAVING sum(n) <> 0),
     r AS (SELECT batch, status::text, count(*) AS n FROM batchrows GROUP BY 1, 2)
SELECT batch::text, status, c.n AS counted, r.n AS recounted
FROM c FULL JOIN r USING (batch, status)
WHERE c.n IS DISTINCT FROM r.n
"""


def drift(jm: JobManager) -> list[tuple[Any, ...]]:
    return store_sql(jm.store, DRIFT)


def exact(jm: JobManager, step: str) -> None:
    assert drift(jm) == [], f"counters differ from a recount after {step}"


def test_counters_equal_a_recount_after_every_transition(database_url: str, redis_url: str,
                                                         file_store_url: str) -> None:
    jm = manager(database_url, redis_url, file_store_url, max_attempts=2)
    try:
        jm.register_batch_processor("cnt", "rows", Proc())
        jm.register_slowquery_processor("cnt", "q", QueryProc())
        eng = jm.engine
        data = [(n, {"x": n, "mode": "fail"} if n % 7 == 0 else
                 {"x": n, "mode": "raise"} if n % 11 == 0 else {"x": n}) for n in range(1, 41)]
        bid = jm.batch_submit("cnt", "rows", {}, data[:30], wait=True)
        exact(jm, "a submit held in wait (COPY)")
        jm.batch_append(bid, data[30:], wait=True)
        exact(jm, "an append")
        jm.wait_off(bid)
        exact(jm, "wait-off")
        qid = jm.slowquery_submit("cnt", "q", {}, {"q": 1})
        exact(jm, "a slow query (one INSERT)")

        claimed = eng.producer.take("cnt", "rows", "B", bid, 12)
        assert claimed is not None and len(claimed.rows) == 12
        exact(jm, "a claim")
        assert jm.batch_status(bid).ninprog == 12
        results = run_claim(jm, claimed)
        eng.completer.write(claimed, results, eng.log)
        eng.producer.forget(claimed)
        exact(jm, "a write-back (success, failed, and a fault requeued for a retry)")
        st = states(jm, bid)
        assert {s[0] for s in st.values()} >= {"success", "failed", "queued"}

        held = eng.producer.take("cnt", "rows", "B", bid, 5)
        assert held is not None
        assert eng.completer.release(held, [r.line for r in held.rows])
        eng.producer.forget(held)
        exact(jm, "a give-back (release)")

        # Recovery: rows held by a worker that went silent go back to the queue as suspects.
        held = eng.producer.take("cnt", "rows", "B", bid, 6)
        assert held is not None
        store_sql(jm.store, "UPDATE workers SET lastseen = now() - interval '1 hour' WHERE id = %s", eng.worker_id)
        report = cleanup(eng, retain=False)
        assert report.requeued == 6
        exact(jm, "recovery")
        eng.producer.forget(held)

        # Abort with rows held, and a late write-back of rows whose call returned before the abort.
        late = eng.producer.take("cnt", "rows", "B", bid, 4)
        assert late is not None
        late_results = run_claim(jm, late)
        time.sleep(0.05)  # their calls returned before the abort commits
        aborted = jm.batch_abort(bid)
        exact(jm, "an abort")
        assert aborted.status is BatchStatus.ABORTED
        eng.completer.write(late, late_results, eng.log)
        eng.producer.forget(late)
        exact(jm, "a late write-back after the abort")

        # The slow query runs to its end; purge takes the batches and their counters.
        jm.run(stop_when_idle=True)
        exact(jm, "a worker run")
        assert jm.slowquery_done(qid).status is BatchStatus.SUCCESS
        # a batch's end folds its counters: one row per final status it has (a slow query: one)
        assert store_sql(jm.store, "SELECT status::text, shard, n FROM batch_counts WHERE batch = %s",
                         qid) == [("success", 0, 1)]
        report = jm.batch_purge(datetime.now(UTC) + timedelta(seconds=5))
        assert report.nbatches == 2
        exact(jm, "a purge")
        assert store_sql(jm.store, "SELECT count(*) FROM batch_counts")[0][0] == 0

        # A batch deleted by hand (its rows go by the foreign key's cascade) leaves no counter behind.
        gone = jm.batch_submit("cnt", "rows", {}, rows(5))
        store_sql(jm.store, "DELETE FROM batches WHERE id = %s", gone)
        exact(jm, "a cascading delete")
        assert store_sql(jm.store, "SELECT count(*) FROM batch_counts")[0][0] == 0
    finally:
        jm.close()


def test_counters_stay_exact_under_workers_and_a_kill(prefect_harness: None, database_url: str, redis_url: str,
                                                      file_store_url: str, tmp_path: Path) -> None:
    """Two worker processes on one batch, one SIGKILLed while it holds rows, the other finishing the batch
    after recovering them: a reader comparing counters with a recount sees no difference at any moment."""
    jm = manager(database_url, redis_url, file_store_url, recovery_sec=2, batchchunk_nrows=10)
    jm.register_batch_processor("cnt", "kill", Proc())
    data = [(n, {"x": n, "sleep": 0.005, **({"mode": "fail"} if n % 25 == 0 else {})}) for n in range(1, 1201)]
    bid = jm.batch_submit("cnt", "kill", {}, data)
    seen: list[list[tuple[Any, ...]]] = []
    checks = [0]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            found = drift(jm)
            checks[0] += 1
            if found:
                seen.append(found)
            time.sleep(0.01)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    log = str(tmp_path / "rows.log")
    try:
        with worker_processes([spawn_worker(database_url, file_store_url, "cnt", "kill", log, "--sleep", "0.02",
                                            "--chunk", "10", "--recovery-sec", "2",
                                            out=str(tmp_path / "worker.out"))]) as [worker]:
            kill_when_busy(jm, bid, worker, 50, timeout=90)
        exact(jm, "a worker killed holding rows")
        assert jm.batch_status(bid).ninprog > 0  # the dead worker's rows, still held
        jm.run(stop_when_idle=True)  # recovers them (as suspects) and finishes the batch
    finally:
        stop.set()
        poller.join(10)
        jm.close()
    jm = manager(database_url, redis_url, file_store_url)
    try:
        assert seen == [], f"a reader saw counters differ from a recount: {seen[:3]}"
        assert checks[0] > 20
        exact(jm, "recovery and the end of the batch")
        summary = jm.batch_status(bid)
        assert summary.status is BatchStatus.FAILED
        assert (summary.nsuccess, summary.nfailed) == (1152, 48)
    finally:
        jm.close()


def test_compaction_folds_shards_and_keeps_the_sums(jm: JobManager) -> None:
    jm.register_batch_processor("cnt", "many", Proc())
    bid = jm.batch_submit("cnt", "many", {}, rows(200))
    conns = [jm.store.engine.raw_connection() for _ in range(5)]  # five backends, five shards
    try:
        for i, conn in enumerate(conns):
            with conn.cursor() as cur:
                cur.execute("UPDATE batchrows SET status = 'inprog', doneby = 'w' WHERE batch = %s "
                            "AND line BETWEEN %s AND %s", (bid, i * 10 + 1, i * 10 + 10))
            conn.commit()
        jm.cache.delete(f"alya:{{{bid}}}:summary")
        before = jm.batch_status(bid)
        shards = store_sql(jm.store, "SELECT count(DISTINCT shard) FROM batch_counts WHERE batch = %s", bid)[0][0]
        assert shards >= 5
        # One shard is held by an open transaction: compaction skips it instead of waiting.
        with conns[0].cursor() as cur:
            cur.execute("UPDATE batchrows SET status = 'queued', doneby = NULL WHERE batch = %s AND line = 1", (bid,))
        with jm.store.tx() as q:
            crowded = q.crowded_counts(over=2, n=10)
            assert crowded == [bid]
            folded = q.fold_counts(ids=crowded)
        assert folded >= 4
        conns[0].rollback()
        exact(jm, "compaction")
        left = store_sql(jm.store, "SELECT count(*) FROM batch_counts WHERE batch = %s AND shard <> 0", bid)[0][0]
        assert left <= 2  # the held shard's rows (queued, inprog) at most
        jm.cache.delete(f"alya:{{{bid}}}:summary")
        after = jm.batch_status(bid)
        assert (after.nqueued, after.ninprog) == (before.nqueued, before.ninprog) == (150, 50)
    finally:
        for conn in conns:
            conn.close()


def test_status_of_an_open_batch_reads_the_counters(jm: JobManager) -> None:
    """Not a recount: a counter row added by hand shows in the uncached status (and nothing else does)."""
    jm.register_batch_processor("cnt", "read", Proc())
    bid = jm.batch_submit("cnt", "read", {}, rows(10))
    store_sql(jm.store, "INSERT INTO batch_counts (batch, status, shard, n) VALUES (%s, 'queued', 0, 5)", bid)
    jm.cache.delete(f"alya:{{{bid}}}:summary")
    assert jm.batch_status(bid).nqueued == 15
    with pytest.raises(AssertionError):
        exact(jm, "a counter changed by hand")


def test_a_drift_is_reported_at_the_batch_s_end_and_the_rows_win(jm: JobManager) -> None:
    """Rows moved behind the triggers' back (here: the counters changed by hand) cannot make a final batch's
    counts wrong: the summary recounts the rows, and says the counters were wrong."""
    from structlog.testing import capture_logs

    jm.register_batch_processor("cnt", "drift", Proc())
    bid = jm.batch_submit("cnt", "drift", {}, rows(5))
    store_sql(jm.store, "INSERT INTO batch_counts (batch, status, shard, n) VALUES (%s, 'failed', 0, 2)", bid)
    with capture_logs() as logs:
        jm.run(stop_when_idle=True)
    (drifted,) = [e for e in logs if e["event"] == "counters_drift"]
    assert drifted["batch"] == bid and drifted["log_level"] == "error"
    s = jm.batch_status(bid)
    assert (s.status, s.nsuccess, s.nfailed) == (BatchStatus.SUCCESS, 5, 0)


def test_a_drift_that_keeps_the_total_is_found_by_the_failed_rows(jm: JobManager) -> None:
    """The end trusts the counters only when they match what can be checked exactly and cheaply: here one
    row moved from success to failed in the counters alone (the total still right) is caught by the count
    of the failed rows' index, and the rows win."""
    from structlog.testing import capture_logs

    jm.register_batch_processor("cnt", "swap", Proc())
    bid = jm.batch_submit("cnt", "swap", {}, rows(6))
    store_sql(jm.store, "INSERT INTO batch_counts (batch, status, shard, n) VALUES (%s, 'success', 0, -1),"
              " (%s, 'failed', 0, 1)", bid, bid)
    with capture_logs() as logs:
        jm.run(stop_when_idle=True)
    (drifted,) = [e for e in logs if e["event"] == "counters_drift"]
    assert drifted["batch"] == bid
    s = jm.batch_status(bid)
    assert (s.status, s.nsuccess, s.nfailed) == (BatchStatus.SUCCESS, 6, 0)


def test_the_triggers_never_sort_nor_jit(jm: JobManager) -> None:
    """The triggers run under the statement's SET LOCALs (the claim's enable_sort = off made a Sort cost
    10^10, past jit_above_cost: each claim and write-back JIT-compiled the upsert, 126 ms a statement)."""
    found = store_sql(jm.store, "SELECT proname, proconfig, pg_get_functiondef(oid) FROM pg_proc "
                      "WHERE proname IN ('alya_count_updated', 'alya_count_deleted')")
    assert len(found) == 2
    for name, config, body in found:
        assert config == ["jit=off"], name
        assert "ORDER BY" not in body.upper(), name
    # and a claim (enable_sort off) with the counters costs about what it costs without them
    jm.register_batch_processor("cnt", "jit", Proc())
    bid = jm.batch_submit("cnt", "jit", {}, rows(2000))
    eng = jm.engine
    took = []
    for _ in range(4):
        t = time.perf_counter()
        claimed = eng.producer.take("cnt", "jit", "B", bid, 200)
        took.append(time.perf_counter() - t)
        assert claimed is not None
        eng.completer.release(claimed, [r.line for r in claimed.rows])
        eng.producer.forget(claimed)
    assert min(took) < 0.1, took  # JIT alone took 0.126 s
