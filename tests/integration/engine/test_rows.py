"""Rows, not chunks, are the unit of concurrency and of visibility: rows of one claim run at once, finished
rows are written back within a flush interval, a hung row times out and frees its slot, async processors
run on an event loop, and wake-ups let one warm flow run serve a stream of slow queries; row faults (a
processor's sys.exit, an output file named ".", a result too large) fail their row alone. (An abort
stopping the rows at once: tests/integration/abort; a crash replaying at most a flush: recovery.)"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from alya import BatchJobResult, BatchStatus, JobManager
from tests.support.procs import Gauge, Proc, QueryProc, manager, rows, states, wait_until


def test_rows_of_one_claim_run_at_once(database_url: str, redis_url: str, file_store_url: str) -> None:
    jm = manager(database_url, redis_url, file_store_url, concurrency=8, batchchunk_nrows=16)
    try:
        proc = Gauge(0.2)
        jm.register_batch_processor("rows", "par", proc)
        bid = jm.batch_submit("rows", "par", {}, rows(16))
        t = time.monotonic()
        rep = jm.engine.process_chunk("rows", "par")
        took = time.monotonic() - t
        assert rep.nrows == 16 and rep.summarised == [bid]
        assert proc.most == 8  # the configured slots, all used: one claim, 8 rows at a time
        print(f"\n16 rows of 0.2 s on 8 slots: {took:.2f} s (one at a time: 3.2 s)")
        assert jm.batch_status(bid).nsuccess == 16
    finally:
        jm.close()


def test_finished_rows_are_written_while_others_still_run(database_url: str, redis_url: str,
                                                         file_store_url: str) -> None:
    """Visibility is per row: the rows that finished are written back within the flush interval, while
    a slow row of the same claim is still running."""
    gate = threading.Event()

    def hook(line: int, input: dict[str, Any]) -> None:
        if line == 6:
            assert gate.wait(30)

    jm = manager(database_url, redis_url, file_store_url, concurrency=4, flush_sec=0.5)
    try:
        jm.register_batch_processor("rows", "vis", Proc(hook))
        bid = jm.batch_submit("rows", "vis", {}, rows(6))
        t = threading.Thread(daemon=True, target=jm.engine.process_chunk, args=("rows", "vis"))
        t.start()
        wait_until(lambda: sum(1 for s in states(jm, bid).values() if s[0] == "success") == 5, timeout=10,
                   every=0.05, what="the five quick rows written while row 6 runs")
        assert states(jm, bid)[6][0] == "inprog"
        gate.set()
        t.join(10)
        assert jm.batch_status(bid).status is BatchStatus.SUCCESS
    finally:
        gate.set()
        jm.close()


def test_a_hung_row_times_out_and_frees_its_slot(database_url: str, redis_url: str, file_store_url: str) -> None:
    """One slot only: row 2 hangs; after ALYA_ROW_TIMEOUT_SEC it is a fault (here its last attempt, so
    failed with processing_error naming the timeout) and the other rows go on in the freed slot."""
    release = threading.Event()

    def hook(line: int, input: dict[str, Any]) -> None:
        if line == 2:
            release.wait(60)

    jm = manager(database_url, redis_url, file_store_url, concurrency=1, row_timeout_sec=0.5, max_attempts=1)
    try:
        proc = Proc(hook)
        jm.register_batch_processor("rows", "hang", proc)
        bid = jm.batch_submit("rows", "hang", {}, rows(5))
        t = time.monotonic()
        rep = jm.engine.process_chunk("rows", "hang")
        took = time.monotonic() - t
        assert rep.summarised == [bid] and took < 10
        done = jm.batch_done(bid)
        assert done.rows is not None
        by_line = {r.line: r for r in done.rows}
        assert [by_line[n].status.value for n in range(1, 6)] == ["success", "failed", "success", "success",
                                                                   "success"]
        (msg,) = by_line[2].messages
        assert msg.errcode == "processing_error" and "timed out" in (msg.vals or [""])[0]
        assert jm.engine.pool.abandoned_threads == 1  # the stuck call still holds its thread...
        release.set()
        wait_until(lambda: jm.engine.pool.abandoned_threads == 0, timeout=10, what="the stuck thread to end")
        assert jm.batch_status(bid).nfailed == 1  # ...and its late answer changed nothing
    finally:
        release.set()
        jm.close()


def test_a_timed_out_row_is_retried(database_url: str, redis_url: str, file_store_url: str) -> None:
    calls: dict[int, int] = {}

    def hook(line: int, input: dict[str, Any]) -> None:
        calls[line] = calls.get(line, 0) + 1
        if line == 1 and calls[line] == 1:
            time.sleep(2.0)  # only the first attempt hangs

    jm = manager(database_url, redis_url, file_store_url, concurrency=2, row_timeout_sec=0.5, max_attempts=3)
    try:
        jm.register_batch_processor("rows", "retry", Proc(hook))
        bid = jm.batch_submit("rows", "retry", {}, rows(3))
        jm.engine.process_chunk("rows", "retry")
        assert states(jm, bid)[1][:2] == ("queued", 1)  # a fault with attempts left: back in the queue
        jm.engine.process_chunk("rows", "retry")
        s = jm.batch_status(bid)
        assert (s.status, s.nsuccess) == (BatchStatus.SUCCESS, 3)
        assert calls[1] == 2
    finally:
        jm.close()


class AsyncProc:
    def __init__(self) -> None:
        self.now = 0
        self.most = 0
        self.done: list[Any] = []

    async def do_batch_job(self, initblock: Any, context: dict[str, Any], line: int, input: dict[str, Any]) -> Any:
        self.now += 1  # one event loop thread: no lock needed
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(float(input.get("sleep", 0.1)))
        finally:
            self.now -= 1
        if input.get("mode") == "raise":
            raise RuntimeError("async boom")
        return BatchJobResult(BatchStatus.SUCCESS, {"line": line}, blobrows={"out.txt": str(line)})

    def mark_done(self, initblock: Any, context: dict[str, Any], details: Any) -> None:
        self.done.append(details)


def test_async_processors_run_on_an_event_loop(database_url: str, redis_url: str, file_store_url: str) -> None:
    jm = manager(database_url, redis_url, file_store_url, concurrency=10, batchchunk_nrows=40,
                 row_timeout_sec=1.0, max_attempts=1)
    try:
        proc = AsyncProc()
        jm.register_batch_processor("rows", "aio", proc)
        data = rows(40, sleep=0.1) + [(41, {"sleep": 30})] + [(42, {"mode": "raise"})]
        bid = jm.batch_submit("rows", "aio", {}, data)
        while jm.engine.process_chunk("rows", "aio").batch is not None:
            pass
        d = jm.batch_done(bid)
        assert d.rows is not None
        by_line = {r.line: r for r in d.rows}
        assert all(by_line[n].status is BatchStatus.SUCCESS for n in range(1, 41))
        assert by_line[41].status is BatchStatus.FAILED and "timed out" in str(by_line[41].messages[0].vals)
        assert by_line[42].status is BatchStatus.FAILED and "async boom" in str(by_line[42].messages[0].vals)
        assert proc.most == 10  # the same limit as threads
        assert len(proc.done) == 1
    finally:
        jm.close()


def test_one_warm_flow_run_serves_a_stream_of_slow_queries(prefect_harness: None, database_url: str,
                                                           redis_url: str, file_store_url: str) -> None:
    """A worker idle between slow queries is woken by NOTIFY, and its flow run lingers for more work
    instead of ending, so ten queries in a row are served by one or two flow runs, not ten."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    jm = manager(database_url, redis_url, file_store_url, linger_sec=5.0, poll_sec=5.0)
    worker = threading.Thread(daemon=True, target=jm.run)
    try:
        jm.register_slowquery_processor("rows", "sq", QueryProc())
        worker.start()
        first = jm.slowquery_submit("rows", "sq", {}, {"q": 0})
        wait_until(lambda: jm.slowquery_done(first).status.is_final, timeout=60, every=0.01, what="first query")
        took = []
        for i in range(1, 11):
            t = time.monotonic()
            req = jm.slowquery_submit("rows", "sq", {"user": "u"}, {"q": i})
            done = wait_until(lambda req=req: (d := jm.slowquery_done(req)).status.is_final and d, timeout=30,
                              every=0.005, what="a query")
            took.append(time.monotonic() - t)
            assert done.status is BatchStatus.SUCCESS and done.result == {"answer": i, "who": "u"}
        print(f"\nslow queries: {', '.join(f'{x * 1000:.0f}' for x in took)} ms (polling every 5 s otherwise)")
        assert max(took) < 4.0  # woken, not polled (poll_sec is 5 s)
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["alya-rows-sq"])))
        assert len(runs) <= 3, f"{len(runs)} flow runs for 11 queries"
    finally:
        jm.engine.stopping.set()
        worker.join(30)
        jm.close()


def test_system_exit_from_a_processor_is_a_fault(jm: JobManager) -> None:
    """A processor calling sys.exit() (or raising SystemExit) does not end the worker nor give its
    attempt back: it is a fault like any other, retried, then failed."""
    import sys as _sys

    def hook(line: int, input: dict[str, Any]) -> None:
        if line == 2:
            _sys.exit(3)

    jm.register_batch_processor("rows", "exit", Proc(hook))
    bid = jm.batch_submit("rows", "exit", {}, rows(3))
    for _ in range(jm.config.max_attempts):
        jm.engine.process_chunk("rows", "exit")
    d = jm.batch_done(bid)
    assert d.status is BatchStatus.FAILED and d.rows is not None
    assert [r.status.value for r in d.rows] == ["success", "failed", "success"]
    assert "SystemExit" in str(d.rows[1].messages[0].vals)


def test_an_output_file_named_dot_is_a_row_fault(jm: JobManager) -> None:
    """A blob row for a file named "." could never be stored (a directory): the row is refused as a fault,
    and the batch still finishes."""
    jm.register_batch_processor("rows", "dot", Proc())
    bid = jm.batch_submit("rows", "dot", {}, [(1, {"blobs": {".": "x"}}), (2, {"blobs": {"ok.txt": "y"}})])
    for _ in range(jm.config.max_attempts):
        jm.engine.process_chunk("rows", "dot")
    d = jm.batch_done(bid)
    assert d.status is BatchStatus.FAILED and list(d.outputfiles) == ["ok.txt"]


def test_a_result_too_large_fails_alone_and_large_write_backs_are_split(jm: JobManager,
                                                                       monkeypatch: Any) -> None:
    """A row whose result exceeds MAX_RESULT_BYTES is a fault (then failed, naming the limit), alone; a
    write-back larger than WRITE_PART_BYTES goes out in several statements of one transaction."""
    from alya.batch import outcomes
    from alya.engine import completer
    from tests.support.faults import on_statement

    monkeypatch.setattr(outcomes, "MAX_RESULT_BYTES", 200_000)
    monkeypatch.setattr(completer, "WRITE_PART_BYTES", 250_000)
    statements: list[str] = []
    on_statement(monkeypatch, before=statements.append)

    class Big(Proc):
        def do_batch_job(self, initblock: Any, context: dict[str, Any], line: int, input: dict[str, Any]) -> Any:
            return BatchJobResult(BatchStatus.SUCCESS, {"pad": "x" * int(input["size"])})

    jm.register_batch_processor("rows", "big", Big())
    bid = jm.batch_submit("rows", "big", {}, [(n, {"size": 100_000}) for n in range(1, 7)] + [(7, {"size": 300_000})])
    for _ in range(jm.config.max_attempts):
        jm.engine.process_chunk("rows", "big")
    d = jm.batch_done(bid)
    assert d.rows is not None
    assert [r.status.value for r in d.rows] == ["success"] * 6 + ["failed"]
    assert "result too large" in str(d.rows[6].messages[0].vals)
    assert len(d.rows[0].res["pad"]) == 100_000  # type: ignore[index]
    assert statements.count("write_results") >= 3 + jm.config.max_attempts - 1  # 600 kB in parts of 250 kB
