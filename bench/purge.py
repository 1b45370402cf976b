"""``python -m bench purge``: what retention costs at two table sizes, over repeated submit/purge cycles.

Each cycle submits ``size`` rows (batches of ``batch_rows``), takes them through the row versions a real
batch leaves (claimed, then written back: three heap versions per row), ends the batches ``success`` as if
40 days ago, and purges them with ``jm.batch_purge`` (bounded transactions of ~10k rows). Printed per
cycle: purge time and rate, WAL written by the purge, the longest single purge transaction, and
``pg_total_relation_size`` of ``batches`` and ``batchrows`` at their peak (before the purge) and after it.
By default a plain VACUUM follows each purge, as autovacuum would between purges a day apart
(``--no-vacuum``: back to back, the dead rows of each cycle still there when the next one is written).
For scale, ``--compare`` also times one single-statement DELETE of the same rows and the DROP of a table
holding them.

Two paths (``--paths drop,delete``, migration 0012): *drop*, the batches' ids are of a past week (its
partition made first), so the purge drops that week's partition whole; *delete*, their ids are of this week
(its partition is not over yet), so the purge deletes their rows in bounded transactions, as it does for
the default partition's old rows. ``batchrows`` sizes are summed over its partitions. "stall": the longest
write-back of one row of this week (a worker's statement, looping on its own connection) during the purge.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg2
import typer

from alya import BatchInput, JobManager, JobManagerConfig
from alya.batch import retention
from alya.core.ids import uuid7
from alya.db import batches as batches_module
from alya.db.partitions import PERIOD, period_start, periods
from bench.common import fresh_database

APP, OP = "bench", "purge"


def _sql(conn: Any, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(query, params)
        return cur.fetchall() if cur.description else []


def _sizes(conn: Any) -> tuple[int, int]:
    (b, r), = _sql(conn, "SELECT pg_total_relation_size('batches'), (SELECT coalesce(sum(pg_total_relation_size("
                         "inhrelid)), 0) FROM pg_inherits WHERE inhparent = 'batchrows'::regclass)")
    return int(b), int(r)


def _fill(jm: JobManager, conn: Any, size: int, batch_rows: int, at: datetime | None = None) -> list[str]:
    """``at``: the batches' ids are of that time (its week's partition is made first)."""
    ids = []
    real = batches_module.uuid7
    if at is not None:
        name, lo, hi = next(periods(at, 0))
        with jm.store.tx() as q:
            q.create_rows_partition(part=name, lo=lo, hi=hi)
        ms = int(at.timestamp() * 1000)
        batches_module.uuid7 = lambda: uuid7(now_ms=ms)  # type: ignore[assignment]
    try:
        for start in range(1, size + 1, batch_rows):
            n = min(batch_rows, size - start + 1)
            ids.append(jm.batch_submit(APP, OP, {}, (BatchInput(i, {"acct": i % 977, "amount": i % 100, "memo": "x"})
                                                     for i in range(1, n + 1))))
    finally:
        batches_module.uuid7 = real  # type: ignore[assignment]
    # the two later versions of every row: claimed, then written back with a result
    _sql(conn, "UPDATE batchrows SET status = 'inprog', doneby = 'w', attempts = 1 WHERE batch = ANY(%s::uuid[])",
         ids)
    _sql(conn, "UPDATE batchrows SET status = 'success', res = '{\"ok\": true}', doneat = now() "
         "WHERE batch = ANY(%s::uuid[])", ids)
    _sql(conn, "UPDATE batches SET status = 'success', nsuccess = nrows, doneat = now() - interval '40 days' "
         "WHERE id = ANY(%s::uuid[])", ids)
    return ids


@contextmanager
def _writer(url: str, batch: str) -> Iterator[list[float]]:
    """A worker's write-back meanwhile, in a loop on its own connection: the longest one (what a purge's
    locks cost the workers) in the list it yields, filled when the block ends."""
    stall = [0.0]
    stop = threading.Event()

    def loop() -> None:
        conn = psycopg2.connect(url)
        conn.autocommit = True
        while not stop.is_set():
            t = time.perf_counter()
            _sql(conn, "UPDATE batchrows SET attempts = attempts WHERE batch = %s AND line = 1", batch)
            stall[0] = max(stall[0], time.perf_counter() - t)
            time.sleep(0.001)
        conn.close()

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    try:
        yield stall
    finally:
        stop.set()
        th.join()


def _mib(n: int) -> str:
    return f"{n / 2**20:7.1f}"


def run(sizes: list[int], cycles: int, batch_rows: int, compare: bool, vacuum: bool,
        paths: tuple[str, ...] = ("drop", "delete")) -> None:
    with fresh_database() as url:
        jm = JobManager(database_url=url, config=JobManagerConfig(batchrowmax=max(sizes)))
        conn = psycopg2.connect(url)
        conn.autocommit = True
        longest = [0.0]
        real_tx = jm.store.tx

        def timed_tx() -> Any:  # the longest purge transaction (what a worker could wait behind)
            from contextlib import contextmanager

            @contextmanager
            def cm() -> Any:
                t = time.perf_counter()
                with real_tx() as q:
                    yield q
                longest[0] = max(longest[0], time.perf_counter() - t)
            return cm()

        live = jm.batch_submit(APP, OP, {}, [(1, {"live": True})])  # a worker's row of this week, written meanwhile
        print(f"{'path':>6} {'rows':>9} {'cycle':>5} {'purge s':>8} {'rows/s':>9} {'WAL MiB':>8} {'max tx ms':>9} "
              f"{'stall ms':>8} {'batches MiB peak/after':>23} {'batchrows MiB peak/after':>25}")
        week = period_start(datetime.now(UTC)) - 60 * PERIOD  # drop path: a past week per cycle
        for path, size in [(p, s) for p in paths for s in sizes]:
            for cycle in range(1, cycles + 1):
                week += PERIOD
                _fill(jm, conn, size, batch_rows, at=week + PERIOD / 2 if path == "drop" else None)
                peak = _sizes(conn)
                (lsn0,), = _sql(conn, "SELECT pg_current_wal_lsn()")
                longest[0] = 0.0
                jm.store.tx = timed_tx  # type: ignore[method-assign]
                with _writer(url, live) as stall:
                    t = time.perf_counter()
                    rep = jm.batch_purge(datetime.now(UTC) - timedelta(days=30))
                    took = time.perf_counter() - t
                del jm.store.tx
                (wal,), = _sql(conn, "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", lsn0)
                assert rep.nrows == size, rep
                after = _sizes(conn)
                if vacuum:  # what autovacuum does between purges a day apart (not VACUUM FULL: no lock)
                    _sql(conn, "VACUUM batchrows, batches")
                print(f"{path:>6} {size:>9} {cycle:>5} {took:8.2f} {size / took:9.0f} {_mib(int(wal))} "
                      f"{longest[0] * 1000:9.0f} {stall[0] * 1000:8.0f} "
                      f"{_mib(peak[0]):>11} /{_mib(after[0])} {_mib(peak[1]):>13} /{_mib(after[1])}")
            if compare and path == paths[-1]:
                _compare(jm, conn, size, batch_rows)
        conn.close()
        jm.close()
    print(f"(purge transactions of about {retention.CHUNK_ROWS:,} rows; sizes include indexes and TOAST)")


def _compare(jm: JobManager, conn: Any, size: int, batch_rows: int) -> None:
    ids = _fill(jm, conn, size, batch_rows)
    (lsn0,), = _sql(conn, "SELECT pg_current_wal_lsn()")
    t = time.perf_counter()
    _sql(conn, "DELETE FROM batches WHERE id = ANY(%s::uuid[])", ids)  # rows by ON DELETE CASCADE, one transaction
    took = time.perf_counter() - t
    (wal,), = _sql(conn, "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", lsn0)
    print(f"{'':>6} {size:>9}   one DELETE statement (one transaction): {took:.2f} s, WAL {_mib(int(wal)).strip()} MiB")
    _sql(conn, "CREATE TABLE bench_part AS SELECT * FROM batchrows LIMIT 0")
    _sql(conn, "INSERT INTO bench_part SELECT b, g, '{\"acct\": 1}'::jsonb, 'success' "
         "FROM (SELECT gen_random_uuid() AS b) x, generate_series(1, %s) g", size)
    _sql(conn, "ALTER TABLE bench_part ADD PRIMARY KEY (batch, line)")
    t = time.perf_counter()
    _sql(conn, "DROP TABLE bench_part")
    ms = (time.perf_counter() - t) * 1000
    print(f"{'':>6} {size:>9}   DROP of a table of as many rows (a partition's drop): {ms:.0f} ms")


def register(app: typer.Typer) -> None:
    @app.command()
    def purge(sizes: str = typer.Option("10000,1000000", help="rows per cycle, comma-separated"),
              cycles: int = typer.Option(3, help="submit/purge cycles per size"),
              batch_rows: int = typer.Option(10_000, help="rows per batch"),
              compare: bool = typer.Option(True, help="also time one DELETE statement and a table DROP"),
              vacuum: bool = typer.Option(True, help="a plain VACUUM after each purge, as autovacuum would "
                                          "between purges a day apart"),
              paths: str = typer.Option("drop,delete", help="drop: ids of a past week, its partition dropped; "
                                        "delete: ids of this week, rows deleted in bounded transactions")) -> None:
        """Purge time and table sizes after repeated submit/purge cycles, at two table sizes, on both paths."""
        run([int(s) for s in sizes.split(",")], cycles, batch_rows, compare, vacuum,
            tuple(p.strip() for p in paths.split(",")))
