"""Later and until (issue 20, item 4): ``not_before`` holds a batch's rows until then (no claim touches it
before; the maintenance leader wakes the workers when it comes), ``deadline`` ends the batch then (aborted,
"deadline passed", files of the finished rows written, mark_done once). On real PostgreSQL, Redis, a file
object store and the Prefect test harness (``jm.run``)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import fsspec
import pytest

from alya import BatchStatus, JobManager
from alya.core.errors import InvalidInput
from tests.support.faults import on_statement
from tests.support.procs import Proc, batch_row, finish, manager, rows, run_until_idle, states, wait_until
from tests.support.services import store_sql


def test_schedule_refusals_store_nothing(jm: JobManager) -> None:
    now = datetime.now(UTC)
    naive = datetime.now()
    bad: list[dict[str, Any]] = [
        {"not_before": naive}, {"deadline": naive + timedelta(hours=1)}, {"not_before": "2030-01-01T00:00:00Z"},
        {"deadline": now - timedelta(seconds=1)},  # already passed
        {"not_before": now + timedelta(hours=2), "deadline": now + timedelta(hours=1)},
        {"not_before": now + timedelta(hours=1), "deadline": now + timedelta(hours=1)},
    ]
    for kwargs in bad:
        with pytest.raises(InvalidInput):
            jm.batch_submit("ctl", "sched", {}, rows(3), **kwargs)
    assert store_sql(jm.store, "SELECT count(*) FROM batches")[0][0] == 0
    assert store_sql(jm.store, "SELECT count(*) FROM batchrows")[0][0] == 0
    # A not_before in the past is simply "now"; other time zones are fine.
    bid = jm.batch_submit("ctl", "sched", {}, rows(3), not_before=now - timedelta(days=1),
                          deadline=(now + timedelta(hours=1)).astimezone(timezone(timedelta(hours=5))))
    assert store_sql(jm.store, "SELECT notbefore < now(), deadline > now() FROM batches WHERE id = %s", bid)[0] == (
        True, True)


@pytest.mark.usefixtures("prefect_harness")  # jm.run
def test_a_not_before_batch_starts_after_its_time_and_not_before(database_url: str, redis_url: str,
                                                                  file_store_url: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that only polls every 30 s: nothing claims the batch before its not_before (no claim statement
    at all), its status stays queued, and the maintenance leader's NOTIFY starts it within a few seconds."""
    jm = manager(database_url, redis_url, file_store_url, poll_sec=30.0)
    started: list[float] = []
    proc = Proc(lambda line, input: started.append(time.time()))
    jm.register_batch_processor("ctl", "later", proc)
    claims: list[float] = []
    on_statement(monkeypatch, before=lambda name: claims.append(time.time()) if name == "claim_rows" else None)
    not_before = datetime.now(UTC) + timedelta(seconds=4)
    bid = jm.batch_submit("ctl", "later", {}, rows(20), not_before=not_before)
    with run_until_idle(jm) as runner:
        time.sleep(2.0)
        assert jm.batch_status(bid).status is BatchStatus.QUEUED and not started
        finish(runner)
    t = not_before.timestamp()
    print(f"\nnot_before: first claim {min(claims) - t:+.3f} s, first row {min(started) - t:+.3f} s after it")
    assert min(claims) >= t and min(started) >= t
    assert min(started) - t < 4.0  # woken by maintenance (duty `schedule`, every second), not its 30 s poll
    s = jm.batch_status(bid)
    assert (s.status, s.nsuccess) == (BatchStatus.SUCCESS, 20) and len(proc.done) == 1
    jm.close()


@pytest.mark.usefixtures("prefect_harness")  # jm.run
def test_a_deadline_passing_mid_batch(database_url: str, redis_url: str, file_store_url: str) -> None:
    """Rows of 50 ms on 2 slots (about 40 rows/s), deadline 3 s after the submit: the batch ends aborted with
    "deadline passed" within a few seconds of it; the output file holds exactly the rows that succeeded,
    in line order; counts, summary and mark_done (once) agree with the rows."""
    jm = manager(database_url, redis_url, file_store_url, concurrency=2, batchchunk_nrows=10)
    proc = Proc()
    jm.register_batch_processor("ctl", "until", proc)
    n = 400
    data = [(i, {"sleep": 0.05, "blobs": {"out.csv": f"{i}"}, **({"mode": "fail"} if i % 7 == 0 else {})})
            for i in range(1, n + 1)]
    deadline = datetime.now(UTC) + timedelta(seconds=3)
    bid = jm.batch_submit("ctl", "until", {}, data, deadline=deadline)
    with run_until_idle(jm) as runner:
        wait_until(lambda: jm.batch_status(bid).status.is_final, timeout=60, what="the batch ended")
        finish(runner)
        time.sleep(1.5)  # late write-backs and maintenance passes: nothing may change any more
    [(doneat,)] = store_sql(jm.store, "SELECT doneat FROM batches WHERE id = %s", bid)
    late = (doneat - deadline).total_seconds()
    st = states(jm, bid)
    ok = sorted(line for line, v in st.items() if v[0] == "success")
    failed = [line for line, v in st.items() if v[0] == "failed"]
    aborted = [line for line, v in st.items() if v[0] == "aborted"]
    print(f"\ndeadline: ended {late:.3f} s after it; {len(ok)} success, {len(failed)} failed, {len(aborted)} aborted")
    assert 0 <= late < 3.0
    assert ok and aborted and len(ok) + len(failed) + len(aborted) == n
    s = jm.batch_status(bid)
    assert (s.status, s.error, s.nsuccess, s.nfailed, s.naborted) == (
        BatchStatus.ABORTED, "deadline passed", len(ok), len(failed), len(aborted))
    with fsspec.open(s.outputfiles["out.csv"], "rt") as fh:
        assert [int(x) for x in fh.read().split()] == ok
    assert len(proc.done) == 1
    d = proc.done[0]
    assert (d.status, d.error, d.nsuccess, d.naborted) == (
        BatchStatus.ABORTED, "deadline passed", len(ok), len(aborted))
    assert jm.cleanup().notified == [] and len(proc.done) == 1 and batch_row(jm, bid)["notified"]
    assert sum(proc.calls.values()) >= len(ok) + len(failed)
    jm.close()


def test_a_deadline_ends_a_paused_batch_nobody_works_on(jm: JobManager) -> None:
    """No worker serves the batch, it is paused too: the deadline still ends it (here through jm.cleanup(),
    the sweeper's pass); its mark_done waits for a process with the processor, and is then called once."""
    bid = jm.batch_submit("ctl", "orphan", {"u": 1}, rows(5), deadline=datetime.now(UTC) + timedelta(seconds=1))
    jm.batch_pause(bid)
    assert jm.cleanup().deadlines == []
    time.sleep(1.2)
    assert jm.cleanup().deadlines == [bid]
    assert jm.cleanup().deadlines == []
    s = jm.batch_status(bid)
    assert (s.status, s.naborted, s.error, s.paused, s.outputfiles) == (
        BatchStatus.ABORTED, 5, "deadline passed", False, {})
    assert not batch_row(jm, bid)["notified"]
    proc = Proc()
    jm.register_batch_processor("ctl", "orphan", proc)
    assert jm.cleanup().notified == [bid]
    assert jm.cleanup().notified == []
    assert len(proc.done) == 1 and proc.done[0].error == "deadline passed"
