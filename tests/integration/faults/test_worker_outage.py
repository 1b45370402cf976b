"""A PostgreSQL outage must not kill ``jm.run(stop_when_idle=True)`` workers (it used to
raise BackendUnavailable from ``open_work`` and leave rows inprog with no worker). A worker process, run as
a user runs it (tests/support/worker_main.py ``--idle``), is mid-batch when its PostgreSQL (a private one: the
shared server is never stopped) goes down for 10 s. It must live through the outage, say that it is
waiting, and once the server is back finish the batch by itself and exit 0: every row done exactly once
in the counts, mark_done called once. (A claim loop that failed mid-claim used to leave its claims held by
the process, so the rows the restart left to recovery, which come back as suspects run only while nothing
is held, were never claimed again: the worker never got idle and never returned.) The figures are printed
(``pytest -s``)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from alya import BatchStatus, JobManager
from tests.support.config import make_config
from tests.support.faults import private_postgres
from tests.support.procs import read_log, spawn_worker, wait_until
from tests.support.services import sql

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

APP, OP = "outage", "slow"
NROWS = 200
OUTAGE_SEC = 10.0
ROW_SEC = 0.05  # two slots: about 5 s of rows, so the worker is mid-batch when the server goes
RECOVERY_SEC = 2  # rows held when the server died are requeued this long after the restart
# what a worker logs while PostgreSQL does not answer (the loop's own lines, and its write-backs/heartbeat)
OUTAGE_EVENTS = {"worker_loop_failed", "flow_failed", "write_failed", "heartbeat_failed", "release_failed",
                 "abort_check_failed", "forget_worker_failed", "worker_identity_retired"}


def log_lines(path: Path, start: int = 0) -> list[dict[str, Any]]:
    """The worker's JSON log lines from byte ``start`` on (Prefect's and other text lines are skipped)."""
    out = []
    with open(path, "rb") as fh:
        fh.seek(start)
        for raw in fh:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict) and "event" in line:
                out.append(line)
    return out


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_stop_when_idle_worker_rides_out_a_10_s_database_outage(mode: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALYA_LOG_FORMAT", "json")  # the worker inherits these: its lines are parsed below
    monkeypatch.setenv("ALYA_LOG_LEVEL", "info")
    rows_log = str(tmp_path / "rows.log")
    out = tmp_path / "worker.out"
    store = (tmp_path / "objects").as_uri()
    with private_postgres() as pg:
        url = pg.create_database("alya")
        jm = JobManager(database_url=url, object_store_url=store, config=make_config())
        try:
            bid = jm.batch_submit(APP, OP, {"tag": "o"}, [(n, {"x": n}) for n in range(1, NROWS + 1)])
            worker = spawn_worker(url, store, APP, OP, rows_log, "--sleep", str(ROW_SEC), "--chunk", "20",
                                  "--recovery-sec", str(RECOVERY_SEC), "--concurrency", "2", "--idle", out=str(out))
            try:
                # mid-batch: some rows written back, more claimed and running
                def busy() -> bool:
                    assert worker.poll() is None, out.read_text()[-3000:]
                    n = sql(url, "SELECT count(*) FILTER (WHERE status = 'success'), "
                                 "count(*) FILTER (WHERE status = 'inprog') FROM batchrows")[0]
                    return n[0] >= 20 and n[1] > 0

                wait_until(busy, timeout=60, every=0.05, what="the worker to be mid-batch")
                ended_before = sum(1 for r in read_log(rows_log) if r[0] == "end")
                at_stop = out.stat().st_size
                t_stop = time.monotonic()
                pg.stop(mode)
                stopped_in = time.monotonic() - t_stop
                while time.monotonic() - t_stop < OUTAGE_SEC:  # the worker must live through all of it
                    assert worker.poll() is None, (f"the worker died {time.monotonic() - t_stop:.1f} s into the "
                                                   f"outage (exit {worker.returncode}):\n{out.read_text()[-3000:]}")
                    time.sleep(0.1)
                alive_at_restart = worker.poll() is None
                during = log_lines(out, at_stop)
                at_start = out.stat().st_size
                t_start = time.monotonic()
                pg.start()
                outage = time.monotonic() - t_stop
                try:  # stop_when_idle: it returns by itself once the batch is done
                    code = worker.wait(60)
                except subprocess.TimeoutExpired:
                    left = sql(url, "SELECT status::text, suspect, count(*) FROM batchrows GROUP BY 1, 2 ORDER BY 1, 2")
                    pytest.fail(f"the worker did not return within 60 s of the restart; rows (status, suspect, n): "
                                f"{left}\n{out.read_text()[-3000:]}")
                took = time.monotonic() - t_start
            finally:
                if worker.poll() is None:
                    worker.kill()
                    worker.wait(10)
            after = log_lines(out, at_start)
            text = out.read_text()
            assert alive_at_restart
            assert code == 0, text[-3000:]
            assert "stopped" in text  # worker_main's last line: jm.run returned, jm.close ran

            # it said it was waiting, and kept trying with a backoff (not a busy loop, not silent)
            seen = [e for e in during if e["event"] in OUTAGE_EVENTS]
            assert seen, f"nothing logged during the outage: {[e['event'] for e in during]}"
            assert all(e["level"] in ("warning", "error") for e in seen)
            loop = [e for e in during if e["event"] in ("worker_loop_failed", "flow_failed")]
            assert len(loop) >= 3, f"the worker loop did not keep trying: {[e['event'] for e in during]}"
            assert any(e.get("note") == "waiting for the database" for e in loop), [e for e in loop][:3]
            assert len(loop) <= 2 * OUTAGE_SEC + 5  # it waits about a second between tries
            assert any(e["event"] == "worker_stopped" for e in after)
            # once the server is back (at most one try while it starts), the loop fails no more
            assert len([e for e in after if e["event"] in ("worker_loop_failed", "flow_failed")]) <= 1

            # the batch: finished, every row counted once, mark_done called once
            s = jm.batch_status(bid)
            assert (s.status, s.nrows, s.nsuccess, s.nfailed, s.naborted) == (BatchStatus.SUCCESS, NROWS, NROWS,
                                                                              0, 0)
            by_status = dict(sql(url, "SELECT status::text, count(*) FROM batchrows GROUP BY 1"))
            assert by_status == {"success": NROWS}
            d = jm.batch_done(bid)
            assert d.rows is not None and sorted(r.line for r in d.rows) == list(range(1, NROWS + 1))
            assert all(r.status is BatchStatus.SUCCESS and r.res == {"line": r.line} for r in d.rows)
            entries = read_log(rows_log)
            done = [r for r in entries if r[0] == "done"]
            assert len(done) == 1 and done[0][1:] == [bid, done[0][2], "success", str(NROWS), "0", "0"]
            ended = [int(r[2]) for r in entries if r[0] == "end"]
            assert set(ended) == set(range(1, NROWS + 1))
            rerun = len(ended) - NROWS  # rows whose first run's write-back the outage lost: run again
            print(f"\noutage (-m {mode}): {outage:.1f} s down (stop took {stopped_in:.1f} s), worker alive "
                  f"throughout; {len(seen)} warning/error lines during it ({len(loop)} from the worker loop); "
                  f"{ended_before} rows done before it; batch finished and worker exited 0 {took:.1f} s after "
                  f"the restart; {rerun} rows run twice, 0 lost, 0 counted twice")
            assert took < 45
        finally:
            jm.close()
