"""Services a fault test may stop, restart or break: each test starts its own instance on its own port, so
that no other test (or other session on this machine) ever sees the fault. The shared PostgreSQL and
Redis of ``tests.support.services`` are never stopped."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psycopg2

from bench.common import free_port

PG_BIN = Path(os.environ.get("ALYA_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the `postgres` user when we are root."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


class PrivatePostgres:
    """A PostgreSQL cluster of this test only (initdb in a temp dir, trust auth, a free port)."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            import pytest

            pytest.skip(f"no PostgreSQL binaries in {PG_BIN} (set ALYA_TEST_PG_BIN)")
        self.dir = Path(tempfile.mkdtemp(prefix="alya-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        subprocess.run(_as_postgres([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                                     "--no-sync", "-E", "UTF8"]), check=True, capture_output=True)
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.dir}'\n"
                       "fsync = off\nshared_buffers = 16MB\nmax_connections = 40\n")

    @property
    def server_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}"

    def url(self, database: str = "postgres") -> str:
        return f"{self.server_url}/{database}"

    def _ctl(self, *args: str) -> None:
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"),
                                     "-w", "-t", "60", *args]), check=True, capture_output=True)

    def start(self) -> None:
        self._ctl("start")

    def stop(self, mode: str = "fast") -> None:
        self._ctl("stop", "-m", mode)

    def restart(self, mode: str = "fast") -> None:
        self._ctl("restart", "-m", mode)

    def create_database(self, name: str, migrated: bool = True) -> str:
        conn = psycopg2.connect(self.url())
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        if migrated:
            from alya import migrate_database

            migrate_database(self.url(name))
        return self.url(name)

    def close(self) -> None:
        with suppress(subprocess.CalledProcessError):  # not running
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    pg.start()
    try:
        yield pg
    finally:
        pg.close()


class PrivateRedis:
    """A redis-server of this test only, on a free port, without persistence."""

    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            import pytest

            pytest.skip("no redis-server on PATH")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.binary is not None
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=0.5).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@contextmanager
def private_redis() -> Iterator[PrivateRedis]:
    r = PrivateRedis()
    r.start()
    try:
        yield r
    finally:
        r.stop()


def on_statement(monkeypatch: Any, *, before: Callable[[str], None] | None = None,
                 after: Callable[[str], None] | None = None) -> None:
    """Call ``before(name)`` / ``after(name)`` around every named statement that any transaction of this
    process runs (``alya.db.transport.Tx._execute``, the one place every query of ``alya.db.queries`` goes
    through), to inject a fault or hold a transaction open at a chosen statement, or to count statements."""
    from alya.db.transport import Tx

    real = Tx._execute

    def execute(self: Tx, name: str, params: dict[str, Any]) -> None:
        if before is not None:
            before(name)
        real(self, name, params)
        if after is not None:
            after(name)

    monkeypatch.setattr(Tx, "_execute", execute)
