"""Several workers on one database: two engines finishing the last rows of a batch together, and several
worker processes (jm.run) on several batches."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest

from alya import BatchStatus, JobManager
from alya.store import Tx
from tests.conftest import make_config
from tests.procs import Proc, rows


def two_managers(database_url: str, redis_url: str, store_url: str, **cfg: Any) -> tuple[JobManager, JobManager]:
    def one() -> JobManager:
        return JobManager(database_url=database_url, redis_url=redis_url, object_store_url=store_url,
                          config=make_config(**cfg))

    return one(), one()


def run_both(a: JobManager, b: JobManager, op: str) -> list[Any]:
    reports: list[Any] = []
    errors: list[BaseException] = []

    def go(jm: JobManager) -> None:
        try:
            reports.append(jm.engine.process_chunk("conc", op))
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(jm,)) for jm in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return reports


def test_two_workers_commit_last_rows_together(database_url: str, redis_url: str, file_store_url: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The Alya race made deterministic: both workers have written their last rows and neither has
    committed yet when each looks at the batch. Exactly one must summarise, and mark_done runs once."""
    a, b = two_managers(database_url, redis_url, file_store_url, batchchunk_nrows=2)
    try:
        procs = Proc(), Proc()
        a.register_batch_processor("conc", "last", procs[0])
        b.register_batch_processor("conc", "last", procs[1])
        bid = a.batch_submit("conc", "last", {}, rows(4, blobs={"f.txt": "v"}))
        before_commit = threading.Barrier(2, timeout=20)
        real_run = Tx.run

        def run(self: Tx, name: str, **params: Any) -> int:
            n = real_run(self, name, **params)
            if name == "write_results":
                before_commit.wait()  # both writes done, neither committed
            return n

        monkeypatch.setattr(Tx, "run", run)
        reports = run_both(a, b, "last")
        assert sorted(r.nrows for r in reports) == [2, 2]
        assert sum(len(r.summarised) for r in reports) == 1
        assert len(procs[0].done) + len(procs[1].done) == 1
        s = a.batch_status(bid)
        assert (s.status, s.nsuccess) == (BatchStatus.SUCCESS, 4)
        with a.store.tx() as tx:
            tx.cur.execute("SELECT notifiedat IS NOT NULL FROM batches WHERE id = %s", (bid,))
            assert tx.cur.fetchone()[0]
        assert a.batch_done(bid).outputfiles["f.txt"]
    finally:
        a.close()
        b.close()


def test_two_workers_finish_together_repeatedly(database_url: str, redis_url: str, file_store_url: str) -> None:
    """Unsynchronised commits: a barrier in the processor makes both workers finish their chunk's last row
    at the same moment; over many batches there is always exactly one summary and one mark_done."""
    a, b = two_managers(database_url, redis_url, file_store_url, batchchunk_nrows=3)
    try:
        barrier = threading.Barrier(2, timeout=20)

        def hook(line: int, input: dict[str, Any]) -> None:
            if line in (3, 6):
                barrier.wait()

        procs = Proc(hook), Proc(hook)
        a.register_batch_processor("conc", "again", procs[0])
        b.register_batch_processor("conc", "again", procs[1])
        ids = []
        for _ in range(15):
            bid = a.batch_submit("conc", "again", {}, rows(5) + [(6, {"mode": "fail"})])
            ids.append(bid)
            reports = run_both(a, b, "again")
            assert sorted(r.nrows for r in reports) == [3, 3]
            assert sum(len(r.summarised) for r in reports) == 1
        done = procs[0].done + procs[1].done
        assert sorted(d.id for d in done) == sorted(ids)
        assert all((d.status, d.nsuccess, d.nfailed) == (BatchStatus.FAILED, 5, 1) for d in done)
        assert Counter(procs[0].calls) + Counter(procs[1].calls) == Counter({i: 15 for i in range(1, 7)})
    finally:
        a.close()
        b.close()
