"""alya benchmarks. Each command prints figures (rows/s) measured on this machine.

    python -m bench submit --rows 1000000      # submit vs. a raw COPY of the same rows
    python -m bench noop --rows 200000 --workers 2   # end-to-end no-op throughput, worker processes
    python -m bench scale --rows 2000 --sleep-ms 20   # I/O-bound rows on 1, 2, 4 workers over simulated hosts
"""

from __future__ import annotations

import functools
import io
import os
import resource
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg2
import typer

from alya import BatchInput, JobManager, JobManagerConfig
from bench import engine_bench
from bench import purge as purge_bench
from bench import status as status_bench
from bench.common import PG_SERVER, fresh_database, prefect_server, wait_registered
from bench.mixed import REDIS
from bench.worker import WARMUP_OP

app = typer.Typer(add_completion=False, no_args_is_help=True)


def _rows(n: int):  # type: ignore[no-untyped-def]
    return (BatchInput(i, {"acct": i % 977, "amount": i % 100, "memo": "x"}) for i in range(1, n + 1))


@app.command()
def submit(rows: int = 1_000_000) -> None:
    """Submit N small rows through batch_submit, and COPY the same rows raw into the same table."""
    with fresh_database() as url:
        jm = JobManager(database_url=url, config=JobManagerConfig(batchrowmax=max(rows, 1)))
        t = time.perf_counter()
        jm.batch_submit("bench", "submit", {}, _rows(rows))
        t_submit = time.perf_counter() - t
        # Raw COPY: the same rows pre-encoded in memory, into the same table with the same indexes.
        bid = str(uuid.uuid4())
        buf = io.BytesIO(b"".join(
            b"%s\t%d\t{\"acct\":%d,\"amount\":%d,\"memo\":\"x\"}\n" % (bid.encode(), i, i % 977, i % 100)
            for i in range(1, rows + 1)))
        conn = psycopg2.connect(url)
        with conn, conn.cursor() as cur:
            cur.execute("INSERT INTO batches (id, app, op, type, context, status) "
                        "VALUES (%s, 'bench', 'raw', 'B', '{}', 'wait')", (bid,))
            t = time.perf_counter()
            cur.copy_expert("COPY batchrows (batch, line, input) FROM STDIN", buf)
            conn.commit()
            t_raw = time.perf_counter() - t
        conn.close()
        jm.close()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"submit      {rows:>9} rows  {t_submit:7.2f} s  {rows / t_submit:9.0f} rows/s")
    print(f"raw COPY    {rows:>9} rows  {t_raw:7.2f} s  {rows / t_raw:9.0f} rows/s")
    print(f"ratio submit/raw = {t_raw / t_submit:.2f}   (peak RSS incl. raw buffer {rss:.0f} MiB)")


def _timed_release(url: str, penv: dict[str, str], worker_cmd: list[str], workers: int, batch_ids: list[str],
                   extra_env: dict[str, str], warmup: tuple[str, str] | None = None) -> float:
    """Start worker processes, wait until all are registered, release the held batches, and time until
    every batch is final. Start-up (imports, Prefect client) is not in the figure; everything after is.
    With ``warmup`` (app, op), a batch of that *other* type runs on every worker first: workers that have
    been running, as a user meets them, but have not run the timed batch's type (its first flow run on
    each worker is in the figure). The polling client and the workers use Redis (``ALYA_BENCH_REDIS``), as a
    user runs them: without it every poll recounts the open batch in PostgreSQL (20 a second here), which
    took PostgreSQL CPU from the rows; ``BENCH_NO_REDIS=1`` measures that case."""
    redis = None if os.environ.get("BENCH_NO_REDIS") else REDIS
    env = {**os.environ, **penv, "ALYA_DATABASE_URL": url, "ALYA_LOG_LEVEL": "warning",
           "PREFECT_LOGGING_LEVEL": "WARNING", **({"ALYA_REDIS_URL": redis} if redis else {}), **extra_env}
    jm = JobManager(database_url=url, redis_url=redis)
    procs = [subprocess.Popen(worker_cmd, env=env) for _ in range(workers)]
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        wait_registered(conn, procs, workers)
        if warmup is not None:
            _warm_up(jm, conn, warmup, workers)
        t = time.perf_counter()
        with conn.cursor() as cur:
            cur.execute("SELECT clock_timestamp()")
            released = cur.fetchone()[0]
        for bid in batch_ids:
            jm.wait_off(bid)
        while not all(jm.batch_status(b).status.is_final for b in batch_ids):
            time.sleep(0.05)
        elapsed = time.perf_counter() - t
        with conn.cursor() as cur:
            cur.execute("SELECT min(doneat) - %s, max(doneat) - %s FROM batchrows WHERE batch = ANY(%s::uuid[])",
                        (released, released, batch_ids))
            first, last = cur.fetchone()
            # rows done per tenth of the run: where the time goes (start-up, steady state, the tail)
            cur.execute("SELECT width_bucket(extract(epoch FROM doneat - %s), 0, %s, 10), count(*) FROM batchrows"
                        " WHERE batch = ANY(%s::uuid[]) GROUP BY 1 ORDER BY 1", (released, elapsed, batch_ids))
            tenths = dict(cur.fetchall())
        print(f"first row done {first.total_seconds() * 1000:.0f} ms after the release, the last"
              f" {last.total_seconds() * 1000:.0f} ms; final status seen at {elapsed * 1000:.0f} ms")
        print("rows done per tenth of the run: " + " ".join(str(tenths.get(i, 0)) for i in range(1, 11)))
        peaks = [_peak_rss_mib(p.pid) for p in procs]
        print(f"worker peak RSS (MiB): {', '.join(f'{m:.0f}' for m in peaks)}")
        return elapsed
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(60)
        conn.close()
        jm.close()


def _warm_up(jm: JobManager, conn: Any, type_: tuple[str, str], workers: int) -> None:
    """Run batches of ``type_`` until every worker has run rows of it (so each has made a flow run)."""
    for _ in range(20):
        bid = jm.batch_submit(*type_, {}, [(i, {"i": i}) for i in range(1, 5000 * workers + 1)])
        while not jm.batch_status(bid).status.is_final:
            time.sleep(0.05)
        with conn.cursor() as cur:
            cur.execute("SELECT count(DISTINCT doneby) FROM batchrows b JOIN batches t ON t.id = b.batch"
                        " WHERE t.app = %s AND t.op = %s", type_)
            if cur.fetchone()[0] >= workers:
                return
    print("warm-up: not every worker ran rows")


def _peak_rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


@app.command()
def noop(rows: int = 200_000, workers: int = 2, chunk: int = 1000, threads: int = 2, cold: bool = False) -> None:
    """End-to-end: N no-op rows processed by W worker processes (jm.run) against a Prefect server. The
    workers have run another type first (``--cold``: not even that, their first flow run ever is timed);
    the no-op type's first flow run on each of them is in the figure either way."""
    with fresh_database() as url, prefect_server() as penv:
        jm = JobManager(database_url=url, config=JobManagerConfig(batchrowmax=rows))
        bid = jm.batch_submit("bench", "noop", {}, _rows(rows), wait=True)
        elapsed = _timed_release(url, penv, [sys.executable, "-m", "bench.worker", url, "bench", "noop"], workers,
                                 [bid], {"ALYA_BATCHCHUNK_NROWS": str(chunk), "ALYA_WORKER_THREADS": str(threads)},
                                 warmup=None if cold else ("bench", WARMUP_OP))
        s = jm.batch_status(bid)
        jm.close()
    print(f"noop  {rows} rows, {workers} workers, chunk {chunk}, threads {threads}{', cold' if cold else ''}: "
          f"{elapsed:.2f} s = {rows / elapsed:.0f} rows/s  (status {s.status.value}, nsuccess {s.nsuccess})")


@app.command()
def bank(rows: int = 100_000, batches: int = 10, workers: int = 2, accounts: int = 50, bulk: bool = False,
         bulk_rows: int = 100) -> None:
    """The bank example (flows/bank.py): N deposits/withdrawals in B batches, W worker processes; checks
    that the final balances equal the ones computed from the input. ``--bulk``: its bulk processor
    (bench/bank_bulk.py), ``--bulk-rows`` transactions per call and statement (ALYA_BULK_ROWS)."""
    with fresh_database() as url, prefect_server() as penv:
        os.environ["ALYA_DATABASE_URL"] = url
        from flows import bank as ex

        jm = JobManager(database_url=url, config=JobManagerConfig(batchrowmax=rows))
        txns, opening = ex.make_transactions(rows, accounts, seed=7)
        ex.open_accounts(url, opening)
        size = -(-rows // batches)
        ids = [jm.batch_submit(ex.APP, ex.OP, {"user": "bench"},
                               [BatchInput(i, t) for i, t in enumerate(txns[s:s + size], 1)], wait=True)
               for s in range(0, rows, size)]
        module = "bench.bank_bulk:jm" if bulk else "flows.bank:jm"
        elapsed = _timed_release(url, penv, [sys.executable, "-m", "alya.cli.main", "worker", module],
                                 workers, ids, {"ALYA_BULK_ROWS": str(bulk_rows)})
        expected, refused = ex.expected_balances(txns, opening)
        actual = ex.read_balances(url, expected)
        nfailed = sum(jm.batch_status(b).nfailed for b in ids)
        jm.close()
    print(f"bank{f' bulk {bulk_rows}' if bulk else ''}  {rows} txns in {len(ids)} batches, {workers} workers: "
          f"{elapsed:.2f} s = {rows / elapsed:.0f} rows/s;"
          f" balances {'match' if actual == expected else 'DIFFER'}; refused {nfailed} (expected {refused})")


def _workers_done(url: str, batch_id: str) -> set[str]:
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT DISTINCT doneby FROM batchrows WHERE batch = %s AND status = 'success'", (batch_id,))
            return {r[0] for r in cur.fetchall()}
    finally:
        conn.close()


def _scale_run(cluster: Any, nworkers: int, rows: int, sleep_ms: int, chunk: int, concurrency: int,
               work: Path) -> tuple[float, list[str]]:
    """One count: a fresh database, ``nworkers`` ``alya worker bench.sleeper:jm`` processes spread round-robin
    over the hosts, warmed up (each has run a flow: a process's first Prefect flow run costs seconds), then
    the held batch released and timed until final."""
    from tests.support.cluster import wait_for

    with fresh_database() as url:
        database = url.rsplit("/", 1)[1]
        store = (work / f"objects-{nworkers}").as_uri()
        jm = JobManager(database_url=url, object_store_url=store, config=JobManagerConfig(batchrowmax=max(rows, 1)))
        measured = jm.batch_submit("bench", "sleep", {}, (BatchInput(i, {"ms": sleep_ms}) for i in range(1, rows + 1)),
                                   wait=True)
        hosts = [cluster.hosts[i % len(cluster.hosts)] for i in range(nworkers)]
        env = {"ALYA_OBJECT_STORE_URL": store, "ALYA_BATCHCHUNK_NROWS": str(chunk),
               "ALYA_WORKER_THREADS": str(concurrency), "ALYA_CONCURRENCY": str(concurrency),
               "ALYA_LOG_LEVEL": "warning", "PREFECT_LOGGING_LEVEL": "WARNING"}
        procs = [cluster.alya_worker(h, "bench.sleeper:jm", database, name=f"scale-{nworkers}-{i}", **env)
                 for i, h in enumerate(hosts)]
        def final(batch_id: str) -> bool:
            return jm.batch_status(batch_id).status.is_final

        try:
            cluster.wait_workers(database, nworkers, timeout=180, procs=procs)
            for _ in range(6):  # warm-up batches until every worker has processed rows
                warm = jm.batch_submit("bench", "sleep", {}, (BatchInput(i, {"ms": 100}) for i in
                                                             range(1, 2 * chunk * nworkers + 1)))
                wait_for("warm-up batch final", functools.partial(final, warm), 300, procs)
                if len(_workers_done(url, warm)) >= nworkers:
                    break
            t = time.perf_counter()
            jm.wait_off(measured)
            wait_for("measured batch final", functools.partial(final, measured), 3600, procs, every=0.05)
            elapsed = time.perf_counter() - t
            s = jm.batch_status(measured)
            if s.nsuccess != rows:
                raise RuntimeError(f"batch ended {s.status.value} with {s.nsuccess} of {rows} rows")
            return elapsed, [h.name for h in hosts]
        finally:
            for p in procs:
                p.stop()
            jm.close()


@app.command()
def scale(rows: int = 2000, sleep_ms: int = 20, workers: str = "1,2,4", hosts: int = 2, chunk: int = 20,
          concurrency: int = 2) -> None:
    """I/O-bound rows (each sleeps SLEEP_MS) on 1, 2, 4 ``alya worker`` processes spread over simulated hosts
    (network namespaces; needs root and iproute2): rows/s per count and the ratio to one worker.

    CONCURRENCY is passed to the workers as ALYA_CONCURRENCY (rows at once per worker, the engine being
    rewritten) and ALYA_WORKER_THREADS (chunks at once per worker, one row at a time per chunk, today)."""
    import tempfile

    from alya.core.logs import configure
    from tests.support.cluster import Cluster
    from tests.support.netns import unavailable

    configure("warning")  # this process's own status-change lines would drown the figures
    reason = unavailable()
    if reason:
        typer.echo(f"scale: no simulated hosts here: {reason}", err=True)
        raise typer.Exit(2)
    counts = [int(w) for w in workers.split(",")]
    work = Path(tempfile.mkdtemp(prefix="alya-scale-"))
    results = []
    try:
        with Cluster(work, nhosts=hosts, pg_server=PG_SERVER) as cluster:
            for n in counts:
                elapsed, placed = _scale_run(cluster, n, rows, sleep_ms, chunk, concurrency, work)
                results.append((n, elapsed, placed))
                print(f"  {n} worker(s): {elapsed:.2f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rows / results[0][1]
    print(f"scale  {rows} rows x {sleep_ms} ms, chunk {chunk}, concurrency {concurrency}, {hosts} simulated hosts")
    print(f"{'workers':>7}  {'placement':<28} {'seconds':>8} {'rows/s':>8} {'ideal':>7} {'vs 1':>6} {'eff.':>5}")
    for n, elapsed, placed in results:
        rps = rows / elapsed
        ideal = n * concurrency * 1000 / sleep_ms if sleep_ms else float("nan")
        where = ", ".join(f"{h} x{placed.count(h)}" for h in dict.fromkeys(placed))
        print(f"{n:>7}  {where:<28} {elapsed:>8.2f} {rps:>8.0f} {ideal:>7.0f} {rps / base:>5.2f}x "
              f"{rps / ideal:>5.0%}")


engine_bench.register(app)  # io, latency, abort, crash
purge_bench.register(app)  # purge
status_bench.register(app)  # status

if __name__ == "__main__":
    app()
