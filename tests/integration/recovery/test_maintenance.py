"""Maintenance duties are done by one worker at a time, and move to another when that one dies.

Real worker processes (``jm.run()``) and real leases: the holder of a duty is read from
``maintenance_leases``."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from alya import BatchStatus, JobManager
from alya.engine.maintenance import RECOVERY, Maintenance, mark_done_duty
from tests.support.config import make_config
from tests.support.procs import Proc, read_log, spawn_worker, wait_until
from tests.support.services import sql


def holders(database_url: str, duty: str) -> list[str]:
    """The worker whose lease on ``duty`` has not run out (none or one)."""
    return [r[0] for r in sql(database_url, "SELECT holder FROM maintenance_leases WHERE duty = %s AND expires > now()",
                              duty)]


def pid_of(worker_id: str) -> int:
    return int(worker_id.split(":")[1])


def test_each_duty_is_held_once_and_given_up_on_close(jm: JobManager, database_url: str,
                                                      file_store_url: str) -> None:
    """In one process: two engines' maintenance compete for the same duties; only one gets each, closing it
    gives them up at once, and a lease that is not renewed runs out."""
    other = JobManager(database_url=database_url, object_store_url=file_store_url,
                       config=make_config())
    try:
        a = Maintenance(jm.store, jm.engine.identity, 60)
        b = Maintenance(other.store, other.engine.identity, 60)
        duties = [RECOVERY, mark_done_duty("app", "op")]
        assert a.hold(duties) == set(duties)
        assert b.hold(duties) == set()
        assert holders(database_url, RECOVERY) == [jm.engine.worker_id]
        a.close()
        assert b.hold(duties) == set(duties)
        assert holders(database_url, RECOVERY) == [other.engine.worker_id]
        b.close()
        assert holders(database_url, RECOVERY) == []
        # a holder that stops renewing (dead, hung, cut off) loses its duties when the lease runs out
        assert a.hold(duties) == set(duties)
        sql(database_url, "UPDATE maintenance_leases SET expires = now() - interval '1 second'")
        assert b.hold(duties) == set(duties)
        assert a.hold(duties) == set()
    finally:
        other.close()


@pytest.mark.usefixtures("prefect_harness")
def test_maintenance_moves_to_a_live_worker_when_its_holder_is_killed(
        database_url: str, redis_url: str, file_store_url: str, tmp_path: Path) -> None:
    """Two worker processes share a batch; the one holding the recovery duty is SIGKILLed while it holds
    rows. The survivor takes the duty, recovers the dead worker's rows and the batch ends with every row
    done exactly once in its counts, and mark_done called once."""
    log = str(tmp_path / "rows.log")
    args = ["--sleep", "0.05", "--chunk", "10", "--recovery-sec", "2", "--concurrency", "4"]
    workers = [spawn_worker(database_url, file_store_url, "mnt", "op", log, *args, out=str(tmp_path / f"w{i}.out"))
               for i in range(2)]
    jm = JobManager(database_url=database_url, redis_url=redis_url, object_store_url=file_store_url,
                    config=make_config(recovery_sec=2))
    try:
        jm.register_batch_processor("mnt", "op", Proc())  # for batch_submit's check of the type only
        leader = wait_until(lambda: holders(database_url, RECOVERY), timeout=60, what="a recovery duty holder")
        assert len(leader) == 1
        by_pid = {w.pid: w for w in workers}
        victim = by_pid[pid_of(leader[0])]
        survivor = next(w for w in workers if w is not victim)
        assert holders(database_url, mark_done_duty("mnt", "op")) == leader  # the first to try got both

        def victim_busy(bid: str) -> bool:
            rows = sql(database_url, "SELECT count(*) FROM batchrows WHERE batch = %s AND status = 'inprog' "
                       "AND doneby LIKE %s", bid, f"%:{victim.pid}:%")
            return rows[0][0] > 0

        # Under load one worker can take a whole small batch before the other claims: submit another until
        # the leader is caught holding rows.
        for _ in range(5):
            bid = jm.batch_submit("mnt", "op", {"tag": "m"}, [(n, {"x": n}) for n in range(1, 601)])
            try:
                wait_until(lambda b=bid: victim_busy(b) or jm.batch_status(b).status.is_final, timeout=60,
                           every=0.02, what="the leader to hold rows")
            except AssertionError:
                tails = [(tmp_path / f"w{i}.out").read_text()[-2000:] for i in range(2)]
                raise AssertionError(f"no rows claimed in 60 s; the workers said: {tails}") from None
            if victim_busy(bid):
                break
        else:
            raise AssertionError("the leader never held rows of 5 batches")
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(10) == -signal.SIGKILL
        t0 = time.monotonic()
        new = wait_until(lambda: [h for h in holders(database_url, RECOVERY) if pid_of(h) != victim.pid],
                         timeout=30, what="the duty to move")  # once the dead holder's lease ran out
        assert pid_of(new[0]) == survivor.pid
        took_over = time.monotonic() - t0

        def final() -> Any:
            s = jm.batch_status(bid)
            return s if s.status.is_final else None

        s = wait_until(final, timeout=90, every=0.2, what="the batch to finish")
        assert s.status is BatchStatus.SUCCESS and s.nsuccess == 600 and s.nfailed == s.naborted == 0
        done = [r for r in read_log(log) if r[0] == "done" and r[1] == bid]
        assert len(done) == 1 and done[0][2] == str(survivor.pid)
        assert took_over < 15  # the survivor's next tick (every recovery_sec / 4, at least 1 s)
    finally:
        for w in workers:
            if w.poll() is None:
                w.terminate()
                try:
                    w.wait(20)
                except Exception:
                    w.kill()
        jm.close()
