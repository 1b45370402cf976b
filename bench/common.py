"""Shared set-up for benchmarks: a fresh migrated database per run, and a Prefect server on loopback.

Also the small process helpers that docs/screenshots.py and tests/support use as well (they need no
``tests/`` on the path): :func:`free_port`, :func:`wait_until` (poll until true) and :func:`stop_process`."""

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
from collections.abc import Callable, Iterator
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


def wait_until(what: str, check: Callable[[], Any], timeout: float, every: float = 0.25,
               died: Callable[[], str | None] | None = None, tail: Callable[[], str] | None = None) -> Any:
    """Call ``check`` every ``every`` seconds until it returns something true, and return that; an exception
    it raises counts as "not yet" (a server still starting, say). Fails with AssertionError after
    ``timeout`` seconds, or as soon as ``died`` (asked after each miss) says why waiting is pointless, e.g.
    :func:`exited`; ``tail`` (a log's end) is added to the failure's message."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        why = died() if died is not None else None
        if why:
            raise AssertionError(f"{what}: {why}" + (f"\n{tail()}" if tail else ""))
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})"
                         + (f"\n{tail()}" if tail else ""))


def exited(proc: subprocess.Popen[bytes]) -> Callable[[], str | None]:
    """For :func:`wait_until`'s ``died``: "process exited N" once ``proc`` has exited."""
    return lambda: None if proc.poll() is None else f"process exited {proc.returncode}"


def log_tail(log: Path, n: int = 4000) -> Callable[[], str]:
    """For :func:`wait_until`'s ``tail``: the last ``n`` characters of the log file."""
    return lambda: log.read_text(errors="replace")[-n:]


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Terminate ``proc``, and kill it if it has not exited ``timeout`` seconds later."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


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
        health = f"http://127.0.0.1:{port}/api/health"
        wait_until("prefect server", lambda: urllib.request.urlopen(health, timeout=1).status == 200, 90,
                   every=0.3, died=exited(proc), tail=log_tail(home / "server.log", 2000))
        yield {"PREFECT_HOME": str(home), "PREFECT_API_URL": env["PREFECT_API_URL"]}
    finally:
        stop_process(proc, 15)
        log.close()
        if os.environ.get("BENCH_KEEP_PREFECT"):  # the server's database, to count what a run made there
            shutil.copytree(home, os.environ["BENCH_KEEP_PREFECT"], dirs_exist_ok=True)
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
