"""The in-memory query layer itself (tests/support/memory.py): that it has every query ``Queries`` has, and
its transactions. What each query does is held to PostgreSQL's by tests/integration/db/test_query_conformance.py."""

from __future__ import annotations

import inspect
import threading

import pytest

from alya.core.errors import BackendUnavailable, ConnectionLost
from alya.db.queries import Queries
from tests.support.memory import MemoryQueries, MemoryStore, jsonb_text


def test_every_query_is_implemented_with_its_parameters() -> None:
    public = [m for m in dir(Queries) if not m.startswith("_") and callable(getattr(Queries, m))]
    assert "claim_rows" in public and "savepoint" in public
    missing = [m for m in public if getattr(MemoryQueries, m) is getattr(Queries, m)]
    # Queries' own, through _notify
    assert missing == ["notify_abort", "notify_any_work", "notify_paused", "notify_work"]
    for m in public:
        assert inspect.signature(getattr(MemoryQueries, m)) == inspect.signature(getattr(Queries, m)), m


def test_rollback_undoes_everything_and_notifies_nothing() -> None:
    store = MemoryStore()
    b = store.add_batch("app", "op", [{"x": 1}, {"x": 2}])
    store.take_notifications()
    with pytest.raises(ZeroDivisionError), store.tx() as q:
        q.claim_rows(batch=b, n=1, worker="w", after=0)
        q.heartbeat(id="w", host="h", pid=1)
        q.insert_row(batch=b, line=7, input="{}")
        q.notify_work("app", "op")
        1 / 0  # noqa: B018
    assert [(r.line, r.status, r.attempts) for r in store.rows(b)] == [(1, "queued", 0), (2, "queued", 0)]
    assert store.workers() == {} and store.notifications == []


def test_a_transaction_is_one_at_a_time_and_not_nested_on_a_thread() -> None:
    store = MemoryStore()
    with store.tx() as q:
        with pytest.raises(RuntimeError, match="second transaction"), store.tx():
            pass
        assert store.lock.locked()  # another thread waits for this transaction to end
        got: list[bool] = []
        t = threading.Thread(target=lambda: got.append(store.lock.acquire(timeout=0.05)))
        t.start()
        t.join()
        assert got == [False]
    with pytest.raises(RuntimeError, match="ended"):
        q.has_open_rows(id="x")


def test_hook_faults_and_run_retries_a_lost_connection() -> None:
    store = MemoryStore()
    fails = [ConnectionLost("lost before commit")]

    def hook(name: str) -> None:
        if name == "get_batch" and fails:
            raise fails.pop()

    store.hook = hook
    assert store.run(lambda q: q.get_batch(id="nope"), readonly=True) is None  # run again on a fresh transaction
    assert store.calls["get_batch"] == 2
    store.hook = lambda name: (_ for _ in ()).throw(BackendUnavailable("down"))
    with pytest.raises(BackendUnavailable):
        store.run(lambda q: q.get_batch(id="nope"))


def test_the_clock_moves_retry_delays_and_heartbeats() -> None:
    store = MemoryStore()
    b = store.add_batch("app", "op", [{"x": 1}])
    with store.tx() as q:
        q.heartbeat(id="w", host="h", pid=1)
        (row,) = q.claim_rows(batch=b, n=1, worker="w", after=0)
        q.write_results(batch=b, worker="w", lines=[1], attempts=[1], statuses=["queued"], res=[None],
                        messages=[None], blobrows=[None], delays=[30.0], finished=[0.0])
        assert q.next_claimable_in(id=b) == 30.0  # now() is the transaction's
        assert q.claim_rows(batch=b, n=1, worker="w", after=0) == []
    store.advance(31)
    with store.tx() as q:
        assert [r.attempts for r in q.claim_rows(batch=b, n=1, worker="w", after=0)] == [2]
        assert q.app_rows_in_progress(app="app", worker="w", sec=30).live_workers == 0  # its heartbeat aged


def test_json_reads_back_as_jsonb_prints_it() -> None:
    assert jsonb_text({"bb": [1, {"z": None, "a": True}], "a": "é\n", "c": 1.5}) == \
        '{"a": "é\\n", "c": 1.5, "bb": [1, {"a": true, "z": null}]}'
