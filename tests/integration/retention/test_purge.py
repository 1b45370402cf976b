"""Retention on real services: ``jm.batch_purge`` deletes old final batches with their rows, file-intake
records, cache entries and (when asked) output files; it leaves open and newer batches alone, refuses bad
input, and does not hold workers up; maintenance applies ALYA_RETENTION_DAYS under its own lease."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from alya import BatchNotFound, BatchStatus, InvalidInput, JobManager, PurgeReport
from alya.batch.retention import parse_age, purge
from alya.core.names import summary_key
from alya.engine.maintenance import RETENTION, Maintenance, cleanup
from tests.support.procs import FastProc, Proc, QueryProc, drain, manager, rows
from tests.support.services import store_sql

APP, OP = "ret", "work"
OLD = timedelta(days=40)


def cutoff() -> datetime:
    return datetime.now(UTC) - timedelta(days=30)


def age(jm: JobManager, *ids: str, by: timedelta = OLD) -> None:
    """As if these batches had ended ``by`` ago."""
    store_sql(jm.store, "UPDATE batches SET doneat = doneat - make_interval(secs => %s) WHERE id = ANY(%s::uuid[])",
              by.total_seconds(), list(ids))


def nrows(jm: JobManager, batch: str) -> int:
    return int(store_sql(jm.store, "SELECT count(*) FROM batchrows WHERE batch = %s", batch)[0][0])


def exists(jm: JobManager, batch: str) -> bool:
    return bool(store_sql(jm.store, "SELECT 1 FROM batches WHERE id = %s", batch))


def add_file_record(jm: JobManager, batch: str | None, status: str = "submitted") -> str:
    fid = str(uuid.uuid4())
    store_sql(jm.store, "INSERT INTO batch_files (id, url, size, version, filetype, status, batch, nrows, reqat) "
              "VALUES (%s, %s, 1, 'v', 't', %s, %s, 0, now() - interval '40 days')",
              fid, f"file:///in/{fid}.csv", status, batch)
    return fid


def records(jm: JobManager) -> set[str]:
    return {str(r[0]) for r in store_sql(jm.store, "SELECT id FROM batch_files")}


@pytest.fixture
def proc(jm: JobManager) -> Proc:
    p = Proc()
    jm.register_batch_processor(APP, OP, p)
    jm.register_slowquery_processor(APP, "ask", QueryProc())
    return p


def finished(jm: JobManager, data: list[tuple[int, dict[str, Any]]], **kw: Any) -> str:
    b = jm.batch_submit(APP, OP, {}, data, **kw)
    drain(jm, APP, OP)
    assert jm.batch_status(b).status.is_final
    return b


def test_purge_removes_old_final_batches_and_nothing_else(jm: JobManager, proc: Proc) -> None:
    ok = finished(jm, rows(30, blobs={"out.txt": "x"}))
    bad = finished(jm, rows(5, mode="fail"))
    aborted = jm.batch_submit(APP, OP, {}, rows(7))
    jm.batch_abort(aborted)
    sq = jm.slowquery_submit(APP, "ask", {}, {"q": 1})
    drain(jm, APP, "ask")
    assert jm.slowquery_done(sq).status is BatchStatus.SUCCESS
    newer = finished(jm, rows(4))
    queued = jm.batch_submit(APP, OP, {}, rows(6))
    held = jm.batch_submit(APP, OP, {}, rows(3), wait=True)
    old = [ok, bad, aborted, sq]
    age(jm, *old)
    store_sql(jm.store, "UPDATE batches SET reqat = reqat - interval '50 days' WHERE id = ANY(%s::uuid[])",
              [queued, held])  # submitted long ago, still open: never purged
    mine = add_file_record(jm, ok)
    theirs = add_file_record(jm, newer)
    rejected = add_file_record(jm, None, "rejected")
    for b in old:
        jm.batch_status(b)  # cached in Redis
    assert jm.cache.get(summary_key(ok)) is not None
    files = jm.batch_done(ok).outputfiles
    assert files

    report = jm.batch_purge(cutoff())

    assert report == PurgeReport(nbatches=4, nrows=30 + 5 + 7 + 1, nfiles=0, nrecords=2)
    for b in old:
        assert not exists(jm, b) and nrows(jm, b) == 0
        assert jm.cache.get(summary_key(b)) is None
        with pytest.raises(BatchNotFound):
            jm.batch_status(b)
    for b, n in ((newer, 4), (queued, 6), (held, 3)):
        assert exists(jm, b) and nrows(jm, b) == n
    assert jm.batch_status(queued).status is BatchStatus.QUEUED
    assert records(jm) == {theirs}
    assert mine and rejected
    assert all(Path(u.removeprefix("file://")).exists() for u in files.values())  # files=False: kept
    assert jm.batch_purge(cutoff()) == PurgeReport()  # nothing left to do


def test_files_go_only_when_asked_and_only_the_purged_batches(jm: JobManager, proc: Proc) -> None:
    a = finished(jm, rows(10, blobs={"a.txt": "a", "b.csv": "1,2"}))
    keep = finished(jm, rows(3, blobs={"a.txt": "k"}))
    age(jm, a)
    fa = jm.batch_done(a).outputfiles
    fk = jm.batch_done(keep).outputfiles
    report = jm.batch_purge(cutoff(), files=True)
    assert (report.nbatches, report.nfiles) == (1, 2)
    assert not any(Path(u.removeprefix("file://")).exists() for u in fa.values())
    assert not Path(next(iter(fa.values())).removeprefix("file://")).parent.exists()  # the batch's folder too
    assert all(Path(u.removeprefix("file://")).exists() for u in fk.values())


def test_files_on_s3(database_url: str, redis_url: str, s3_url: str) -> None:
    import fsspec

    jm = manager(database_url, redis_url, s3_url)
    try:
        jm.register_batch_processor(APP, OP, FastProc())
        b = finished(jm, rows(20, blobs={"s.txt": "s"}))
        url = jm.batch_done(b).outputfiles["s.txt"]
        fs, path = fsspec.core.url_to_fs(url)
        assert fs.exists(path)
        age(jm, b)
        assert jm.batch_purge(cutoff(), files=True) == PurgeReport(nbatches=1, nrows=20, nfiles=1)
        fs.invalidate_cache()
        assert not fs.exists(path)
    finally:
        jm.close()


def test_the_app_filter(jm: JobManager, proc: Proc) -> None:
    mine = finished(jm, rows(2))
    jm.register_batch_processor("other", OP, FastProc())
    theirs = jm.batch_submit("other", OP, {}, rows(2))
    drain(jm, "other", OP)
    age(jm, mine, theirs)
    rejected = add_file_record(jm, None, "rejected")
    assert jm.batch_purge(cutoff(), app="other").nbatches == 1
    assert exists(jm, mine) and not exists(jm, theirs)
    assert records(jm) == {rejected}  # rejected files have no app: only a purge of every app takes them


def test_an_idempotency_key_is_free_again_after_its_batch_is_purged(jm: JobManager, proc: Proc) -> None:
    first = finished(jm, rows(3), idempotency_key="k-1")
    assert jm.batch_submit(APP, OP, {}, rows(3), idempotency_key="k-1") == first
    age(jm, first)
    assert jm.batch_purge(cutoff()).nbatches == 1
    second = jm.batch_submit(APP, OP, {}, rows(3), idempotency_key="k-1")
    assert second != first and nrows(jm, second) == 3


@pytest.mark.parametrize("before", [datetime.now() - OLD, "2020-01-01", 0, None])
def test_bad_input_deletes_nothing(jm: JobManager, proc: Proc, before: Any) -> None:
    b = finished(jm, rows(3))
    age(jm, b)
    with pytest.raises(InvalidInput):
        jm.batch_purge(before)
    with pytest.raises(InvalidInput):
        jm.batch_purge(cutoff(), app="Not An App")
    assert exists(jm, b) and nrows(jm, b) == 3
    with pytest.raises(InvalidInput):
        parse_age("soon")
    assert parse_age("30d") == timedelta(days=30) and parse_age("90m") == timedelta(minutes=90)


def test_a_big_batch_goes_in_bounded_transactions(jm: JobManager, proc: Proc) -> None:
    big = jm.batch_submit(APP, OP, {}, rows(2500))
    small = [jm.batch_submit(APP, OP, {}, rows(3)) for _ in range(5)]
    for b in (big, *small):
        jm.batch_abort(b)
    age(jm, big, *small)
    statements: list[str] = []
    real_tx = jm.store.tx

    def counting_tx() -> Any:
        statements.append("tx")
        return real_tx()

    jm.store.tx = counting_tx  # type: ignore[method-assign]
    try:
        report = purge(jm.services, cutoff(), chunk_rows=1000)
    finally:
        del jm.store.tx
    assert (report.nbatches, report.nrows) == (6, 2515)
    # partitions to drop (none: this week's), 2 look-ups, 3 steps of the big batch's rows, its record, the
    # small ones together, rejected records
    assert len(statements) == 1 + 2 + 3 + 1 + 1 + 1
    assert not any(exists(jm, b) for b in (big, *small))


def test_workers_keep_processing_during_a_purge(database_url: str, redis_url: str, file_store_url: str) -> None:
    """A purge of 60,000 old rows runs while a worker processes a batch: the worker's chunks never wait
    for the purge (each purge transaction is short), and both finish."""
    jm = manager(database_url, redis_url, file_store_url, batchchunk_nrows=50)
    try:
        jm.register_batch_processor(APP, OP, FastProc())
        old = [jm.batch_submit(APP, OP, {}, rows(6000)) for _ in range(10)]
        store_sql(jm.store, "UPDATE batchrows SET status = 'success', doneat = now() WHERE batch = ANY(%s::uuid[])",
                  old)
        store_sql(jm.store, "UPDATE batches SET status = 'success', doneat = now() - interval '40 days', "
                  "nsuccess = nrows WHERE id = ANY(%s::uuid[])", old)
        live = jm.batch_submit(APP, OP, {}, rows(3000))
        gaps: list[float] = []
        stop = threading.Event()

        def work() -> None:
            last = time.monotonic()
            while not stop.is_set():
                rep = jm.engine.process_chunk(APP, OP)
                now = time.monotonic()
                gaps.append(now - last)
                last = now
                if rep.batch is None:
                    return

        t = threading.Thread(target=work, daemon=True)
        t.start()
        t0 = time.monotonic()
        report = jm.batch_purge(cutoff())
        took = time.monotonic() - t0
        t.join(120)
        stop.set()
        assert report.nbatches == 10 and report.nrows == 60_000
        assert jm.batch_status(live).status is BatchStatus.SUCCESS
        print(f"purge of 60,000 rows: {took:.2f} s; worker chunks: {len(gaps)}, longest gap {max(gaps):.3f} s")
        assert max(gaps) < 1.0
    finally:
        jm.close()


def test_maintenance_purges_under_its_own_lease(database_url: str, redis_url: str, file_store_url: str) -> None:
    a = manager(database_url, redis_url, file_store_url, retention_days=30)
    b = manager(database_url, redis_url, file_store_url, retention_days=30)
    off = manager(database_url, redis_url, file_store_url, retention_days=0)
    try:
        a.register_batch_processor(APP, OP, FastProc())
        old = finished(a, rows(5))
        new = finished(a, rows(5))
        age(a, old)
        assert cleanup(off.engine).purged == 0 and exists(a, old)  # 0: keep for ever
        ma = Maintenance(a.store, a.engine.identity, a.config.recovery_sec)
        mb = Maintenance(b.store, b.engine.identity, b.config.recovery_sec)
        rep = ma.tick(a.engine, [])
        assert rep is not None and rep.purged == 1 and RETENTION in ma.held()
        assert not exists(a, old) and exists(a, new)
        again = finished(a, rows(2))
        age(a, again)
        rep_b = mb.tick(b.engine, [])
        assert RETENTION not in mb.held() and (rep_b is None or rep_b.purged == 0) and exists(a, again)
        ma.close()
        rep_b = mb.tick(b.engine, [])
        assert rep_b is not None and rep_b.purged == 1 and not exists(a, again)
        mb.close()
    finally:
        for m in (a, b, off):
            m.close()


def test_the_purge_command(env: None, jm: JobManager, proc: Proc) -> None:
    from tests.support.cli import as_json, cli

    old = finished(jm, rows(3, blobs={"f.txt": "x"}))
    new = finished(jm, rows(2))
    age(jm, old)
    out = cli("purge", "--older-than", "30d", "--app", APP, "--files").stdout
    assert out.startswith("purged 1 batches (3 rows, 1 output files, 0 file-intake records) that ended before ")
    assert not exists(jm, old) and exists(jm, new)
    assert as_json("purge", "--older-than", "0s") == {"nbatches": 1, "nrows": 2, "nfiles": 0, "nrecords": 0}
    res = cli("purge", "--older-than", "soon", code=2)
    assert res.stderr.startswith("error: InvalidInput: not an age")
