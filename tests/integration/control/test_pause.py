"""Pause and resume (issue 20, item 3): on real PostgreSQL, Redis and worker processes. A pause stops new rows
of the batch from starting (rows running finish and are recorded, unstarted claimed rows are given back),
workers neither claim nor spin on a paused batch, a resume completes it, and an abort works on it."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest

from alya import BatchStatus, JobManager
from alya.core.errors import BatchNotFound, InvalidState
from tests.support.faults import on_statement
from tests.support.procs import (
    Gauge,
    Proc,
    QueryProc,
    batch_row,
    read_log,
    rows,
    spawn_worker,
    states,
    stop_workers,
    wait_until,
    wait_workers_registered,
    worker_processes,
)
from tests.support.services import store_sql


@pytest.mark.usefixtures("prefect_harness")
def test_pause_under_two_workers_then_resume(jm: JobManager, database_url: str, file_store_url: str,
                                            tmp_path: Any) -> None:
    """Two worker processes (4 slots each) run a batch of 50 ms rows; pause it midway: rows running then
    finish and are recorded, none starts after the pause has returned (beyond the NOTIFY's delivery), no row
    stays in progress, the status says paused (Redis included); resume: the batch completes, every row ran
    exactly once, one mark_done."""
    log = str(tmp_path / "rows.log")
    n = 400
    bid = jm.batch_submit("ctl", "work", {"tag": "p"}, [(i, {}) for i in range(1, n + 1)], wait=True)
    with worker_processes([spawn_worker(database_url, file_store_url, "ctl", "work", log, "--sleep", "0.05",
                                        "--chunk", "10", "--concurrency", "4", "--stamp",
                                        out=str(tmp_path / f"w{i}.out")) for i in range(2)]) as workers:
        wait_workers_registered(jm, 2)
        jm.wait_off(bid)
        wait_until(lambda: sum(1 for r in read_log(log) if r[0] == "end") >= 80, timeout=120, every=0.05,
                   what="80 rows done")
        t0 = time.time()
        s = jm.batch_pause(bid)
        t1 = time.time()
        assert s.paused and s.status is BatchStatus.INPROG
        assert jm.batch_status(bid).paused  # what pollers see (Redis)
        # Rows running at the pause finish (50 ms); claimed rows not started are given back when their
        # claims end. Then nothing moves while paused.
        wait_until(lambda: not any(st[0] == "inprog" for st in states(jm, bid).values()), timeout=30,
                   what="no row in progress")
        time.sleep(3.0)
        entries = read_log(log)
        starts = [float(r[4]) for r in entries if r[0] == "start"]
        late = [t - t1 for t in starts if t > t1]
        print(f"\npause: {len(starts)} rows started before it returned ({t1 - t0:.3f} s), {len(late)} after it "
              f"(the last {max(late, default=0):.3f} s after)")
        assert len(late) <= 8, late  # at most one per slot of the two workers, and only while the NOTIFY travels
        assert all(d < 1.0 for d in late), late
        ends = [r for r in entries if r[0] == "end"]
        assert len(ends) == len(starts)  # every row that started finished, and was recorded:
        st = states(jm, bid)
        done = [line for line, v in st.items() if v[0] == "success"]
        assert sorted(done) == sorted(int(r[2]) for r in ends)
        assert all(v[0] == "queued" for line, v in st.items() if line not in done)
        # (pollers see counts at most 5 s old: an open batch's cached summary expires, README "Cache")
        wait_until(lambda: (lambda s: (s.paused, s.nsuccess, s.nqueued, s.ninprog))(jm.batch_status(bid))
                   == (True, len(done), n - len(done), 0), timeout=15, what="the paused summary")
        assert n - len(done) > 100  # the pause came midway
        assert all(w.poll() is None for w in workers)

        s = jm.batch_resume(bid)
        assert not s.paused
        wait_until(lambda: jm.batch_status(bid).status.is_final, timeout=180, what="batch final after resume")
        codes = stop_workers(workers)
    assert codes == [0, 0]
    s = jm.batch_status(bid)
    assert (s.status, s.nsuccess, s.naborted, s.paused) == (BatchStatus.SUCCESS, n, 0, False)
    entries = read_log(log)
    assert Counter(int(r[2]) for r in entries if r[0] == "start") == Counter(range(1, n + 1))  # each once
    assert len({r[3] for r in entries if r[0] == "end"}) == 2  # both workers worked
    assert [r[0] for r in entries].count("done") == 1 and batch_row(jm, bid)["notified"]


def test_a_paused_batch_is_not_claimed_and_workers_do_not_spin(jm: JobManager, monkeypatch: pytest.MonkeyPatch) -> None:
    """While paused: no claim statement touches the batch (the open-batch listing leaves it out), its type
    has no claimable work, no summary; after the resume the engine finishes it."""
    proc = Proc()
    jm.register_batch_processor("ctl", "idle", proc)
    bid = jm.batch_submit("ctl", "idle", {}, rows(30))
    jm.batch_pause(bid)
    claims: list[str] = []
    on_statement(monkeypatch, before=lambda name: claims.append(name) if name.startswith("claim_") else None)
    assert jm.engine.types_with_work([("ctl", "idle")]) == []
    rep = jm.engine.work("ctl", "idle", seconds=1.0, linger=1.0)  # a lingering claim loop: nothing to do
    assert (rep.nrows, rep.batch, claims) == (0, None, [])
    assert jm.engine.next_claimable_in(bid) is None  # a dispatched run of it ends instead of waiting
    assert jm.cleanup().summarised == []
    assert sum(proc.calls.values()) == 0
    jm.batch_resume(bid)
    assert jm.engine.types_with_work([("ctl", "idle")]) == [("ctl", "idle")]
    while jm.engine.process_chunk("ctl", "idle").batch is not None:
        pass
    s = jm.batch_status(bid)
    assert (s.status, s.nsuccess, s.paused) == (BatchStatus.SUCCESS, 30, False)
    assert len(proc.done) == 1


def test_pause_stops_rows_held_in_the_row_pool(jm: JobManager) -> None:
    """A claim loop holds 40 rows of 0.2 s on 2 slots; at the pause, the rows running finish, the others are
    never started and go back to the queue with their attempt restored."""
    g = Gauge(sleep=0.2)
    jm.register_batch_processor("ctl", "pool", g)
    bid = jm.batch_submit("ctl", "pool", {}, rows(40))
    jm.engine.start()
    t = threading.Thread(daemon=True, target=lambda: jm.engine.work("ctl", "pool", claim_size=40, max_claims=1,
                                                                     seconds=60))
    t.start()
    wait_until(lambda: len(g.started) >= 4, timeout=30, every=0.02, what="rows started")
    jm.batch_pause(bid)
    t_paused = time.monotonic()
    t.join(30)
    assert not t.is_alive()
    late = [x - t_paused for x in g.started if x > t_paused]
    assert len(late) <= 2 and all(d < 1.0 for d in late), late  # the NOTIFY's delivery: at most a slot each
    st = states(jm, bid)
    ran = {line for line, n in g.calls.items() if n}
    assert all(st[line][0] == "success" for line in ran)
    assert all(st[line] == ("queued", 0, None) for line in st if line not in ran)  # attempt given back
    assert len(ran) < 20


def test_a_claim_that_raced_the_pause_is_cancelled_when_it_registers(jm: JobManager) -> None:
    """The pause notice came before the claim (whose statement read the batch before the pause committed)
    registered: the claim is cancelled at once, so none of its rows starts."""
    jm.register_batch_processor("ctl", "race", Proc())
    bid = jm.batch_submit("ctl", "race", {}, rows(5))
    jm.engine.start()
    producer = jm.engine.producer
    assert producer.pause_noticed(bid, True) == []
    claimed = producer.take("ctl", "race", "B", None, 5)
    assert claimed is not None and claimed.cancelled and len(claimed.rows) == 5
    producer.forget(claimed)
    producer.pause_noticed(bid, False)  # a resume: claims register normally again
    jm.engine.completer.release(claimed, [r.line for r in claimed.rows])
    again = producer.take("ctl", "race", "B", None, 5)
    assert again is not None and not again.cancelled


def test_abort_of_a_paused_batch(jm: JobManager) -> None:
    proc = Proc()
    jm.register_batch_processor("ctl", "ab", proc)
    bid = jm.batch_submit("ctl", "ab", {}, rows(10))
    assert jm.batch_pause(bid).paused
    s = jm.batch_abort(bid)
    assert (s.status, s.naborted, s.paused) == (BatchStatus.ABORTED, 10, False)
    assert jm.batch_status(bid).status is BatchStatus.ABORTED
    assert jm.batch_done(bid).rows is not None and proc.done == []
    with pytest.raises(InvalidState):
        jm.batch_resume(bid)


def test_pause_refusals_and_idempotence(jm: JobManager) -> None:
    """Pausing a paused batch (or resuming a running one) changes nothing, not even the version; a final
    batch, a slow query and an unknown id are refused with nothing changed."""
    jm.register_batch_processor("ctl", "ref", Proc())
    jm.register_slowquery_processor("ctl", "q", QueryProc())
    bid = jm.batch_submit("ctl", "ref", {}, rows(3), wait=True)
    assert not jm.batch_resume(bid).paused
    ver = int(store_sql(jm.store, "SELECT ver FROM batches WHERE id = %s", bid)[0][0])
    assert jm.batch_pause(bid).paused
    assert jm.batch_pause(bid).paused  # idempotent
    assert int(store_sql(jm.store, "SELECT ver FROM batches WHERE id = %s", bid)[0][0]) == ver + 1
    jm.wait_off(bid)  # released while paused: queued, still paused (the cache says so too)
    s = jm.batch_status(bid)
    assert (s.status, s.paused) == (BatchStatus.QUEUED, True)
    assert jm.engine.process_chunk("ctl", "ref").batch is None
    jm.batch_resume(bid)
    jm.engine.process_chunk("ctl", "ref")
    assert jm.batch_status(bid).status is BatchStatus.SUCCESS
    for call in (jm.batch_pause, jm.batch_resume):
        with pytest.raises(InvalidState):
            call(bid)
    qid = jm.slowquery_submit("ctl", "q", {}, {"q": 1})
    with pytest.raises(InvalidState):
        jm.batch_pause(qid)
    with pytest.raises(BatchNotFound):
        jm.batch_pause("00000000-0000-4000-8000-000000000000")
    assert store_sql(jm.store, "SELECT count(*) FROM batches WHERE paused")[0][0] == 0
