"""Partitions of batchrows (migration 0012) on real PostgreSQL: a purge drops a week whose batches are all
purgeable (the table is gone, nothing else touched), falls back to the batched DELETE for the rest (open or
younger batches in the week, another app's, the default partition's old random ids); maintenance creates
the weeks ahead (moving rows of the default partition that fall in a new range); a DROP that cannot have its
locks soon gives up instead of holding workers up; the counters stay exact across partitions."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import psycopg2
import pytest

from alya import BatchNotFound, BatchStatus, JobManager
from alya.batch.retention import purge
from alya.core.ids import id_time, uuid7
from alya.db import batches as batches_module
from alya.db.partitions import AHEAD, ensure_partitions, period_start, periods
from alya.engine.maintenance import cleanup
from tests.support.procs import Proc, drain, rows
from tests.support.services import store_sql

APP, OP = "part", "work"
WEEK = timedelta(days=7)


@pytest.fixture
def proc(jm: JobManager) -> Proc:
    p = Proc()
    jm.register_batch_processor(APP, OP, p)
    jm.register_batch_processor("other", OP, Proc())
    return p


def week_of(at: datetime) -> tuple[str, str, str]:
    return next(periods(at, 0))


def make_week(jm: JobManager, at: datetime) -> str:
    """The partition of ``at``'s week (a past one: the migration made this week and the next ones)."""
    name, lo, hi = week_of(at)
    with jm.store.tx() as q:
        q.create_rows_partition(part=name, lo=lo, hi=hi)
    return name


@contextmanager
def ids_at(at: datetime | None) -> Iterator[None]:
    """Batches submitted meanwhile get ids of time ``at`` (None: random v4 ids, as before migration 0012)."""
    real = batches_module.uuid7
    ms = None if at is None else int(at.timestamp() * 1000)
    batches_module.uuid7 = (lambda: str(uuid.uuid4())) if ms is None else (lambda: uuid7(now_ms=ms))  # type: ignore[assignment]
    try:
        yield
    finally:
        batches_module.uuid7 = real  # type: ignore[assignment]


def ended(jm: JobManager, n: int, app: str = APP) -> str:
    b = jm.batch_submit(app, OP, {}, rows(n))
    drain(jm, app, OP)
    assert jm.batch_status(b).status is BatchStatus.SUCCESS
    return b


def age(jm: JobManager, *ids: str, days: int = 40) -> None:
    store_sql(jm.store, "UPDATE batches SET doneat = now() - make_interval(days => %s) WHERE id = ANY(%s::uuid[])",
              days, list(ids))


def old_week(jm: JobManager, weeks_ago: int, n: int) -> tuple[datetime, str, str]:
    """(now, the partition of the week ``weeks_ago`` weeks back, a batch of ``n`` rows in it, ended 40 days ago)."""
    now = datetime.now(UTC)
    at = period_start(now) - weeks_ago * WEEK
    week = make_week(jm, at)
    with ids_at(at):
        b = ended(jm, n)
    age(jm, b)
    return now, week, b


def table_exists(jm: JobManager, name: str) -> bool:
    return store_sql(jm.store, "SELECT to_regclass(%s) IS NOT NULL", name)[0][0] is True


def where(jm: JobManager, batch: str) -> set[str]:
    """The partitions that hold the batch's rows."""
    return {r[0] for r in store_sql(jm.store, "SELECT DISTINCT tableoid::regclass::text FROM batchrows "
                                              "WHERE batch = %s", batch)}


def nrows(jm: JobManager, batch: str) -> int:
    return int(store_sql(jm.store, "SELECT count(*) FROM batchrows WHERE batch = %s", batch)[0][0])


def counters_exact(jm: JobManager) -> None:
    """Every open batch's counters equal a recount of its rows."""
    counted = store_sql(jm.store, """
        SELECT c.batch::text, c.status::text, sum(c.n)::int FROM batch_counts c
        JOIN batches b ON b.id = c.batch AND b.status IN ('wait', 'queued', 'inprog')
        GROUP BY 1, 2 HAVING sum(c.n) <> 0""")
    actual = store_sql(jm.store, """
        SELECT r.batch::text, r.status::text, count(*)::int FROM batchrows r
        JOIN batches b ON b.id = r.batch AND b.status IN ('wait', 'queued', 'inprog') GROUP BY 1, 2""")
    assert sorted(counted) == sorted(actual)


def test_new_ids_are_uuid7_and_land_in_this_week_s_partition(jm: JobManager, proc: Proc) -> None:
    b = jm.batch_submit(APP, OP, {}, rows(5))
    assert uuid.UUID(b).version == 7
    assert abs(id_time(b) - datetime.now(UTC)) < timedelta(minutes=1)
    assert where(jm, b) == {week_of(datetime.now(UTC))[0]}
    ids = [uuid7() for _ in range(2000)]
    assert ids == sorted(ids) and len(set(ids)) == 2000  # monotonic within a process


def test_a_purge_drops_a_whole_week_and_touches_nothing_else(jm: JobManager, proc: Proc) -> None:
    now = datetime.now(UTC)
    old_at, mixed_at = period_start(now) - 10 * WEEK + timedelta(days=1), period_start(now) - 9 * WEEK
    old, mixed = make_week(jm, old_at), make_week(jm, mixed_at)
    with ids_at(old_at):
        gone = [ended(jm, 40), ended(jm, 3)]
    with ids_at(mixed_at):
        mixed_done = ended(jm, 20)
    young = ended(jm, 10)  # this week, ended now
    with ids_at(mixed_at):
        mixed_open = jm.batch_submit(APP, OP, {}, rows(15))  # open: its week stays
    age(jm, *gone, mixed_done)
    assert where(jm, gone[0]) == {old} and where(jm, mixed_open) == {mixed}

    report = purge(jm.services, now - timedelta(days=30))

    assert not table_exists(jm, old)
    assert table_exists(jm, mixed)
    assert (report.nbatches, report.nrows) == (3, 40 + 3 + 20)
    assert not store_sql(jm.store, "SELECT 1 FROM batches WHERE id = ANY(%s::uuid[])", [*gone, mixed_done])
    assert nrows(jm, mixed_done) == 0  # the batched DELETE, in a week that stays
    assert nrows(jm, mixed_open) == 15 and nrows(jm, young) == 10
    assert jm.batch_status(mixed_open).status is BatchStatus.QUEUED
    drain(jm, APP, OP)  # the week that stayed still works
    assert jm.batch_status(mixed_open).status is BatchStatus.SUCCESS
    counters_exact(jm)
    # Ids of a dropped week go to the default partition (a client clock far off): still stored and purged.
    with ids_at(old_at):
        late = ended(jm, 4)
    assert where(jm, late) == {"batchrows_default"}
    age(jm, late)
    assert purge(jm.services, now - timedelta(days=30)).nrows >= 4 and nrows(jm, late) == 0


def test_with_app_a_week_is_dropped_only_if_every_batch_in_it_is_of_that_app(jm: JobManager, proc: Proc) -> None:
    now = datetime.now(UTC)
    at = period_start(now) - 12 * WEEK
    week = make_week(jm, at)
    with ids_at(at):
        mine, theirs = ended(jm, 6), ended(jm, 7, app="other")
    age(jm, mine, theirs)
    assert purge(jm.services, now - timedelta(days=30), app=APP).nrows == 6
    assert table_exists(jm, week) and nrows(jm, mine) == 0 and nrows(jm, theirs) == 7
    assert purge(jm.services, now - timedelta(days=30), app="other").nrows == 7
    assert not table_exists(jm, week)


def test_old_random_ids_in_the_default_partition_are_purged_by_delete(jm: JobManager, proc: Proc) -> None:
    with ids_at(None):
        legacy_old, legacy_open = ended(jm, 12), jm.batch_submit(APP, OP, {}, rows(5))
    assert where(jm, legacy_old) == {"batchrows_default"}
    age(jm, legacy_old)
    report = purge(jm.services, datetime.now(UTC) - timedelta(days=30))
    assert (report.nbatches, report.nrows) == (1, 12)
    assert nrows(jm, legacy_open) == 5
    counters_exact(jm)
    drain(jm, APP, OP)
    assert jm.batch_status(legacy_open).status is BatchStatus.SUCCESS


def test_maintenance_creates_the_weeks_ahead_and_moves_default_rows_into_them(jm: JobManager, proc: Proc) -> None:
    later = datetime.now(UTC) + (AHEAD + 3) * WEEK  # past the horizon the migration made
    name, lo, hi = week_of(later)
    with ids_at(later):  # a client clock far ahead: no partition yet, the default one takes it
        early = jm.batch_submit(APP, OP, {}, rows(9))
    assert where(jm, early) == {"batchrows_default"}
    made = ensure_partitions(jm.store, now=later)
    assert name in made and len(made) == AHEAD + 1
    assert where(jm, early) == {name}  # moved with its range, rows and counters intact
    assert ensure_partitions(jm.store, now=later) == []  # idempotent
    counters_exact(jm)
    drain(jm, APP, OP)
    assert jm.batch_status(early).status is BatchStatus.SUCCESS
    assert cleanup(jm.engine, recover=True, retain=False).partitions == []  # the pass does it too; all there


def test_while_the_default_partition_is_large_only_a_missing_current_week_is_made(
        jm: JobManager, proc: Proc, monkeypatch: pytest.MonkeyPatch) -> None:
    from alya.db import partitions

    monkeypatch.setattr(partitions, "SMALL_DEFAULT", -10)  # "large" (reltuples is 0 or -1 here)
    later = datetime.now(UTC) + (AHEAD + 20) * WEEK
    assert ensure_partitions(jm.store, now=later) == [week_of(later)[0]]
    assert ensure_partitions(jm.store, now=later + WEEK) == [week_of(later + WEEK)[0]]
    assert ensure_partitions(jm.store, now=later + timedelta(days=1)) == []


def test_a_drop_that_cannot_have_its_locks_gives_up_fast(jm: JobManager, proc: Proc) -> None:
    """A long transaction reading the old week (or any statement on batchrows) holds the DROP off: it waits
    at most the lock timeout per attempt, is retried a few times, and the purge goes on; the next purge
    drops it."""
    now, week, b = old_week(jm, 15, 5)
    conn = psycopg2.connect(jm.store.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM batchrows WHERE batch = %s", (b,))  # holds ACCESS SHARE
            t = time.monotonic()
            report = purge(jm.services, now - timedelta(days=30))
            took = time.monotonic() - t
        assert table_exists(jm, week)
        assert took < 3.0
        assert report.nbatches == 1 and nrows(jm, b) == 0  # the batched DELETE did it instead
    finally:
        conn.rollback()
        conn.close()
    purge(jm.services, now - timedelta(days=30))
    assert not table_exists(jm, week)


def test_workers_are_not_held_up_by_drops(jm: JobManager, proc: Proc) -> None:
    """Writes of rows in this week's partition go on while old weeks are dropped: no statement waits for
    longer than about the DROP's lock timeout."""
    now = datetime.now(UTC)
    weeks = []
    for k in range(20, 26):
        at = period_start(now) - k * WEEK
        weeks.append(make_week(jm, at))
        with ids_at(at):
            age(jm, ended(jm, 50))
    live = jm.batch_submit(APP, OP, {}, rows(200))
    gaps: list[float] = []
    stop = threading.Event()

    def poke() -> None:
        while not stop.is_set():
            t = time.monotonic()
            store_sql(jm.store, "UPDATE batchrows SET attempts = attempts WHERE batch = %s AND line = 1", live)
            gaps.append(time.monotonic() - t)

    th = threading.Thread(target=poke)
    th.start()
    try:
        purge(jm.services, now - timedelta(days=30))
    finally:
        stop.set()
        th.join()
    assert not any(table_exists(jm, w) for w in weeks)
    assert max(gaps) < 0.5, max(gaps)
    counters_exact(jm)




def test_new_partitions_take_the_default_partition_s_storage_parameters(jm: JobManager, proc: Proc) -> None:
    """A partitioned table has no autovacuum settings of its own: operators set them on batchrows_default
    (README, "PostgreSQL settings") and every partition made later copies them."""
    store_sql(jm.store, "ALTER TABLE batchrows_default SET (autovacuum_vacuum_scale_factor = 0.02)")
    name = make_week(jm, datetime.now(UTC) - 30 * WEEK)
    assert store_sql(jm.store, "SELECT reloptions FROM pg_class WHERE relname = %s", name)[0][0] == [
        "autovacuum_vacuum_scale_factor=0.02"]


def test_a_partition_left_detached_by_a_stopped_purge_is_dropped_by_the_next(jm: JobManager, proc: Proc) -> None:
    now, week, b = old_week(jm, 40, 8)
    with jm.store.tx() as q:  # the purge's first step, then a crash
        assert q.detach_rows_partition(part=week, before=now - timedelta(days=30), app=None) == 8
    assert table_exists(jm, week) and nrows(jm, b) == 0  # no longer part of batchrows
    report = purge(jm.services, now - timedelta(days=30))
    assert not table_exists(jm, week)
    assert report.nbatches == 1 and not store_sql(jm.store, "SELECT 1 FROM batches WHERE id = %s", b)


def test_a_retry_of_a_batch_being_purged_is_batch_not_found(jm: JobManager, proc: Proc) -> None:
    """batch_retry_failed of a failed batch whose week a purge has detached (its record not deleted yet: the
    purge's later step), or whose rows a purge is deleting in steps: BatchNotFound, nothing changed (was
    InvalidState "no failed rows", or a reopened batch without its purged rows); the purge then ends it."""
    now = datetime.now(UTC)
    at = period_start(now) - 41 * WEEK
    week = make_week(jm, at)
    with ids_at(at):
        b = jm.batch_submit(APP, OP, {}, rows(6) + [(7, {"mode": "fail"}), (8, {"mode": "fail"})])
        drain(jm, APP, OP)
    assert jm.batch_status(b).status is BatchStatus.FAILED
    age(jm, b)
    with jm.store.tx() as q:  # the purge's first step (the partition goes), its record is still there
        assert q.detach_rows_partition(part=week, before=now - timedelta(days=30), app=None) == 8
    with pytest.raises(BatchNotFound, match="being purged"):
        jm.batch_retry_failed(b)
    assert store_sql(jm.store, "SELECT status::text, round FROM batches WHERE id = %s", b) == [("failed", 1)]
    assert purge(jm.services, now - timedelta(days=30)).nbatches == 1
    with pytest.raises(BatchNotFound):
        jm.batch_retry_failed(b)
    # The delete path: a batch whose rows a purge deletes in steps (purge_rows), its record last.
    c = jm.batch_submit(APP, OP, {}, rows(6) + [(7, {"mode": "fail"}), (8, {"mode": "fail"})])
    drain(jm, APP, OP)
    age(jm, c)
    with jm.store.tx() as q:
        assert q.purge_rows(id=c, before=now - timedelta(days=30), after=0, n=7) == (7, 7)
    with pytest.raises(BatchNotFound, match="being purged"):
        jm.batch_retry_failed(c)
    assert nrows(jm, c) == 1 and jm.batch_status(c).status is BatchStatus.FAILED
