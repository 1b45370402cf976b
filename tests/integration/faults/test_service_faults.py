"""Faults of the services under clients and workers: connections the server ends (all at once, under
polling clients, between a write and its commit), a private PostgreSQL restarted, or crashed losing an
acknowledged write-back under a live worker, an unreachable database, dead pooled connections, and
misconfigured services (garbage Redis or object-store URLs, a database never migrated) as typed errors, and
workers that cannot reach Redis (no stale status for the client).
Services a test breaks are its own (tests.support.faults); the shared ones are never stopped. The figures
the README's "Reliability" table reports are printed (``pytest -s``)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
import structlog.testing

from alya import (
    BackendUnavailable,
    BatchInput,
    BatchJobResult,
    BatchStatus,
    ConfigError,
    JobManager,
)
from alya.core.errors import ConnectionLost, DatabaseNotMigrated
from alya.db.queries import Queries
from alya.db.store import Store
from tests.support import services
from tests.support.config import make_config
from tests.support.faults import private_postgres
from tests.support.services import sql

APP = "rel"
S = BatchStatus


class Ok:
    def do_batch_job(self, initblock: Any, context: dict[str, Any], line: int, input: dict[str, Any]
                     ) -> BatchJobResult:
        return BatchJobResult(S.SUCCESS, result={"line": line})

    def mark_done(self, *args: Any) -> None:
        pass


def rows(n: int, start: int = 1) -> list[BatchInput]:
    return [BatchInput(i, {"i": i}) for i in range(start, start + n)]


def db_name(url: str) -> str:
    return url.rsplit("/", 1)[1]


def terminate_all(url: str) -> int:
    """End every server connection of the test's own database, as a restart or an admin would."""
    name = db_name(url)
    conn = psycopg2.connect(f"{services.PG_SERVER}/postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s "
                        "AND pid <> pg_backend_pid()", (name,))
            return int(cur.fetchone()[0])  # type: ignore[index]
    finally:
        conn.close()


def fill_pool(jm: JobManager, n: int = 4) -> None:
    """Check out n connections at once, so that the pool holds n (its size) live connections afterwards."""
    txs = [jm.store.tx() for _ in range(n)]
    for t in txs:
        t.__enter__()
    for t in txs:
        t.__exit__(None, None, None)


@pytest.fixture
def client(database_url: str, file_store_url: str) -> Iterator[JobManager]:
    """No Redis: every call reaches PostgreSQL."""
    jm = JobManager(database_url=database_url, object_store_url=file_store_url, config=make_config())
    yield jm
    jm.close()


# -------------------------------------------------------------------------------- connections ended, servers restarted
def every_client_call(jm: JobManager, big: str) -> None:
    bid = jm.batch_submit(APP, "op", {}, rows(3), wait=True)
    assert jm.batch_status(bid).status is S.WAIT
    assert jm.batch_append(bid, rows(2, start=4), wait=True) == 5
    assert jm.wait_off(bid) == 5
    assert jm.batch_done(bid).status is S.QUEUED
    assert len(jm.batch_done(big).rows or []) == 1500  # large: streamed from a server-side cursor
    assert len(jm.batch_list(APP)) >= 2
    q = jm.slowquery_submit(APP, "q", {}, {"x": 1})
    assert jm.slowquery_done(q).status is S.QUEUED
    assert jm.batch_abort(bid).status is S.ABORTED


def finished_batch(jm: JobManager, url: str, n: int) -> str:
    big = jm.batch_submit(APP, "op", {}, rows(n))
    sql(url, "UPDATE batchrows SET status = 'success' WHERE batch = %s", big)
    sql(url, "UPDATE batches SET status = 'success', nsuccess = %s WHERE id = %s", n, big)
    return big


def test_client_calls_reconnect_after_the_server_ended_every_connection(client: JobManager,
                                                                        database_url: str) -> None:
    big = finished_batch(client, database_url, 1500)
    for call in ("status", "done", "list", "submit", "done-big"):
        fill_pool(client)
        assert terminate_all(database_url) >= 4  # the pool keeps 4
        t = time.monotonic()
        if call == "status":
            client.batch_status(big)
        elif call == "done":
            client.batch_done(big)
        elif call == "list":
            client.batch_list(APP)
        elif call == "submit":
            client.batch_submit(APP, "op", {}, rows(2))
        else:
            # the first statement of this transaction is a server-side cursor's
            assert len(client.services.statuses.final_rows(big, client.services.statuses.read(big))) == 1500
        print(f"\nreconnect after pg_terminate_backend ({call}): {1000 * (time.monotonic() - t):.1f} ms")
    fill_pool(client)
    terminate_all(database_url)
    every_client_call(client, big)


def test_pollers_never_see_a_terminated_connection(client: JobManager, database_url: str) -> None:
    """Four threads poll while every connection of the database is terminated 30 times, some in the
    middle of a transaction: no call fails (a read-only transaction that lost its connection runs again)."""
    big = finished_batch(client, database_url, 10)
    q = client.batch_submit(APP, "op", {}, rows(10))
    errors: list[BaseException] = []
    calls = [0]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                client.batch_status(q)
                client.batch_done(big)
                calls[0] += 1
            except BaseException as exc:  # noqa: BLE001 - every failure is counted
                errors.append(exc)

    threads = [threading.Thread(target=poll, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    killed = 0
    for _ in range(30):
        time.sleep(0.05)
        killed += terminate_all(database_url)
    stop.set()
    for t in threads:
        t.join(30)
    print(f"\npollers: {calls[0]} calls, {killed} connections terminated, {len(errors)} errors")
    assert not errors, errors[:3]
    assert killed >= 30 and calls[0] > 30


def test_a_transaction_that_loses_its_connection_runs_once_more_and_stores_once(database_url: str) -> None:
    store = Store(database_url)
    calls = [0]

    def body(q: Queries) -> str:
        calls[0] += 1
        bid = str(uuid.uuid4())
        q.insert_batch(id=bid, app=APP, op="op", type="B", context="{}", inputfile=None, status=BatchStatus.WAIT)
        if calls[0] == 1:  # the connection dies after a write, before the commit
            terminate_all(database_url)
            q.get_batch(id=bid)
        return bid

    try:
        bid = store.run(body)
        assert calls[0] == 2
        assert sql(database_url, "SELECT id::text FROM batches") == [(bid,)]  # the first attempt left nothing

        def lost(q: Queries) -> None:
            q.get_batch(id=bid)
            terminate_all(database_url)
            q.get_batch(id=bid)

        with pytest.raises(ConnectionLost) as err:  # out of attempts: a BackendUnavailable, nothing stored
            store.run(lost, attempts=2)
        assert isinstance(err.value, BackendUnavailable) and not err.value.at_commit
    finally:
        store.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_client_reconnects_after_a_private_server_restart(mode: str, tmp_path: Any) -> None:
    with private_postgres() as pg:
        url = pg.create_database("alya")
        jm = JobManager(database_url=url, object_store_url=(tmp_path / "o").as_uri(), config=make_config())
        try:
            big = finished_batch(jm, url, 1500)
            fill_pool(jm)
            t = time.monotonic()
            pg.restart(mode)
            restart = time.monotonic() - t
            t = time.monotonic()
            assert jm.batch_status(big).status is S.SUCCESS
            print(f"\nrestart -m {mode}: {restart:.1f} s; first call after it {1000 * (time.monotonic() - t):.0f} ms")
            every_client_call(jm, big)
        finally:
            jm.close()


# ---------------------------------------------------------------------------------------------- misconfigured services
@pytest.mark.parametrize("url", ["garbage", "http://user:s3cr3t@host/0", "redis://:s3cr3t@host:notaport/0",
                                 "redis://h:6379/0?socket_timeout=abc"])
def test_a_garbage_redis_url_is_a_config_error(url: str, database_url: str, file_store_url: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="ALYA_REDIS_URL") as err:
        JobManager(database_url=database_url, redis_url=url, object_store_url=file_store_url)
    assert "s3cr3t" not in str(err.value)
    monkeypatch.setenv("ALYA_REDIS_URL", url)
    with pytest.raises(ConfigError, match="ALYA_REDIS_URL") as err:
        JobManager(database_url=database_url, object_store_url=file_store_url)
    assert "s3cr3t" not in str(err.value)


@pytest.mark.parametrize("url", ["garbage", "nope://user:s3cr3t@bucket/x", "relative/path"])
def test_a_garbage_object_store_url_is_a_config_error(url: str, database_url: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="ALYA_OBJECT_STORE_URL") as err:
        JobManager(database_url=database_url, object_store_url=url)
    assert "s3cr3t" not in str(err.value)
    monkeypatch.setenv("ALYA_OBJECT_STORE_URL", url)
    with pytest.raises(ConfigError, match="ALYA_OBJECT_STORE_URL"):
        JobManager(database_url=database_url)


def test_a_database_never_migrated_says_run_alya_migrate(file_store_url: str) -> None:
    name = f"alya_nm_{uuid.uuid4().hex[:10]}"
    services.admin_exec(f'CREATE DATABASE "{name}"')
    url = f"{services.PG_SERVER}/{name}"
    jm = JobManager(database_url=url, object_store_url=file_store_url, config=make_config())
    try:
        for call in (lambda: jm.batch_submit(APP, "op", {}, rows(2)),
                     lambda: jm.batch_status(str(uuid.uuid4())),
                     lambda: jm.slowquery_submit(APP, "q", {}, {}),
                     lambda: jm.batch_list(APP)):
            with pytest.raises(DatabaseNotMigrated, match="alya migrate"):
                call()
        assert sql(url, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]
    finally:
        jm.close()
        services.drop_database(name)


# ------------------------------------------------------------------------------------- Redis out of the workers' reach
@pytest.mark.slow
def test_workers_without_redis_leave_no_stale_status(database_url: str, redis_url: str, file_store_url: str) -> None:
    """The client caches `queued` at submit; the worker cannot reach Redis (its URL points nowhere), so it
    never updates that entry. The client must still see `success` within a few seconds of the end."""
    client = JobManager(database_url=database_url, redis_url=redis_url, object_store_url=file_store_url,
                        config=make_config(batchstatus_cachedur_sec=60))
    worker = JobManager(database_url=database_url, redis_url=f"redis://127.0.0.1:{services.free_port()}/0",
                        object_store_url=file_store_url, config=make_config())
    try:
        bid = client.batch_submit(APP, "op", {}, rows(50))
        assert client.batch_status(bid).status is S.QUEUED  # cached
        worker.register_batch_processor(APP, "op", Ok())
        while worker.engine.process_chunk(APP, "op").batch is not None:
            pass
        assert sql(database_url, "SELECT status::text FROM batches WHERE id = %s", bid) == [("success",)]
        assert not worker.cache.available  # the worker never reached Redis
        done = time.monotonic()
        while (status := client.batch_status(bid).status) is not S.SUCCESS:
            assert time.monotonic() - done < 10, f"still {status.value} 10 s after the batch ended"
            time.sleep(0.1)
        stale = time.monotonic() - done
        print(f"\nstale status seen by the client for {stale:.1f} s after the batch ended (was up to 60 s)")
        assert stale <= 6
        assert client.batch_done(bid).nsuccess == 50
    finally:
        worker.close()
        client.close()


# ---------------------------------------------------------------------------------------- crashes, unreachable servers
@pytest.mark.slow
def test_rows_whose_write_back_a_server_crash_lost_are_recovered_under_a_live_worker(tmp_path: Any) -> None:
    """Write-backs commit with synchronous_commit off: a PostgreSQL crash can lose one that the worker saw
    acknowledged, and its rows stay inprog under a worker that lives on. The heartbeat sees the server's
    new start time and the worker stops vouching for what it held before: recovery requeues those rows
    after ALYA_RECOVERY_SEC and they finish."""
    from alya.engine.maintenance import cleanup
    from tests.support.procs import Proc, drain, wait_until

    with private_postgres() as pg:
        url = pg.create_database("alya")
        jm = JobManager(database_url=url, object_store_url=(tmp_path / "o").as_uri(),
                        config=make_config(recovery_sec=2))
        try:
            jm.register_batch_processor("rel", "lost", Proc())
            bid = jm.batch_submit("rel", "lost", {}, [(n, {"x": n}) for n in range(1, 21)])
            eng = jm.engine
            eng.start()
            held = eng.producer.take("rel", "lost", "B", None)  # as if its write-back had been lost in the crash
            assert held is not None and len(held.rows) == 20
            eng.identity.beat()  # a synchronous commit: the claim (asynchronous) is on disk before the crash
            old_id = eng.worker_id
            pg.restart("immediate")
            t = time.monotonic()
            wait_until(lambda: eng.worker_id != old_id, timeout=20, every=0.1, what="the restart noticed")
            wait_until(lambda: cleanup(eng).requeued == 20, timeout=30, every=0.5, what="the rows recovered")
            took = time.monotonic() - t
            eng.producer.forget(held)  # that claim's rows were given to recovery (they come back as suspects)
            drain(jm, "rel", "lost")
            s = jm.batch_status(bid)
            print(f"\nrows lost under a live worker: recovered and finished {took:.1f} s after the restart")
            assert (s.status, s.nsuccess) == (S.SUCCESS, 20)
            assert took < 2 * jm.config.recovery_sec + 10
        finally:
            jm.close()


def test_database_unreachable_is_backend_unavailable(redis_url: str, file_store_url: str) -> None:
    with structlog.testing.capture_logs() as logs:
        jm = JobManager(database_url="postgresql://postgres:s3cret@127.0.0.1:1/none", redis_url=redis_url,
                        object_store_url=file_store_url, config=make_config())
        try:
            with pytest.raises(BackendUnavailable) as e1:
                jm.batch_submit(APP, "op", {}, rows(1))
            with pytest.raises(BackendUnavailable) as e2:
                jm.batch_status("3fa85f64-5717-4562-b3fc-2c963f66afa6")
        finally:
            jm.close()
    assert "s3cret" not in f"{e1.value} {e2.value} {logs!r}"


def test_dead_pooled_connections_are_replaced(jm: JobManager, database_url: str) -> None:
    """A server restart or idle timeout kills pooled connections; the next calls must not fail for it."""
    bid = jm.batch_submit(APP, "op", {}, rows(2))
    held = [jm.store.engine.raw_connection() for _ in range(3)]  # fill the pool with several connections
    for c in held:
        c.close()
    killed = sql(database_url, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                               "WHERE datname = current_database() AND pid <> pg_backend_pid()")[0][0]
    assert killed >= 3
    for _ in range(4):
        assert [d.id for d in jm.batch_list(APP)] == [bid]
    assert jm.batch_abort(bid).status is S.ABORTED
