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
                   extra_env: dict[str, str]) -> float:
    """Start worker processes, wait until all are registered, release the held batches, and time until
    every batch is final. Start-up (imports, Prefect client) is not in the figure; everything after is."""
    env = {**os.environ, **penv, "ALYA_DATABASE_URL": url, "ALYA_LOG_LEVEL": "warning",
           "PREFECT_LOGGING_LEVEL": "WARNING", **extra_env}
    jm = JobManager(database_url=url)
    procs = [subprocess.Popen(worker_cmd, env=env) for _ in range(workers)]
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        deadline = time.monotonic() + 180
        while True:
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM workers")
                if cur.fetchone()[0] >= workers:  # type: ignore[index]
                    break
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("workers did not start")
            time.sleep(0.2)
        t = time.perf_counter()
        for bid in batch_ids:
            jm.wait_off(bid)
        while not all(jm.batch_status(b).status.is_final for b in batch_ids):
            time.sleep(0.05)
        elapsed = time.perf_counter() - t
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
def noop(rows: int = 200_000, workers: int = 2, chunk: int = 1000, threads: int = 2) -> None:
    """End-to-end: N no-op rows processed by W worker processes (jm.run) against a Prefect server."""
    with fresh_database() as url, prefect_server() as penv:
        jm = JobManager(database_url=url, config=JobManagerConfig(batchrowmax=rows))
        bid = jm.batch_submit("bench", "noop", {}, _rows(rows), wait=True)
        elapsed = _timed_release(url, penv, [sys.executable, "-m", "bench.worker", url, "bench", "noop"], workers,
                                 [bid], {"ALYA_BATCHCHUNK_NROWS": str(chunk), "ALYA_WORKER_THREADS": str(threads)})
        s = jm.batch_status(bid)
        jm.close()
    print(f"noop  {rows} rows, {workers} workers, chunk {chunk}, threads {threads}: {elapsed:.2f} s = "
          f"{rows / elapsed:.0f} rows/s  (status {s.status.value}, nsuccess {s.nsuccess})")


@app.command()
def bank(rows: int = 100_000, batches: int = 10, workers: int = 2, accounts: int = 50) -> None:
    """The bank example (flows/bank.py): N deposits/withdrawals in B batches, W worker processes; checks
    that the final balances equal the ones computed from the input."""
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
        elapsed = _timed_release(url, penv, [sys.executable, "-m", "alya.cli", "worker", "flows.bank:jm"],
                                 workers, ids, {})
        expected, refused = ex.expected_balances(txns, opening)
        actual = ex.read_balances(url, expected)
        nfailed = sum(jm.batch_status(b).nfailed for b in ids)
        jm.close()
    print(f"bank  {rows} txns in {len(ids)} batches, {workers} workers: {elapsed:.2f} s = {rows / elapsed:.0f} rows/s;"
          f" balances {'match' if actual == expected else 'DIFFER'}; refused {nfailed} (expected {refused})")


if __name__ == "__main__":
    app()
