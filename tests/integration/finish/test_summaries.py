"""Finishing a batch: its summary written exactly once (also under racing summarise calls), counts equal
to its rows' statuses, and mark_done called once, after a working init, and never fatal when it fails."""

from __future__ import annotations

import threading
from typing import Any

from alya import BatchStatus, JobManager
from tests.support.procs import Init, Proc, batch_row, drain, rows
from tests.support.services import store_sql


def test_all_success_is_success_and_mark_done_once(jm: JobManager) -> None:
    proc = Proc()
    jm.register_batch_processor("eng", "ok", proc)
    bid = jm.batch_submit("eng", "ok", {"c": 1}, rows(250))  # 3 chunks of 100
    drain(jm, "eng", "ok")
    assert jm.batch_status(bid).status is BatchStatus.SUCCESS
    assert len(proc.done) == 1
    d = proc.done[0]
    assert (d.id, d.app, d.op, d.type, d.status, d.nrows, d.nsuccess, d.nfailed, d.naborted) == (
        bid, "eng", "ok", "B", BatchStatus.SUCCESS, 250, 250, 0, 0)
    assert d.context == {"c": 1} and d.doneat is not None
    # summarising or notifying again changes nothing
    assert jm.engine.summarise(bid) is False
    assert jm.engine.notify(bid) is False
    from alya.engine.maintenance import cleanup

    cleanup(jm.engine, types=[("eng", "ok")])
    assert len(proc.done) == 1
    assert sum(proc.calls.values()) == 250 and set(proc.calls.values()) == {1}


def test_concurrent_summarise_exactly_once(jm: JobManager) -> None:
    proc = Proc()
    jm.register_batch_processor("eng", "race", proc)
    bid = jm.batch_submit("eng", "race", {}, rows(30, blobs={"o.txt": "x"}))
    # process the rows without summarising: write results as the engine would, then race summarise()
    original = jm.engine.summarise
    jm.engine.summarise = lambda b: False  # type: ignore[method-assign]
    drain(jm, "eng", "race")
    jm.engine.summarise = original  # type: ignore[method-assign]
    assert batch_row(jm, bid)["status"] == "inprog"
    barrier = threading.Barrier(12)
    results: list[bool] = []
    errors: list[BaseException] = []

    def go() -> None:
        try:
            barrier.wait()
            results.append(jm.engine.summarise(bid))
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(daemon=True, target=go) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results.count(True) == 1 and len(results) == 12
    assert len(proc.done) == 1
    b = batch_row(jm, bid)
    assert (b["status"], b["nsuccess"]) == ("success", 30)


def test_summary_counts_equal_row_statuses(jm: JobManager) -> None:
    proc = Proc()
    jm.register_batch_processor("eng", "count", proc)
    data = [(i, {"mode": "fail" if i % 7 == 0 else ("raise" if i % 31 == 0 else "ok")}) for i in range(1, 301)]
    bid = jm.batch_submit("eng", "count", {}, data)
    drain(jm, "eng", "count")
    actual = dict(store_sql(jm.store, "SELECT status::text, count(*) FROM batchrows WHERE batch = %s GROUP BY 1",
                            bid))
    s = jm.batch_status(bid)
    assert (s.nsuccess, s.nfailed, s.naborted) == (actual.get("success", 0), actual["failed"], 0)
    assert s.nsuccess + s.nfailed == 300 and s.status is BatchStatus.FAILED
    b = batch_row(jm, bid)
    assert (b["nsuccess"], b["nfailed"]) == (s.nsuccess, s.nfailed)


def test_mark_done_waits_for_a_working_init(jm: JobManager) -> None:
    from alya.engine.maintenance import cleanup

    init, proc = Init(), Proc()
    jm.register_initializer("eng", init)
    jm.register_batch_processor("eng", "notify", proc)
    bid = jm.batch_submit("eng", "notify", {}, rows(3))
    original = jm.engine.notify
    jm.engine.notify = lambda b: False  # type: ignore[method-assign]  # simulate a crash before notifying
    drain(jm, "eng", "notify")
    jm.engine.notify = original  # type: ignore[method-assign]
    assert batch_row(jm, bid)["status"] == "success" and not batch_row(jm, bid)["notified"]
    init.blocks[0].alive = False
    init.broken = True
    cleanup(jm.engine, types=[("eng", "notify")])
    assert proc.done == [] and not batch_row(jm, bid)["notified"]
    init.broken = False
    rep = cleanup(jm.engine, types=[("eng", "notify")])
    assert rep.notified == [bid] and len(proc.done) == 1
    cleanup(jm.engine, types=[("eng", "notify")])
    assert len(proc.done) == 1


def test_mark_done_errors_are_not_fatal(jm: JobManager) -> None:
    class Bad(Proc):
        def mark_done(self, initblock: Any, context: dict[str, Any], details: Any) -> None:
            super().mark_done(initblock, context, details)
            raise RuntimeError("mark_done broke")

    proc = Bad()
    jm.register_batch_processor("eng", "badmark", proc)
    bid = jm.batch_submit("eng", "badmark", {}, rows(3))
    drain(jm, "eng", "badmark")
    assert jm.batch_status(bid).status is BatchStatus.SUCCESS and len(proc.done) == 1
    from alya.engine.maintenance import cleanup

    cleanup(jm.engine, types=[("eng", "badmark")])
    assert len(proc.done) == 1
