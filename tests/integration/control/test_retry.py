"""``jm.batch_retry_failed`` / ``alya retry``: a failed batch's failed rows run again (never the successful
ones), the batch is summarised again (counts, output files rebuilt in line order over all rows, mark_done
again with its round), the cached final status is never served after the retry, two retries at once
requeue once, refusals change nothing, and a retried batch with a failure threshold counts this round's
failures."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import fsspec
import pytest

from alya import BatchJobResult, BatchNotFound, BatchStatus, ErrorMessage, InvalidState, JobManager
from alya.core.names import summary_key
from tests.support.cli import cli
from tests.support.procs import Proc, batch_row, drain, manager, states
from tests.support.services import store_sql

APP = "rty"


class Flaky:
    """Fails the lines in ``failing`` (the test changes it between rounds); counts calls per line; records
    mark_done's details. Successful rows write a line of ``out.csv`` and one of ``all.txt``."""

    def __init__(self, failing: set[int]) -> None:
        self.failing = failing
        self.calls: dict[int, int] = {}
        self.done: list[Any] = []
        self.lock = threading.Lock()

    def do_batch_job(self, initblock: Any, context: dict[str, Any], line: int, input: dict[str, Any]) -> Any:
        with self.lock:
            self.calls[line] = self.calls.get(line, 0) + 1
        if line in self.failing:
            return BatchJobResult(BatchStatus.FAILED, None, [ErrorMessage(1, "flaky", vals=[str(line)])])
        return BatchJobResult(BatchStatus.SUCCESS, {"line": line}, blobrows={"out.csv": f"{line},{input['x']}",
                                                                            "all.txt": str(line)})

    def mark_done(self, initblock: Any, context: dict[str, Any], details: Any) -> None:
        self.done.append(details)


def _read(url: str) -> str:
    with fsspec.open(url, "rt") as fh:
        return str(fh.read())


def _snapshot(jm: JobManager, bid: str) -> Any:
    return (store_sql(jm.store, "SELECT status::text, ver, round, nsuccess, nfailed, naborted, outputfiles, doneat, "
                      "notifiedat, error FROM batches WHERE id = %s", bid), states(jm, bid))


def test_retry_after_a_summary_with_output_files(jm: JobManager) -> None:
    proc = Flaky({5, 10, 15, 20, 25, 30})
    jm.register_batch_processor(APP, "files", proc)
    bid = jm.batch_submit(APP, "files", {}, [(n, {"x": n * 10}) for n in range(1, 31)])
    drain(jm, APP, "files")
    s1 = jm.batch_status(bid)
    assert (s1.status, s1.nsuccess, s1.nfailed) == (BatchStatus.FAILED, 24, 6)
    ok1 = [n for n in range(1, 31) if n % 5]
    assert _read(s1.outputfiles["out.csv"]) == "".join(f"{n},{n * 10}\n" for n in ok1)
    assert [(d.status, d.round) for d in proc.done] == [(BatchStatus.FAILED, 1)]

    proc.failing = {30}  # the fix: only line 30 still fails
    assert jm.batch_retry_failed(bid) == 6
    s = jm.batch_status(bid)  # served from Redis: the reopened summary, not the final one cached before
    assert (s.status, s.nqueued, s.nsuccess, s.nfailed, s.outputfiles) == (BatchStatus.QUEUED, 6, 24, 0, {})
    assert jm.batch_done(bid).rows is None
    assert {n: v[:2] for n, v in states(jm, bid).items() if n % 5 == 0} == {n: ("queued", 0) for n in range(5, 31, 5)}
    drain(jm, APP, "files")

    s2 = jm.batch_status(bid)
    assert (s2.status, s2.nsuccess, s2.nfailed, s2.naborted) == (BatchStatus.FAILED, 29, 1, 0)
    ok2 = [n for n in range(1, 31) if n != 30]
    assert _read(s2.outputfiles["out.csv"]) == "".join(f"{n},{n * 10}\n" for n in ok2)  # rebuilt, in line order
    assert _read(s2.outputfiles["all.txt"]) == "".join(f"{n}\n" for n in ok2)
    assert [(d.status, d.round, d.nsuccess, d.nfailed) for d in proc.done] == [
        (BatchStatus.FAILED, 1, 24, 6), (BatchStatus.FAILED, 2, 29, 1)]
    assert {n: c for n, c in proc.calls.items() if c != 1} == {n: 2 for n in range(5, 31, 5)}  # successes never rerun

    proc.failing = set()
    assert jm.batch_retry_failed(bid) == 1
    drain(jm, APP, "files")
    s3 = jm.batch_status(bid)
    assert (s3.status, s3.nsuccess, s3.nfailed, s3.error) == (BatchStatus.SUCCESS, 30, 0, None)
    assert _read(s3.outputfiles["out.csv"]) == "".join(f"{n},{n * 10}\n" for n in range(1, 31))
    assert [(d.status, d.round) for d in proc.done][-1] == (BatchStatus.SUCCESS, 3)
    assert batch_row(jm, bid)["notified"]
    done = jm.batch_done(bid)
    assert done.rows is not None and [r.status for r in done.rows] == [BatchStatus.SUCCESS] * 30


def test_the_cached_final_status_is_replaced_at_once(jm: JobManager) -> None:
    """A poller that read the final status (cached in Redis for 100x the TTL) sees the reopened one right after
    the retry; a reader that read PostgreSQL before the retry cannot put the final status back."""
    proc = Flaky({2})
    jm.register_batch_processor(APP, "cache", proc)
    bid = jm.batch_submit(APP, "cache", {}, [(1, {"x": 1}), (2, {"x": 2})])
    drain(jm, APP, "cache")
    old = jm.services.statuses.read(bid)  # cached, final
    assert old.value.status is BatchStatus.FAILED and jm.cache.get(summary_key(bid))["final"] is True
    assert jm.batch_retry_failed(bid) == 1
    cached = jm.cache.get(summary_key(bid))
    assert cached is not None and cached["status"] == "queued" and cached["ver"] > old.ver
    jm.services.statuses.put(bid, old)  # the stale reader's late put is refused
    assert jm.batch_status(bid).status is BatchStatus.QUEUED


def test_refusals_change_nothing(jm: JobManager) -> None:
    proc = Proc()
    jm.register_batch_processor(APP, "refuse", proc)
    queued = jm.batch_submit(APP, "refuse", {}, [(1, {"x": 1})])
    ok = jm.batch_submit(APP, "refuse", {}, [(1, {"x": 1})])
    drain(jm, APP, "refuse")
    queued = jm.batch_submit(APP, "refuse", {}, [(1, {"x": 1})])
    waiting = jm.batch_submit(APP, "refuse", {}, [(1, {"x": 1})], wait=True)
    aborted = jm.batch_submit(APP, "refuse", {}, [(1, {"x": 1})])
    jm.batch_abort(aborted)
    sq = jm.slowquery_submit(APP, "refuse", {}, {"q": 1})
    for bid, match in [(queued, "is queued"), (ok, "is success"), (waiting, "is wait"), (aborted, "is aborted"),
                       (sq, "slow query")]:
        before = _snapshot(jm, bid)
        with pytest.raises(InvalidState, match=match):
            jm.batch_retry_failed(bid)
        assert _snapshot(jm, bid) == before
    with pytest.raises(BatchNotFound):
        jm.batch_retry_failed(str(uuid.uuid4()))
    with pytest.raises(BatchNotFound):
        jm.batch_retry_failed("not-a-uuid")


def test_nothing_to_requeue_changes_nothing(database_url: str, redis_url: str, file_store_url: str) -> None:
    """A failed batch whose only unfinished rows are aborted (stopped past its threshold, every failed row
    ... retried): without include_aborted there is nothing to run, and the batch stays as it was."""
    jm = manager(database_url, redis_url, file_store_url, batchchunk_nrows=2, concurrency=1)
    proc = Flaky({1})
    jm.register_batch_processor(APP, "empty", proc)
    bid = jm.batch_submit(APP, "empty", {}, [(n, {"x": n}) for n in range(1, 7)], max_failures=0)
    drain(jm, APP, "empty")
    assert jm.batch_status(bid).naborted == 4
    store_sql(jm.store, "UPDATE batchrows SET status = 'success' WHERE batch = %s AND status = 'failed'", bid)
    # ...and its stored counts as a round's summary would have left them: fewer failed rows than the
    # counts say is a batch being purged (BatchNotFound: tests/integration/retention/test_partitions.py)
    store_sql(jm.store, "UPDATE batches SET nsuccess = nsuccess + nfailed, nfailed = 0 WHERE id = %s", bid)
    before = _snapshot(jm, bid)
    with pytest.raises(InvalidState, match="no failed rows"):
        jm.batch_retry_failed(bid)
    assert _snapshot(jm, bid) == before
    assert jm.batch_retry_failed(bid, include_aborted=True) == 4
    jm.close()


def test_two_retries_at_once_requeue_once(jm: JobManager) -> None:
    jm.register_batch_processor(APP, "race", Flaky({1, 2, 3}))
    bid = jm.batch_submit(APP, "race", {}, [(n, {"x": n}) for n in range(1, 6)])
    drain(jm, APP, "race")
    barrier = threading.Barrier(2, timeout=20)
    results: list[Any] = []

    def retry() -> None:
        barrier.wait()
        try:
            results.append(jm.batch_retry_failed(bid))
        except InvalidState as exc:
            results.append(exc)

    threads = [threading.Thread(target=retry) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [r for r in results if isinstance(r, int)] == [3]
    assert sum(isinstance(r, InvalidState) for r in results) == 1
    assert {n: v[:2] for n, v in states(jm, bid).items() if n <= 3} == {n: ("queued", 0) for n in (1, 2, 3)}
    assert store_sql(jm.store, "SELECT round, status::text FROM batches WHERE id = %s", bid) == [(2, "queued")]


def test_a_retried_batch_counts_the_failures_of_its_round(database_url: str, redis_url: str,
                                                           file_store_url: str) -> None:
    """max_failures=2: round 1 stops at its 3rd failure (rows after it aborted); the retry with include_aborted
    requeues failed and aborted rows; round 2 fails 2 rows (within the limit: it runs to the end) and ends
    failed without the threshold's error; round 3 runs only those 2."""
    jm = manager(database_url, redis_url, file_store_url, batchchunk_nrows=5, concurrency=1)
    proc = Flaky({2, 7, 12, 17})  # one per chunk of 5
    jm.register_batch_processor(APP, "round", proc)
    bid = jm.batch_submit(APP, "round", {}, [(n, {"x": n}) for n in range(1, 21)], max_failures=2)
    drain(jm, APP, "round")
    s = jm.batch_status(bid)
    assert (s.status, s.nfailed, s.error) == (BatchStatus.FAILED, 3, "too many failures: 3 of 20 rows (limit 2)")
    assert (s.nsuccess, s.naborted) == (12, 5)
    proc.failing = {2, 7}
    assert jm.batch_retry_failed(bid, include_aborted=True) == 3 + s.naborted
    drain(jm, APP, "round")
    s = jm.batch_status(bid)
    assert (s.status, s.nsuccess, s.nfailed, s.naborted, s.error) == (BatchStatus.FAILED, 18, 2, 0, None)
    proc.failing = set()
    assert jm.batch_retry_failed(bid) == 2
    drain(jm, APP, "round")
    assert jm.batch_status(bid).status is BatchStatus.SUCCESS
    assert [d.round for d in proc.done] == [1, 2, 3]
    jm.close()


def test_the_retry_command(env: None, jm: JobManager) -> None:
    jm.register_batch_processor(APP, "cmd", Flaky({1}))
    bid = jm.batch_submit(APP, "cmd", {}, [(1, {"x": 1}), (2, {"x": 2})])
    drain(jm, APP, "cmd")
    assert cli("retry", bid).stdout.strip() == "1"
    assert "InvalidState" in cli("retry", bid, code=2).stderr
    assert cli("retry", str(uuid.uuid4()), "--include-aborted", code=2).stderr.startswith("error: BatchNotFound")
    assert jm.batch_status(bid).status is BatchStatus.QUEUED
