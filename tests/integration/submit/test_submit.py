"""batch_submit on the real PostgreSQL and Redis: every kind of rows it takes and what it stores, wait=True,
large line numbers and long names, configuration from the environment, processor registration, and a
200k-row generator in bounded memory. (Refusals: test_refusals.py; JSON values: test_json_values.py;
retried submits: test_idempotency.py; hypothesis: test_fuzz.py.)"""

from __future__ import annotations

import gc
import threading
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any, cast

import pandas as pd
import pytest
import redis

from alya import (
    BatchInput,
    BatchSummary,
    InvalidInput,
    JobManager,
    ProcessorNotFound,
)
from alya.core.names import summary_key
from tests.support.client import APP, Proc, QueryProc, S, refused, rows, run_chunks
from tests.support.services import sql


# ---------------------------------------------------------------------------------------------- submit
def test_submit_batchinputs_stores_batch_and_rows(jm: JobManager, database_url: str) -> None:
    bid = jm.batch_submit(APP, "MixedCase", {"user": "u1", "n": [1, 2]}, rows(5))
    (app, op, type_, status, context, inputfile, nrows), = sql(
        database_url, "SELECT app, op, type, status::text, context, inputfile, nrows FROM batches WHERE id = %s", bid)
    assert (app, op, type_, status, inputfile, nrows) == (APP, "mixedcase", "B", "queued", None, 5)
    assert context == {"user": "u1", "n": [1, 2]}
    stored = sql(database_url, "SELECT line, input, status::text, attempts FROM batchrows WHERE batch = %s "
                               "ORDER BY line", bid)
    assert stored == [(i, {"i": i}, "queued", 0) for i in range(1, 6)]
    s = jm.batch_status(bid)
    assert isinstance(s, BatchSummary)
    assert (s.status, s.nrows, s.nqueued, s.ninprog, s.nsuccess, s.nfailed, s.naborted) == (S.QUEUED, 5, 5, 0, 0, 0, 0)
    assert s.outputfiles == {}


def test_submit_tuples_json_text_and_inputfile(jm: JobManager, database_url: str) -> None:
    bid = jm.batch_submit(APP, "op", '{"user": "u2"}', [(3, '{"a": 1}'), (1, {"b": [True, None]}), (2, b'{"c": 2}')],
                          inputfile="uploads/in.csv")
    assert sql(database_url, "SELECT context, inputfile FROM batches WHERE id = %s", bid) == [
        ({"user": "u2"}, "uploads/in.csv")]
    assert sql(database_url, "SELECT line, input FROM batchrows WHERE batch = %s ORDER BY line", bid) == [
        (1, {"b": [True, None]}), (2, {"c": 2}), (3, {"a": 1})]


def test_submit_dataframe(jm: JobManager, database_url: str) -> None:
    df = pd.DataFrame({"line": [10, 20, 30], "input": [{"x": 1}, '{"x": 2}', {"x": "three"}], "extra": [1, 2, 3]})
    bid = jm.batch_submit(APP, "df", {}, df)
    assert jm.batch_status(bid).nrows == 3
    assert sql(database_url, "SELECT line, input FROM batchrows WHERE batch = %s ORDER BY line", bid) == [
        (10, {"x": 1}), (20, {"x": 2}), (30, {"x": "three"})]


def test_submit_values_survive_copy_escaping(jm: JobManager, database_url: str) -> None:
    """COPY text format gives tab, newline and backslash meanings: every value must arrive unchanged."""
    tricky: list[dict[str, Any]] = [
        {"tab": "a\tb", "nl": "x\ny\r\n", "bs": "C:\\dir\\n", "q": "\"quoted\" 'single'"},
        {"uni": "żółć 日本 🙂", "ctrl": "\x01\x1f\x7f", "ls": "\u2028\u2029", "empty": ""},
        {"nested": {"deep": [[{"k": "\\\\"}]]}, "num": 1.5e300, "neg": -0, "big": 2**62, "null": None},
        {"\\N": "\\N", "key\twith\ttabs": "\\.", "dot": "."},
        {"not_nul": "\\u0000", "also_not": "\\\\u0000 \\x00"},  # backslash-u text, not a NUL character
    ]
    bid = jm.batch_submit(APP, "escapes", {"ctx": "\t\\\n"}, [BatchInput(i + 1, v) for i, v in enumerate(tricky)])
    got = sql(database_url, "SELECT input FROM batchrows WHERE batch = %s ORDER BY line", bid)
    assert [g[0] for g in got] == tricky
    assert sql(database_url, "SELECT context FROM batches WHERE id = %s", bid) == [({"ctx": "\t\\\n"},)]


def test_submit_wait_holds_batch(jm: JobManager) -> None:
    jm.register_batch_processor(APP, "held", Proc())
    bid = jm.batch_submit(APP, "held", {}, rows(3), wait=True)
    s = jm.batch_status(bid)
    assert (s.status, s.nrows) == (S.WAIT, 3)
    assert run_chunks(jm, APP, "held") == 0  # workers do not see a wait batch
    assert jm.batch_status(bid).status is S.WAIT


def test_submit_max_line_and_large_line_numbers(jm: JobManager, database_url: str) -> None:
    bid = jm.batch_submit(APP, "op", {}, [BatchInput(2**31 - 1, {}), BatchInput(1, {})])
    assert sql(database_url, "SELECT max(line) FROM batchrows WHERE batch = %s", bid) == [(2**31 - 1,)]


def test_submit_app_of_64_chars_is_accepted(jm: JobManager) -> None:
    app = "a" * 64
    bid = jm.batch_submit(app, "o" * 64, {}, rows(1))
    assert [d.id for d in jm.batch_list(app)] == [bid]


def test_ids_are_accepted_in_any_uuid_spelling(jm: JobManager) -> None:
    bid = jm.batch_submit(APP, "op", {}, rows(1))
    assert jm.batch_status(bid.upper()).nrows == 1
    assert jm.batch_status("{" + bid + "}").nrows == 1


# ---------------------------------------------------------------------------------------------- setup & registry
def test_from_env(monkeypatch: pytest.MonkeyPatch, database_url: str, redis_url: str, file_store_url: str) -> None:
    monkeypatch.setenv("ALYA_DATABASE_URL", database_url)
    monkeypatch.setenv("ALYA_REDIS_URL", redis_url)
    monkeypatch.setenv("ALYA_OBJECT_STORE_URL", file_store_url)
    monkeypatch.setenv("ALYA_BATCHROWMAX", "2")
    monkeypatch.setenv("ALYA_BATCHSTATUS_CACHEDUR_SEC", "7")
    jm = JobManager.from_env()
    try:
        assert (jm.config.batchrowmax, jm.cache.ttl, jm.cache.final_ttl) == (2, 7, 700)
        refused(database_url, InvalidInput, lambda: jm.batch_submit(APP, "op", {}, rows(3)))
        bid = jm.batch_submit(APP, "op", {}, rows(2))
        assert cast(int, redis.Redis.from_url(redis_url).ttl(summary_key(bid))) <= 7
    finally:
        jm.close()


def test_registration(jm: JobManager) -> None:
    with pytest.raises(InvalidInput):
        jm.register_batch_processor("Bad", "op", Proc())
    with pytest.raises(InvalidInput):
        jm.register_batch_processor(APP, "op", cast(Any, QueryProc()))  # no do_batch_job
    with pytest.raises(InvalidInput):
        jm.register_slowquery_processor(APP, "op", cast(Any, Proc()))  # no do_slow_query
    with pytest.raises(InvalidInput):
        jm.register_initializer(APP, object())  # type: ignore[arg-type]
    with pytest.raises(ProcessorNotFound):
        jm.engine.process_chunk(APP, "unregistered")

    errors: list[BaseException] = []

    def register(k: int) -> None:
        try:
            for i in range(50):
                jm.register_batch_processor(APP, f"t{k}_{i}", Proc())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(daemon=True, target=register, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({(r.app, r.op) for r in jm.registry.batch_types()} & {(APP, f"t{k}_{i}") for k in range(8)
                                                                     for i in range(50)}) == 400


# ---------------------------------------------------------------------------------------------- volume
def test_submit_200k_rows_from_a_generator_in_bounded_memory(jm: JobManager, database_url: str) -> None:
    n = 200_000

    def gen() -> Iterator[BatchInput]:
        for i in range(1, n + 1):
            yield BatchInput(i, {"i": i, "name": f"row {i}", "tags": ["a", "b"]})

    # What materialising the rows would cost, measured the same way.
    gc.collect()
    tracemalloc.start()
    sample = [BatchInput(i, {"i": i, "name": f"row {i}", "tags": ["a", "b"]}) for i in range(1, 20_001)]
    materialised = tracemalloc.get_traced_memory()[0] * (n // len(sample))
    del sample
    tracemalloc.stop()

    gc.collect()
    tracemalloc.start()
    t0 = time.monotonic()
    bid = jm.batch_submit(APP, "big", {}, gen())
    elapsed = time.monotonic() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert jm.batch_status(bid).nrows == n
    assert sql(database_url, "SELECT count(*), min(line), max(line) FROM batchrows WHERE batch = %s", bid) == [
        (n, 1, n)]
    assert peak < materialised / 10, (peak, materialised)
    assert peak < 16 * 2**20, peak
    assert elapsed < 60, elapsed  # a sanity bound, not a benchmark (tracemalloc slows allocation)
    print(f"200k rows: {elapsed:.1f} s, peak {peak / 2**20:.1f} MiB vs {materialised / 2**20:.0f} MiB materialised")
