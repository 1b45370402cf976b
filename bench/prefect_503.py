"""Reproduce the HTTP 503 of the Prefect UI's "Submit" (a custom run of a deployment) under load, and
show what removes it (deployments/README.md, "HTTP 503 from the Prefect server").

    python -m bench.prefect_503                      # Prefect's default database: SQLite
    python -m bench.prefect_503 --db postgres        # the same load on PostgreSQL (asyncpg)

A real ``prefect server start`` (its own PREFECT_HOME, ``PREFECT_SERVER_LOG_RETRYABLE_ERRORS=true`` so
that its log says why it answered 503), one process work pool, one deployment. Then, at once:

- ``--submitters`` clients POST ``/deployments/{id}/create_flow_run`` ``--requests`` times in all, each
  request once, with no retry (as the UI's form does; Prefect's Python client retries 503 by itself);
- ``--pollers`` fake workers poll the pool (``get_scheduled_flow_runs``, which also writes the pool's
  and deployments' ``last_polled``) and take every run they get through Pending, Running, Completed.

Prints the answers counted by HTTP status and the server's log lines about locks.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench.common import PG_SERVER, _admin, exited, free_port, log_tail, stop_process, wait_until


def start_server(db: str) -> tuple[subprocess.Popen[bytes], str, Path, str | None]:
    home = Path(tempfile.mkdtemp(prefix="alya-503-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false", PREFECT_SERVER_LOG_RETRYABLE_ERRORS="true")
    pgdb = None
    if db == "postgres":
        pgdb = f"prefect_503_{uuid.uuid4().hex[:8]}"
        _admin(f'CREATE DATABASE "{pgdb}"')
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = \
            f"{PG_SERVER.replace('postgresql://', 'postgresql+asyncpg://')}/{pgdb}"
    prefect = str(Path(sys.executable).parent / "prefect")
    log = open(home / "server.log", "wb")  # noqa: SIM115 - the server's, closed when it exits
    proc = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_until("prefect server", lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, 120,
               every=0.3, died=exited(proc), tail=log_tail(home / "server.log", 3000))
    return proc, url, home, pgdb


async def load(url: str, requests: int, submitters: int, pollers: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=submitters + pollers + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        (await c.post("/work_pools/", json={"name": "p503", "type": "process"})).raise_for_status()
        flow = (await c.post("/flows/", json={"name": "f503"})).json()
        dep = (await c.post("/deployments/", json={"name": "d503", "flow_id": flow["id"], "work_pool_name": "p503",
                                                   "entrypoint": "x.py:f"})).json()
        codes: collections.Counter[int | str] = collections.Counter()
        poll_codes: collections.Counter[int | str] = collections.Counter()
        latencies: list[float] = []
        left = list(range(requests))
        done = asyncio.Event()

        async def submitter() -> None:
            while left:
                left.pop()
                t0 = time.monotonic()
                try:
                    r = await c.post(f"/deployments/{dep['id']}/create_flow_run",
                                     json={"state": {"type": "SCHEDULED"}, "parameters": {}})
                    codes[r.status_code] += 1
                except httpx.TransportError as exc:  # the server dropped the connection
                    codes[type(exc).__name__] += 1
                latencies.append(time.monotonic() - t0)

        async def poller() -> None:
            while not done.is_set():
                try:
                    r = await c.post("/work_pools/p503/get_scheduled_flow_runs", json={})
                    poll_codes[r.status_code] += 1
                    if r.status_code != 200:
                        continue
                    for item in r.json():
                        run_id = item["flow_run"]["id"]
                        for kind in ("PENDING", "RUNNING", "COMPLETED"):
                            s = await c.post(f"/flow_runs/{run_id}/set_state", json={"state": {"type": kind}})
                            poll_codes[s.status_code] += 1
                except httpx.TransportError as exc:
                    poll_codes[type(exc).__name__] += 1
                await asyncio.sleep(0.05)

        t0 = time.monotonic()
        polling = [asyncio.create_task(poller()) for _ in range(pollers)]
        await asyncio.gather(*(submitter() for _ in range(submitters)))
        took = time.monotonic() - t0
        done.set()
        await asyncio.gather(*polling)
    latencies.sort()
    return {"create_flow_run": dict(codes), "worker_calls": dict(poll_codes), "seconds": round(took, 1),
            "p50_s": round(latencies[len(latencies) // 2], 2), "max_s": round(latencies[-1], 2)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--submitters", type=int, default=16)
    ap.add_argument("--pollers", type=int, default=4)
    args = ap.parse_args(argv)
    proc, url, home, pgdb = start_server(args.db)
    try:
        out = asyncio.run(load(url, args.requests, args.submitters, args.pollers))
    finally:
        stop_process(proc, 20)
        text = (home / "server.log").read_text(errors="replace")
        shutil.rmtree(home, ignore_errors=True)
        if pgdb:
            _admin(f'DROP DATABASE IF EXISTS "{pgdb}" WITH (FORCE)')
    lines = text.splitlines()
    out.update(db=args.db, requests=args.requests, submitters=args.submitters, pollers=args.pollers,
               log_retryable=sum("retryable exception" in ln for ln in lines),
               log_locked=sum("database is locked" in ln for ln in lines),
               log_busy_snapshot=sum("SQLITE_BUSY" in ln or "BUSY_SNAPSHOT" in ln for ln in lines),
               log_sample=[ln for ln in lines if "database is locked" in ln or "retryable" in ln][:3])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
