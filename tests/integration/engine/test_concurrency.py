"""Several workers on one database: two engines finishing the last rows of a batch together, and several
worker processes (jm.run) on several batches."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest

from alya import BatchStatus, JobManager
from tests.support.config import make_config
from tests.support.faults import on_statement
from tests.support.procs import Proc, rows, wait_until
from tests.support.services import store_sql


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

    threads = [threading.Thread(daemon=True, target=go, args=(jm,)) for jm in (a, b)]
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

        def written(name: str) -> None:
            if name == "write_results":
                before_commit.wait()  # both writes done, neither committed

        on_statement(monkeypatch, after=written)
        reports = run_both(a, b, "last")
        assert sorted(r.nrows for r in reports) == [2, 2]
        assert sum(len(r.summarised) for r in reports) == 1
        assert len(procs[0].done) + len(procs[1].done) == 1
        s = a.batch_status(bid)
        assert (s.status, s.nsuccess) == (BatchStatus.SUCCESS, 4)
        assert store_sql(a.store, "SELECT notifiedat IS NOT NULL FROM batches WHERE id = %s", bid) == [(True,)]
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


@pytest.mark.usefixtures("prefect_harness")
def test_several_worker_processes_on_several_batches(database_url: str, redis_url: str, file_store_url: str,
                                                     tmp_path: Any) -> None:
    """Three worker processes (jm.run, stopped by SIGTERM at the end) on five batches of two batch types: every row is
    processed exactly once, every summary equals the rows' actual statuses, one mark_done per batch, and
    the output files hold every line in order."""
    import fsspec

    from tests.support.procs import read_log, spawn_worker, stop_workers, wait_workers_registered, worker_processes

    log = str(tmp_path / "rows.log")
    jm = JobManager(database_url=database_url, redis_url=redis_url, object_store_url=file_store_url,
                    config=make_config())
    sizes = {"a1": ("alpha", 400), "a2": ("alpha", 150), "a3": ("alpha", 60), "b1": ("beta", 300),
             "b2": ("beta", 90)}
    ids: dict[str, str] = {}
    for tag, (op, n) in sizes.items():
        data = [(line, {"mode": "fail"} if line % 13 == 0 else {}) for line in range(1, n + 1)]
        ids[tag] = jm.batch_submit("multi", op, {"tag": tag}, data, wait=True)
    # Held in `wait` until all three workers are up: they start at different speeds (Prefect's import
    # alone takes seconds on a loaded machine), and the first one up would otherwise do everything;
    # 50 ms per row, two at a time (25 s of work for one worker) outlasts each worker's first flow run start.
    with worker_processes([spawn_worker(database_url, file_store_url, "multi", "alpha,beta", log, "--sleep", "0.05",
                                        "--chunk", "15", "--concurrency", "2", out=str(tmp_path / f"worker{i}.out"))
                           for i in range(3)]) as workers:
        wait_workers_registered(jm, 3)
        for bid in ids.values():
            jm.wait_off(bid)
        wait_until(lambda: all(jm.batch_status(b).status.is_final for b in ids.values()), timeout=240,
                   what="every batch final")
        codes = stop_workers(workers)
    assert codes == [0, 0, 0]
    entries = read_log(log)
    ends = [(r[1], int(r[2])) for r in entries if r[0] == "end"]
    pids = {r[3] for r in entries if r[0] == "end"}
    assert len(ends) == len(set(ends)) == sum(n for _, n in sizes.values())  # each row exactly once
    print("rows per worker:", Counter(r[3] for r in entries if r[0] == "end"))
    assert len(pids) >= 2  # the work was actually shared
    dones = [r for r in entries if r[0] == "done"]
    assert sorted(r[1] for r in dones) == sorted(ids.values())  # one mark_done per batch
    try:
        for tag, bid in ids.items():
            n = sizes[tag][1]
            actual = dict(store_sql(jm.store, "SELECT status::text, count(*) FROM batchrows WHERE batch = %s "
                                    "GROUP BY 1", bid))
            [stored] = store_sql(jm.store, "SELECT status::text, nsuccess, nfailed, naborted FROM batches "
                                 "WHERE id = %s", bid)
            nfail = n // 13
            assert actual == {"success": n - nfail, "failed": nfail}
            assert stored == ("failed", n - nfail, nfail, 0)
            s = jm.batch_status(bid)
            assert (s.status, s.nsuccess, s.nfailed, s.nqueued, s.ninprog) == (BatchStatus.FAILED, n - nfail, nfail,
                                                                               0, 0)
            done = next(r for r in dones if r[1] == bid)
            assert done[3:] == ["failed", str(n - nfail), str(nfail), "0"]
            with fsspec.open(s.outputfiles["out.txt"], "rt") as fh:
                assert fh.read() == "".join(f"{line}\n" for line in range(1, n + 1) if line % 13)
    finally:
        jm.close()
