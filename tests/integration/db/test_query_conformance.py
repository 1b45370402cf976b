"""The in-memory query layer (tests/support/memory.py) against PostgreSQL: each scenario runs the same queries,
with the same expectations, on a fresh database and on a ``MemoryStore``, so that where the fake departs
from ``sql/queries.sql`` (and the engine's unit tests would test the fake instead of alya) a test fails.

The scenarios are the decisions the engine takes from the database: claim order and scan hints, attempts,
suspects, write-backs of held and no longer held rows, give-backs, abort and late write-backs, app load
counts, retry delays, "anything left" look-ups, recovery of a dead worker's rows, and the finish path."""

from __future__ import annotations

import select
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg2
import pytest

from alya.core.errors import InvalidInput
from alya.core.models import BatchStatus
from alya.core.names import WORK_CHANNEL
from alya.core.records import Counts, FailureLimit, SummaryFailures
from alya.db.queries import Queries
from alya.db.store import Store, json_text
from tests.support.memory import MemoryStore, StoredBatch, StoredRow, add_batch

APP, OP = "conf", "op"
MINUTE = 60.0


# ---------------------------------------------------------------------------------------------- two adapters
class Harness:
    """One adapter, and what a scenario needs besides its queries: set-up, reading state back, ageing."""

    store: Store

    def add(self, n: int, *, app: str = APP, op: str = OP, type: str = "B", status: str = "queued",
            context: dict[str, Any] | None = None) -> str:
        return add_batch(self.store, app, op, [{"x": i, "bb": 1, "a": f"r{i}"} for i in range(1, n + 1)], type=type,
                         status=status, context=context or {"ctx": 1})

    def rows(self, batch: str) -> list[StoredRow]:
        raise NotImplementedError

    def row(self, batch: str, line: int) -> StoredRow:
        return next(r for r in self.rows(batch) if r.line == line)

    def batch(self, batch: str) -> StoredBatch:
        raise NotImplementedError

    def age_worker(self, worker: str, seconds: float) -> None:
        raise NotImplementedError

    def age_rows(self, batch: str, seconds: float) -> None:
        raise NotImplementedError

    def notes(self) -> list[str]:
        """Payloads notified since the last call, in commit order."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class MemoryHarness(Harness):
    def __init__(self) -> None:
        self.mem = MemoryStore()
        self.store = self.mem

    def rows(self, batch: str) -> list[StoredRow]:
        return self.mem.rows(batch)

    def batch(self, batch: str) -> StoredBatch:
        return self.mem.batch(batch)

    def age_worker(self, worker: str, seconds: float) -> None:
        self.mem.age_worker(worker, seconds)

    def age_rows(self, batch: str, seconds: float) -> None:
        self.mem.age_rows(batch, seconds)

    def notes(self) -> list[str]:
        return self.mem.take_notifications()


class PostgresHarness(Harness):
    def __init__(self, url: str) -> None:
        self.store = Store(url)
        self.conn = psycopg2.connect(url)
        self.conn.autocommit = True
        self.listener = psycopg2.connect(url)
        self.listener.autocommit = True
        with self.listener.cursor() as cur:
            cur.execute(f"LISTEN {WORK_CHANNEL}")

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else []

    def rows(self, batch: str) -> list[StoredRow]:
        return [StoredRow(*r) for r in self.sql(
            "SELECT line, input, status::text, res, messages, blobrows, doneby, attempts, doneat, notbefore, suspect "
            "FROM batchrows WHERE batch = %s ORDER BY line", batch)]

    def batch(self, batch: str) -> StoredBatch:
        (row,) = self.sql("SELECT id::text, app, op, type, status::text, context, nrows, nsuccess, nfailed, naborted, "
                          "ver, outputfiles, doneat, notifiedat, sumfails, sumerror, error FROM batches WHERE id = %s",
                          batch)
        return StoredBatch(*row)

    def age_worker(self, worker: str, seconds: float) -> None:
        self.sql("UPDATE workers SET lastseen = lastseen - make_interval(secs => %s) WHERE id = %s", seconds, worker)

    def age_rows(self, batch: str, seconds: float) -> None:
        self.sql("UPDATE batchrows SET notbefore = notbefore - make_interval(secs => %s) "
                 "WHERE batch = %s AND notbefore IS NOT NULL", seconds, batch)

    def notes(self) -> list[str]:
        out: list[str] = []
        while True:  # notifications arrive on their own connection shortly after the commit
            self.listener.poll()
            if self.listener.notifies:
                out += [n.payload for n in self.listener.notifies]
                self.listener.notifies.clear()
                continue
            if select.select([self.listener], [], [], 0.1) == ([], [], []):
                return out

    def close(self) -> None:
        self.listener.close()
        self.conn.close()
        self.store.dispose()


@pytest.fixture(params=["postgres", "memory"])
def h(request: pytest.FixtureRequest) -> Iterator[Harness]:
    harness: Harness = PostgresHarness(request.getfixturevalue("database_url")) if request.param == "postgres" \
        else MemoryHarness()
    harness.notes()
    yield harness
    harness.close()


# ---------------------------------------------------------------------------------------------- helpers
@dataclass
class Out:
    """One row's outcome as the write-back statements take it."""

    line: int
    attempts: int
    status: str = "success"
    res: Any = None
    messages: Any = None
    blobrows: Any = None
    delay: float = 0.0
    finished: float = 0.0


def write(q: Queries, batch: str, worker: str, outs: list[Out], late: bool = False) -> Any:
    def text(v: Any) -> str | None:
        return None if v is None else json_text(v)

    cols: dict[str, Any] = dict(
        lines=[o.line for o in outs], attempts=[o.attempts for o in outs], statuses=[o.status for o in outs],
        res=[text(o.res) for o in outs], messages=[text(o.messages) for o in outs],
        blobrows=[text(o.blobrows) for o in outs], delays=[o.delay for o in outs],
        finished=[o.finished or time.time() for o in outs])
    if late:
        return q.write_results_late(batch=batch, worker=worker, **cols)
    return q.write_results(batch=batch, worker=worker, **cols)


def lines(claimed: list[Any]) -> list[int]:
    return sorted(r.line for r in claimed)


def statuses(h: Harness, batch: str) -> dict[int, str]:
    return {r.line: r.status for r in h.rows(batch)}


def beat(h: Harness, *workers: str) -> None:
    with h.store.tx() as q:
        for w in workers:
            q.heartbeat(id=w, host="h", pid=1)


# ---------------------------------------------------------------------------------------------- scenarios
def test_a_stored_batch_reads_back_the_same(h: Harness) -> None:
    b = h.add(3, context={"zz": [1, 2], "a": None})
    assert h.notes() == [f"{APP}/{OP}"]
    stored = h.batch(b)
    assert (stored.status, stored.nrows, stored.ver, stored.context) == ("queued", 3, 2, {"zz": [1, 2], "a": None})
    with h.store.tx() as q:
        rec = q.get_batch(id=b)
        assert rec is not None and rec.status is BatchStatus.QUEUED and rec.nrows == 3 and rec.context == stored.context
        assert q.lock_open_batch(id=b) == rec and q.lock_batch(id=b) == rec
        assert q.batch_context(id=b) == stored.context and q.batch_context(id=str(uuid.uuid4())) is None
        assert q.get_batch(id=str(uuid.uuid4())) is None
        assert q.row_counts(id=b).queued == 3
        # the input as jsonb prints it: keys by length, then bytewise
        claimed = q.claim_rows(batch=b, n=1, worker="w", after=0)
    assert [c.input for c in claimed] == ['{"a": "r1", "x": 1, "bb": 1}']
    assert h.rows(b)[1].input == {"x": 2, "bb": 1, "a": "r2"}

    with pytest.raises(InvalidInput, match="unique"):
        add_batch(h.store, APP, OP, [(1, {"a": 1}), (1, {"a": 2})])
    assert h.notes() == []  # the failed submit was rolled back, its notification with it


def test_claim_order_hints_and_attempts(h: Harness) -> None:
    old = h.add(2)
    b = h.add(10)
    with h.store.tx() as q:
        assert [ob.id for ob in q.open_batches(app=APP, op=OP, type="B", only=None)] == [old, b]
        assert [ob.id for ob in q.open_batches(app=APP, op=OP, type="B", only=b)] == [b]
        assert q.open_batches(app=APP, op=OP, type="Q", only=None) == []
        assert q.open_batches(app=APP, op="other", type="B", only=None) == []
        assert [r.id for r in q.open_batches_all()] == [old, b]
        assert q.batch_to_inprog(batch=b) == (3, 10)
        assert q.batch_to_inprog(batch=b) is None
        first = q.claim_rows(batch=b, n=3, worker="w1", after=0)
        assert lines(first) == [1, 2, 3] and {r.attempts for r in first} == {1}
        assert lines(q.claim_rows(batch=b, n=3, worker="w2", after=3)) == [4, 5, 6]  # the hint: from line 3 on
        assert lines(q.claim_rows(batch=b, n=5, worker="w1", after=8)) == [8, 9, 10]
        assert lines(q.claim_rows(batch=b, n=10, worker="w1", after=0)) == [7]
        assert q.claim_rows(batch=b, n=10, worker="w1", after=0) == []
        assert q.claim_rows(batch=b, n=0, worker="w1", after=0) == []
    ob = h.batch(b)
    assert (ob.status, ob.ver) == ("inprog", 3)
    assert [(r.doneby, r.attempts, r.status) for r in h.rows(b)][:4] == [("w1", 1, "inprog")] * 3 + [
        ("w2", 1, "inprog")]

    with h.store.tx() as q:  # a give-back restores the attempt, only for rows held at that attempt by that worker
        assert q.release_rows(batch=b, lines=[1, 2, 3, 4], attempts=[1, 1, 2, 1], worker="w1") == 2
    assert [(r.status, r.doneby, r.attempts) for r in h.rows(b)[:4]] == [
        ("queued", None, 0), ("queued", None, 0), ("inprog", "w1", 1), ("inprog", "w2", 1)]
    with h.store.tx() as q:
        again = q.claim_rows(batch=b, n=5, worker="w3", after=0)
        assert [(r.line, r.attempts) for r in sorted(again, key=lambda r: r.line)] == [(1, 1), (2, 1)]
        assert not q.has_open_rows(id=str(uuid.uuid4()))
        assert q.has_open_rows(id=b) and not q.queued_after(id=b, after=0)
        assert q.next_claimable_in(id=b) is None


def test_write_back_of_held_and_not_held_rows_and_retry_delays(h: Harness) -> None:
    b = h.add(6)
    with h.store.tx() as q:
        q.claim_rows(batch=b, n=4, worker="A", after=0)
        res = write(q, b, "A", [
            Out(1, 1, "success", {"line": 1, "zz": "é"}, [{"msgid": 1, "errcode": "note"}], {"out.txt": "one\n"}),
            Out(2, 1, "failed", None, [{"msgid": 2, "errcode": "bad", "vals": ["x"]}]),
            Out(3, 1, "queued", delay=30.0),  # a fault: back to the queue after 30 s
            Out(4, 2),  # not the attempt it was claimed at
            Out(5, 1),  # not claimed at all
        ])
        assert (res.status, res.written, res.late, res.ver) == ("queued", 3, 0, None)
        assert write(q, b, "B", [Out(4, 1)]).written == 0  # held by A, not B
        assert q.next_claimable_in(id=b) == 0.0  # lines 5, 6 wait for nothing
        assert q.queued_after(id=b, after=2) and q.queued_after(id=b, after=5) and not q.queued_after(id=b, after=6)
    r1, r2, r3, r4, r5, _ = h.rows(b)
    assert (r1.status, r1.res, r1.messages, r1.blobrows, r1.doneby, r1.notbefore) == (
        "success", {"line": 1, "zz": "é"}, [{"msgid": 1, "errcode": "note"}], {"out.txt": "one\n"}, "A", None)
    assert r1.doneat is not None
    assert (r2.status, r2.res, r2.messages, r2.doneby) == (
        "failed", None, [{"msgid": 2, "errcode": "bad", "vals": ["x"]}], "A")
    assert (r3.status, r3.doneby, r3.doneat, r3.attempts) == ("queued", None, None, 1)
    assert r3.notbefore is not None
    assert (r4.status, r4.doneby, r4.attempts) == ("inprog", "A", 1)
    assert (r5.status, r5.attempts) == ("queued", 0)

    with h.store.tx() as q:
        assert lines(q.claim_rows(batch=b, n=10, worker="A", after=0)) == [5, 6]  # line 3 waits out its delay
        assert [k.app for k in q.claimable_batch_types()] == []
        # nor listed by open_batches: nothing of it can be claimed now
        assert q.open_batches(app=APP, op=OP, type="B", only=None) == []
        wait = q.next_claimable_in(id=b)
        assert wait is not None and 25 < wait <= 30
        assert q.stalled_batches(sec=MINUTE) == []
        assert q.open_work_exists(types=[f"{APP}/{OP}/B"])
        assert not q.open_work_exists(types=[f"{APP}/{OP}/Q", f"{APP}/x/B"])
    h.age_rows(b, 31)
    with h.store.tx() as q:
        wait = q.next_claimable_in(id=b)
        assert wait is not None and -10 < wait < 0  # about -1 s; wider for a loaded machine
        assert [(k.app, k.op, k.type) for k in q.claimable_batch_types()] == [(APP, OP, "B")]
        assert [(r.line, r.attempts) for r in q.claim_rows(batch=b, n=10, worker="A", after=0)] == [(3, 2)]
        assert q.next_claimable_in(id=b) is None
    with h.store.tx() as q:
        rows = q.batch_rows(id=b)
        assert [(r.line, r.status) for r in rows] == [(1, "success"), (2, "failed")] + [
            (n, "inprog") for n in (3, 4, 5, 6)]
        assert rows[0].res == {"line": 1, "zz": "é"}
        assert [o.line for o in q.stream_batch_rows(id=b)] == [1, 2, 3, 4, 5, 6]
        assert q.row_counts(id=b) == Counts(inprog=4, success=1, failed=1)
        assert q.failed_rows(id=b) == 1
    assert h.notes() == [f"{APP}/{OP}"]  # the submit's: a write-back's notifying is its caller's business


def test_app_load_counts(h: Harness) -> None:
    beat(h, "A", "B")
    b1, b2, other = h.add(5), h.add(5), h.add(5, app="other")
    with h.store.tx() as q:
        q.claim_rows(batch=b1, n=2, worker="A", after=0)
        q.claim_rows(batch=b2, n=1, worker="A", after=0)
        q.claim_rows(batch=b2, n=2, worker="B", after=0)
        q.claim_rows(batch=other, n=4, worker="A", after=0)
        assert q.app_rows_in_progress(app=APP, worker="A", sec=MINUTE).as_tuple() == (5, 3, 2)
        assert q.app_rows_in_progress(app=APP, worker="C", sec=MINUTE).as_tuple() == (5, 0, 2)
        assert q.app_rows_in_progress(app="nobody", worker="A", sec=MINUTE).as_tuple() == (0, 0, 2)
        write(q, b1, "A", [Out(1, 1)])
    h.age_worker("B", 2 * MINUTE)
    with h.store.tx() as q:
        assert q.app_rows_in_progress(app=APP, worker="A", sec=MINUTE).as_tuple() == (4, 2, 1)
        assert q.app_rows_in_progress(app=APP, worker="B", sec=MINUTE).as_tuple() == (4, 2, 1)


def test_recovery_of_a_dead_workers_rows_and_suspects(h: Harness) -> None:
    beat(h, "A", "D")
    b = h.add(8)
    fail = json_text([{"msgid": 0, "errcode": "processing_error"}])
    with h.store.tx() as q:
        q.claim_rows(batch=b, n=2, worker="A", after=0)
        q.claim_rows(batch=b, n=2, worker="D", after=0)
        assert q.claim_suspect(batch=b, worker="A") == []  # no suspect yet
    h.age_worker("D", 2 * MINUTE)
    with h.store.tx() as q:
        # rows that were not run alone are not blamed, even with their attempts used up
        got = q.recover_rows(sec=MINUTE, max_attempts=1, fail_messages=fail)
        assert sorted((r.batch, r.line, r.status, r.worker) for r in got) == [
            (b, 3, "queued", "D"), (b, 4, "queued", "D")]
        assert q.recover_rows(sec=MINUTE, max_attempts=3, fail_messages=fail) == []
    assert [(r.line, r.status, r.doneby, r.attempts, r.suspect) for r in h.rows(b)[:5]] == [
        (1, "inprog", "A", 1, False), (2, "inprog", "A", 1, False), (3, "queued", None, 0, True),
        (4, "queued", None, 0, True), (5, "queued", None, 0, False)]
    with h.store.tx() as q:
        assert lines(q.claim_rows(batch=b, n=10, worker="A", after=0)) == [5, 6, 7, 8]  # suspects run alone
        assert [k.op for k in q.claimable_batch_types()] == [OP]  # the suspects are claimable
        s = q.claim_suspect(batch=b, worker="E")  # E never beat: dead at once
        assert [(r.line, r.attempts) for r in s] == [(3, 1)]
        # a suspect held by a dead worker spends its attempt; out of attempts, it fails
        got = q.recover_rows(sec=MINUTE, max_attempts=1, fail_messages=fail)
        assert [(r.line, r.status, r.worker) for r in got] == [(3, "failed", "E")]
        s = q.claim_suspect(batch=b, worker="E")
        assert [(r.line, r.attempts) for r in s] == [(4, 1)]
        assert [(r.line, r.status) for r in q.recover_rows(sec=MINUTE, max_attempts=3, fail_messages=fail)] == [
            (4, "queued")]
        assert q.stalled_batches(sec=MINUTE) == []  # A holds rows and beats
        assert q.forget_dead_workers(sec=MINUTE / 10) == 1  # D: silent for over 10 x 6 s
        assert q.forget_dead_workers(sec=MINUTE / 10) == 0
    r3, r4 = h.row(b, 3), h.row(b, 4)
    assert (r3.status, r3.doneby, r3.attempts, r3.suspect, r3.messages) == (
        "failed", "E", 1, True, [{"msgid": 0, "errcode": "processing_error"}])
    assert r3.doneat is not None
    assert (r4.status, r4.doneby, r4.attempts, r4.suspect, r4.doneat) == ("queued", None, 1, True, None)
    h.age_worker("A", 2 * MINUTE)
    with h.store.tx() as q:
        assert q.stalled_batches(sec=MINUTE) == [b]
        q.forget_worker(id="A")
        assert q.app_rows_in_progress(app=APP, worker="A", sec=MINUTE).live_workers == 0


def test_abort_then_a_late_write_back(h: Harness) -> None:
    b = h.add(6)
    before = time.time() - 5
    with h.store.tx() as q:
        q.claim_rows(batch=b, n=4, worker="A", after=0)
        assert write(q, b, "A", [Out(1, 1)]).written == 1
    with h.store.tx() as q:  # Finisher.abort's statements
        rec = q.lock_batch(id=b)
        assert rec is not None
        assert q.abort_rows(id=b) == 5  # 3 held, 2 queued
        q.notify_abort(b)
        counts = q.row_counts(id=b)
        assert (counts.success, counts.aborted) == (1, 5)
        ver = q.finish_batch(id=b, status=BatchStatus.ABORTED, nsuccess=1, nfailed=0, naborted=5, outputfiles="{}",
                             error=None)
        assert ver == rec.ver + 1
    assert h.notes() == [f"{APP}/{OP}", f"abort:{b}"]  # the submit's, the abort's
    ab = h.batch(b)
    assert (ab.status, ab.notifiedat is not None, ab.nsuccess, ab.naborted) == ("aborted", True, 1, 5)
    assert [(r.status, r.doneby) for r in h.rows(b)] == [("success", "A")] + [("aborted", "A")] * 3 + [
        ("aborted", None)] * 2
    outs = [Out(2, 1, "success", {"k": 2}, finished=before),  # returned before the abort: kept
            Out(3, 1, "failed", finished=before),  # kept too
            Out(4, 1, "success", finished=time.time() + 60),  # after the abort: dropped
            Out(5, 1, "success", finished=before)]  # never claimed
    with h.store.tx() as q:
        res = write(q, b, "A", outs)
        assert (res.status, res.written) == ("aborted", 0)
        assert write(q, b, "B", outs, late=True) == (0, None)  # another worker's answers
        assert write(q, b, "A", [Out(2, 1, "queued", finished=before)], late=True) == (0, None)  # a fault is no result
        assert write(q, b, "A", outs, late=True) == (2, ver + 1)
        assert write(q, b, "A", outs, late=True) == (0, None)  # once
        assert not q.claim_notify(id=b)  # mark_done is not due for an aborted batch
        assert q.lock_open_batch(id=b) is None
        assert [(s.id, s.status) for s in q.batch_statuses(ids=[b, str(uuid.uuid4())])] == [(b, "aborted")]
    ab = h.batch(b)
    assert (ab.nsuccess, ab.nfailed, ab.naborted, ab.ver) == (2, 1, 3, ver + 1)
    assert [(r.line, r.status, r.res) for r in h.rows(b)][:4] == [
        (1, "success", None), (2, "success", {"k": 2}), (3, "failed", None), (4, "aborted", None)]


def test_the_finish_path(h: Harness) -> None:
    b = h.add(3)
    with h.store.tx() as q:
        q.claim_rows(batch=b, n=3, worker="A", after=0)
        assert q.summary_failed(id=b, error="boom #") == SummaryFailures(1, 0.0)  # (now() is the transaction's)
        assert q.summary_failed(id=b, error="boom #") == SummaryFailures(2, 0.0)
    with h.store.tx() as q:
        write(q, b, "A", [Out(3, 1, blobrows={"a.txt": "three\n"}),
                          Out(1, 1, blobrows={"a.txt": "one\n", "b.txt": "b\n"}), Out(2, 1, "failed")])
        assert q.unsummarised_batches() == [b]
        assert not q.queued_after(id=b, after=0) and not q.has_open_rows(id=b)
    with h.store.tx() as q:
        failed = q.summary_failed(id=b, error="boom #")
        assert failed is not None and failed.failures == 3 and failed.seconds >= 0
        failed = q.summary_failed(id=b, error="other")
        assert failed is not None and failed.failures == 1
        rec = q.lock_open_batch(id=b)
        assert rec is not None and rec.status is BatchStatus.QUEUED
        counts = q.row_counts(id=b)
        assert (counts.success, counts.failed, counts.final_status) == (2, 1, BatchStatus.FAILED)
        assert list(q.stream_batch_blobrows(id=b)) == [{"a.txt": "one\n", "b.txt": "b\n"}, {"a.txt": "three\n"}]
        ver = q.finish_batch(id=b, status=BatchStatus.FAILED, nsuccess=2, nfailed=1, naborted=0,
                             outputfiles=json_text({"a.txt": "file:///x/a.txt"}), error=None)
        assert ver == rec.ver + 1
    with h.store.tx() as q:
        assert q.lock_open_batch(id=b) is None
        assert q.summary_failed(id=b, error="boom") is None
        assert q.unsummarised_batches() == []
        assert not q.open_work_exists(types=[f"{APP}/{OP}/B"])
        rec = q.get_batch(id=b)
        assert rec is not None and (rec.status, rec.nsuccess, rec.nfailed, rec.outputfiles) == (
            BatchStatus.FAILED, 2, 1, {"a.txt": "file:///x/a.txt"})
        assert rec.doneat is not None
        assert q.unnotified_batches(app=APP, op=OP) == [b]
        assert q.claim_notify(id=b)
        assert not q.claim_notify(id=b)
        assert q.unnotified_batches(app=APP, op=OP) == []
    done = h.batch(b)
    assert (done.sumfails, done.sumerror, done.notifiedat is not None) == (1, "other", True)


def test_batch_control_statements(h: Harness) -> None:
    """Failure threshold, reopen and requeue of a retry, rows and inputs of one status (alya.db.failure_queries)."""
    b = h.add(10)
    with h.store.tx() as q:
        assert not q.batch_has_failure_limit(id=b) and q.failure_limit(id=b) is None
        q.set_failure_limit(id=b, max_failures=None, ratio=0.29)
        assert q.batch_has_failure_limit(id=b)
        assert q.failure_limit(id=b) == FailureLimit(10, 2, 0)  # 0.29 of 10 rows: 2 (rounded down)
        q.claim_rows(batch=b, n=10, worker="A", after=0)
        write(q, b, "A", [Out(n, 1, "failed" if n <= 4 else "success", blobrows={"f.txt": f"{n}\n"})
                          for n in range(1, 9)])
        limit = q.failure_limit(id=b)
        assert limit == FailureLimit(10, 2, 3) and limit.passed  # counted up to limit + 1
        assert q.reopen_batch(id=b) is None  # open: not a failed batch
        assert q.abort_rows(id=b) == 2
        q.finish_batch(id=b, status=BatchStatus.FAILED, nsuccess=4, nfailed=4, naborted=2, outputfiles="{}",
                       error="too many")
        assert q.failure_limit(id=b) is None  # no longer open
        assert [r.line for r in q.stream_batch_rows_of_status(id=b, status="failed")] == [1, 2, 3, 4]
        assert len(list(q.stream_batch_rows_of_status(id=b, status=None))) == 10
        assert list(q.stream_batch_inputs(id=b, status="aborted")) == [
            (9, {"x": 9, "bb": 1, "a": "r9"}), (10, {"x": 10, "bb": 1, "a": "r10"})]
        assert q.batch_input_keys(id=b, status="failed") == ["a", "bb", "x"]
        rec = q.reopen_batch(id=b)
        assert rec is not None and (rec.status, rec.round, rec.outputfiles, rec.error) == (
            BatchStatus.QUEUED, 2, {}, None)
        assert q.reopen_batch(id=b) is None
        assert q.requeue_rows(batch=b, status="failed") == 4
        assert q.requeue_rows(batch=b, status="failed") == 0
        assert q.failure_limit(id=b) == FailureLimit(10, 2, 0)
    r1, r9 = h.row(b, 1), h.row(b, 9)
    assert (r1.status, r1.attempts, r1.res, r1.messages, r1.blobrows, r1.doneby, r1.doneat) == (
        "queued", 0, None, None, None, None, None)
    assert r9.status == "aborted"
    stored = h.batch(b)
    assert (stored.status, stored.doneat, stored.notifiedat, stored.error, stored.ver) == ("queued", None, None, None,
                                                                                         rec.ver)


def test_slow_query_wait_and_keys(h: Harness) -> None:
    sq = h.add(1, type="Q")
    w = h.add(2, status="wait")
    assert h.notes() == [f"{APP}/{OP}"]  # the wait batch is not announced
    with h.store.tx() as q:
        assert q.slowquery_row(id=sq) is not None
        assert q.open_batches(app=APP, op=OP, type="B", only=None) == []  # wait is not open
        (row,) = q.claim_rows(batch=sq, n=5, worker="A", after=0)
        assert row.line == 0
        write(q, sq, "A", [Out(0, 1, res={"answer": 1}, blobrows={"r.csv": "s3://b/r.csv"})])
        got = q.slowquery_row(id=sq)
        assert got is not None and (got.status, got.res, got.outputfiles) == (
            BatchStatus.SUCCESS, {"answer": 1}, {"r.csv": "s3://b/r.csv"})
        assert q.wait_off(id=w) == 3
        assert q.wait_off(id=w) is None
        q.notify_work(APP, OP)
        q.notify_work(APP, OP)  # folded: one per transaction
        q.notify_any_work()
        assert q.insert_batch_keyed(id=str(uuid.uuid4()), app=APP, op=OP, type="B", context="{}", inputfile=None,
                                    status=BatchStatus.WAIT, key="k1")
        assert not q.insert_batch_keyed(id=str(uuid.uuid4()), app=APP, op=OP, type="B", context="{}",
                                        inputfile=None, status=BatchStatus.WAIT, key="k1")
        keyed = q.batch_by_key(app=APP, key="k1")
        assert keyed is not None and (keyed.op, keyed.type) == (OP, "B")
        same = {"id": keyed.id, "op": OP, "type": "B", "context": "{ }", "inputfile": None, "input": None}
        assert q.keyed_call_matches(**same)
        for other in ({"context": '{"a": 1}'}, {"op": "x"}, {"type": "Q"}, {"inputfile": "f.csv"}, {"input": "{}"}):
            assert not q.keyed_call_matches(**{**same, **other}), other
        assert q.batch_by_key(app="other", key="k1") is None
        assert [r.id for r in q.list_batches(app=APP, op=None, type="B", age_days=1)][1:] == [w]
        assert [r.id for r in q.list_batches(app=APP, op=OP, type="Q", age_days=1)] == [sq]
    assert h.notes() == [f"{APP}/{OP}", "*"]


def test_rollback_and_savepoints(h: Harness) -> None:
    b = h.add(4)
    h.notes()
    with pytest.raises(RuntimeError), h.store.tx() as q:
        q.claim_rows(batch=b, n=2, worker="A", after=0)
        q.notify_work(APP, OP)
        q.heartbeat(id="A", host="h", pid=1)
        raise RuntimeError("rolled back")
    assert [r.status for r in h.rows(b)] == ["queued"] * 4
    assert h.notes() == []
    with h.store.tx() as q:
        assert q.app_rows_in_progress(app=APP, worker="A", sec=MINUTE).as_tuple() == (0, 0, 0)
        q.claim_rows(batch=b, n=1, worker="A", after=0)
        with pytest.raises(InvalidInput), q.savepoint():
            q.claim_rows(batch=b, n=1, worker="A", after=0)
            q.notify_work(APP, "undone")
            q.insert_row(batch=b, line=1, input='{"again": true}')  # a line twice: refused
        with q.savepoint():
            q.insert_row(batch=b, line=9, input=orjson.dumps({"late": 1}).decode())
            q.notify_work(APP, "kept")
        q.set_nrows_status(id=b, nrows=5, status=BatchStatus.QUEUED)
    assert statuses(h, b) == {1: "inprog", 2: "queued", 3: "queued", 4: "queued", 9: "queued"}
    assert h.row(b, 1).attempts == 1 and h.row(b, 2).attempts == 0
    assert h.notes() == [f"{APP}/kept"]
    assert h.batch(b).nrows == 5


def test_maintenance_leases(h: Harness) -> None:
    """A lease is held by one holder: renewed by it, refused to others until it runs out, given up."""
    duties = ["recovery", "mark_done:a/b"]
    with h.store.tx() as q:
        assert q.take_leases(holder="w1", duties=duties, sec=60) == set(duties)
    with h.store.tx() as q:
        assert q.take_leases(holder="w2", duties=duties + ["mark_done:c/d"], sec=60) == {"mark_done:c/d"}
        assert q.take_leases(holder="w1", duties=duties, sec=60) == set(duties)  # renewed
    with h.store.tx() as q:
        assert q.take_leases(holder="w1", duties=["recovery"], sec=-1) == {"recovery"}  # renewed into the past
    with h.store.tx() as q:
        assert q.take_leases(holder="w2", duties=duties, sec=60) == {"recovery"}  # taken once run out
        assert q.drop_leases(holder="w1") == 1
        assert q.take_leases(holder="w2", duties=duties, sec=60) == set(duties)


def test_purge_statements(h: Harness) -> None:
    """Retention: final batches found oldest first past a cursor, rows deleted in bounded steps, whole batches
    with their file records; open batches and newer ones never."""
    from datetime import UTC, datetime, timedelta

    zero = "00000000-0000-0000-0000-000000000000"
    start = datetime(1970, 1, 1, tzinfo=UTC)
    done = []
    for status in ("success", "aborted"):
        b = h.add(5)
        with h.store.tx() as q:
            q.finish_batch(id=b, status=BatchStatus(status), nsuccess=5, nfailed=0, naborted=0, outputfiles="{}",
                           error=None)
        done.append(b)
    other = h.add(2, app="other")
    with h.store.tx() as q:
        q.finish_batch(id=other, status=BatchStatus.FAILED, nsuccess=1, nfailed=1, naborted=0, outputfiles="{}",
                       error=None)
    open_ = h.add(3)
    later = datetime.now(UTC) + timedelta(minutes=10)
    with h.store.tx() as q:
        page = q.purgeable_batches(before=later, app=None, after_at=start, after_id=zero, n=10)
        assert sorted(c.id for c in page) == sorted([*done, other]) and open_ not in [c.id for c in page]
        assert [(c.doneat, uuid.UUID(c.id)) for c in page] == sorted((c.doneat, uuid.UUID(c.id)) for c in page)
        assert {c.nrows for c in page} == {5, 2} and page[0].outputfiles == {}
        assert [c.id for c in q.purgeable_batches(before=later, app=APP, after_at=start, after_id=zero, n=10)] \
            == [c.id for c in page if c.id != other]
        rest = q.purgeable_batches(before=later, app=None, after_at=page[0].doneat, after_id=page[0].id, n=10)
        assert [c.id for c in rest] == [c.id for c in page[1:]]
        assert q.purgeable_batches(before=start, app=None, after_at=start, after_id=zero, n=10) == []
        assert len(q.purgeable_batches(before=later, app=None, after_at=start, after_id=zero, n=1)) == 1
        f1 = q.insert_file(id=str(uuid.uuid4()), url="file:///in/a.csv", size=1, version="v", filetype="t",
                           status="submitted", batch=done[0], nrows=5, error=None, dest=None)
        q.insert_file(id=str(uuid.uuid4()), url="file:///in/b.csv", size=1, version="v", filetype="t",
                      status="rejected", batch=None, nrows=0, error="bad", dest=None)
    with h.store.tx() as q:
        assert q.purge_rows(id=done[0], before=later, after=-1, n=2) == (2, 2)
        assert q.purge_rows(id=done[0], before=later, after=2, n=2) == (2, 4)
        assert q.purge_rows(id=open_, before=later, after=-1, n=2) == (0, -1)  # open: never
        assert q.purge_rows(id=done[1], before=start, after=-1, n=2) == (0, -1)  # too new
    assert [r.line for r in h.rows(done[0])] == [5]
    with h.store.tx() as q:
        gone = q.purge_batches(ids=[*done, open_], before=later)
        assert (sorted(gone.ids), gone.nrows, gone.nrecords) == (sorted(done), 1 + 5, 1)
        assert q.purge_batches(ids=done, before=later).ids == []
        assert q.get_batch(id=done[0]) is None and q.get_batch(id=open_) is not None
        assert q.files_at(urls=[f1.url]) == []
        assert q.purge_rejected_files(before=start, n=10) == 0
        assert q.purge_rejected_files(before=later, n=10) == 1
    assert h.rows(done[1]) == [] and len(h.rows(open_)) == 3


def test_metrics_statements(h: Harness) -> None:
    """Queue depths per open batch type (final and held batches aside), and live workers."""
    a = h.add(5)
    h.add(2, type="Q", op="ask")
    h.add(4, app="other", status="wait")
    done = h.add(3)
    with h.store.tx() as q:
        q.finish_batch(id=done, status=BatchStatus.SUCCESS, nsuccess=3, nfailed=0, naborted=0, outputfiles="{}",
                       error=None)
        q.claim_rows(batch=a, n=2, worker="w1", after=0)
    beat(h, "w1", "w2")
    h.age_worker("w2", 600)
    with h.store.tx() as q:
        depths = q.queue_depths()
        assert [d[:5] for d in depths] == [(APP, "ask", "Q", 1, 0), (APP, OP, "B", 3, 2)]
        assert all(d[5] is not None and -5 < d[5] < 60 for d in depths)
        assert q.live_workers(sec=60) == 1
