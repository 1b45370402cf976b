"""The engine's decisions over the in-memory query layer (tests/support/memory.py): claim sizing, flush timing,
the suspect gate, app limits, init() back-off, aborts, write-back splitting and give-backs, and one whole
``Engine.work`` run to a summarised batch. No PostgreSQL, no Redis: the whole file runs in about a second.

The fake follows sql/queries.sql (tests/integration/db/test_query_conformance.py holds it to that), so what is
decided here is what the engine decides on PostgreSQL."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from alya.batch.outcomes import Outcome, accepted
from alya.batch.services import Services
from alya.batch.status import Statuses
from alya.core.errors import AlyaError, BackendUnavailable
from alya.core.models import BatchDetails, BatchJobResult, BatchStatus
from alya.core.names import batch_prefix
from alya.core.records import ClaimedRow
from alya.core.registry import InitBlocks, Registry
from alya.core.settings import JobManagerConfig
from alya.engine import completer as completer_module
from alya.engine import producer as producer_module
from alya.engine.claim import FLUSH_ROWS, FLUSH_ROWS_AGE_SEC, ChunkReport, Claimed
from alya.engine.completer import WRITE_TRIES, _by_size
from alya.engine.engine import Engine
from alya.engine.maintenance import cleanup
from alya.engine.producer import CLAIM_TARGET_SEC
from alya.engine.rowpool import Job, PoolStats
from alya.io.cache import StatusCache
from alya.io.outputs import ObjectStore
from tests.support.memory import MemoryStore

APP, OP = "unit", "op"


# ---------------------------------------------------------------------------------------------- set-up
class Proc:
    """A batch processor driven by each row's input: ``block`` waits for ``gate``, ``raise_once`` raises on
    its first call; every row writes its line to out.txt."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: Counter[int] = Counter()
        self.started: list[int] = []
        self.done: list[BatchDetails] = []
        self.gate = threading.Event()

    def do_batch_job(self, initblock: Any, context: dict[str, Any], line: int, input: dict[str, Any]) -> Any:
        with self.lock:
            self.calls[line] += 1
            first = self.calls[line] == 1
            self.started.append(line)
        if input.get("block"):
            self.gate.wait(10)
        if input.get("sleep"):
            time.sleep(input["sleep"])
        if input.get("mode") == "raise_once" and first:
            raise RuntimeError(f"boom at line {line}")
        return BatchJobResult(BatchStatus.SUCCESS, {"line": line}, blobrows={"out.txt": f"line {line}"})

    def mark_done(self, initblock: Any, context: dict[str, Any], details: BatchDetails) -> None:
        with self.lock:
            self.done.append(details)


class Init:
    """An initializer whose first ``fail_first`` calls raise."""

    def __init__(self, fail_first: int) -> None:
        self.fail_first = fail_first
        self.calls = 0

    def init(self, app: str) -> Any:
        self.calls += 1
        if self.calls <= self.fail_first:
            raise ConnectionError(f"init of {app} failed (call {self.calls})")
        return SimpleNamespace(is_alive=lambda: True, close=lambda: None)


def config(**overrides: Any) -> JobManagerConfig:
    base: dict[str, Any] = {"batchchunk_nrows": 100, "retry_backoff_sec": 0.0, "recovery_sec": 60, "concurrency": 4,
                            "worker_threads": 2, "flush_sec": 1.0}
    return JobManagerConfig(**{**base, **overrides})


def env_config(**overrides: Any) -> JobManagerConfig:
    """Settings from the ALYA_* environment, and ``overrides``."""
    return JobManagerConfig(**overrides)


def services(store: MemoryStore, root: Path, cfg: JobManagerConfig) -> Services:
    cache = StatusCache(None, cfg.batchstatus_cachedur_sec)
    registry = Registry()
    return Services(config=cfg, store=store, cache=cache, objects=ObjectStore(root.as_uri()),
                    statuses=Statuses(store, cache, cfg.done_cache_rows), registry=registry,
                    initblocks=InitBlocks(registry))


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def proc() -> Proc:
    return Proc()


@pytest.fixture
def make_engine(store: MemoryStore, proc: Proc, tmp_path: Path) -> Iterator[Callable[..., Engine]]:
    """An Engine over ``store`` with ``proc`` registered for (APP, OP); config overrides as keywords."""
    engines: list[Engine] = []

    def make(cfg: JobManagerConfig | None = None, **overrides: Any) -> Engine:
        svc = services(store, tmp_path / "objects", cfg or config(**overrides))
        svc.registry.add_processor(APP, OP, "B", proc)
        engine = Engine(svc)
        engine.identity.beat()  # a live worker, as Engine.start registers it (without its threads)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        proc.gate.set()
        engine.shutdown()


def rows(n: int, **input: Any) -> list[dict[str, Any]]:
    return [{"x": i, **input} for i in range(1, n + 1)]


def statuses(store: MemoryStore, batch: str) -> dict[int, str]:
    return {r.line: r.status for r in store.rows(batch)}


def outcome(line: int, attempts: int = 1, **result: Any) -> Outcome:
    return accepted(line, attempts, BatchJobResult(BatchStatus.SUCCESS, {"line": line, **result}), False)


def finish(c: Claimed, line: int, out: Outcome | None) -> None:
    """A row of the claim ends (``None``: it was never started), as a slot of the row pool ends it."""
    row = next(r for r in c.rows if r.line == line)
    assert c.finish(Job(c, row), out)


def take(engine: Engine, n: int | None = None) -> Claimed | None:
    return engine.producer.take(APP, OP, "B", None, n)


def wait_until(pred: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := pred():
            return value
        time.sleep(0.002)
    raise AssertionError("timed out")


# ---------------------------------------------------------------------------------------------- claim sizing
def test_claim_size_follows_the_measured_row_time(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(concurrency=8, worker_threads=2, batchchunk_nrows=1000)
    p = engine.producer
    assert p.claim_size(APP, OP) == 16  # nothing measured yet: two rows per slot

    def measured(row_sec: float) -> int:
        stats = PoolStats()
        stats.add(row_sec)
        engine.executor.pool.stats[(APP, OP)] = stats
        return p.claim_size(APP, OP)

    # CLAIM_TARGET_SEC of work for 8 slots, shared by 2 claim loops
    assert measured(0.01) == math.ceil(CLAIM_TARGET_SEC * 8 / 0.01 / 2) == 200
    assert measured(5.0) == 8  # slow rows: never fewer than one per slot
    assert measured(0.0001) == 1000  # fast rows: never more than ALYA_BATCHCHUNK_NROWS
    assert make_engine(concurrency=8, batchchunk_nrows=5).producer.claim_size(APP, OP) == 5


def test_more_rows_are_wanted_while_the_backlog_is_short(make_engine: Callable[..., Engine],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(concurrency=8, worker_threads=2, batchchunk_nrows=1000)
    backlog = [0]
    monkeypatch.setattr(engine.executor, "backlog", lambda app=None, op=None: backlog[0])

    def wants(n: int) -> bool:
        backlog[0] = n
        return engine.producer.wants_rows(APP, OP)

    assert wants(15) and not wants(16)  # unmeasured: two rows per slot wait at most
    stats = PoolStats()
    stats.add(0.01)
    engine.executor.pool.stats[(APP, OP)] = stats  # a claim is 200 rows: half of one may wait
    assert wants(99) and not wants(100)


# ---------------------------------------------------------------------------------------------- flush timing
def test_flush_due_by_age_and_by_count() -> None:
    c = Claimed("b", APP, OP, "B", {}, [ClaimedRow(i, "{}", 1) for i in range(1, 151)], "w")
    assert not c.flush_due(time.monotonic() + 100, 1.0)  # nothing finished: nothing to write
    finish(c, 1, outcome(1))
    t0 = c.first_outcome_at
    assert not c.flush_due(t0 + 0.5, 1.0)
    eps = 1e-6  # (t0 + x) - t0 may round to a hair under x
    assert c.flush_due(t0 + 1.0 + eps, 1.0)  # ALYA_FLUSH_SEC after the oldest unwritten outcome
    for line in range(2, FLUSH_ROWS):
        finish(c, line, outcome(line))
    assert not c.flush_due(t0 + FLUSH_ROWS_AGE_SEC, 1.0)  # FLUSH_ROWS - 1: wait for the age
    finish(c, FLUSH_ROWS, outcome(FLUSH_ROWS))
    assert not c.flush_due(t0 + FLUSH_ROWS_AGE_SEC / 2, 1.0)
    assert c.flush_due(t0 + FLUSH_ROWS_AGE_SEC + eps, 1.0)  # FLUSH_ROWS of them, a little old: written early
    assert len(c.take()) == FLUSH_ROWS
    assert not c.flush_due(t0 + 100, 1.0)
    finish(c, 101, outcome(101))
    assert c.first_outcome_at > t0  # the age starts again with the next outcome
    assert not c.flush_due(c.first_outcome_at + 0.5, 1.0)
    assert c.unwritten == 150 - FLUSH_ROWS


def test_alya_flush_sec_writes_finished_rows_while_the_claim_runs(make_engine: Callable[..., Engine],
                                                                 store: MemoryStore, proc: Proc,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALYA_FLUSH_SEC", "0.05")
    cfg = env_config(batchchunk_nrows=100, retry_backoff_sec=0.0, concurrency=2)
    assert cfg.flush_sec == 0.05
    engine = make_engine(cfg)
    b = store.add_batch(APP, OP, [{"x": 1}, {"x": 2, "block": True}])
    worker = threading.Thread(target=engine.work, args=(APP, OP), kwargs={"seconds": 10})
    worker.start()
    # line 1 is written while line 2 (same claim) still runs
    wait_until(lambda: statuses(store, b) == {1: "success", 2: "inprog"})
    proc.gate.set()
    worker.join(10)
    assert statuses(store, b) == {1: "success", 2: "success"}
    assert store.batch(b).status == "success"


# ---------------------------------------------------------------------------------------------- the suspect gate
def make_suspect(store: MemoryStore, batch: str, line: int) -> None:
    """The row was held by a worker that died: recovery requeues it as a suspect."""
    with store.tx() as q:
        q.heartbeat(id="dead", host="h", pid=1)
        assert [r.line for r in q.claim_rows(batch=batch, n=1, worker="dead", after=line)] == [line]
    store.age_worker("dead", 600)
    with store.tx() as q:
        assert [r.line for r in q.recover_rows(sec=60, max_attempts=3, fail_messages="[]")] == [line]
    assert store.row(batch, line).suspect


def test_a_suspect_runs_alone(make_engine: Callable[..., Engine], store: MemoryStore) -> None:
    engine = make_engine()
    b = store.add_batch(APP, OP, rows(6))
    make_suspect(store, b, 3)
    suspect = take(engine, 10)  # nothing held here: the suspect is taken, alone
    assert suspect is not None and suspect.suspect and [r.line for r in suspect.rows] == [3]
    claims = store.calls["claim_rows"]
    assert take(engine, 10) is None  # while it runs, nothing else is claimed...
    assert store.calls["claim_rows"] == claims  # ...nor even asked for
    engine.producer.forget(suspect)
    after = take(engine, 10)
    assert after is not None and not after.suspect and [r.line for r in after.rows] == [1, 2, 4, 5, 6]


def test_a_suspect_waits_while_anything_is_held(make_engine: Callable[..., Engine], store: MemoryStore) -> None:
    engine = make_engine()
    b = store.add_batch(APP, OP, rows(6))
    held = take(engine, 2)
    assert held is not None and [r.line for r in held.rows] == [1, 2]
    make_suspect(store, b, 3)
    asked = store.calls["claim_suspect"]
    more = take(engine, 10)
    assert more is not None and not more.suspect and [r.line for r in more.rows] == [4, 5, 6]
    assert (store.row(b, 3).status, store.calls["claim_suspect"]) == ("queued", asked)  # not even asked for
    assert take(engine, 10) is None  # only the suspect is left, and this process holds rows
    engine.producer.forget(held)
    assert take(engine, 10) is None  # still holds the second claim
    engine.producer.forget(more)
    alone = take(engine, 10)
    assert alone is not None and alone.suspect and [r.line for r in alone.rows] == [3]


def test_a_claim_starting_while_a_suspect_is_being_claimed_gets_nothing(make_engine: Callable[..., Engine],
                                                                        store: MemoryStore) -> None:
    engine = make_engine()
    b = store.add_batch(APP, OP, rows(4))
    make_suspect(store, b, 2)
    inside, release = threading.Event(), threading.Event()

    def hook(name: str) -> None:
        if name == "claim_suspect" and not inside.is_set():
            inside.set()
            release.wait(5)

    store.hook = hook
    got: dict[str, Any] = {}
    first = threading.Thread(target=lambda: got.update(first=take(engine, 10)))
    first.start()
    assert inside.wait(5)  # the first claim (nothing held: it may take a suspect) is under way
    second = threading.Thread(target=lambda: got.update(second=take(engine, 10)))
    second.start()
    time.sleep(0.05)
    release.set()
    first.join(5)
    second.join(5)
    assert got["first"] is not None and got["first"].suspect
    assert got["second"] is None
    assert statuses(store, b) == {1: "queued", 2: "inprog", 3: "queued", 4: "queued"}


# ---------------------------------------------------------------------------------------------- app limits
def test_app_limits_share_the_limit_among_live_workers(make_engine: Callable[..., Engine], store: MemoryStore,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALYA_APP_LIMITS", f"{APP}=5")
    engine = make_engine(env_config(batchchunk_nrows=100, concurrency=4))
    b = store.add_batch(APP, OP, rows(20))
    with store.tx() as q:
        q.heartbeat(id="other", host="h", pid=2)
        other = q.claim_rows(batch=b, n=3, worker="other", after=0)
    # 2 live workers: a fair share is 3; the app has 2 left of its 5
    first = take(engine, 10)
    assert first is not None and len(first.rows) == 2
    assert take(engine, 10) is None  # the app is at its limit
    with store.tx() as q:  # the other worker finishes its rows
        q.write_results(batch=b, worker="other", lines=[r.line for r in other], attempts=[1, 1, 1],
                        statuses=["success"] * 3, res=[None] * 3, messages=[None] * 3, blobrows=[None] * 3,
                        delays=[0.0] * 3, finished=[0.0] * 3)
    second = take(engine, 10)
    assert second is not None and len(second.rows) == 1  # 3 of the 5 free, but our fair share is 3
    store.age_worker("other", 120)  # the other worker is gone: the whole limit is ours
    third = take(engine, 10)
    assert third is not None and len(third.rows) == 2
    assert take(engine, 10) is None
    with store.tx() as q:
        assert q.app_rows_in_progress(app=APP, worker=engine.worker_id, sec=60).as_tuple() == (5, 5, 1)


# ---------------------------------------------------------------------------------------------- init() back-off
def test_a_failing_init_backs_off_and_claims_nothing(make_engine: Callable[..., Engine], store: MemoryStore,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(producer_module, "INIT_RETRY_SEC", 0.05)
    engine = make_engine()
    init = Init(fail_first=2)
    engine.svc.registry.add_initializer(APP, init)
    reg = engine.svc.registry.processor(APP, OP)
    b = store.add_batch(APP, OP, rows(3))
    assert engine.types_with_work([(APP, OP)]) == [(APP, OP)]

    assert engine.producer.claim(reg, None, None, engine.log) is None
    assert init.calls == 1 and engine.producer.waiting_apps() == {APP}
    assert 0 < engine.init_retry_in(APP) <= 0.05
    assert engine.types_with_work([(APP, OP)]) == []  # a waiting app's types are not offered
    assert engine.producer.claim(reg, None, None, engine.log) is None
    assert init.calls == 1  # not tried again before its delay
    assert store.calls["claim_rows"] == store.calls["open_batches"] == 0
    assert [(r.status, r.attempts) for r in store.rows(b)] == [("queued", 0)] * 3  # attempts untouched

    wait_until(lambda: engine.init_retry_in(APP) == 0)
    assert engine.producer.claim(reg, None, None, engine.log) is None
    assert init.calls == 2 and engine.init_retry_in(APP) > 0.05  # the delay doubled
    wait_until(lambda: engine.init_retry_in(APP) == 0)
    claimed = engine.producer.claim(reg, None, None, engine.log)
    assert claimed is not None and claimed.initblock is not None and init.calls == 3
    assert engine.producer.waiting_apps() == set()
    assert [(r.status, r.attempts) for r in store.rows(b)] == [("inprog", 1)] * 3


# ---------------------------------------------------------------------------------------------- aborts
def test_a_write_back_after_an_abort_keeps_only_rows_finished_before_it(make_engine: Callable[..., Engine],
                                                                       store: MemoryStore) -> None:
    engine = make_engine()
    b = store.add_batch(APP, OP, rows(4))
    c = take(engine, 4)
    assert c is not None
    finish(c, 1, outcome(1))
    finish(c, 2, outcome(2))
    aborted = engine.finisher.abort(b)
    assert aborted.now and aborted.summary.value.naborted == 4
    finish(c, 3, outcome(3)._replace(finished=time.time() + 60))  # returned after the abort committed
    finish(c, 4, None)  # never started
    assert c.done and c.skipped == [4]
    report = ChunkReport()
    engine.completer.flush([c], report, engine.log)
    assert c.aborted and c.cancelled
    assert statuses(store, b) == {1: "success", 2: "success", 3: "aborted", 4: "aborted"}
    batch = store.batch(b)
    assert (batch.status, batch.nsuccess, batch.naborted) == ("aborted", 2, 2)
    assert store.calls["write_results_late"] == 1
    engine.producer.forget(c)
    engine._claim_ended(c, report, engine.log)
    assert store.calls["release_rows"] == 0  # an aborted claim gives nothing back
    assert report.summarised == [] and f"abort:{b}" in store.notifications


def test_an_abort_during_work(make_engine: Callable[..., Engine], store: MemoryStore, proc: Proc) -> None:
    engine = make_engine(concurrency=2, flush_sec=10.0)
    b = store.add_batch(APP, OP, [{"x": 1}, {"x": 2}, {"x": 3, "block": True}, {"x": 4, "block": True},
                                  {"x": 5}, {"x": 6}])
    report: list[ChunkReport] = []
    worker = threading.Thread(target=lambda: report.append(engine.work(APP, OP, seconds=10, max_claims=1,
                                                                       claim_size=6)))
    worker.start()
    wait_until(lambda: sorted(proc.started) == [1, 2, 3, 4])  # 1, 2 done (not written yet); 3, 4 running
    engine.finisher.abort(b)
    engine.notices.abort_notified(b)  # what the Waker does on the abort's NOTIFY
    proc.gate.set()
    worker.join(10)
    assert sorted(proc.started) == [1, 2, 3, 4]  # 5 and 6 were never started
    assert statuses(store, b) == {1: "success", 2: "success", 3: "aborted", 4: "aborted", 5: "aborted",
                                  6: "aborted"}
    batch = store.batch(b)
    assert (batch.status, batch.nsuccess, batch.naborted) == ("aborted", 2, 4)
    assert report[0].summarised == [] and proc.done == []


# ---------------------------------------------------------------------------------------------- write-backs
def test_write_backs_are_split_by_size() -> None:
    def out(line: int, res: int, messages: int = 0) -> Outcome:
        return Outcome(line, 1, "success", "r" * res, "m" * messages or None, None, 0.0, 0.0)

    parts = _by_size([out(1, 40), out(2, 30, 10), out(3, 40), out(4, 150), out(5, 10), out(6, 10)], 100)
    assert [[o.line for o in p] for p in parts] == [[1, 2], [3], [4], [5, 6]]  # a row larger than a part: alone
    assert _by_size([], 100) == [[]]


def test_a_large_write_back_is_several_statements_in_one_transaction(make_engine: Callable[..., Engine],
                                                                    store: MemoryStore,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(completer_module, "WRITE_PART_BYTES", 100)
    engine = make_engine()
    b = store.add_batch(APP, OP, rows(5))
    c = take(engine, 5)
    assert c is not None
    outs = [outcome(r.line, pad="x" * 60) for r in c.rows]  # one row per part
    commits = store.commits
    res = engine.completer.write(c, outs, engine.log)
    assert (res.status, res.written) == ("inprog", 5)
    assert store.calls["write_results"] == 5 and store.commits == commits + 1
    assert set(statuses(store, b).values()) == {"success"}


def test_a_write_back_that_keeps_failing_gives_the_rows_back(make_engine: Callable[..., Engine], store: MemoryStore,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(completer_module, "time", SimpleNamespace(sleep=sleeps.append))
    engine = make_engine()
    b = store.add_batch(APP, OP, rows(3))
    c = take(engine, 3)
    assert c is not None

    def outage(name: str) -> None:
        if name == "write_results":
            raise BackendUnavailable("PostgreSQL failed: injected")

    store.hook = outage
    for r in c.rows:
        finish(c, r.line, outcome(r.line))
    store.take_notifications()
    engine.completer.flush([c], ChunkReport(), engine.log)
    assert store.calls["write_results"] == WRITE_TRIES and len(sleeps) == WRITE_TRIES - 1
    assert c.lost and c.cancelled
    assert [(r.status, r.attempts, r.doneby) for r in store.rows(b)] == [("queued", 0, None)] * 3  # not tried
    assert store.take_notifications() == [f"{APP}/{OP}"]  # idle workers may take them


def test_when_even_the_give_back_fails_the_identity_is_retired(make_engine: Callable[..., Engine],
                                                               store: MemoryStore,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(completer_module, "time", SimpleNamespace(sleep=lambda s: None))
    engine = make_engine()
    b = store.add_batch(APP, OP, rows(2))
    c = take(engine, 2)
    assert c is not None
    old = c.worker

    def outage(name: str) -> None:
        if name in ("write_results", "release_rows"):
            raise BackendUnavailable("PostgreSQL failed: injected")

    store.hook = outage
    with pytest.raises(AlyaError):
        engine.completer.write(c, [outcome(1), outcome(2)], engine.log)
    assert engine.worker_id != old and engine.worker_id in store.workers()  # a new identity, beating
    assert [(r.status, r.doneby) for r in store.rows(b)] == [("inprog", old)] * 2  # left to recovery
    store.hook = None
    store.age_worker(old, 120)
    report = cleanup(engine)
    assert report.requeued == 2 and set(statuses(store, b).values()) == {"queued"}


# ---------------------------------------------------------------------------------------------- a whole run
def test_a_whole_run_summarises_the_batch(make_engine: Callable[..., Engine], store: MemoryStore, proc: Proc,
                                          tmp_path: Path) -> None:
    engine = make_engine(concurrency=4, batchchunk_nrows=7)
    inputs: list[dict[str, Any]] = [{"x": i, "sleep": 0.002 * (i % 3)} for i in range(1, 41)]
    inputs[4]["mode"] = "raise_once"  # line 5: a fault, retried at once (no backoff)
    b = store.add_batch(APP, OP, inputs, context={"who": "unit"})
    report = engine.work(APP, OP, seconds=20)
    assert report.summarised == [b]
    assert (report.nsuccess, report.nretry) == (40, 1)
    batch = store.batch(b)
    assert (batch.status, batch.nrows, batch.nsuccess, batch.nfailed, batch.naborted) == ("success", 40, 40, 0, 0)
    assert batch.notifiedat is not None
    assert store.row(b, 5).attempts == 2 and proc.calls[5] == 2
    prefix = batch_prefix(engine.svc.objects.url, APP, OP, b)
    assert batch.outputfiles == {"out.txt": f"{prefix}/out.txt"}
    out = tmp_path / "objects" / APP / OP / b / "out.txt"
    assert out.read_text().splitlines() == [f"line {i}" for i in range(1, 41)]  # line order, whatever the order run
    assert [(d.id, d.status, d.nsuccess, d.context) for d in proc.done] == [
        (b, BatchStatus.SUCCESS, 40, {"who": "unit"})]
    assert store.calls["claim_notify"] == 1
    # counted from the counters, checked against the failed rows' index: no recount of every row
    assert (store.calls["row_counts"], store.calls["failed_rows"]) == (0, 1)
    assert engine.svc.statuses.read(b).value.status is BatchStatus.SUCCESS
    assert engine.work(APP, OP, seconds=1).batch is None  # nothing left
    assert len(proc.done) == 1


def test_a_report_lists_every_batch_it_wrote_rows_of(make_engine: Callable[..., Engine], store: MemoryStore) -> None:
    """The flow's per-batch artifacts need each batch a task touched, not only its first."""
    engine = make_engine(concurrency=2, batchchunk_nrows=5)
    b1 = store.add_batch(APP, OP, [{"x": i} for i in range(1, 8)])
    b2 = store.add_batch(APP, OP, [{"x": i} for i in range(1, 4)])
    report = engine.work(APP, OP, seconds=20)
    assert report.batches == {b1: 7, b2: 3} and report.nrows == 10
    assert sorted(report.summarised) == sorted([b1, b2])
    assert report.as_dict()["batches"] == {b1: 7, b2: 3}


# ---------------------------------------------------------------------------------------------- faults found
# Faults found by these tests and fixed (the last one: Engine.shutdown left the workers table at once,
# while a claim loop on another thread still ran its rows, which recovery then requeued as a dead worker's).
def test_a_failed_write_back_of_two_claims_of_one_batch_gives_all_rows_back(make_engine: Callable[..., Engine],
                                                                            store: MemoryStore,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(completer_module, "time", SimpleNamespace(sleep=lambda s: None))
    engine = make_engine()
    b = store.add_batch(APP, OP, rows(4))
    claims = [take(engine, 2), take(engine, 2)]
    worker = engine.worker_id
    for c in claims:
        assert c is not None
        for r in c.rows:
            finish(c, r.line, outcome(r.line))

    def outage(name: str) -> None:
        if name == "write_results":
            raise BackendUnavailable("PostgreSQL failed: injected")

    store.hook = outage
    engine.completer.flush([c for c in claims if c is not None], ChunkReport(), engine.log)
    assert engine.worker_id == worker  # giving the rows back worked: no reason to retire the identity
    assert set(statuses(store, b).values()) == {"queued"}


def test_claims_of_one_batch_under_two_identities_are_all_written(make_engine: Callable[..., Engine],
                                                                  store: MemoryStore) -> None:
    engine = make_engine()
    b = store.add_batch(APP, OP, rows(4))
    before = take(engine, 2)
    engine.identity.retire(engine.worker_id)  # as after a PostgreSQL restart (Identity.beat)
    after = take(engine, 2)
    for c in (before, after):
        assert c is not None
        for r in c.rows:
            finish(c, r.line, outcome(r.line))
    assert before is not None and after is not None and before.worker != after.worker
    engine.completer.flush([before, after], ChunkReport(), engine.log)
    assert statuses(store, b) == {1: "success", 2: "success", 3: "success", 4: "success"}


def test_a_claimable_batch_behind_a_hundred_waiting_ones_is_claimed(make_engine: Callable[..., Engine],
                                                                    store: MemoryStore) -> None:
    engine = make_engine()
    waiting = [store.add_batch(APP, OP, rows(1)) for _ in range(100)]
    with store.tx() as q:  # each one's only row waits out a retry delay
        for b in waiting:
            q.claim_rows(batch=b, n=1, worker="w", after=0)
            q.write_results(batch=b, worker="w", lines=[1], attempts=[1], statuses=["queued"], res=[None],
                            messages=[None], blobrows=[None], delays=[60.0], finished=[0.0])
    new = store.add_batch(APP, OP, rows(3))
    assert engine.types_with_work([(APP, OP)]) == [(APP, OP)]
    claimed = take(engine, 10)
    assert claimed is not None and claimed.batch == new


def test_shutdown_leaves_the_workers_table_after_the_claim_loops(make_engine: Callable[..., Engine],
                                                                 store: MemoryStore, proc: Proc) -> None:
    engine = make_engine(concurrency=2)
    b = store.add_batch(APP, OP, [{"x": 1, "block": True}, {"x": 2}])
    loop = threading.Thread(target=engine.work, args=(APP, OP), kwargs={"seconds": 10})
    loop.start()
    wait_until(lambda: sorted(proc.started) == [1, 2])
    held_when_leaving: list[int] = []

    def hook(name: str) -> None:  # runs inside the transaction: the store's lock is held, read its state directly
        if name == "forget_worker":
            held_when_leaving.extend(r.line for r in store.state.rows[b].values() if r.status == "inprog")

    store.hook = hook
    threading.Timer(0.3, proc.gate.set).start()  # the running row ends a little later
    engine.shutdown()  # as JobManager.close() from another thread
    loop.join(10)
    assert held_when_leaving == []


# ------------------------------------------------------------------------------------------ priorities
def test_claims_take_higher_priority_first_in_turn_and_lower_every_reserved_turn(
        make_engine: Callable[..., Engine], store: MemoryStore) -> None:
    engine = make_engine()
    low = store.add_batch(APP, OP, rows(50))  # oldest, priority 0
    high1 = store.add_batch(APP, OP, rows(50), priority=5)
    high2 = store.add_batch(APP, OP, rows(50), priority=5)
    got = []
    for _ in range(20):
        c = take(engine, 1)
        assert c is not None
        got.append(c.batch)
        engine.producer.forget(c)
    assert [i for i, b in enumerate(got, 1) if b == low] == [10, 20]  # the reserved share of claims
    assert [b for b in got if b != low] == [high1, high2] * 9  # equal priorities in turn
    c = take(engine, 1)
    assert c is not None and c.priority == 5  # the claim carries its batch's priority to the row pool


def test_the_oldest_batches_are_listed_whatever_their_priority(store: MemoryStore) -> None:
    old = store.add_batch(APP, OP, rows(1), priority=-5)
    newer = [store.add_batch(APP, OP, rows(1), priority=1) for _ in range(105)]
    with store.tx() as q:
        listed = q.open_batches(app=APP, op=OP, type="B", only=None)
    assert [b.id for b in listed[:100]] == newer[:100] and listed[-1].id == old  # last, but listed


def test_a_batch_s_context_is_read_once_per_process(make_engine: Callable[..., Engine], store: MemoryStore) -> None:
    """Issue 18: every claim read each open batch's context again (0.3 s per claim for a 40 MiB one). Claims
    now carry the context read at the batch's first claim here; open_batches reads no context."""
    engine = make_engine()
    b = store.add_batch(APP, OP, rows(6), context={"user": "ann"})
    claims = [take(engine, 2) for _ in range(3)]
    assert all(c is not None and c.batch == b and c.context == {"user": "ann"} for c in claims)
    assert store.calls["open_batches"] >= 3 and store.calls["batch_context"] == 1


def test_a_report_is_busy_when_its_last_claim_was_full(make_engine: Callable[..., Engine], store: MemoryStore) -> None:
    """What a run's chunk tasks scale by (``alya.prefect.flows._waves``): a claim that got all the rows it
    asked for leaves work behind; one that got fewer, or none, does not."""
    engine = make_engine(concurrency=2, batchchunk_nrows=4)
    assert engine.producer.was_full(APP, OP)  # no claim yet: a run for new work starts at full width
    store.add_batch(APP, OP, rows(8))
    report = engine.work(APP, OP, seconds=5, max_claims=1, claim_size=4)
    assert report.busy and engine.producer.was_full(APP, OP)
    report = engine.work(APP, OP, seconds=5)  # the other 4 rows, then a claim that finds nothing
    assert report.nrows == 4 and not report.busy and not engine.producer.was_full(APP, OP)
