"""alya benchmarks. Each command prints figures (rows/s) measured on this machine.

    python -m bench submit --rows 1000000      # submit vs. a raw COPY of the same rows
    python -m bench noop --rows 200000 --workers 2   # end-to-end no-op throughput, worker processes
"""

from __future__ import annotations

import io
import os
import resource
import subprocess
import sys
import time
import uuid

import psycopg2
import typer

from alya import BatchInput, JobManager, JobManagerConfig
from bench.common import fresh_database, prefect_server

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
            cur.execute("INSERT INTO batches (id, app, op, type, context, status) VALUES (%s,'bench','raw','B','{}','wait')",
                        (bid,))
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


@app.command()
def noop(rows: int = 200_000, workers: int = 2, chunk: int = 1000, threads: int = 2) -> None:
    """End-to-end: N no-op rows processed by W worker processes (jm.run) against a Prefect server."""
    with fresh_database() as url, prefect_server() as penv:
        env = {**os.environ, **penv, "ALYA_BATCHCHUNK_NROWS": str(chunk), "ALYA_WORKER_THREADS": str(threads),
               "ALYA_LOG_LEVEL": "warning", "PREFECT_LOGGING_LEVEL": "WARNING"}
        jm = JobManager(database_url=url, config=JobManagerConfig(batchrowmax=rows))
        bid = jm.batch_submit("bench", "noop", {}, _rows(rows), wait=True)
        procs = [subprocess.Popen([sys.executable, "-m", "bench.worker", url, "bench", "noop"], env=env)
                 for _ in range(workers)]
        conn = psycopg2.connect(url)
        conn.autocommit = True
        try:
            deadline = time.monotonic() + 120
            while True:  # wait until every worker has registered (Prefect client warm)
                with conn.cursor() as cur:
                    cur.execute("SELECT count(*) FROM workers")
                    if cur.fetchone()[0] >= workers:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("workers did not start")
                time.sleep(0.2)
            t = time.perf_counter()
            jm.wait_off(bid)
            while not jm.batch_status(bid).status.is_final:
                time.sleep(0.05)
            elapsed = time.perf_counter() - t
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(60)
            conn.close()
        s = jm.batch_status(bid)
        jm.close()
    print(f"noop  {rows} rows, {workers} workers, chunk {chunk}, threads {threads}: {elapsed:.2f} s = "
          f"{rows / elapsed:.0f} rows/s  (status {s.status.value}, nsuccess {s.nsuccess})")


if __name__ == "__main__":
    app()
