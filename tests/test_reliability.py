"""Faults outside the engine: lost database connections under clients, errors that were not AlyaErrors,
NaN and Infinity, a status cache that workers cannot reach, and retried submits. Services a test breaks are
its own (tests.faults); the shared ones are never stopped. The figures the README's "Reliability" table
reports are printed (``pytest -s``)."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import psycopg2
import pytest

from alya import (
    AlyaError,
    BackendUnavailable,
    BatchInput,
    BatchJobResult,
    BatchStatus,
    ConfigError,
    InvalidInput,
    JobManager,
)
from alya.core.errors import ConnectionLost, DatabaseNotMigrated
from alya.core.redact import redact_url
from alya.core.validate import json_text_strict
from alya.db.queries import Queries
from alya.db.store import Store
from tests import services
from tests.conftest import make_config
from tests.faults import private_postgres
from tests.services import sql

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


def stored(url: str) -> tuple[int, int]:
    return sql(url, "SELECT (SELECT count(*) FROM batches), (SELECT count(*) FROM batchrows)")[0]  # type: ignore[return-value]


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


# ------------------------------------------------------------------------ lost connections under clients
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


# --------------------------------------------------------------------------- every error is an AlyaError
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


def test_redacted_urls_never_show_a_password() -> None:
    assert redact_url("redis://user:pw@h:1/0") == "redis://***@h:1/0"
    assert redact_url("s3://bucket/x") == "s3://bucket/x"


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


@pytest.mark.parametrize("inputfile", ["a\x00b", "\x00", "\ud800.csv", 7])
def test_a_bad_inputfile_is_invalid_input(client: JobManager, database_url: str, inputfile: Any) -> None:
    with pytest.raises(InvalidInput, match="inputfile"):
        client.batch_submit(APP, "op", {}, rows(2), inputfile=inputfile)
    assert stored(database_url) == (0, 0)


# -------------------------------------------------------------------------------------- NaN and Infinity
NONFINITE = [math.nan, math.inf, -math.inf]


def bad_values(x: float) -> list[Any]:
    return [{"v": x}, {"a": [1, {"b": x}]}, {"a": [[[x]]]}, {"a": (1.0, x)}]


@pytest.mark.parametrize("x", NONFINITE, ids=["nan", "inf", "-inf"])
def test_nan_and_infinity_are_refused_everywhere(client: JobManager, database_url: str, x: float) -> None:
    import pandas as pd

    for value in bad_values(x):
        with pytest.raises(InvalidInput, match="NaN or Infinity"):
            client.batch_submit(APP, "op", value, rows(2))  # context
        with pytest.raises(InvalidInput, match="NaN or Infinity"):  # input, the fast path, on line 700
            client.batch_submit(APP, "op", {}, [*rows(699), BatchInput(700, value)])
        with pytest.raises(InvalidInput, match="NaN or Infinity"):  # (line, input) tuples
            client.batch_submit(APP, "op", {}, [(1, {"ok": 1}), (2, value)])
        with pytest.raises(InvalidInput, match="NaN or Infinity"):  # a DataFrame
            client.batch_submit(APP, "op", {}, pd.DataFrame({"line": [1, 2], "input": [{"a": None}, value]}))
        with pytest.raises(InvalidInput, match="NaN or Infinity"):
            client.slowquery_submit(APP, "q", {}, value)
        with pytest.raises(InvalidInput, match="NaN or Infinity"):
            client.slowquery_submit(APP, "q", value, {})
    assert stored(database_url) == (0, 0)
    bid = client.batch_submit(APP, "op", {}, rows(2), wait=True)
    with pytest.raises(InvalidInput, match="NaN or Infinity"):
        client.batch_append(bid, [BatchInput(3, {"x": None}), BatchInput(4, {"x": x})])
    assert stored(database_url) == (1, 2)
    assert client.batch_status(bid).nrows == 2


@pytest.mark.parametrize("text", ['{"v": NaN}', '{"v": Infinity}', '{"v": -Infinity}', '{"v": 1e999}',
                                  '{"v": [-1e400]}'])
def test_nan_and_infinity_in_json_text_are_refused(client: JobManager, database_url: str, text: str) -> None:
    with pytest.raises(InvalidInput):
        client.batch_submit(APP, "op", text, rows(1))
    with pytest.raises(InvalidInput):
        client.batch_submit(APP, "op", {}, [BatchInput(1, text)])  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        client.batch_submit(APP, "op", {}, [(1, text.encode())])
    with pytest.raises(InvalidInput):
        client.slowquery_submit(APP, "q", {}, text)
    assert stored(database_url) == (0, 0)


def test_nulls_and_large_finite_floats_are_kept(client: JobManager, database_url: str) -> None:
    value = {"n": None, "big": 1.7976931348623157e308, "tiny": 5e-324, "neg": -0.5, "l": [None, 1e300]}
    bid = client.batch_submit(APP, "op", value, [BatchInput(1, value)])
    got = sql(database_url, "SELECT b.context::text, r.input::text FROM batches b JOIN batchrows r ON r.batch = b.id "
                            "WHERE b.id = %s", bid)[0]
    # PostgreSQL writes 1e300 as 1000…0; orjson (which alya reads jsonb with) reads that back as the float
    assert orjson.loads(got[0]) == value and orjson.loads(got[1]) == value
    assert client.batch_list(APP)[0].context == value


def test_json_text_strict_for_results() -> None:
    assert json_text_strict({"a": [1, None, 2.5], "b": "x"}) == '{"a":[1,null,2.5],"b":"x"}'
    assert json_text_strict(None) == "null"
    assert json_text_strict(1.5) == "1.5"
    for bad in ({"a": math.nan}, [math.inf], {"a": {"b": -math.inf}}, {"a": "x\x00"}, {1: 2}, {"a": 2**64},
                {"a": object()}, math.nan):
        with pytest.raises(InvalidInput):
            json_text_strict(bad)
    with pytest.raises(InvalidInput, match="blob"):
        json_text_strict({"a": math.nan}, "blob")


# ------------------------------------------------------------------- a status cache workers cannot reach
@pytest.mark.slow
def test_workers_without_redis_leave_no_stale_status(database_url: str, redis_url: str, file_store_url: str) -> None:
    """The client caches `queued` at submit; the worker cannot reach Redis (its URL points nowhere), so it
    never updates that entry. The client must still see `success` within a few seconds of the end."""
    client = JobManager(database_url=database_url, redis_url=redis_url, object_store_url=file_store_url,
                        config=make_config(batchstatus_cachedur_sec=60))
    worker = JobManager(database_url=database_url, redis_url=f"redis://127.0.0.1:{services._free_port()}/0",
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


# --------------------------------------------------------------------------------------- retried submits
def never_read() -> Iterator[BatchInput]:
    raise AssertionError("a replayed submit must not read its rows")
    yield BatchInput(1, {})  # pragma: no cover


def test_a_retried_submit_returns_the_first_batch(client: JobManager, database_url: str) -> None:
    first = client.batch_submit(APP, "op", {"u": 1}, rows(3), idempotency_key="req-1")
    assert client.batch_submit(APP, "op", {"u": 2}, never_read(), idempotency_key="req-1") == first
    assert client.batch_submit(APP, "OP", {}, never_read(), wait=True, idempotency_key="req-1") == first
    assert stored(database_url) == (1, 3)
    other_app = client.batch_submit("rel2", "op", {}, rows(1), idempotency_key="req-1")
    other_key = client.batch_submit(APP, "op", {}, rows(1), idempotency_key="req-2")
    no_key = [client.batch_submit(APP, "op", {}, rows(1)) for _ in range(2)]
    assert len({first, other_app, other_key, *no_key}) == 5
    assert stored(database_url) == (5, 7)
    with pytest.raises(InvalidInput, match="already used by a batch"):
        client.slowquery_submit(APP, "op", {}, {}, idempotency_key="req-1")
    with pytest.raises(InvalidInput, match="already used by a batch of op op"):
        client.batch_submit(APP, "other", {}, rows(1), idempotency_key="req-1")
    assert stored(database_url) == (5, 7)


def test_a_failed_submit_does_not_take_its_key(client: JobManager, database_url: str) -> None:
    with pytest.raises(InvalidInput):
        client.batch_submit(APP, "op", {}, [BatchInput(1, {}), BatchInput(1, {})], idempotency_key="k")
    assert stored(database_url) == (0, 0)
    bid = client.batch_submit(APP, "op", {}, rows(2), idempotency_key="k")
    assert client.batch_submit(APP, "op", {}, rows(2), idempotency_key="k") == bid


def test_a_retried_slow_query_returns_the_first(client: JobManager, database_url: str) -> None:
    q = client.slowquery_submit(APP, "q", {}, {"x": 1}, idempotency_key="sq")
    assert client.slowquery_submit(APP, "q", {}, {"x": 2}, idempotency_key="sq") == q
    assert stored(database_url) == (1, 1)
    with pytest.raises(InvalidInput, match="already used by a slow query"):
        client.batch_submit(APP, "q", {}, rows(1), idempotency_key="sq")


@pytest.mark.parametrize("key", ["", "x" * 256, "a\x00b", 5, b"k"])
def test_bad_idempotency_keys_are_refused(client: JobManager, database_url: str, key: Any) -> None:
    with pytest.raises(InvalidInput, match="idempotency_key"):
        client.batch_submit(APP, "op", {}, rows(1), idempotency_key=key)
    with pytest.raises(InvalidInput, match="idempotency_key"):
        client.slowquery_submit(APP, "q", {}, {}, idempotency_key=key)
    assert stored(database_url) == (0, 0)


def test_racing_submits_with_one_key_store_one_batch(database_url: str, file_store_url: str) -> None:
    """Eight JobManagers (eight connection pools) submit 2,000 rows with the same key at the same instant."""
    managers = [JobManager(database_url=database_url, object_store_url=file_store_url, config=make_config())
                for _ in range(8)]
    barrier = threading.Barrier(len(managers))
    ids: list[str] = []
    errors: list[BaseException] = []

    def submit(jm: JobManager) -> None:
        barrier.wait()
        try:
            ids.append(jm.batch_submit(APP, "op", {}, rows(2000), idempotency_key="race"))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    try:
        threads = [threading.Thread(target=submit, args=(jm,), daemon=True) for jm in managers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert len(ids) == 8 and len(set(ids)) == 1
        assert stored(database_url) == (1, 2000)
    finally:
        for jm in managers:
            jm.close()


RACER = """
import sys
from alya import BatchInput, JobManager
jm = JobManager(database_url=sys.argv[1], object_store_url=sys.argv[2])
sys.stdin.readline()
print(jm.batch_submit("rel", "op", {}, (BatchInput(i, {"i": i}) for i in range(1, 5001)), idempotency_key="p"))
jm.close()
"""


@pytest.mark.slow
def test_racing_submits_from_processes_store_one_batch(database_url: str, file_store_url: str) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", RACER, database_url, file_store_url], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(3)]
    time.sleep(3)  # imports done: each waits on its stdin
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len(set(outs)) == 1 and uuid.UUID(outs[0])
    assert stored(database_url) == (1, 5000)


def test_errors_are_alya_errors() -> None:
    assert issubclass(ConnectionLost, BackendUnavailable) and issubclass(DatabaseNotMigrated, ConfigError)
    assert issubclass(ConfigError, AlyaError)


@pytest.mark.slow
def test_rows_whose_write_back_a_server_crash_lost_are_recovered_under_a_live_worker(tmp_path: Any) -> None:
    """Write-backs commit with synchronous_commit off: a PostgreSQL crash can lose one that the worker saw
    acknowledged, and its rows stay inprog under a worker that lives on. The heartbeat sees the server's
    new start time and the worker stops vouching for what it held before: recovery requeues those rows
    after ALYA_RECOVERY_SEC and they finish."""
    from alya.engine.maintenance import cleanup
    from tests.procs import Proc, drain, wait_until

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
