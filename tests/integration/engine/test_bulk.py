"""Bulk processors (issue 20 item 7): a processor with ``do_batch_jobs`` gets its rows in calls of up to
``ALYA_BULK_ROWS``; a call that raises, answers the wrong number of results or times out requeues its rows,
each then retried alone, so that only the bad row fails; a malformed result fails its row alone at once."""

from __future__ import annotations

import threading
import time
from typing import Any

from alya import BatchDetails, BatchJobResult, BatchStatus
from tests.support.procs import drain, manager, rows, wait_until


class Bulk:
    """Records every call's lines; ``bad`` lines make the call raise, ``hang`` lines make it hang,
    ``short`` lines make it answer one result too few, ``junk`` lines get a malformed result."""

    def __init__(self, bad: set[int] = frozenset(), hang: set[int] = frozenset(),  # type: ignore[assignment]
                 short: set[int] = frozenset(), junk: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        self.bad, self.hang, self.short, self.junk = bad, hang, short, junk
        self.calls: list[list[int]] = []
        self.lock = threading.Lock()
        self.release = threading.Event()

    def do_batch_jobs(self, initblock: Any, context: dict[str, Any],
                      rows: list[tuple[int, dict[str, Any]]]) -> list[Any]:
        lines = [line for line, _ in rows]
        with self.lock:
            self.calls.append(lines)
        if self.hang & set(lines):
            self.release.wait(30)
        if self.bad & set(lines):
            raise RuntimeError(f"bad row among {len(lines)}")
        out: list[Any] = [BatchJobResult(BatchStatus.SUCCESS, {"line": line, "x": inp["x"], "n": len(rows)})
                          if line not in self.junk else "not a result" for line, inp in rows]
        return out[:-1] if self.short & set(lines) else out

    def mark_done(self, initblock: Any, context: dict[str, Any], details: BatchDetails) -> None:
        pass


def results(jm: Any, bid: str) -> dict[int, Any]:
    done = jm.batch_done(bid)
    assert done.rows is not None
    return {r.line: r for r in done.rows}


def test_a_bulk_processor_gets_its_rows_grouped(database_url: str, redis_url: str, file_store_url: str) -> None:
    jm = manager(database_url, redis_url, file_store_url, bulk_rows=40, batchchunk_nrows=100, concurrency=4)
    try:
        proc = Bulk()
        jm.register_batch_processor("bulk", "ok", proc)  # no do_batch_job at all: do_batch_jobs is enough
        bid = jm.batch_submit("bulk", "ok", {}, rows(250))
        assert drain(jm, "bulk", "ok") == 250
        s = jm.batch_status(bid)
        assert s.status is BatchStatus.SUCCESS and s.nsuccess == 250
        assert all(1 <= len(c) <= 40 for c in proc.calls) and sum(len(c) for c in proc.calls) == 250
        assert len(proc.calls) <= 250 // 40 + 3  # claims of 100 split 40+40+20: about 7 calls, not 250
        assert all(c == sorted(c) for c in proc.calls)  # in line order within a call
        res = results(jm, bid)
        assert sorted(res) == list(range(1, 251))
        assert all(r.status is BatchStatus.SUCCESS and r.res["line"] == line and r.res["x"] == line
                   for line, r in res.items())  # each result landed on its own row
    finally:
        jm.close()


def test_a_failing_call_falls_back_to_single_rows(database_url: str, redis_url: str, file_store_url: str) -> None:
    """Line 17 makes any call it is in raise: its group's rows are requeued and each retried alone; the
    others succeed on that retry, line 17 fails alone after its own attempts. Line 55 gets one result too
    few (a fault of its call, same path); line 80 gets a malformed result (its own fault, no fallback)."""
    jm = manager(database_url, redis_url, file_store_url, bulk_rows=10, batchchunk_nrows=100, concurrency=2,
                 max_attempts=2)
    try:
        proc = Bulk(bad={17}, short={55}, junk={80})
        jm.register_batch_processor("bulk", "bad", proc)
        bid = jm.batch_submit("bulk", "bad", {}, rows(100))
        drain(jm, "bulk", "bad")
        s = jm.batch_status(bid)
        assert s.status is BatchStatus.FAILED and (s.nsuccess, s.nfailed) == (97, 3)
        res = results(jm, bid)
        failed = {line for line, r in res.items() if r.status is BatchStatus.FAILED}
        assert failed == {17, 55, 80}
        assert "bad row among 1" in res[17].messages[0].vals[0]  # failed alone, not with its group
        assert res[55].messages[0].errcode == "processing_error"
        assert res[18].res["n"] == 1 and res[52].res["n"] == 1  # retried alone, after the group's fault
        assert res[25].res["n"] == 10  # other groups untouched
        singles = [c[0] for c in proc.calls if len(c) == 1]
        # 11..20 and 51..60 retried alone once each (17 and 55 fail there: attempt 2 of max_attempts=2; the
        # group's fault never fails a row); 80, whose own fault was its first attempt, retried alone once
        assert sorted(singles) == sorted([*range(11, 21), *range(51, 61), 80])
        assert res[80].messages[0].errcode == "processing_error"
        assert "returned str" in res[80].messages[0].vals[0]
    finally:
        jm.close()


def test_a_call_that_hangs_times_out_as_a_group(database_url: str, redis_url: str, file_store_url: str) -> None:
    """ALYA_ROW_TIMEOUT_SEC bounds each call: the hung group's rows are requeued, retried alone, and only
    the hanging row fails (timed out alone); its slot went on with a fresh thread meanwhile."""
    jm = manager(database_url, redis_url, file_store_url, bulk_rows=5, batchchunk_nrows=20, concurrency=2,
                 row_timeout_sec=1.0, max_attempts=1)
    proc = Bulk(hang={3})
    try:
        jm.register_batch_processor("bulk", "hang", proc)
        bid = jm.batch_submit("bulk", "hang", {}, rows(12))
        t0 = time.monotonic()
        drain(jm, "bulk", "hang")
        took = time.monotonic() - t0
        s = jm.batch_status(bid)
        assert s.status is BatchStatus.FAILED and (s.nsuccess, s.nfailed) == (11, 1), s
        res = results(jm, bid)
        assert res[3].status is BatchStatus.FAILED and "timed out" in res[3].messages[0].vals[0]
        assert res[1].res["n"] == 1 and res[6].res["n"] == 5  # 1..5 retried alone; 6..10 one call
        assert took < 60, took
    finally:
        proc.release.set()
        wait_until(lambda: jm.engine.pool.abandoned_threads == 0, timeout=30, what="the stuck threads to end")
        jm.close()


class AsyncBulk:
    def __init__(self) -> None:
        self.calls: list[int] = []

    async def do_batch_jobs(self, initblock: Any, context: dict[str, Any],
                            rows: list[tuple[int, dict[str, Any]]]) -> list[BatchJobResult]:
        import asyncio

        self.calls.append(len(rows))
        await asyncio.sleep(0.01)
        if any(line == 7 for line, _ in rows):
            raise RuntimeError("line 7")
        return [BatchJobResult(BatchStatus.SUCCESS, {"line": line}) for line, _ in rows]

    def mark_done(self, initblock: Any, context: dict[str, Any], details: BatchDetails) -> None:
        pass


def test_an_async_bulk_processor_runs_on_the_event_loop(database_url: str, redis_url: str,
                                                        file_store_url: str) -> None:
    jm = manager(database_url, redis_url, file_store_url, bulk_rows=8, batchchunk_nrows=40, max_attempts=1)
    try:
        proc = AsyncBulk()
        jm.register_batch_processor("bulk", "aio", proc)
        bid = jm.batch_submit("bulk", "aio", {}, rows(40))
        drain(jm, "bulk", "aio")
        s = jm.batch_status(bid)
        assert (s.nsuccess, s.nfailed) == (39, 1)
        assert results(jm, bid)[7].status is BatchStatus.FAILED
        assert max(proc.calls) == 8 and proc.calls.count(1) == 8  # 1..8 retried alone after its call failed
    finally:
        jm.close()
