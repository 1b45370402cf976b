"""``python -m bench status``: what ``batch_status`` of an open 1,000,000-row batch costs uncached (Redis
off), and what the metrics' queue read costs, from the counters (migration 0011) and, for comparison, by
recounting the rows as before.

The batch is submitted (COPY), then taken through the row versions an open batch has mid-run: a quarter of
its rows claimed and written back (``success``), 2,000 in progress, the rest queued, with no VACUUM since
(as between autovacuum runs: the partial indexes still hold entries of rows that moved). Printed: p50 and
max of ``--repeat`` calls of ``jm.batch_status`` (the whole client call: two queries in one read
transaction), of the counters' query alone and of the recount query it replaced; and the same for
``queue_depths`` (``jm.metrics()``'s database part) against the recount it replaced.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import psycopg2
import typer

from alya import BatchInput, JobManager, JobManagerConfig
from bench.common import fresh_database

APP, OP = "bench", "status"

# The reads the counters replaced (alya/db/sql/queries.sql before migration 0011).
RECOUNT = "SELECT status::text, count(*) FROM batchrows WHERE batch = %s GROUP BY status"
COUNTERS = "SELECT status::text, sum(n) FROM batch_counts WHERE batch = %s GROUP BY status HAVING sum(n) <> 0"
OLD_QUEUE_DEPTHS = """
SELECT b.app, b.op, b.type,
       (SELECT count(*) FROM batchrows r WHERE r.batch = ANY(array_agg(b.id)) AND r.status = 'queued'),
       (SELECT count(*) FROM batchrows r WHERE r.batch = ANY(array_agg(b.id)) AND r.status = 'inprog'),
       (SELECT extract(epoch FROM now() - min(r.reqat))::float8 FROM batchrows r
        WHERE r.batch = ANY(array_agg(b.id)) AND r.status = 'queued')
FROM batches b WHERE b.status IN ('queued', 'inprog')
GROUP BY b.app, b.op, b.type ORDER BY b.app, b.op, b.type"""


def _timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """(p50, max) in ms."""
    took = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        took.append((time.perf_counter() - t) * 1000)
    return statistics.median(took), max(took)


def run(rows: int, repeat: int) -> None:
    with fresh_database() as url:
        jm = JobManager(database_url=url, redis_url=None, object_store_url="memory://alya-bench-status",
                        config=JobManagerConfig(batchrowmax=max(rows, 1)))
        assert not jm.cache.available, "Redis must be off: this measures the uncached status"
        t = time.perf_counter()
        bid = jm.batch_submit(APP, OP, {}, (BatchInput(i, {"acct": i % 977, "amount": i % 100, "memo": "x"})
                                            for i in range(1, rows + 1)))
        t_submit = time.perf_counter() - t
        conn = psycopg2.connect(url)
        conn.autocommit = True
        cur = conn.cursor()
        done, running = rows // 4, min(2000, rows // 10)
        cur.execute("UPDATE batchrows SET status = 'inprog', doneby = 'w', attempts = 1 "
                    "WHERE batch = %s AND line <= %s", (bid, done + running))
        cur.execute("UPDATE batchrows SET status = 'success', res = '{\"ok\": true}', doneat = now() "
                    "WHERE batch = %s AND line <= %s", (bid, done))
        cur.execute("UPDATE batches SET status = 'inprog', ver = ver + 1 WHERE id = %s", (bid,))
        # a few small open batches of other types, as on a busy system
        for i in range(20):
            jm.batch_submit(APP, f"small{i % 4}", {}, (BatchInput(n, {"n": n}) for n in range(1, 101)))
        status = jm.batch_status(bid)
        assert (status.nsuccess, status.ninprog, status.nqueued) == (done, running, rows - done - running), status
        cur.execute(RECOUNT, (bid,))
        assert dict(cur.fetchall()) == {"success": done, "inprog": running, "queued": rows - done - running}

        def query(sql: str, *params: Any) -> Callable[[], Any]:
            return lambda: (cur.execute(sql, params), cur.fetchall())

        print(f"open batch: {rows:,} rows ({done:,} success, {running:,} inprog, {rows - done - running:,} "
              f"queued, no VACUUM since); submitted in {t_submit:.1f} s ({rows / t_submit:,.0f} rows/s)")
        print(f"{'read (ms, uncached)':<44} {'p50':>9} {'max':>9}")
        for name, fn in [("jm.batch_status (client call, counters)", lambda: jm.batch_status(bid)),
                         ("  counters query alone", query(COUNTERS, bid)),
                         ("  recount of the rows (before)", query(RECOUNT, bid)),
                         ("metrics queue_depths (counters)", lambda: jm.store.run(lambda q: q.queue_depths())),
                         ("  queue_depths recount (before)", query(OLD_QUEUE_DEPTHS))]:
            p50, top = _timed(fn, repeat)
            print(f"{name:<44} {p50:>9.2f} {top:>9.2f}")
        cur.execute("SELECT count(*), pg_total_relation_size('batch_counts') FROM batch_counts")
        n, size = cur.fetchone()
        print(f"batch_counts: {n} rows, {size / 1024:.0f} KiB")
        conn.close()
        jm.close()


def _flip(url: str, bid: str, lines: list[int], seconds: float, out: list[int]) -> None:
    """Write-back-like transactions on one batch, as fast as possible: 100 rows of this client's own lines
    move queued -> inprog, then inprog -> queued, each a transaction (synchronous_commit off, as the
    engine's claims and write-backs)."""
    conn = psycopg2.connect(url)
    cur = conn.cursor()
    n, end, k = 0, time.monotonic() + seconds, 0
    while time.monotonic() < end:
        first = lines[k]
        k = (k + 100) % (len(lines) - 100)
        for old, new in (("queued", "inprog"), ("inprog", "queued")):
            cur.execute("SET LOCAL synchronous_commit = off")
            cur.execute(f"UPDATE batchrows SET status = '{new}' WHERE batch = %s AND line >= %s AND line < %s "
                        f"AND status = '{old}'", (bid, first, first + 100))
            conn.commit()
            n += 1
    out.append(n)
    conn.close()


def contention(clients: int, seconds: float, rows: int) -> None:
    """Transactions/s of ``clients`` connections moving rows of ONE batch: without counters, with one
    counter row per batch and status (every transaction of every client updates the same rows), and with a
    shard per backend (as migrated). Shows what the shards buy on this machine."""
    import threading

    with fresh_database() as url:
        jm = JobManager(database_url=url, redis_url=None, object_store_url="memory://alya-bench-status",
                        config=JobManagerConfig(batchrowmax=max(rows, 1)))
        bid = jm.batch_submit(APP, OP, {}, (BatchInput(i, {"n": i}) for i in range(1, rows + 1)))
        jm.close()
        conn = psycopg2.connect(url)
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute("ANALYZE batchrows")
        cur.execute("SELECT p.proname, pg_get_functiondef(p.oid) FROM pg_proc p "
                    "WHERE p.proname LIKE 'alya_count_%' AND pg_get_functiondef(p.oid) LIKE '%pg_backend_pid()%'")
        functions = cur.fetchall()
        per = rows // clients
        variants = [("no counters (triggers disabled)", "ALTER TABLE batchrows DISABLE TRIGGER USER", None),
                    ("one counter row per batch and status", "ALTER TABLE batchrows ENABLE TRIGGER USER", "0"),
                    ("a shard per backend (as migrated)", None, "pg_backend_pid()")]
        print(f"{clients} clients, {seconds:g} s each, 100-row transactions on one batch of {rows:,} rows")
        for name, ddl, shard in variants:
            if ddl:
                cur.execute(ddl)
            for _name, body in functions if shard else []:
                cur.execute(body.replace("pg_backend_pid()", shard) if shard == "0" else body)
            out: list[int] = []
            threads = [threading.Thread(target=_flip, args=(url, bid, list(range(1 + i * per, 1 + (i + 1) * per)),
                                                           seconds, out)) for i in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            print(f"  {name:<40} {sum(out) / seconds:>9,.0f} transactions/s")
        cur.execute("SELECT status::text, sum(n) FROM batch_counts WHERE batch = %s GROUP BY 1 HAVING sum(n) <> 0",
                    (bid,))
        print(f"  counters at the end (triggers were off for the first part): {dict(cur.fetchall())}")
        conn.close()


def register(app: typer.Typer) -> None:
    @app.command()
    def status(rows: int = typer.Option(1_000_000, help="rows of the open batch"),
               repeat: int = typer.Option(20, help="calls timed per read")) -> None:
        """Uncached batch_status and the metrics queue read of an open batch: counters vs a recount."""
        run(rows, repeat)

    @app.command(name="counters")
    def counters(clients: int = typer.Option(8, help="connections moving rows of one batch at once"),
                 seconds: float = typer.Option(5.0, help="seconds per variant"),
                 rows: int = typer.Option(100_000, help="rows of the batch")) -> None:
        """Hot-row contention: transactions/s with no counters, one counter row per batch, a shard per backend."""
        contention(clients, seconds, rows)
