"""Retried submits: a submit or slow query with an idempotency key already used returns the first batch
without reading its rows; a failed submit does not take its key; bad keys are refused; racing submits with
one key (threads with their own pools, and processes) store one batch."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from alya import BatchInput, InvalidInput, JobManager
from tests.support.client import rows, stored
from tests.support.config import make_config

APP = "rel"


def never_read() -> Iterator[BatchInput]:
    raise AssertionError("a replayed submit must not read its rows")
    yield BatchInput(1, {})  # pragma: no cover


def test_a_retried_submit_returns_the_first_batch(client: JobManager, database_url: str) -> None:
    first = client.batch_submit(APP, "op", {"u": 1}, rows(3), idempotency_key="req-1")
    assert client.batch_submit(APP, "op", {"u": 1}, never_read(), idempotency_key="req-1") == first
    assert client.batch_submit(APP, "OP", '{ "u" : 1 }', never_read(), wait=True, idempotency_key="req-1") == first
    assert stored(database_url) == (1, 3)
    other_app = client.batch_submit("rel2", "op", {}, rows(1), idempotency_key="req-1")
    other_key = client.batch_submit(APP, "op", {}, rows(1), idempotency_key="req-2")
    no_key = [client.batch_submit(APP, "op", {}, rows(1)) for _ in range(2)]
    assert len({first, other_app, other_key, *no_key}) == 5
    assert stored(database_url) == (5, 7)
    with pytest.raises(InvalidInput, match="^idempotency key reused with different parameters$"):
        client.slowquery_submit(APP, "op", {"u": 1}, {}, idempotency_key="req-1")
    with pytest.raises(InvalidInput, match="^idempotency key reused with different parameters$"):
        client.batch_submit(APP, "other", {"u": 1}, rows(1), idempotency_key="req-1")
    assert stored(database_url) == (5, 7)


def test_a_failed_submit_does_not_take_its_key(client: JobManager, database_url: str) -> None:
    with pytest.raises(InvalidInput):
        client.batch_submit(APP, "op", {}, [BatchInput(1, {}), BatchInput(1, {})], idempotency_key="k")
    assert stored(database_url) == (0, 0)
    bid = client.batch_submit(APP, "op", {}, rows(2), idempotency_key="k")
    assert client.batch_submit(APP, "op", {}, rows(2), idempotency_key="k") == bid


def test_a_retried_slow_query_returns_the_first(client: JobManager, database_url: str) -> None:
    q = client.slowquery_submit(APP, "q", {}, {"x": 1}, idempotency_key="sq")
    assert client.slowquery_submit(APP, "q", {}, {"x": 1}, idempotency_key="sq") == q
    assert stored(database_url) == (1, 1)
    with pytest.raises(InvalidInput, match="idempotency key reused with different parameters"):
        client.slowquery_submit(APP, "q", {}, {"x": 2}, idempotency_key="sq")  # another input
    with pytest.raises(InvalidInput, match="idempotency key reused with different parameters"):
        client.batch_submit(APP, "q", {}, rows(1), idempotency_key="sq")
    assert stored(database_url) == (1, 1)


def test_another_caller_with_the_same_key_gets_nothing_of_the_first(client: JobManager, database_url: str) -> None:
    """The probe of issue 18: two callers, the same key, different contexts. The second used to get the
    first one's batch id (and could then abort it), and an error for another op named the first one's op.
    Now the second is refused, its message the same whatever the first call was, and nothing changes."""
    first = client.batch_submit(APP, "payroll", {"user": "ann"}, rows(2), idempotency_key="order-17")
    messages = set()
    for op, ctx in (("payroll", {"user": "mallory"}), ("other", {"user": "mallory"}), ("payroll", {})):
        with pytest.raises(InvalidInput) as exc:
            client.batch_submit(APP, op, ctx, never_read(), idempotency_key="order-17")
        messages.add(str(exc.value))
    assert messages == {"idempotency key reused with different parameters"}
    assert first not in str(messages) and "payroll" not in str(messages) and "ann" not in str(messages)
    assert stored(database_url) == (1, 2) and client.batch_status(first).nqueued == 2
    with pytest.raises(InvalidInput, match="different parameters"):  # the input file is part of the call
        client.batch_submit(APP, "payroll", {"user": "ann"}, never_read(), inputfile="x.csv",
                            idempotency_key="order-17")


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
