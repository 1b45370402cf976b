"""Shared set-up for benchmarks: a fresh migrated database per run, and a Prefect server on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg2

PG_SERVER = os.environ.get("ALYA_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")


def _admin(sql: str) -> None:
    conn = psycopg2.connect(f"{PG_SERVER}/postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql)
    conn.close()


@contextmanager
def fresh_database(keep: bool = False) -> Iterator[str]:
    from alya import migrate_database

    name = f"alya_bench_{uuid.uuid4().hex[:8]}"
    _admin(f'CREATE DATABASE "{name}"')
    url = f"{PG_SERVER}/{name}"
    migrate_database(url)
    try:
        yield url
    finally:
        if not keep:
            _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def prefect_server() -> Iterator[dict[str, str]]:
    """``prefect server start`` on a free loopback port with its own PREFECT_HOME; yields the env to use."""
    home = Path(tempfile.mkdtemp(prefix="alya-prefect-"))
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    prefect = str(Path(sys.executable).parent / "prefect")
    log = open(home / "server.log", "wb")  # noqa: SIM115 - handed to the server process, closed below
    proc = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=1).read()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((home / "server.log").read_text()[-2000:]) from None
                time.sleep(0.3)
        yield {"PREFECT_HOME": str(home), "PREFECT_API_URL": env["PREFECT_API_URL"]}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(home, ignore_errors=True)


def wait_registered(conn: Any, procs: list[Any], n: int, timeout: float = 180) -> None:
    """Until ``n`` workers are in the ``workers`` table (each has started its engine); a worker process
    that exits first, or a timeout, is an error."""
    deadline = time.monotonic() + timeout
    while True:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM workers")
            if cur.fetchone()[0] >= n:
                return
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise RuntimeError("workers did not start")
        time.sleep(0.2)
