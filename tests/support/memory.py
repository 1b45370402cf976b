"""An in-memory adapter of the query layer, for tests that need no PostgreSQL: ``MemoryStore`` has the surface
the engine, the finisher and the status reader use of ``alya.db.store.Store`` (``tx()``, ``run(body)``,
``database_url``, ``dispose()``), and ``MemoryQueries`` implements every method of ``alya.db.queries.Queries``
over plain Python objects, following ``alya/db/sql/queries.sql`` statement by statement (each method is
named as its query there; read the two side by side). tests/integration/db/test_query_conformance.py runs the
same scenarios against PostgreSQL and against this, so a divergence fails there. Records come out through
the same ``from_row`` converters as the real ones (``alya.core.records``), so their types match too.

Not modelled, as no caller depends on it: the order of ``RETURNING`` rows and of ``SELECT``s without ``ORDER
BY`` (here line order, or insertion order), and the errors PostgreSQL raises for arguments the callers never
pass (arrays of different lengths, ids that are not UUIDs).

Transactions: one lock (``MemoryStore.lock``) is held for the whole transaction, so transactions are
serialised (stricter than PostgreSQL's READ COMMITTED: what row locks, SKIP LOCKED and advisory locks decide
there cannot interleave here). Every change is journalled; an exception out of ``tx()`` undoes the journal
(a rollback) and ``savepoint()`` undoes its own part only. Notifications are recorded at commit, once per
distinct payload per transaction (as PostgreSQL delivers them), in ``MemoryStore.notifications``. A second
transaction opened on a thread that holds one raises: on PostgreSQL that is a second connection, which can
wait for the first one's locks for ever.

Time is the store's clock (``clock()``: the wall clock plus ``advance()``); as ``now()`` in PostgreSQL, it is
read once when a transaction begins. JSON columns are kept as the text jsonb would print (keys ordered by
length, then bytewise; ``", "`` and ``": "``) and parsed again on every read, so that no reader shares objects
with the store. Numbers print as Python prints them, which differs from ``numeric`` for exponents.

Faults and counts: ``hook(name)`` (if set) is called before every query with its name, inside the
transaction (the store's lock is held: read ``state`` directly there), and may raise (an outage: raise
``BackendUnavailable``; a lost connection: ``ConnectionLost``, which ``run`` retries as ``Store.run`` does);
``calls`` counts the queries run and ``commits`` the transactions committed.

The store's ``database_url`` points at a socket directory that does not exist, so that whatever connects to
it directly (the engine's Waker, Maintenance's duty session) fails at once: the Waker logs
``wakeups_unavailable`` and the engine polls.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

import orjson

from alya.core import names
from alya.core.errors import InvalidInput
from alya.core.models import BatchOutput, BatchStatus
from alya.core.records import (
    AppLoad,
    BatchKeyed,
    BatchKind,
    BatchRecord,
    BatchRef,
    BatchState,
    ClaimedRow,
    Counts,
    FailureLimit,
    FileRecord,
    OpenBatch,
    PurgeCandidate,
    Purged,
    RecoveredRow,
    RowResult,
    RowsPartition,
    SlowQueryRow,
    SummaryFailures,
    WriteResult,
    batch_output,
)
from alya.db import batches as db_batches
from alya.db.partitions import LOCK_TIMEOUT_MS
from alya.db.queries import Queries
from alya.db.store import Store
from alya.db.transport import Readable

T = TypeVar("T")

MEMORY_URL = "postgresql:///alya_memory?host=/nonexistent/alya-memory-store&connect_timeout=1"
OPEN = ("queued", "inprog")
FINAL = ("success", "failed", "aborted")
_APP = re.compile(r"^[a-z][a-z0-9_]*$")
_BATCH_FIELDS = tuple(f.name for f in fields(BatchRecord))


# ---------------------------------------------------------------------------------------------- JSON as jsonb
def jsonb_text(value: Any) -> str:
    """``value`` as PostgreSQL prints a jsonb (``jsonb::text``)."""
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: (len(k.encode()), k.encode()))
        return "{" + ", ".join(f"{_jstring(k)}: {jsonb_text(value[k])}" for k in keys) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(jsonb_text(v) for v in value) + "]"
    if isinstance(value, str):
        return _jstring(value)
    return json.dumps(value)  # null, true, false, numbers


def _jstring(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def _jsonb(text: str | None) -> str | None:
    """JSON text as a jsonb column stores it; what PostgreSQL refuses (bad JSON, NUL) is refused."""
    if text is None:
        return None
    if "\\u0000" in text:
        raise InvalidInput("refused by the database: unsupported Unicode escape sequence (\\u0000)")
    try:
        return jsonb_text(orjson.loads(text))
    except orjson.JSONDecodeError:
        raise InvalidInput("refused by the database: invalid input syntax for type json") from None


def _load(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


def _status(value: str) -> str:
    try:
        return BatchStatus(value).value
    except ValueError:
        raise InvalidInput(f'refused by the database: invalid input value for enum batch_status: "{value}"') from None


# ---------------------------------------------------------------------------------------------- stored state
@dataclass
class _Batch:
    id: str
    app: str
    op: str
    type: str
    context: str  # jsonb text
    inputfile: str | None
    status: str
    reqat: datetime
    seq: int  # insertion order: breaks ties of reqat
    doneat: datetime | None = None
    outputfiles: str = "{}"
    nrows: int = 0
    nsuccess: int = 0
    nfailed: int = 0
    naborted: int = 0
    ver: int = 1
    notifiedat: datetime | None = None
    idempotency_key: str | None = None
    sumfails: int = 0
    sumerror: str | None = None
    sumsince: datetime | None = None
    error: str | None = None
    priority: int = 0
    round: int = 1
    max_failures: int | None = None
    max_failure_ratio: Decimal | None = None
    paused: bool = False
    notbefore: datetime | None = None
    deadline: datetime | None = None

    @property
    def open(self) -> bool:
        return self.status in OPEN

    def startable(self, now: datetime) -> bool:
        """Batch control: neither paused nor waiting for its not_before."""
        return not self.paused and (self.notbefore is None or self.notbefore <= now)

    def record(self) -> BatchRecord:
        values = {"context": _load(self.context), "outputfiles": _load(self.outputfiles)}
        return BatchRecord.from_row(tuple(values[f] if f in values else getattr(self, f) for f in _BATCH_FIELDS))


@dataclass
class _Row:
    batch: str
    line: int
    input: str  # jsonb text
    reqat: datetime
    status: str = "queued"
    doneat: datetime | None = None
    res: str | None = None
    blobrows: str | None = None
    messages: str | None = None
    doneby: str | None = None
    attempts: int = 0
    notbefore: datetime | None = None
    suspect: bool = False

    def claimable(self, now: datetime) -> bool:
        return self.status == "queued" and (self.notbefore is None or self.notbefore <= now)


@dataclass
class _Worker:
    id: str
    host: str
    pid: int
    started: datetime
    lastseen: datetime


@dataclass
class _File:
    id: str
    url: str
    size: int
    version: str
    filetype: str
    status: str
    batch: str | None
    nrows: int
    error: str | None
    dest: str | None
    movedat: datetime | None
    reqat: datetime

    def record(self) -> FileRecord:
        return FileRecord.from_row(tuple(getattr(self, f) for f in FileRecord.COLUMNS.split(", ")))


@dataclass(frozen=True)
class StoredBatch:
    """A batch's every column, as a test reads it back (``MemoryStore.batch``; the conformance test reads
    PostgreSQL into the same record)."""

    id: str
    app: str
    op: str
    type: str
    status: str
    context: Any
    nrows: int
    nsuccess: int
    nfailed: int
    naborted: int
    ver: int
    outputfiles: Any
    doneat: datetime | None
    notifiedat: datetime | None
    sumfails: int
    sumerror: str | None
    error: str | None


@dataclass(frozen=True)
class StoredRow:
    """A row's every column but ``reqat``, JSON parsed."""

    line: int
    input: Any
    status: str
    res: Any
    messages: Any
    blobrows: Any
    doneby: str | None
    attempts: int
    doneat: datetime | None
    notbefore: datetime | None
    suspect: bool


class _Journal:
    """What a transaction (or a savepoint) changed, to undo it."""

    def __init__(self) -> None:
        self.saved: dict[int, tuple[Any, dict[str, Any]]] = {}  # id(obj) -> (obj, its fields before)
        self.undo: list[Callable[[], object]] = []  # inserts and deletes, undone in reverse
        self.notes: list[str] = []  # NOTIFY payloads, sent at commit

    def touch(self, obj: Any) -> None:
        if id(obj) not in self.saved:
            self.saved[id(obj)] = (obj, dict(vars(obj)))

    def rollback(self) -> None:
        for fn in reversed(self.undo):
            fn()
        for obj, before in self.saved.values():
            vars(obj).update(before)

    def merge_into(self, parent: _Journal) -> None:
        for key, saved in self.saved.items():
            parent.saved.setdefault(key, saved)  # the parent's copy is the older one
        parent.undo.extend(self.undo)
        parent.notes.extend(self.notes)


@dataclass
class _State:
    batches: dict[str, _Batch] = field(default_factory=dict)
    rows: dict[str, dict[int, _Row]] = field(default_factory=dict)  # batch -> line -> row
    workers: dict[str, _Worker] = field(default_factory=dict)
    files: dict[str, _File] = field(default_factory=dict)
    leases: dict[str, tuple[str, datetime]] = field(default_factory=dict)  # duty -> (holder, expires)
    seq: int = 0


# ---------------------------------------------------------------------------------------------- the store
class MemoryStore(Store):
    """The in-memory database, with ``Store``'s transaction surface and the helpers tests use to set up and
    read back state directly."""

    def __init__(self, database_url: str = MEMORY_URL) -> None:
        super().__init__(database_url)
        self.lock = threading.Lock()
        self.state = _State()
        self.notifications: list[str] = []  # payloads on alya.core.names.WORK_CHANNEL, in commit order
        self.calls: Counter[str] = Counter()
        self.hook: Callable[[str], None] | None = None
        self.offset = 0.0  # seconds added to the wall clock
        self.started = self.clock() - timedelta(hours=1)  # pg_postmaster_start_time()
        self.commits = 0
        self._local = threading.local()

    # ------------------------------------------------------------------ Store's surface
    @property
    def engine(self) -> Any:
        raise RuntimeError("MemoryStore has no SQLAlchemy engine")

    @contextmanager
    def tx(self) -> Iterator[MemoryQueries]:  # type: ignore[override]
        if getattr(self._local, "open", False):
            raise RuntimeError("a second transaction on a thread that holds one (on PostgreSQL: a second "
                               "connection, which may wait for the first one's locks for ever)")
        with self.lock:
            self._local.open = True
            q = MemoryQueries(self, self.clock())
            try:
                yield q
            except BaseException:
                q.end(commit=False)
                raise
            else:
                q.end(commit=True)
            finally:
                self._local.open = False

    def dispose(self) -> None:
        pass

    # ------------------------------------------------------------------ time
    def clock(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.offset)

    def advance(self, seconds: float) -> None:
        """Move the store's clock (``now()``) on: retry delays pass, heartbeats age."""
        with self.lock:
            self.offset += seconds

    def restart(self) -> None:
        """As a server restart looks to a heartbeat: a new ``pg_postmaster_start_time()``."""
        with self.lock:
            self.started = self.clock()

    def age_worker(self, worker: str, seconds: float) -> None:
        """The worker's last heartbeat, ``seconds`` earlier (as a silent worker's)."""
        with self.lock:
            w = self.state.workers[worker]
            w.lastseen -= timedelta(seconds=seconds)

    def age_rows(self, batch: str, seconds: float) -> None:
        """Every retry delay of the batch's rows, ``seconds`` shorter."""
        with self.lock:
            for r in self.state.rows.get(batch, {}).values():
                if r.notbefore is not None:
                    r.notbefore -= timedelta(seconds=seconds)

    # ------------------------------------------------------------------ setting up and reading back
    def add_batch(self, app: str, op: str, rows: Iterable[tuple[int, Any] | dict[str, Any]], *,
                  type: str = "B", status: str = "queued", context: dict[str, Any] | None = None,
                  inputfile: str | None = None, priority: int | None = None) -> str:
        """See :func:`add_batch`."""
        return add_batch(self, app, op, rows, type=type, status=status, context=context, inputfile=inputfile,
                         priority=priority)

    def batch(self, batch_id: str) -> StoredBatch:
        with self.lock:
            b = self.state.batches[batch_id]
            return StoredBatch(b.id, b.app, b.op, b.type, b.status, _load(b.context), b.nrows, b.nsuccess,
                               b.nfailed, b.naborted, b.ver, _load(b.outputfiles), b.doneat, b.notifiedat,
                               b.sumfails, b.sumerror, b.error)

    def rows(self, batch_id: str) -> list[StoredRow]:
        with self.lock:
            return [StoredRow(r.line, _load(r.input), r.status, _load(r.res), _load(r.messages), _load(r.blobrows),
                              r.doneby, r.attempts, r.doneat, r.notbefore, r.suspect)
                    for r in sorted(self.state.rows.get(batch_id, {}).values(), key=lambda r: r.line)]

    def row(self, batch_id: str, line: int) -> StoredRow:
        return next(r for r in self.rows(batch_id) if r.line == line)

    def take_notifications(self) -> list[str]:
        """The payloads notified so far, forgotten: the next call returns only those that came after."""
        with self.lock:
            out, self.notifications[:] = list(self.notifications), []
        return out

    def workers(self) -> dict[str, datetime]:
        """Worker id -> last heartbeat."""
        with self.lock:
            return {w.id: w.lastseen for w in self.state.workers.values()}


def add_batch(store: Store, app: str, op: str, rows: Iterable[tuple[int, Any] | dict[str, Any]], *,
              type: str = "B", status: str = "queued", context: dict[str, Any] | None = None,
              inputfile: str | None = None, priority: int | None = None) -> str:
    """Store a batch as a submit does (``alya.db.batches``: insert, COPY of its rows, count, notify), in
    ``store`` (a ``MemoryStore`` or PostgreSQL's ``Store``); ``rows`` as (line, input) pairs, or inputs
    numbered from line 1. A slow query (type Q) takes the first input as its one row. Returns its id."""
    pairs = [(i, r) if isinstance(r, dict) else (r[0], r[1]) for i, r in enumerate(rows, 1)]
    with store.tx() as q:
        if type == "Q":
            return db_batches.insert_slowquery(q, str(uuid.uuid4()), app, op, context or {},
                                               orjson.dumps(pairs[0][1]).decode(),
                                               priority=10 if priority is None else priority).id
        return db_batches.insert_batch(q, app, op, context or {}, iter(pairs), status=BatchStatus(status),
                                       inputfile=inputfile, max_rows=10_000_000, priority=priority or 0).id


# ---------------------------------------------------------------------------------------------- the queries
class MemoryQueries(Queries):
    """One transaction of a ``MemoryStore``: every method of ``Queries``, over the store's objects."""

    def __init__(self, store: MemoryStore, now: datetime) -> None:  # no transport: Queries' __init__ is not run
        self._store = store
        self._s = store.state
        self._now = now
        self._journal = _Journal()
        self._open = True

    # ------------------------------------------------------------------ plumbing
    def end(self, commit: bool) -> None:
        """The transaction's end (called by ``MemoryStore.tx``)."""
        self._open = False
        if not commit:
            self._journal.rollback()
            return
        sent: list[str] = []
        for note in self._journal.notes:  # PostgreSQL folds identical notifications of one transaction
            if note not in sent:
                sent.append(note)
        self._store.notifications.extend(sent)
        self._store.commits += 1

    def _q(self, name: str) -> None:
        if not self._open:
            raise RuntimeError(f"{name}: this transaction has ended")
        self._store.calls[name] += 1
        if self._store.hook is not None:
            self._store.hook(name)

    def _set(self, obj: Any, **changes: Any) -> None:
        self._journal.touch(obj)
        for k, v in changes.items():
            setattr(obj, k, v)

    def _batch(self, id: str) -> _Batch | None:
        return self._s.batches.get(id)

    def _rows(self, batch: str) -> list[_Row]:
        """The batch's rows in line order."""
        return sorted(self._s.rows.get(batch, {}).values(), key=lambda r: r.line)

    def _ago(self, seconds: float) -> datetime:
        return self._now - timedelta(seconds=seconds)

    def _live(self, worker: str | None, sec: float) -> bool:
        w = self._s.workers.get(worker) if worker is not None else None
        return w is not None and w.lastseen > self._ago(sec)

    def _add_row(self, batch: str, line: int, input: str) -> None:
        if self._batch(batch) is None:
            raise InvalidInput("refused by the database: batchrows violates foreign key batchrows_batch_fkey")
        if line < 0:
            raise InvalidInput("refused by the database: batchrows violates check constraint batchrows_line_nonneg")
        rows = self._s.rows.setdefault(batch, {})
        if line in rows:
            raise InvalidInput("line numbers must be unique within a batch")
        rows[line] = _Row(batch, line, _jsonb(input) or "null", self._now)
        self._journal.undo.append(lambda: rows.pop(line, None))

    # ------------------------------------------------------------------ storing a batch
    def insert_batch(self, *, id: str, app: str, op: str, type: str, context: str, inputfile: str | None,
                     status: BatchStatus, priority: int = 0) -> None:
        self._q("insert_batch")
        self._insert(id=id, app=app, op=op, type=type, context=context, inputfile=inputfile, status=status, key=None,
                     priority=priority)

    def _insert(self, *, id: str, app: str, op: str, type: str, context: str, inputfile: str | None,
                status: BatchStatus, key: str | None, priority: int = 0) -> None:
        if id in self._s.batches:
            raise InvalidInput("refused by the database: duplicate key value violates constraint batches_pkey")
        if op != op.lower() or not _APP.match(app) or type not in ("B", "Q"):
            raise InvalidInput("refused by the database: batches violates a check constraint")
        self._s.seq += 1
        self._s.batches[id] = _Batch(id, app, op, type, _jsonb(context) or "null", inputfile,
                                     _status(str(status)), self._now, self._s.seq, idempotency_key=key,
                                     priority=priority)
        self._journal.undo.append(lambda: self._s.batches.pop(id, None))

    def insert_batch_keyed(self, *, id: str, app: str, op: str, type: str, context: str, inputfile: str | None,
                           status: BatchStatus, key: str, priority: int = 0) -> bool:
        self._q("insert_batch_keyed")
        if any(b.app == app and b.idempotency_key == key for b in self._s.batches.values()):
            return False  # ON CONFLICT DO NOTHING
        self._insert(id=id, app=app, op=op, type=type, context=context, inputfile=inputfile, status=status, key=key,
                     priority=priority)
        return True

    def batch_by_key(self, *, app: str, key: str) -> BatchKeyed | None:
        self._q("batch_by_key")
        b = next((b for b in self._s.batches.values() if b.app == app and b.idempotency_key == key), None)
        return None if b is None else BatchKeyed.from_row((b.id, b.op, b.type))

    def keyed_call_matches(self, *, id: str, op: str, type: str, context: str, inputfile: str | None,
                           input: str | None) -> bool:
        self._q("keyed_call_matches")
        b = self._s.batches.get(id)
        if b is None or (b.op, b.type, b.inputfile) != (op, type, inputfile) or _load(b.context) != _load(context):
            return False
        return input is None or any(r.line == 0 and _load(r.input) == _load(input)
                                    for r in self._s.rows.get(id, {}).values())

    def copy_rows(self, stream: Readable) -> None:
        """COPY batchrows (batch, line, input) FROM STDIN, text format. An error raised by the stream (a bad
        row) comes out as itself, as ``Tx.copy_in`` raises it."""
        self._q("copy_rows")
        data = b"".join(iter(lambda: stream.read(1 << 18), b""))
        for raw in data.split(b"\n"):
            if not raw:
                continue
            batch, line, text = raw.split(b"\t")
            self._add_row(batch.decode(), int(line), _copy_unescape(text).decode())

    def insert_row(self, *, batch: str, line: int, input: str) -> None:
        self._q("insert_row")
        self._add_row(batch, line, input)

    def insert_query(self, *, id: str, app: str, op: str, context: str, input: str, priority: int) -> int:
        self._q("insert_query")
        self._insert(id=id, app=app, op=op, type="Q", context=context, inputfile=None, status=BatchStatus.QUEUED,
                     key=None, priority=priority)
        self._add_row(id, 0, input)
        b = self._batch(id)
        assert b is not None
        self._set(b, nrows=1)
        self._journal.notes.append(names.work_payload(app, op))
        return b.ver

    def set_nrows_status(self, *, id: str, nrows: int, status: BatchStatus) -> int:
        self._q("set_nrows_status")
        b = self._batch(id)
        assert b is not None, f"no batch {id}"
        self._set(b, nrows=nrows, status=_status(str(status)), ver=b.ver + 1)
        return b.ver

    def wait_off(self, *, id: str) -> int | None:
        self._q("wait_off")
        b = self._batch(id)
        if b is None or b.status != "wait":
            return None
        self._set(b, status="queued", ver=b.ver + 1)
        return b.ver

    # ------------------------------------------------------------------ reading and locking a batch
    def get_batch(self, *, id: str) -> BatchRecord | None:
        self._q("get_batch")
        b = self._batch(id)
        return None if b is None else b.record()

    def lock_batch(self, *, id: str) -> BatchRecord | None:
        self._q("lock_batch")
        b = self._batch(id)
        return None if b is None else b.record()

    def lock_open_batch(self, *, id: str) -> BatchRecord | None:
        self._q("lock_open_batch")
        b = self._batch(id)
        return b.record() if b is not None and b.open else None

    def list_batches(self, *, app: str, op: str | None, type: str, age_days: int) -> list[BatchRecord]:
        self._q("list_batches")
        since = self._now - timedelta(days=age_days)
        found = [b for b in self._s.batches.values()
                 if b.app == app and b.type == type and (op is None or b.op == op) and b.reqat >= since]
        return [b.record() for b in sorted(found, key=lambda b: (b.reqat, b.seq), reverse=True)]

    def batch_statuses(self, *, ids: list[str]) -> list[BatchState]:
        self._q("batch_statuses")
        wanted = set(ids)
        return [BatchState.from_row((b.id, b.status)) for b in self._s.batches.values() if b.id in wanted]

    def row_counts(self, *, id: str) -> Counts:
        self._q("row_counts")
        by_status = Counter(r.status for r in self._s.rows.get(id, {}).values())
        return Counts.from_rows(list(by_status.items()))

    def batch_counts(self, *, id: str) -> Counts:
        """The counters (PostgreSQL's triggers keep them equal to a recount; here the recount is them)."""
        self._q("batch_counts")
        by_status = Counter(r.status for r in self._s.rows.get(id, {}).values())
        return Counts.from_rows(list(by_status.items()))

    def failed_rows(self, *, id: str) -> int:
        self._q("failed_rows")
        return sum(1 for r in self._s.rows.get(id, {}).values() if r.status == "failed")

    def count_inserted(self, *, batch: str, n: int) -> None:
        self._q("count_inserted")

    def crowded_counts(self, *, over: int, n: int) -> list[str]:
        self._q("crowded_counts")
        return []  # no shards here

    def fold_counts(self, *, ids: list[str]) -> int:
        self._q("fold_counts")
        return 0

    def rows_partitions(self) -> list[RowsPartition]:
        self._q("rows_partitions")
        return []  # one table here: every partition exists, none is ever dropped

    def default_rows(self) -> int:
        self._q("default_rows")
        return 0

    def create_rows_partition(self, *, part: str, lo: str, hi: str, ms: int = LOCK_TIMEOUT_MS) -> bool:
        self._q("create_rows_partition")
        return False

    def detach_rows_partition(self, *, part: str, before: datetime, app: str | None,
                              ms: int = LOCK_TIMEOUT_MS) -> int:
        self._q("detach_rows_partition")
        return -1

    def discard_rows_partition(self, *, part: str, fk: bool, ms: int = LOCK_TIMEOUT_MS) -> bool:
        self._q("discard_rows_partition")
        return False

    def detached_rows_partitions(self) -> list[str]:
        self._q("detached_rows_partitions")
        return []

    def _batch_rows(self, id: str) -> list[tuple[Any, ...]]:
        return [(r.line, r.status, _load(r.res), _load(r.messages)) for r in self._rows(id)]

    def batch_rows(self, *, id: str) -> list[RowResult]:
        self._q("batch_rows")
        return [RowResult.from_row(r) for r in self._batch_rows(id)]

    def stream_batch_rows(self, *, id: str, itersize: int = 5000) -> Generator[BatchOutput, None, None]:
        self._q("stream_batch_rows")
        for r in self._batch_rows(id):
            if not self._open:
                raise RuntimeError("stream_batch_rows: read after its transaction ended")
            yield batch_output(r)

    def stream_batch_blobrows(self, *, id: str, itersize: int = 5000) -> Generator[dict[str, str], None, None]:
        self._q("stream_batch_blobrows")
        for r in self._rows(id):
            if r.blobrows is not None:
                if not self._open:
                    raise RuntimeError("stream_batch_blobrows: read after its transaction ended")
                yield _load(r.blobrows)

    def slowquery_row(self, *, id: str) -> SlowQueryRow | None:
        self._q("slowquery_row")
        r = self._s.rows.get(id, {}).get(0)
        return None if r is None else SlowQueryRow.from_row((r.status, _load(r.res), _load(r.messages),
                                                             _load(r.blobrows)))

    # ------------------------------------------------------------------ ending a batch
    def abort_rows(self, *, id: str) -> int:
        self._q("abort_rows")
        n = 0
        for r in self._rows(id):
            if r.status in OPEN:
                self._set(r, status="aborted", doneat=self._now)  # doneby is kept (write_results_late)
                n += 1
        return n

    def finish_batch(self, *, id: str, status: BatchStatus, nsuccess: int, nfailed: int, naborted: int,
                     outputfiles: str, error: str | None) -> int:
        self._q("finish_batch")
        b = self._batch(id)
        assert b is not None, f"no batch {id}"
        value = _status(str(status))
        self._set(b, status=value, doneat=self._now, nsuccess=nsuccess, nfailed=nfailed, naborted=naborted,
                  outputfiles=_jsonb(outputfiles), ver=b.ver + 1,
                  notifiedat=self._now if value == "aborted" and error is None else None, error=error)
        return b.ver

    def summary_failed(self, *, id: str, error: str) -> SummaryFailures | None:
        self._q("summary_failed")
        b = self._batch(id)
        if b is None or not b.open:
            return None
        same = b.sumerror == error  # IS NOT DISTINCT FROM
        self._set(b, sumfails=b.sumfails + 1 if same else 1, sumsince=b.sumsince if same else self._now,
                  sumerror=error)
        seconds = None if b.sumsince is None else (self._now - b.sumsince).total_seconds()
        return SummaryFailures.from_row((b.sumfails, seconds))

    def claim_notify(self, *, id: str) -> bool:
        self._q("claim_notify")
        b = self._batch(id)
        if b is None or b.notifiedat is not None:
            return False
        self._set(b, notifiedat=self._now)
        return True

    def unnotified_batches(self, *, app: str, op: str) -> list[str]:
        self._q("unnotified_batches")
        return [b.id for b in self._s.batches.values()
                if b.app == app and b.op == op and b.notifiedat is None
                and b.status in ("success", "failed", "aborted")]

    def unsummarised_batches(self) -> list[str]:
        self._q("unsummarised_batches")
        return [b.id for b in self._s.batches.values()
                if b.open and not any(r.status in OPEN for r in self._s.rows.get(b.id, {}).values())]

    # ------------------------------------------------------------------ claims
    def _open_batches(self) -> list[_Batch]:
        """Open batches, ORDER BY reqat (ties in insertion order)."""
        return sorted((b for b in self._s.batches.values() if b.open), key=lambda b: (b.reqat, b.seq))

    def open_batches(self, *, app: str, op: str, type: str, only: str | None) -> list[OpenBatch]:
        self._q("open_batches")
        found = [b for b in self._open_batches()
                 if b.app == app and b.op == op and b.type == type and (only is None or b.id == only)
                 and b.startable(self._now)
                 and any(r.claimable(self._now) for r in self._s.rows.get(b.id, {}).values())]
        # The 100 first by priority then age, and the 10 oldest whatever their priority (as the SQL lists them).
        listed = {b.id: b for b in sorted(found, key=lambda b: -b.priority)[:100] + found[:10]}
        ordered = sorted(listed.values(), key=lambda b: (-b.priority, b.reqat, b.seq))
        return [OpenBatch.from_row((b.id, b.status, b.ver, b.priority)) for b in ordered]

    def batch_context(self, *, id: str) -> dict[str, Any] | None:
        self._q("batch_context")
        b = self._s.batches.get(id)
        return None if b is None else _load(b.context)  # type: ignore[no-any-return]

    def open_batches_all(self) -> list[BatchRef]:
        self._q("open_batches_all")
        return [BatchRef.from_row((b.id, b.app, b.op)) for b in self._open_batches()
                if b.startable(self._now)][:1000]

    def stalled_batches(self, *, sec: float) -> list[str]:
        self._q("stalled_batches")
        out = []
        for b in self._s.batches.values():
            rows = self._s.rows.get(b.id, {}).values()
            if (b.open and b.startable(self._now) and any(r.claimable(self._now) for r in rows)
                    and not any(r.status == "inprog" and self._live(r.doneby, sec) for r in rows)):
                out.append(b.id)
        return out

    def _take(self, rows: list[_Row], worker: str) -> list[ClaimedRow]:
        out = []
        for r in rows:
            self._set(r, status="inprog", doneby=worker, attempts=r.attempts + 1)
            out.append(ClaimedRow.from_row((r.line, r.input, r.attempts)))
        return out

    def claim_rows(self, *, batch: str, n: int, worker: str, after: int) -> list[ClaimedRow]:
        self._q("claim_rows")
        if n < 0:
            raise InvalidInput("refused by the database: LIMIT must not be negative")
        picked = [r for r in self._rows(batch) if r.line >= after and not r.suspect and r.claimable(self._now)]
        return self._take(picked[:n], worker)

    def claim_suspect(self, *, batch: str, worker: str) -> list[ClaimedRow]:
        self._q("claim_suspect")
        picked = [r for r in self._rows(batch) if r.suspect and r.claimable(self._now)]
        return self._take(picked[:1], worker)

    def app_rows_in_progress(self, *, app: str, worker: str, sec: float) -> AppLoad:
        self._q("app_rows_in_progress")  # the app's advisory lock: this store's lock, held already
        held = [r for b in self._s.batches.values() if b.app == app and b.open
                for r in self._s.rows.get(b.id, {}).values() if r.status == "inprog"]
        live = sum(1 for w in self._s.workers.values() if w.lastseen > self._ago(sec))
        return AppLoad.from_row((len(held), sum(1 for r in held if r.doneby == worker), live))

    def batch_to_inprog(self, *, batch: str) -> tuple[int, int] | None:
        self._q("batch_to_inprog")
        b = self._batch(batch)
        if b is None or b.status != "queued":
            return None
        self._set(b, status="inprog", ver=b.ver + 1)
        return b.ver, b.nrows

    def claimable_batch_types(self) -> list[BatchKind]:
        self._q("claimable_batch_types")
        kinds = {(b.app, b.op, b.type) for b in self._s.batches.values()
                 if b.open and b.startable(self._now)
                 and any(r.claimable(self._now) for r in self._s.rows.get(b.id, {}).values())}
        return [BatchKind.from_row(k) for k in sorted(kinds)]

    def open_work_exists(self, *, types: list[str]) -> bool:
        self._q("open_work_exists")
        wanted = set(types)
        return any(b.open and f"{b.app}/{b.op}/{b.type}" in wanted for b in self._s.batches.values())

    def next_claimable_in(self, *, id: str) -> float | None:
        self._q("next_claimable_in")
        b = self._batch(id)
        times = [r.notbefore or self._now for r in self._s.rows.get(id, {}).values() if r.status == "queued"]
        if not times or b is None or b.paused:
            return None
        return (max(min(times), b.notbefore or min(times)) - self._now).total_seconds()

    # ------------------------------------------------------------------ batch control
    def set_schedule(self, *, id: str, notbefore: datetime | None, deadline: datetime | None) -> None:
        self._q("set_schedule")
        b = self._batch(id)
        if b is not None:
            self._set(b, notbefore=notbefore, deadline=deadline)

    def set_paused(self, *, id: str, paused: bool) -> int:
        self._q("set_paused")
        b = self._batch(id)
        assert b is not None, f"no batch {id}"
        self._set(b, paused=paused, ver=b.ver + 1)
        return b.ver

    def due_deadlines(self) -> list[str]:
        self._q("due_deadlines")
        due = [b for b in self._s.batches.values()
               if b.deadline is not None and b.status in ("wait", *OPEN) and b.deadline <= self._now]
        return [b.id for b in sorted(due, key=lambda b: b.deadline or self._now)[:100]]

    def started_types(self, *, sec: float) -> list[tuple[str, str]]:
        self._q("started_types")
        since = self._now - timedelta(seconds=sec)
        return sorted({(b.app, b.op) for b in self._s.batches.values()
                       if b.notbefore is not None and b.status in ("wait", *OPEN) and not b.paused
                       and since < b.notbefore <= self._now})

    # ------------------------------------------------------------------ write-backs
    def write_results(self, *, batch: str, worker: str, lines: list[int], attempts: list[int],
                      statuses: list[str], res: list[str | None], messages: list[str | None],
                      blobrows: list[str | None], delays: list[float], finished: list[float]) -> WriteResult:
        self._q("write_results")
        rows = self._s.rows.get(batch, {})
        written: set[int] = set()
        for line, attempt, status, r_res, r_msgs, r_blobs, delay in zip(lines, attempts, statuses, res, messages,
                                                                        blobrows, delays, strict=True):
            r = rows.get(line)
            if (r is None or line in written or r.status != "inprog" or r.doneby != worker
                    or r.attempts != attempt):
                continue
            queued = _status(status) == "queued"
            self._set(r, status=_status(status), res=_jsonb(r_res), messages=_jsonb(r_msgs),
                      blobrows=_jsonb(r_blobs), doneat=None if queued else self._now,
                      doneby=None if queued else r.doneby,
                      notbefore=self._now + timedelta(seconds=delay) if queued else None)
            written.add(line)
        b = self._batch(batch)
        return WriteResult.from_row((None if b is None else b.status, len(written), 0, None))

    def write_results_late(self, *, batch: str, worker: str, lines: list[int], attempts: list[int],
                           statuses: list[str], res: list[str | None], messages: list[str | None],
                           blobrows: list[str | None], delays: list[float],
                           finished: list[float]) -> tuple[int, int | None]:
        self._q("write_results_late")
        b = self._batch(batch)
        if b is None or b.status != "aborted" or b.error is not None:  # (ended by its deadline: no late results)
            return 0, None
        rows = self._s.rows.get(batch, {})
        late: dict[int, str] = {}
        for line, attempt, status, r_res, r_msgs, r_blobs, done in zip(lines, attempts, statuses, res, messages,
                                                                       blobrows, finished, strict=True):
            r = rows.get(line)
            if (r is None or line in late or r.status != "aborted" or r.doneby != worker or r.attempts != attempt
                    or status == "queued" or b.doneat is None
                    or datetime.fromtimestamp(done, UTC) > b.doneat):
                continue
            self._set(r, status=_status(status), res=_jsonb(r_res), messages=_jsonb(r_msgs), blobrows=_jsonb(r_blobs),
                      doneat=self._now)
            late[line] = status
        if not late:
            return 0, None
        new = list(late.values())
        self._set(b, nsuccess=b.nsuccess + new.count("success"), nfailed=b.nfailed + new.count("failed"),
                  naborted=b.naborted - len(new), ver=b.ver + 1)
        return len(new), b.ver

    def release_rows(self, *, batch: str, lines: list[int], attempts: list[int], worker: str) -> int:
        self._q("release_rows")
        rows = self._s.rows.get(batch, {})
        n = 0
        for line, attempt in zip(lines, attempts, strict=True):
            r = rows.get(line)
            if r is not None and r.status == "inprog" and r.doneby == worker and r.attempts == attempt:
                self._set(r, status="queued", doneby=None, attempts=r.attempts - 1)
                n += 1
        return n

    def has_open_rows(self, *, id: str) -> bool:
        self._q("has_open_rows")
        return any(r.status in OPEN for r in self._s.rows.get(id, {}).values())

    def queued_after(self, *, id: str, after: int) -> bool:
        self._q("queued_after")
        return any(r.status == "queued" and r.line > after for r in self._s.rows.get(id, {}).values())

    # ------------------------------------------------------------------ workers and recovery
    def heartbeat(self, *, id: str, host: str, pid: int) -> None:
        self._q("heartbeat")
        w = self._s.workers.get(id)
        if w is not None:
            self._set(w, lastseen=self._now)  # ON CONFLICT: only lastseen moves
            return
        self._s.workers[id] = _Worker(id, host, pid, self._now, self._now)
        self._journal.undo.append(lambda: self._s.workers.pop(id, None))

    def server_started(self) -> datetime:
        self._q("server_started")
        return self._store.started

    def forget_worker(self, *, id: str) -> None:
        self._q("forget_worker")
        self._drop_worker(id)

    def _drop_worker(self, id: str) -> None:
        w = self._s.workers.pop(id, None)
        if w is not None:
            self._journal.undo.append(lambda: self._s.workers.__setitem__(id, w))

    def recover_rows(self, *, sec: float, max_attempts: int, fail_messages: str) -> list[RecoveredRow]:
        self._q("recover_rows")
        out = []
        for b in list(self._s.rows):
            for r in self._rows(b):
                if r.status != "inprog" or self._live(r.doneby, sec):
                    continue
                dead = r.doneby
                if r.suspect and r.attempts >= max_attempts:  # it is what kills workers: it fails
                    self._set(r, status="failed", doneat=self._now, messages=_jsonb(fail_messages))
                else:  # back to the queue, its attempt given back unless it was run alone
                    self._set(r, status="queued", doneby=None, doneat=None,
                              attempts=r.attempts if r.suspect else max(r.attempts - 1, 0))
                self._set(r, suspect=True)
                out.append(RecoveredRow.from_row((r.batch, r.line, r.status, dead)))
        return out

    def forget_dead_workers(self, *, sec: float) -> int:
        self._q("forget_dead_workers")
        dead = [w.id for w in self._s.workers.values() if w.lastseen < self._ago(sec * 10)]
        for id in dead:
            self._drop_worker(id)
        return len(dead)

    def take_leases(self, *, holder: str, duties: list[str], sec: float) -> set[str]:
        self._q("take_leases")
        now, leases = self._now, self._s.leases
        taken = set()
        for duty in duties:
            old = leases.get(duty)
            if old is None or old[0] == holder or old[1] < now:
                leases[duty] = (holder, now + timedelta(seconds=sec))
                self._journal.undo.append(lambda d=duty, o=old: leases.__setitem__(d, o) if o else leases.pop(d, None))
                taken.add(duty)
        return taken

    def drop_leases(self, *, holder: str) -> int:
        self._q("drop_leases")
        mine = {d: v for d, v in self._s.leases.items() if v[0] == holder}
        for d in mine:
            del self._s.leases[d]
        self._journal.undo.append(lambda: self._s.leases.update(mine))
        return len(mine)

    # ------------------------------------------------------------------ wake-ups (sent at commit)
    def _notify(self, payload: str) -> None:
        self._q("notify_work")
        self._journal.notes.append(payload)

    # ------------------------------------------------------------------ file intake
    def lock_file(self, *, url: str) -> None:
        self._q("lock_file")  # transactions are serialised: the lock is held already

    def try_lock_file(self, *, url: str) -> bool:
        self._q("try_lock_file")
        return True

    def get_file(self, *, url: str, size: int, version: str) -> FileRecord | None:
        self._q("get_file")
        f = next((f for f in self._s.files.values() if (f.url, f.size, f.version) == (url, size, version)), None)
        return None if f is None else f.record()

    def files_at(self, *, urls: list[str]) -> list[FileRecord]:
        self._q("files_at")
        wanted = set(urls)
        return [f.record() for f in self._s.files.values() if f.url in wanted]

    def insert_file(self, *, id: str, url: str, size: int, version: str, filetype: str, status: str,
                    batch: str | None, nrows: int, error: str | None, dest: str | None) -> FileRecord:
        self._q("insert_file")
        if id in self._s.files or any((f.url, f.size, f.version) == (url, size, version)
                                      for f in self._s.files.values()):
            raise InvalidInput("refused by the database: duplicate key value violates constraint batch_files_file")
        if status not in ("submitted", "rejected"):
            raise InvalidInput("refused by the database: batch_files violates check constraint batch_files_status")
        f = self._s.files[id] = _File(id, url, size, version, filetype, status, batch, nrows, error, dest, None,
                                      self._now)
        self._journal.undo.append(lambda: self._s.files.pop(id, None))
        return f.record()

    def file_moved(self, *, id: str, dest: str) -> FileRecord | None:
        self._q("file_moved")
        f = self._s.files.get(id)
        if f is None:
            return None
        self._set(f, dest=dest, movedat=f.movedat or self._now)
        return f.record()

    def list_files(self, *, age_days: int) -> list[FileRecord]:
        self._q("list_files")
        since = self._now - timedelta(days=age_days)
        return [f.record() for f in sorted(self._s.files.values(), key=lambda f: f.reqat, reverse=True)
                if f.reqat >= since]

    # ------------------------------------------------------------------ retention
    def _purgeable(self, id: str, before: datetime) -> _Batch | None:
        b = self._batch(id)
        return b if b is not None and b.status in FINAL and b.doneat is not None and b.doneat < before else None

    def purgeable_batches(self, *, before: datetime, app: str | None, after_at: datetime, after_id: str,
                          n: int) -> list[PurgeCandidate]:
        self._q("purgeable_batches")
        found = sorted((b for b in self._s.batches.values()
                        if self._purgeable(b.id, before) and (app is None or b.app == app)
                        and (b.doneat, uuid.UUID(b.id)) > (after_at, uuid.UUID(after_id))),
                       key=lambda b: (b.doneat, uuid.UUID(b.id)))
        return [PurgeCandidate.from_row((b.id, b.app, b.op, b.nrows, _load(b.outputfiles), b.doneat))
                for b in found[:n]]

    def _drop_rows(self, batch: str, lines: list[int]) -> None:
        rows = self._s.rows.get(batch, {})
        gone = {line: rows.pop(line) for line in lines}
        self._journal.undo.append(lambda: rows.update(gone))

    def purge_rows(self, *, id: str, before: datetime, after: int, n: int) -> tuple[int, int]:
        self._q("purge_rows")
        if self._purgeable(id, before) is None:
            return 0, after
        lines = [r.line for r in self._rows(id) if r.line > after][:n]
        self._drop_rows(id, lines)
        return len(lines), max(lines, default=after)

    def purge_batches(self, *, ids: list[str], before: datetime) -> Purged:
        self._q("purge_batches")
        gone = [i for i in dict.fromkeys(ids) if self._purgeable(i, before) is not None]
        nrows = nrecords = 0
        for i in gone:
            nrows += len(self._s.rows.get(i, {}))
            self._drop_rows(i, list(self._s.rows.get(i, {})))
            b = self._s.batches.pop(i)
            self._journal.undo.append(lambda b=b: self._s.batches.__setitem__(b.id, b))
            for f in [f for f in self._s.files.values() if f.batch == i]:
                nrecords += 1
                del self._s.files[f.id]
                self._journal.undo.append(lambda f=f: self._s.files.__setitem__(f.id, f))
        return Purged(gone, nrows, nrecords)

    def purge_rejected_files(self, *, before: datetime, n: int) -> int:
        self._q("purge_rejected_files")
        old = sorted((f for f in self._s.files.values() if f.status == "rejected" and f.reqat < before),
                     key=lambda f: f.reqat)[:n]
        for f in old:
            del self._s.files[f.id]
            self._journal.undo.append(lambda f=f: self._s.files.__setitem__(f.id, f))
        return len(old)

    # ------------------------------------------------------------------ metrics
    def queue_depths(self) -> list[tuple[str, str, str, int, int, float | None]]:
        self._q("queue_depths")
        out: dict[tuple[str, str, str], list[Any]] = {}
        for b in self._open_batches():
            acc = out.setdefault((b.app, b.op, b.type), [0, 0, None])
            for r in self._s.rows.get(b.id, {}).values():
                if r.status == "queued":
                    acc[0] += 1
                    acc[2] = r.reqat if acc[2] is None else min(acc[2], r.reqat)
                elif r.status == "inprog":
                    acc[1] += 1
        return [(*k, q, i, None if old is None else (self._now - old).total_seconds())
                for k, (q, i, old) in sorted(out.items())]

    def live_workers(self, *, sec: float) -> int:
        self._q("live_workers")
        return sum(self._live(w, sec) for w in self._s.workers)

    # ------------------------------------------------------------------ batch control
    def set_failure_limit(self, *, id: str, max_failures: int | None, ratio: float | None) -> None:
        self._q("set_failure_limit")
        b = self._batch(id)
        if b is not None:
            self._set(b, max_failures=max_failures, max_failure_ratio=None if ratio is None else Decimal(repr(ratio)))

    def batch_has_failure_limit(self, *, id: str) -> bool:
        self._q("batch_has_failure_limit")
        b = self._batch(id)
        return b is not None and (b.max_failures is not None or b.max_failure_ratio is not None)

    def failure_limit(self, *, id: str) -> FailureLimit | None:
        self._q("failure_limit")
        b = self._batch(id)
        if b is None or not b.open or (b.max_failures is None and b.max_failure_ratio is None):
            return None
        lim = b.max_failures if b.max_failures is not None else int(b.max_failure_ratio * b.nrows)  # type: ignore[operator]
        failed = sum(1 for r in self._rows(id) if r.status == "failed")
        return FailureLimit.from_row((b.nrows, lim, min(failed, lim + 1)))

    def reopen_batch(self, *, id: str) -> BatchRecord | None:
        self._q("reopen_batch")
        b = self._batch(id)
        if b is None or b.status != "failed" or b.type != "B":
            return None
        self._set(b, status="queued", round=b.round + 1, doneat=None, notifiedat=None, error=None, outputfiles="{}",
                  sumfails=0, sumerror=None, sumsince=None, ver=b.ver + 1)
        return b.record()

    def requeue_rows(self, *, batch: str, status: str) -> int:
        self._q("requeue_rows")
        value = _status(status)
        n = 0
        for r in self._rows(batch):
            if r.status == value:
                self._set(r, status="queued", attempts=0, res=None, messages=None, blobrows=None, doneat=None,
                          doneby=None, notbefore=None, suspect=False)
                n += 1
        return n

    def _of_status(self, id: str, status: str | None) -> list[_Row]:
        return [r for r in self._rows(id) if status is None or r.status == _status(status)]

    def stream_batch_rows_of_status(self, *, id: str, status: str | None,
                                    itersize: int = 5000) -> Generator[BatchOutput, None, None]:
        self._q("stream_batch_rows_of_status")
        for r in self._of_status(id, status):
            yield batch_output((r.line, r.status, _load(r.res), _load(r.messages)))

    def stream_batch_inputs(self, *, id: str, status: str | None,
                            itersize: int = 5000) -> Generator[tuple[int, dict[str, Any]], None, None]:
        self._q("stream_batch_inputs")
        for r in self._of_status(id, status):
            yield r.line, _load(r.input)

    def batch_input_keys(self, *, id: str, status: str | None) -> list[str]:
        self._q("batch_input_keys")
        first: dict[str, int] = {}
        for r in self._of_status(id, status):
            for k in _load(r.input):
                first.setdefault(k, r.line)
        return sorted(first, key=lambda k: (first[k], k))

    # ------------------------------------------------------------------ transaction
    @contextmanager
    def savepoint(self) -> Iterator[None]:
        parent, self._journal = self._journal, _Journal()
        try:
            yield
        except BaseException:
            self._journal.rollback()
            raise
        else:
            self._journal.merge_into(parent)
        finally:
            self._journal = parent


_COPY_ESCAPES = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}


def _copy_unescape(text: bytes) -> bytes:
    """A field of COPY's text format as stored: backslash escapes undone."""
    return re.sub(rb"\\(.)", lambda m: _COPY_ESCAPES.get(m.group(1), m.group(1)), text)

