"""The Redis status cache on the real Redis: hit, miss, TTL, versioned writes, and Redis down or hanging
(served from PostgreSQL, without paying a timeout per call)."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, cast

import orjson
import pytest
import redis
import structlog.testing

from alya import BatchInput, BatchJobResult, BatchStatus, JobManager, SlowQueryResult
from alya.core.errors import InvalidState
from alya.core.names import done_key, summary_key
from alya.io.cache import StatusCache
from tests.support.config import make_config
from tests.support.services import sql

APP = "cachetest"
S = BatchStatus




def rows(n: int, start: int = 1) -> list[BatchInput]:
    return [BatchInput(i, {"i": i}) for i in range(start, start + n)]


class Ok:
    def do_batch_job(self, initblock: Any, context: dict[str, Any], line: int, input: dict[str, Any]
                     ) -> BatchJobResult:
        return BatchJobResult(S.SUCCESS, result={"line": line})

    def mark_done(self, *args: Any) -> None:
        pass


def finish(jm: JobManager, op: str, n: int) -> str:
    jm.register_batch_processor(APP, op, Ok())
    bid = jm.batch_submit(APP, op, {}, rows(n))
    while jm.engine.process_chunk(APP, op).batch is not None:
        pass
    return bid


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def cached(r: redis.Redis, key: str) -> dict[str, Any] | None:
    raw = r.get(key)
    return None if raw is None else cast(dict[str, Any], orjson.loads(cast(bytes, raw)))


def manager(database_url: str, redis_url: str, file_store_url: str, **cfg: Any) -> JobManager:
    return JobManager(database_url=database_url, redis_url=redis_url, object_store_url=file_store_url,
                      config=make_config(**cfg))


# ---------------------------------------------------------------------------------------------- miss / hit
def test_miss_reads_postgres_then_caches(jm: JobManager, database_url: str, r: redis.Redis) -> None:
    bid = jm.batch_submit(APP, "op", {}, rows(4))
    r.delete(summary_key(bid))
    s = jm.batch_status(bid)
    assert (s.status, s.nrows, s.nqueued) == (S.QUEUED, 4, 4)
    value = cached(r, summary_key(bid))
    assert value is not None
    assert (value["status"], value["nrows"], value["nqueued"], value["final"]) == ("queued", 4, 4, False)
    assert value["ver"] == sql(database_url, "SELECT ver FROM batches WHERE id = %s", bid)[0][0]
    assert 0 < cast(int, r.ttl(summary_key(bid))) <= jm.config.batchstatus_cachedur_sec


def test_hit_is_served_from_redis(jm: JobManager, database_url: str, r: redis.Redis) -> None:
    bid = jm.batch_submit(APP, "op", {}, rows(4))
    jm.batch_status(bid)
    sql(database_url, "UPDATE batches SET nrows = 999 WHERE id = %s", bid)  # behind alya's back
    sql(database_url, "UPDATE batchrows SET status = 'success' WHERE batch = %s AND line = 1", bid)
    s = jm.batch_status(bid)
    assert (s.nrows, s.nqueued, s.nsuccess) == (4, 4, 0)  # the cached value
    r.delete(summary_key(bid))
    s = jm.batch_status(bid)
    assert (s.nrows, s.nqueued, s.nsuccess) == (999, 3, 1)  # a miss reads PostgreSQL


def test_ttl_non_final_and_final(database_url: str, redis_url: str, file_store_url: str, r: redis.Redis) -> None:
    jm = manager(database_url, redis_url, file_store_url, batchstatus_cachedur_sec=1)
    try:
        open_id = jm.batch_submit(APP, "op", {}, rows(2))
        final_id = jm.batch_submit(APP, "op", {}, rows(2))
        jm.batch_abort(final_id)
        assert 0 < cast(int, r.pttl(summary_key(open_id))) <= 1000
        assert 1000 < cast(int, r.pttl(summary_key(final_id))) <= 100_000
        jm.batch_status(open_id)
        sql(database_url, "UPDATE batches SET nrows = 77 WHERE id IN (%s, %s)", open_id, final_id)
        assert jm.batch_status(open_id).nrows == 2
        time.sleep(1.2)
        assert r.exists(summary_key(open_id)) == 0
        assert jm.batch_status(open_id).nrows == 77  # expired: read again
        assert jm.batch_status(final_id).nrows == 2  # final: still cached (100x longer)
    finally:
        jm.close()


# ---------------------------------------------------------------------------------------------- versioned put
def test_stale_write_never_replaces_a_newer_or_final_value(jm: JobManager, r: redis.Redis) -> None:
    key = summary_key(str(uuid.uuid4()))
    r.delete(key)
    c = jm.cache
    assert c.put(key, {"status": "queued"}, ver=2, final=False)
    assert c.put(key, {"status": "queued", "n": 1}, ver=2, final=False)  # same version: refresh
    assert not c.put(key, {"status": "wait"}, ver=1, final=False)      # older: refused
    assert c.put(key, {"status": "success"}, ver=5, final=True)
    for ver in (4, 5, 6, 100):  # nothing non-final, of any version, replaces a final value
        assert not c.put(key, {"status": "inprog"}, ver=ver, final=False)
    assert not c.put(key, {"status": "failed"}, ver=4, final=True)
    value = cached(r, key)
    assert value is not None and (value["status"], value["ver"], value["final"]) == ("success", 5, True)
    r.delete(key)


def test_stale_reader_cannot_undo_a_finished_batch(jm: JobManager, r: redis.Redis) -> None:
    jm.register_batch_processor(APP, "race", Ok())
    bid = jm.batch_submit(APP, "race", {}, rows(3))
    stale = dict(cached(r, summary_key(bid)) or {})  # what a slow reader saw: queued, an old version
    while jm.engine.process_chunk(APP, "race").batch is not None:
        pass
    assert not jm.cache.put(summary_key(bid), stale, ver=stale["ver"], final=False)
    assert jm.batch_status(bid).status is S.SUCCESS


def test_concurrent_writers_end_on_the_final_value(jm: JobManager, r: redis.Redis) -> None:
    key = summary_key(str(uuid.uuid4()))
    r.delete(key)
    writes = [(v, v == 50) for v in range(1, 51)] * 4
    random.Random(7).shuffle(writes)
    start = threading.Barrier(8)

    def writer(part: list[tuple[int, bool]]) -> None:
        start.wait()
        for ver, final in part:
            jm.cache.put(key, {"status": "success" if final else "inprog"}, ver=ver, final=final)

    threads = [threading.Thread(daemon=True, target=writer, args=(writes[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    value = cached(r, key)
    assert value is not None and (value["status"], value["ver"]) == ("success", 50)
    r.delete(key)


# ---------------------------------------------------------------------------------------------- writes after commit
def test_every_state_change_updates_the_cache(jm: JobManager, r: redis.Redis) -> None:
    def now(bid: str) -> tuple[Any, ...]:
        v = cached(r, summary_key(bid))
        assert v is not None
        return v["status"], v["nrows"], v["nqueued"], v["naborted"], v["ver"]

    bid = jm.batch_submit(APP, "op", {}, rows(2), wait=True)
    s1 = now(bid)
    assert s1[:4] == ("wait", 2, 2, 0)
    jm.batch_append(bid, rows(3, start=3), wait=True)
    s2 = now(bid)
    assert s2[:4] == ("wait", 5, 5, 0) and s2[4] > s1[4]
    jm.wait_off(bid)
    s3 = now(bid)
    assert s3[:4] == ("queued", 5, 5, 0) and s3[4] > s2[4]
    jm.batch_abort(bid)
    s4 = now(bid)
    assert s4[:4] == ("aborted", 5, 0, 5) and s4[4] > s3[4]

    done = finish(jm, "fin", 3)
    v = cached(r, summary_key(done))
    assert v is not None and (v["status"], v["nsuccess"], v["final"]) == ("success", 3, True)


def test_done_rows_of_small_final_batches_are_cached(jm: JobManager, database_url: str, r: redis.Redis) -> None:
    bid = finish(jm, "small", 3)
    first = jm.batch_done(bid)
    assert cast(int, r.pttl(done_key(bid))) > 1000
    sql(database_url, "UPDATE batchrows SET res = '{\"changed\": 1}' WHERE batch = %s", bid)
    assert jm.batch_done(bid) == first  # rows from Redis
    r.delete(done_key(bid))
    assert jm.batch_done(bid).rows[0].res == {"changed": 1}  # type: ignore[index]


class Answer:
    def do_slow_query(self, initblock: Any, context: dict[str, Any], input: dict[str, Any]) -> Any:
        return SlowQueryResult(S.SUCCESS, {"answer": input["q"] * 2})

    def mark_done(self, *args: Any) -> None:
        pass


def test_a_slow_query_answer_is_cached_by_the_worker_that_ended_it(jm: JobManager, database_url: str,
                                                                   r: redis.Redis) -> None:
    """The client that sees a slow query final reads its answer from Redis too: the worker cached the row
    with the end (before the final status), so the poll that sees it final does not go to PostgreSQL."""
    jm.register_slowquery_processor(APP, "ask", Answer())
    req = jm.slowquery_submit(APP, "ask", {}, {"q": 21})
    assert jm.engine.process_chunk(APP, "ask").batch == req
    value = cached(r, done_key(req))
    assert value is not None and value["rows"][0][:3] == [0, "success", {"answer": 42}]
    sql(database_url, "UPDATE batchrows SET res = '{\"changed\": 1}' WHERE batch = %s", req)
    done = jm.slowquery_done(req)
    assert (done.status, done.result) == (S.SUCCESS, {"answer": 42})  # from Redis, not the changed row
    r.delete(done_key(req))
    assert jm.slowquery_done(req).result == {"changed": 1}  # a miss reads PostgreSQL (and caches it again)
    assert cached(r, done_key(req)) is not None
    bid = finish(jm, "one", 1)  # a batch of one row (line 1) is no slow query, cached or not
    with pytest.raises(InvalidState):
        jm.slowquery_done(bid)


def test_done_rows_of_large_batches_are_not_cached(database_url: str, redis_url: str, file_store_url: str,
                                                   r: redis.Redis) -> None:
    jm = manager(database_url, redis_url, file_store_url, done_cache_rows=2)
    try:
        bid = finish(jm, "large", 3)
        assert len(jm.batch_done(bid).rows or []) == 3
        assert r.exists(done_key(bid)) == 0
    finally:
        jm.close()


def test_undecodable_cached_value_is_a_miss(jm: JobManager, r: redis.Redis) -> None:
    bid = jm.batch_submit(APP, "op", {}, rows(2))
    r.set(summary_key(bid), b"\x00not json")
    assert jm.batch_status(bid).nrows == 2
    v = cached(r, summary_key(bid))
    assert v is not None and v["nrows"] == 2  # and the next put repaired it


# ---------------------------------------------------------------------------------------------- Redis down
def exercise_every_call(jm: JobManager) -> None:
    jm.register_batch_processor(APP, "down", Ok())
    bid = jm.batch_submit(APP, "down", {"u": 1}, rows(3), wait=True)
    assert jm.batch_status(bid).status is S.WAIT
    assert jm.batch_append(bid, rows(2, start=4), wait=True) == 5
    assert jm.wait_off(bid) == 5
    assert jm.batch_status(bid).status is S.QUEUED
    while jm.engine.process_chunk(APP, "down").batch is not None:
        pass
    done = jm.batch_done(bid)
    assert (done.status, done.nsuccess, len(done.rows or [])) == (S.SUCCESS, 5, 5)
    other = jm.batch_submit(APP, "down", {}, rows(2))
    assert jm.batch_abort(other).naborted == 2
    assert jm.batch_status(other).status is S.ABORTED
    assert {d.id for d in jm.batch_list(APP)} == {bid, other}
    q = jm.slowquery_submit(APP, "q", {}, {"x": 1})
    assert jm.slowquery_done(q).status is S.QUEUED
    jm.slowquery_abort(q)
    assert jm.slowquery_done(q).status is S.ABORTED


def test_redis_unreachable_everything_served_from_postgres(database_url: str, file_store_url: str) -> None:
    jm = JobManager(database_url=database_url, redis_url="redis://127.0.0.1:1/0", object_store_url=file_store_url,
                    config=make_config())
    try:
        t0 = time.monotonic()
        exercise_every_call(jm)
        assert not jm.cache.available
        assert time.monotonic() - t0 < 30
    finally:
        jm.close()


@pytest.fixture
def hanging_redis() -> Iterator[str]:
    """A port that accepts connections and never answers: every Redis call would wait for its timeout."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    yield f"redis://127.0.0.1:{srv.getsockname()[1]}/0"
    srv.close()


def test_hanging_redis_costs_one_timeout_not_one_per_call(database_url: str, file_store_url: str,
                                                         hanging_redis: str) -> None:
    jm = JobManager(database_url=database_url, redis_url=hanging_redis, object_store_url=file_store_url,
                    config=make_config())
    jm.cache.cooldown_sec = 60  # one trip for the whole test, however slow the machine
    try:
        with structlog.testing.capture_logs() as logs:
            t0 = time.monotonic()
            bid = jm.batch_submit(APP, "op", {}, rows(3))  # its cache write times out (1 s) and trips
            for _ in range(30):  # a client's poll loop
                assert jm.batch_status(bid).nqueued == 3
            jm.batch_abort(bid)
            assert jm.batch_done(bid).status is S.ABORTED
            elapsed = time.monotonic() - t0
        assert elapsed < 5, f"{elapsed:.1f} s: Redis timeouts were paid per call"
        warnings = [e for e in logs if e["event"] == "redis_unavailable"]
        assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
    finally:
        jm.close()


class FlakyRedis:
    """A TCP relay to the real Redis that can be cut (open connections dropped, new ones refused) and
    restored: a real outage, without touching the shared Redis server."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.up = True
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(64)
        self.port = self.srv.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(daemon=True, target=self._accept).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.srv.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(daemon=True, target=self._pump, args=(a, b)).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.up = False
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        self.srv.close()


def test_breaker_reopens_and_invalidates_what_it_could_not_write(redis_url: str, r: redis.Redis) -> None:
    target = r.connection_pool.connection_kwargs
    relay = FlakyRedis((target.get("host", "127.0.0.1"), target.get("port", 6379)))
    db = target.get("db", 0)
    cache = StatusCache(f"redis://127.0.0.1:{relay.port}/{db}", ttl_sec=60, cooldown_sec=1.0)
    k1 = summary_key(str(uuid.uuid4()))
    k2 = summary_key(str(uuid.uuid4()))
    r.delete(k1, k2)
    try:
        assert cache.put(k1, {"status": "queued"}, ver=1, final=False)
        assert cache.get(k1) is not None
        relay.cut()
        # The abort's write fails: Redis (still holding "queued") is now stale for k1.
        assert not cache.put(k1, {"status": "aborted"}, ver=2, final=True)
        assert not cache.available
        t0 = time.monotonic()
        for _ in range(100):
            assert cache.get(k1) is None  # breaker open: straight to PostgreSQL, no network wait
        assert not cache.put(k2, {"status": "queued"}, ver=1, final=False)  # skipped, remembered
        assert time.monotonic() - t0 < 1.0
        assert cached(r, k1) is not None and cached(r, k1)["status"] == "queued"  # type: ignore[index]
        relay.restore()
        time.sleep(1.1)
        assert cache.available
        assert cache.get(k1) is None  # first call after the cool-down deletes the stale keys
        assert r.exists(k1) == 0 and r.exists(k2) == 0
        assert cache.put(k1, {"status": "aborted"}, ver=2, final=True)
        assert cache.get(k1) == {"status": "aborted", "ver": 2, "final": True}
    finally:
        cache.close()
        relay.close()
        r.delete(k1, k2)


def test_no_redis_configured(database_url: str, file_store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALYA_REDIS_URL", raising=False)
    jm = JobManager(database_url=database_url, object_store_url=file_store_url, config=make_config())
    try:
        assert not jm.cache.enabled
        exercise_every_call(jm)
    finally:
        jm.close()
