"""Aborts that land while workers run the batch's rows: jm.run and chunks in flight, the abort racing the
first claim and busy write-backs (no deadlock), the write-back racing the abort (results whose call
returned before it are kept, nothing else changes), and how soon rows stop starting after it."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from alya import BatchStatus, JobManager
from tests.support.config import make_config
from tests.support.faults import on_statement
from tests.support.procs import FastProc, Gauge, Proc, manager, rows, run_claim, states, wait_until
from tests.support.services import store_sql


@pytest.mark.usefixtures("prefect_harness")  # jm.run
def test_abort_while_running(database_url: str, redis_url: str, file_store_url: str) -> None:
    jm = manager(database_url, redis_url, file_store_url, batchchunk_nrows=20)
    calls: list[float] = []
    lock = threading.Lock()

    def hook(line: int, input: dict[str, Any]) -> None:
        with lock:
            calls.append(time.monotonic())

    proc = Proc(hook)
    jm.register_batch_processor("wrk", "abort", proc)
    data = [(n, {"x": n, "sleep": 0.02, **({"mode": "fail"} if n % 10 == 0 else {})}) for n in range(1, 1001)]
    bid = jm.batch_submit("wrk", "abort", {}, data)
    runner = threading.Thread(daemon=True, target=jm.run, kwargs={"stop_when_idle": True})
    try:
        runner.start()
        wait_until(lambda: sum(1 for s in states(jm, bid).values() if s[0] in ("success", "failed")) >= 60,
                   timeout=60, every=0.05, what="some rows done")
        summary = jm.batch_abort(bid)
        t_abort = time.monotonic()
        at_abort = states(jm, bid)
        assert summary.status is BatchStatus.ABORTED
        assert summary.nsuccess + summary.nfailed + summary.naborted == 1000
        # (rows whose call returned before the abort may be written back between the two reads: <=)
        assert summary.naborted >= sum(1 for s in at_abort.values() if s[0] == "aborted") > 0
        runner.join(30)
        assert not runner.is_alive(), "jm.run(stop_when_idle=True) did not return after the abort"
        t_stopped = time.monotonic()
    finally:
        if runner.is_alive():
            jm.engine.stopping.set()
            runner.join(30)
    after = states(jm, bid)
    changed = {n: (at_abort[n], after[n]) for n in after if after[n] != at_abort[n]}
    # rows whose call had returned when the abort committed keep their results (written with the next
    # flush); nothing else changes, and nothing goes back to the queue
    assert all(a[0] == "aborted" and b[0] in ("success", "failed") and proc.calls[n] == 1
               for n, (a, b) in changed.items()), changed
    assert len(changed) <= jm.config.concurrency * 60  # at most about a flush of rows per slot
    assert not any(s[0] in ("queued", "inprog") for s in after.values())
    last_call = max(calls)
    print(f"\nabort: last processor call {last_call - t_abort:.2f}s after it, run returned after "
          f"{t_stopped - t_abort:.2f}s; {summary.nsuccess + summary.nfailed} rows done, {summary.naborted} aborted")
    assert last_call - t_abort < 5.0, f"processor still called {last_call - t_abort:.1f}s after the abort"
    assert t_stopped - t_abort < 15
    s = jm.batch_status(bid)
    by_status = [st[0] for st in after.values()]
    assert (s.status, s.nsuccess, s.nfailed, s.naborted) == (
        BatchStatus.ABORTED, by_status.count("success"), by_status.count("failed"), by_status.count("aborted"))
    assert s.nsuccess + s.nfailed + s.naborted == s.nrows == 1000
    d = jm.batch_done(bid)
    assert d.rows is not None and len(d.rows) == 1000
    assert sum(1 for r in d.rows if r.status is BatchStatus.ABORTED) == s.naborted
    assert proc.done == []  # mark_done is for batches that ran to the end
    jm.close()


def test_abort_races_the_write_back(jm: JobManager) -> None:
    """Rows are running when the batch is aborted: the ones whose call had returned keep their results
    (their write-back comes after the abort), the one still running and the faulted one stay aborted;
    counts stay whole; no summary, no mark_done."""
    gate, entered = threading.Event(), threading.Event()

    def hook(line: int, input: dict[str, Any]) -> None:
        if line == 5:
            entered.set()
            assert gate.wait(30)

    proc = Proc(hook)
    jm.register_batch_processor("wrk", "race", proc)
    bid = jm.batch_submit("wrk", "race", {}, rows(5) + [(6, {"mode": "raise"})])
    rep: list[Any] = []
    t = threading.Thread(daemon=True, target=lambda: rep.append(jm.engine.process_chunk("wrk", "race")))
    t.start()
    assert entered.wait(30)
    summary = jm.batch_abort(bid)
    gate.set()
    t.join(30)
    assert summary.naborted == 6
    st = states(jm, bid)
    assert [st[n][0] for n in range(1, 7)] == ["success"] * 4 + ["aborted"] * 2
    s = jm.batch_status(bid)
    assert (s.status, s.nsuccess, s.nfailed, s.naborted) == (BatchStatus.ABORTED, 4, 0, 2)
    assert rep and rep[0].summarised == [] and proc.done == []
    assert jm.engine.summarise(bid) is False


def test_abort_racing_the_first_claim_does_not_deadlock(jm: JobManager, monkeypatch: pytest.MonkeyPatch) -> None:
    """An abort that arrives while a worker is claiming the first chunk of a queued batch: both lock the
    batch and its rows, and must do so in the same order, or PostgreSQL kills one of them (the user's
    abort failing with a deadlock)."""
    proc = Proc()
    jm.register_batch_processor("conc", "dead", proc)
    bid = jm.batch_submit("conc", "dead", {}, rows(30))
    claimed_rows, go = threading.Event(), threading.Event()

    def claimed(name: str) -> None:
        if name == "claim_rows" and not claimed_rows.is_set():
            claimed_rows.set()
            go.wait(10)  # the abort starts while this claim's transaction is open

    on_statement(monkeypatch, after=claimed)
    errors: list[BaseException] = []
    reports: list[Any] = []

    def work() -> None:
        try:
            reports.append(jm.engine.process_chunk("conc", "dead"))
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(daemon=True, target=work)
    t.start()
    assert claimed_rows.wait(10)
    aborted: list[Any] = []
    a = threading.Thread(daemon=True, target=lambda: aborted.append(jm.batch_abort(bid)))
    a.start()
    # Until the abort waits on a lock the claim holds (a fixed sleep was too short on a loaded machine).
    assert wait_until(lambda: store_sql(jm.store, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type"
                                                  " = 'Lock' AND datname = current_database()")[0][0] > 0, 20)
    go.set()
    t.join(30)
    a.join(30)
    assert not errors, errors
    assert aborted and aborted[0].status is BatchStatus.ABORTED and aborted[0].naborted == 30
    s = jm.batch_status(bid)
    assert (s.status, s.nsuccess, s.naborted) == (BatchStatus.ABORTED, 0, 30)
    assert proc.done == []


def test_aborts_during_busy_write_backs(database_url: str, redis_url: str, file_store_url: str) -> None:
    """Aborts landing among concurrent chunk write-backs: neither side ever fails (no deadlock: both lock
    the batch before its rows), and the counts always add up."""
    import random

    managers = [JobManager(database_url=database_url, redis_url=redis_url, object_store_url=file_store_url,
                           config=make_config(batchchunk_nrows=150)) for _ in range(3)]
    try:
        for m in managers:
            m.register_batch_processor("conc", "busy", FastProc())
        client, workers = managers[0], managers[1:]
        rnd = random.Random(7)
        errors: list[BaseException] = []
        for _ in range(12):
            bid = client.batch_submit("conc", "busy", {}, [(n, {}) for n in range(2000, 0, -1)])
            stop = threading.Event()

            def work(m: JobManager, stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    try:
                        if m.engine.process_chunk("conc", "busy").batch is None:
                            return
                    except BaseException as exc:
                        errors.append(exc)
                        return

            threads = [threading.Thread(daemon=True, target=work, args=(m,)) for m in workers]
            for t in threads:
                t.start()
            time.sleep(rnd.uniform(0.02, 0.3))
            try:
                s = client.batch_abort(bid)
            except Exception as exc:
                if "already ended" not in str(exc):
                    errors.append(exc)
                s = client.batch_status(bid)
            stop.set()
            for t in threads:
                t.join(30)
            assert not errors, errors
            assert s.nsuccess + s.nfailed + s.naborted == 2000
            # rows whose call returned before the abort keep their results when written after it
            at_abort, s = s, client.batch_status(bid)
            assert s.nsuccess + s.nfailed + s.naborted == 2000 and s.nsuccess >= at_abort.nsuccess
            actual = dict(store_sql(client.store,
                                    "SELECT status::text, count(*) FROM batchrows WHERE batch = %s GROUP BY 1", bid))
            assert actual.get("success", 0) == s.nsuccess and actual.get("aborted", 0) == s.naborted
    finally:
        for m in managers:
            m.close()


@pytest.mark.usefixtures("prefect_harness")  # jm.run
def test_an_abort_stops_the_batch_s_rows_at_once(database_url: str, redis_url: str, file_store_url: str) -> None:
    """The abort's notification reaches the worker in milliseconds: hardly any row starts after it (at
    most one per slot that was between two rows), the rows running finish and stay aborted, and the ones
    that returned before it keep their results."""
    jm = manager(database_url, redis_url, file_store_url, concurrency=4, batchchunk_nrows=1000)
    try:
        proc = Gauge(0.01)
        jm.register_batch_processor("rows", "stop", proc)
        bid = jm.batch_submit("rows", "stop", {}, rows(3000))
        runner = threading.Thread(daemon=True, target=jm.run, kwargs={"stop_when_idle": True})
        runner.start()
        wait_until(lambda: len(proc.started) >= 400, timeout=60, every=0.01, what="rows running")
        t_abort = time.monotonic()
        jm.batch_abort(bid)
        t_done = time.monotonic()
        runner.join(30)
        assert not runner.is_alive()
        late_starts = [s for s in proc.started if s > t_done + 0.1]
        print(f"\nabort: {len(proc.started)} calls, {len([s for s in proc.started if s > t_abort])} started after "
              f"the abort call, {len(late_starts)} more than 0.1 s after it returned")
        assert len(late_starts) <= 2 * jm.config.concurrency
        st = states(jm, bid)
        s = jm.batch_status(bid)
        counts = [v[0] for v in st.values()]
        assert (s.nsuccess, s.naborted) == (counts.count("success"), counts.count("aborted"))
        assert counts.count("success") >= len([x for x in proc.started if x < t_abort]) - 2 * jm.config.concurrency
    finally:
        jm.close()


def test_results_finished_before_an_abort_are_kept(jm: JobManager) -> None:
    """A row whose call returned before the abort's commit keeps its result, even if its write-back comes
    after the abort (the flush interval); one that returned after the abort stays aborted."""
    jm.register_batch_processor("rec", "abortlate", Proc())
    bid = jm.batch_submit("rec", "abortlate", {}, rows(6))
    eng = jm.engine
    claimed = eng.producer.take("rec", "abortlate", "B", None)
    assert claimed is not None
    results = run_claim(jm, claimed)
    before, after = results[:4], results[4:]
    aborted = jm.batch_abort(bid)
    assert aborted.naborted == 6
    res = eng.completer.write(claimed, before, eng.log)
    assert (res.status, res.written, res.late) == ("aborted", 4, 4)
    after = [o._replace(finished=time.time()) for o in after]  # these returned after the abort
    assert eng.completer.write(claimed, after, eng.log).written == 0
    st = states(jm, bid)
    assert [st[n][0] for n in sorted(st)] == ["success"] * 4 + ["aborted"] * 2
    s = jm.batch_status(bid)
    assert (s.status, s.nsuccess, s.naborted) == (BatchStatus.ABORTED, 4, 2)
    d = jm.batch_done(bid)
    assert (d.nsuccess, d.naborted) == (4, 2) and [r.status.value for r in d.rows or []].count("success") == 4
