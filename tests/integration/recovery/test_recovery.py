"""Recovery: a worker killed mid-batch (its rows go to another worker; a crash replays at most about a
flush of rows), late writes from a worker presumed dead, write failures, and the idempotent cleanup()."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from alya import BackendUnavailable, BatchStatus, JobManager
from alya.engine.maintenance import cleanup
from tests.support.faults import on_statement
from tests.support.procs import (
    Proc,
    drain,
    kill_when_busy,
    manager,
    read_log,
    rows,
    run_claim,
    spawn_worker,
    wait_until,
    worker_processes,
)
from tests.support.services import store_sql


def states(jm: JobManager, batch: str) -> dict[int, tuple[Any, ...]]:
    found = store_sql(jm.store, "SELECT line, status::text, attempts, doneby, res FROM batchrows "
                      "WHERE batch = %s", batch)
    return {r[0]: tuple(r[1:]) for r in found}


def age_worker(jm: JobManager, worker: str, sec: int = 3600) -> None:
    store_sql(jm.store, "UPDATE workers SET lastseen = now() - make_interval(secs => %s) WHERE id = %s",
              sec, worker)


def stop_heartbeat(jm: JobManager) -> None:
    jm.engine.identity.stop(forget=False)


# ---------------------------------------------------------------------------------- a killed worker
@pytest.mark.usefixtures("prefect_harness")
def test_sigkill_mid_batch_rows_go_to_another_worker(database_url: str, redis_url: str, file_store_url: str,
                                                     tmp_path: Path) -> None:
    log = str(tmp_path / "rows.log")
    jm = manager(database_url, redis_url, file_store_url, recovery_sec=2, batchchunk_nrows=10)
    proc = Proc()
    jm.register_batch_processor("rec", "kill", proc)
    data = [(n, {"x": n, "mode": "fail"} if n % 25 == 0 else {"x": n}) for n in range(1, 201)]
    bid = jm.batch_submit("rec", "kill", {"tag": "k"}, data)
    with worker_processes([spawn_worker(database_url, file_store_url, "rec", "kill", log, "--sleep", "0.1",
                                        "--chunk", "10", "--recovery-sec", "2",
                                        out=str(tmp_path / "worker.out"))]) as [worker]:
        kill_when_busy(jm, bid, worker, 20, timeout=60)  # while it holds a chunk, after it has finished a few
    at_kill = states(jm, bid)
    held = {line for line, s in at_kill.items() if s[0] == "inprog"}
    finished = {line: s for line, s in at_kill.items() if s[0] in ("success", "failed")}
    dead_id = next(iter(at_kill[min(held)][2:3]))
    assert held and all(at_kill[n][2] == dead_id for n in held)
    started = {int(r[2]) for r in read_log(log) if r[0] == "start"}
    assert held & started  # it was in the middle of a chunk
    try:
        t0 = time.monotonic()
        jm.run(stop_when_idle=True)  # waits for the dead worker's rows to be recovered, then does them
        took = time.monotonic() - t0
    finally:
        jm.close()
    jm = manager(database_url, redis_url, file_store_url)
    try:
        after = states(jm, bid)
        assert all(s[0] in ("success", "failed") for s in after.values())
        for line in held:  # recovered with their attempt given back (which one killed it is unknown), redone
            assert after[line][1] == at_kill[line][1] and after[line][2] != dead_id
        for line, s in finished.items():  # what the dead worker finished stays as it was
            assert after[line] == s
        s = jm.batch_status(bid)
        assert (s.status, s.nrows, s.nsuccess, s.nfailed, s.naborted) == (BatchStatus.FAILED, 200, 192, 8, 0)
        assert s.nsuccess == sum(1 for v in after.values() if v[0] == "success")
        assert len(proc.done) == 1 and proc.done[0].nfailed == 8
        assert took < 60
    finally:
        jm.close()


def test_rows_of_a_live_worker_are_not_recovered(jm: JobManager) -> None:
    jm.register_batch_processor("rec", "live", Proc())
    bid = jm.batch_submit("rec", "live", {}, rows(5))
    jm.engine.start()
    claimed = jm.engine.producer.take("rec", "live", "B", None)
    assert claimed is not None
    rep = cleanup(jm.engine, types=[("rec", "live")])
    assert rep.requeued == 0 and all(s[0] == "inprog" for s in states(jm, bid).values())


def test_recovery_fails_rows_that_used_their_attempts(jm: JobManager) -> None:
    """A row that keeps killing its workers ends failed instead of looping forever: a suspect (held alone)
    whose attempts are used up fails; the other rows of a dead worker get their attempt back as suspects."""
    jm.register_batch_processor("rec", "poison", Proc())
    bid = jm.batch_submit("rec", "poison", {}, rows(3))
    claimed = jm.engine.producer.take("rec", "poison", "B", None)
    assert claimed is not None
    store_sql(jm.store, "UPDATE batchrows SET attempts = 3, suspect = true WHERE batch = %s AND line = 2", bid)
    stop_heartbeat(jm)
    age_worker(jm, claimed.worker)
    rep = cleanup(jm.engine, types=[("rec", "poison")])
    assert (rep.requeued, rep.failed) == (2, 1)
    st = states(jm, bid)
    assert st[1][:2] == ("queued", 0) and st[3][:2] == ("queued", 0) and st[2][:2] == ("failed", 3)
    assert cleanup(jm.engine).requeued == 0  # idempotent
    jm.engine.producer.forget(claimed)  # the claim died with its (simulated) worker
    jm.engine.start()
    drain(jm, "rec", "poison")
    done = jm.batch_done(bid)
    assert done.status is BatchStatus.FAILED and (done.nsuccess, done.nfailed) == (2, 1)
    msg = done.rows[1].messages[0]  # type: ignore[index]
    assert msg.errcode == "processing_error" and "worker lost" in (msg.vals or [""])[0]


# ---------------------------------------------------------------------------------- late writes
def test_late_write_from_a_dead_worker_changes_nothing(database_url: str, redis_url: str, file_store_url: str) -> None:
    """Worker A claims and processes a chunk, then goes silent; cleanup requeues its rows, worker B does
    them; A's answer arrives afterwards and must not change a thing."""
    a = manager(database_url, redis_url, file_store_url, recovery_sec=2)
    b = manager(database_url, redis_url, file_store_url, recovery_sec=2)
    try:
        gate, entered = threading.Event(), threading.Event()

        def hook(line: int, input: dict[str, Any]) -> None:
            if line == 3:
                entered.set()
                assert gate.wait(60)

        pa = Proc(hook)
        a.register_batch_processor("rec", "late", pa)
        pb = Proc()
        b.register_batch_processor("rec", "late", pb)
        bid = a.batch_submit("rec", "late", {}, [(n, {"x": n}) for n in range(1, 6)])
        reports: list[Any] = []
        ta = threading.Thread(daemon=True, target=lambda: reports.append(a.engine.process_chunk("rec", "late")))
        ta.start()
        assert entered.wait(30)
        a_id = a.engine.worker_id
        stop_heartbeat(a)  # A goes silent (a long GC pause, a network partition...)
        age_worker(a, a_id)
        rep = cleanup(b.engine, types=[("rec", "late")])
        assert rep.requeued == 5
        drain(b, "rec", "late")
        before = states(b, bid)
        assert all(s[0] == "success" and s[1] == 1 and s[2] == b.engine.worker_id for s in before.values())
        assert len(pb.done) == 1
        summary = b.batch_status(bid)
        gate.set()  # A wakes up and writes its (stale) results
        ta.join(30)
        assert reports and reports[0].nrows == 5 and reports[0].summarised == []
        assert states(b, bid) == before
        assert b.batch_status(bid) == summary
        assert len(pa.done) == 0 and len(pb.done) == 1
    finally:
        a.close()
        b.close()


def test_late_write_while_another_worker_holds_the_rows(jm: JobManager, database_url: str, redis_url: str,
                                                        file_store_url: str) -> None:
    """The stale answer arrives while the rows are inprog again under another worker (and, separately,
    under the same worker at a newer attempt): neither is touched."""
    other = manager(database_url, redis_url, file_store_url)
    try:
        proc = Proc()
        jm.register_batch_processor("rec", "held", proc)
        other.register_batch_processor("rec", "held", Proc())
        bid = jm.batch_submit("rec", "held", {}, rows(4))
        eng = jm.engine
        old = eng.producer.take("rec", "held", "B", None)
        assert old is not None
        results = run_claim(jm, old)
        # requeued as if A had died, then claimed by the other worker
        store_sql(jm.store, "UPDATE batchrows SET status = 'queued', doneby = NULL WHERE batch = %s", bid)
        again = other.engine.producer.take("rec", "held", "B", None)
        assert again is not None and len(again.rows) == 4
        assert eng.completer.write(old, results, eng.log).written == 0
        assert all(s[:3] == ("inprog", 2, other.engine.worker_id) for s in states(jm, bid).values())
        # and the same worker re-claiming at a newer attempt: the old attempt's answer is refused too
        store_sql(jm.store, "UPDATE batchrows SET status = 'queued', doneby = NULL WHERE batch = %s", bid)
        newer = eng.producer.take("rec", "held", "B", None)
        assert newer is not None
        assert eng.completer.write(old, results, eng.log).written == 0
        assert all(s[:3] == ("inprog", 3, eng.worker_id) for s in states(jm, bid).values())
        newer_results = run_claim(jm, newer)
        assert eng.completer.write(newer, newer_results, eng.log).written == 4
        assert all(s[:2] == ("success", 3) for s in states(jm, bid).values())
    finally:
        other.close()


# ---------------------------------------------------------------------------------- write failures
def _failing_writes(monkeypatch: pytest.MonkeyPatch, names: set[str], times: int) -> list[str]:
    failed: list[str] = []

    def fail(name: str) -> None:
        if name in names and len(failed) < times:
            failed.append(name)
            raise BackendUnavailable("PostgreSQL failed: connection lost")

    on_statement(monkeypatch, before=fail)
    return failed


def test_write_back_survives_a_short_outage(jm: JobManager, monkeypatch: pytest.MonkeyPatch) -> None:
    proc = Proc()
    jm.register_batch_processor("rec", "blip", proc)
    bid = jm.batch_submit("rec", "blip", {}, rows(10))
    failed = _failing_writes(monkeypatch, {"write_results"}, 2)
    drain(jm, "rec", "blip")
    assert failed == ["write_results"] * 2
    assert jm.batch_status(bid).status is BatchStatus.SUCCESS and sum(proc.calls.values()) == 10


def test_write_back_failing_gives_the_rows_back(jm: JobManager, monkeypatch: pytest.MonkeyPatch) -> None:
    proc = Proc()
    jm.register_batch_processor("rec", "down", proc)
    bid = jm.batch_submit("rec", "down", {}, rows(10))
    _failing_writes(monkeypatch, {"write_results"}, 4)
    assert jm.engine.process_chunk("rec", "down").nrows == 0  # nothing written; logged, not raised
    assert all(s[:3] == ("queued", 0, None) for s in states(jm, bid).values())
    drain(jm, "rec", "down")
    assert jm.batch_status(bid).status is BatchStatus.SUCCESS


def test_rows_never_stay_inprog_under_a_live_worker(database_url: str, redis_url: str, file_store_url: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither the write-back nor the release can reach the database: the worker drops its identity, so
    the rows it held are recovered like a dead worker's, although the process and its heartbeat live on."""
    jm = manager(database_url, redis_url, file_store_url, recovery_sec=1)
    try:
        jm.register_batch_processor("rec", "lost", Proc())
        bid = jm.batch_submit("rec", "lost", {}, rows(10))
        jm.engine.start()
        old_id = jm.engine.worker_id
        _failing_writes(monkeypatch, {"write_results", "release_rows"}, 5)
        assert jm.engine.process_chunk("rec", "lost").nrows == 0
        assert jm.engine.worker_id != old_id
        assert all(s[0] == "inprog" and s[2] == old_id for s in states(jm, bid).values())
        wait_until(lambda: cleanup(jm.engine).requeued == 10, timeout=10, every=0.3, what="recovery")
        drain(jm, "rec", "lost")
        s = jm.batch_status(bid)
        assert s.status is BatchStatus.SUCCESS and s.nsuccess == 10
        assert all(v[1] == 1 for v in states(jm, bid).values())  # the lost attempt was given back
    finally:
        jm.close()


def test_cleanup_is_idempotent(jm: JobManager) -> None:
    proc = Proc()
    jm.register_batch_processor("rec", "idem", proc)
    bid = jm.batch_submit("rec", "idem", {}, rows(3))
    original = jm.engine.summarise
    jm.engine.summarise = lambda b: False  # type: ignore[method-assign]  # the summary is "missed"
    drain(jm, "rec", "idem")
    jm.engine.summarise = original  # type: ignore[method-assign]
    first = cleanup(jm.engine, types=[("rec", "idem")])
    assert first.summarised == [bid] and len(proc.done) == 1
    for _ in range(3):
        rep = cleanup(jm.engine, types=[("rec", "idem")])
        assert (rep.requeued, rep.failed, rep.summarised, rep.notified) == (0, 0, [], [])
    assert len(proc.done) == 1


def test_stale_release_leaves_a_newer_claim_alone(jm: JobManager) -> None:
    """Rows recovered and claimed again by the same worker: giving back the old claim (shutdown, init
    failure) must not requeue the rows that the newer claim is processing."""
    jm.register_batch_processor("rec", "rel", Proc())
    bid = jm.batch_submit("rec", "rel", {}, rows(4))
    eng = jm.engine
    eng.start()
    old = eng.producer.take("rec", "rel", "B", None)
    assert old is not None
    store_sql(jm.store, "UPDATE batchrows SET status = 'queued', doneby = NULL WHERE batch = %s", bid)
    eng.producer.forget_hints()
    newer = eng.producer.take("rec", "rel", "B", None)
    assert newer is not None
    assert eng.completer.release(old, [r.line for r in old.rows])
    assert all(s[:3] == ("inprog", 2, eng.worker_id) for s in states(jm, bid).values())
    assert eng.completer.release(newer, [r.line for r in newer.rows])
    assert all(s[:3] == ("queued", 1, None) for s in states(jm, bid).values())


def test_a_row_that_kills_its_worker_ends_alone(database_url: str, file_store_url: str, tmp_path: Any) -> None:
    """Line 25 of 200 kills its process every time (os._exit). Its worker is restarted as a supervisor
    would: the rows held at each death come back as suspects without spending an attempt, suspects run
    alone, and only line 25 spends its attempts and ends failed; the 199 good rows succeed."""
    log = str(tmp_path / "rows.log")
    jm = manager(database_url, None, file_store_url, recovery_sec=2)
    try:
        jm.register_batch_processor("rec", "poison", Proc())
        bid = jm.batch_submit("rec", "poison", {"tag": "p"},
                              [(n, {"mode": "exit"} if n == 25 else {}) for n in range(1, 201)])
        starts = 0
        while not jm.batch_status(bid).status.is_final and starts < 8:
            w = spawn_worker(database_url, file_store_url, "rec", "poison", log, "--recovery-sec", "2", "--idle",
                             "--chunk", "50", out=str(tmp_path / f"w{starts}.out"))
            starts += 1
            w.wait(120)
        s = jm.batch_status(bid)
        d = jm.batch_done(bid)
        assert d.rows is not None
        print(f"\npoison row: {starts} worker starts; {s.nsuccess} success, {s.nfailed} failed")
        assert (s.status, s.nsuccess, s.nfailed) == (BatchStatus.FAILED, 199, 1)
        (bad,) = [r for r in d.rows if r.status is BatchStatus.FAILED]
        assert bad.line == 25 and "worker lost" in str(bad.messages[0].vals)
        assert starts <= 1 + jm.config.max_attempts + 1
    finally:
        jm.close()


# ---------------------------------------------------------------------------------- a crash's replays
def test_a_crash_replays_at_most_about_a_flush(prefect_harness: None, jm: JobManager, database_url: str,
                                               file_store_url: str, tmp_path: Path) -> None:
    """SIGKILL of a worker mid-batch: rows it had finished and written are not run again; only the rows
    it finished since its last write-back (a flush, or FLUSH_ROWS rows) and those running are replayed."""
    log = str(tmp_path / "rows.log")
    jm.register_batch_processor("rows", "crash", Proc())
    bid = jm.batch_submit("rows", "crash", {"tag": "c"}, rows(3000))
    victim = spawn_worker(database_url, file_store_url, "rows", "crash", log, "--sleep", "0.01", "--chunk", "500",
                          "--recovery-sec", "2", "--concurrency", "4", out=str(tmp_path / "victim.out"))
    try:
        wait_until(lambda: sum(1 for r in read_log(log) if r[0] == "end") >= 600, timeout=120, every=0.05,
                   what="the worker to have finished rows")
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    finally:
        if victim.poll() is None:
            victim.kill()
    finished_before = {int(r[2]) for r in read_log(log) if r[0] == "end"}
    heir = spawn_worker(database_url, file_store_url, "rows", "crash", log, "--sleep", "0.0", "--chunk", "500",
                        "--recovery-sec", "2", "--idle")
    try:
        assert heir.wait(120) == 0
    finally:
        if heir.poll() is None:
            heir.kill()
    ends = [int(r[2]) for r in read_log(log) if r[0] == "end"]
    replayed = len(ends) - len(set(ends))
    s = jm.batch_status(bid)
    print(f"\ncrash: {len(finished_before)} rows finished before SIGKILL, {replayed} replayed")
    assert (s.status, s.nsuccess) == (BatchStatus.SUCCESS, 3000)
    assert set(ends) == set(range(1, 3001))
    assert replayed <= 4 * 100 + 100  # 4 slots: at most ~FLUSH_ROWS per write-back plus the rows running
