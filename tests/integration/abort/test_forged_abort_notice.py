"""Abort notices are checked (issue 18): any database role may ``NOTIFY alya_work, 'abort:<id>'``. Workers
used to drop their claims of a live batch on such a notice; they now look at the batch's status first."""

from __future__ import annotations

import pytest

from alya import BatchStatus
from tests.support.procs import Proc, finish, manager, run_until_idle, states, wait_until
from tests.support.services import sql


@pytest.mark.usefixtures("prefect_harness")  # jm.run
def test_a_forged_abort_notice_drops_no_claim(database_url: str, redis_url: str, file_store_url: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    jm = manager(database_url, redis_url, file_store_url, batchchunk_nrows=20)
    proc = Proc()
    jm.register_batch_processor("wrk", "forged", proc)
    bid = jm.batch_submit("wrk", "forged", {}, [(n, {"x": n, "sleep": 0.01}) for n in range(1, 301)])
    try:
        with run_until_idle(jm) as runner:
            wait_until(lambda: sum(1 for s in states(jm, bid).values() if s[0] == "success") >= 20,
                       timeout=60, every=0.02, what="some rows done")
            for _ in range(5):
                sql(database_url, "SELECT pg_notify('alya_work', %s)", f"abort:{bid}")
            finish(runner)
    finally:
        jm.close()
    s = jm.batch_status(bid)
    assert (s.status, s.nsuccess) == (BatchStatus.SUCCESS, 300)
    assert all(n == 1 for n in proc.calls.values()) and len(proc.calls) == 300
    err = capsys.readouterr().err
    assert "abort_notice_ignored" in err and '"abort_notified"' not in err
