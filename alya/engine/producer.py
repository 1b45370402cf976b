"""The producer: which rows this process claims next, and the gate in front of the claim.

- **Claim sizing.** A claim is about ``CLAIM_TARGET_SEC`` of work at the measured row rate (capped by
  ``ALYA_BATCHCHUNK_NROWS``), taken while earlier claims still run, so the slots never starve and no worker
  hoards rows.
- **The gate.** An app whose ``init()`` fails is not claimed for (its rows stay queued, untouched) until its
  retry delay passes; ``ALYA_APP_LIMITS`` caps an app's rows in progress over all workers, a fair share
  each; a *suspect* row (held by a worker that died) is claimed only while this process holds and claims
  nothing else, and nothing else is claimed while it runs: a death while holding it is then its own.
- **The claim.** One statement per batch tried (FOR UPDATE SKIP LOCKED over the partial index of queued
  rows), starting after the last line this process claimed of the batch.

Lock order everywhere: the batch row before its rows (claim of a queued batch, write-back, release, abort,
summary), so that no two of them can deadlock.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

from alya.batch.services import Services
from alya.core.errors import describe
from alya.core.logs import status_change
from alya.core.models import BatchStatus
from alya.core.records import OpenBatch
from alya.core.registry import Registration
from alya.engine.claim import Claimed
from alya.engine.executor import Executor
from alya.engine.identity import Identity
from alya.engine.rowpool import RESERVED_TURN

CLAIM_TARGET_SEC = 0.5  # work per claim at the measured rate: short enough that no worker hoards rows
INIT_RETRY_SEC = 1.0  # first delay after an app's init() failed; doubles per failure
INIT_RETRY_MAX_SEC = 30.0
HINTS_KEPT = 1000  # batches whose last claimed line is remembered
MAX_CONTEXTS = 1000  # batch contexts kept in a worker process (at most ALYA_MAX_CONTEXT_BYTES each)
PAUSE_RACE_SEC = 5.0  # after a pause notice, a claim of the batch registering this soon raced the pause


class Producer:
    """Claims for every claim loop of the process. One lock (with its condition) guards the claims in
    flight, the suspect gate, the per-batch scan hints and the apps whose init() is failing."""

    def __init__(self, services: Services, identity: Identity, executor: Executor) -> None:
        self.svc = services
        self.identity = identity
        self.executor = executor
        self._lock = threading.Lock()
        self._turn = threading.Condition(self._lock)
        self._claims: dict[str, set[Claimed]] = {}  # batch -> claims in flight here (abort notices, suspects)
        self._claiming = 0  # claim statements under way in this process
        self._alone_claiming = False  # one of them may take a suspect: the others wait
        self._suspect_active = False
        self._hint: dict[str, int] = {}  # batch -> last line claimed here: where the next scan starts
        self._turn_of: dict[tuple[str, str, int], str] = {}  # (type, priority) -> batch of its last claim
        self._turns: dict[tuple[str, str], int] = {}  # type -> claims made while several priorities waited
        self._init_failures: dict[str, tuple[int, float]] = {}  # app -> (failures in a row, retry at)
        self._contexts: dict[str, dict[str, Any]] = {}  # batch -> its context (immutable), read once here
        self._contexts_lock = threading.Lock()
        self._paused: dict[str, float] = {}  # batch -> until when a claim of it registering here is cancelled
        self._full: dict[tuple[str, str], bool] = {}  # type -> whether its last claim got all it asked for

    # ------------------------------------------------------------------ sizing
    def wants_rows(self, app: str, op: str) -> bool:
        """Whether to claim more of (app, op) now: when fewer of its rows wait unstarted than the slots will
        run through before the next claim could be ready (so they never starve). Counted per type: another
        type's backlog must not keep this one from claiming (the pool takes their rows in turn)."""
        return self.executor.backlog(app, op) < max(2 * self.executor.concurrency, self.claim_size(app, op) // 2)

    def claim_size(self, app: str, op: str) -> int:
        """About CLAIM_TARGET_SEC of work for this process's slots at the measured row rate, shared by the
        claim loops running at once (``ALYA_WORKER_THREADS``)."""
        cfg = self.svc.config
        stats = self.executor.row_stats(app, op)
        if stats is None or stats.row_sec <= 0:
            return min(cfg.batchchunk_nrows, 2 * cfg.concurrency)
        rate = cfg.concurrency / stats.row_sec
        n = math.ceil(CLAIM_TARGET_SEC * rate / max(1, cfg.worker_threads))
        return max(1, min(cfg.batchchunk_nrows, max(cfg.concurrency, n)))

    def was_full(self, app: str, op: str) -> bool:
        """Whether the type's last claim here got all the rows it asked for (work was likely left); True
        before its first: a run started for work it has not seen yet starts at full width."""
        return self._full.get((app, op), True)

    # ------------------------------------------------------------------ init blocks
    def init_retry_in(self, app: str) -> float:
        """Seconds until the app's failed init() is tried again (0: not waiting)."""
        failures, retry_at = self._init_failures.get(app, (0, 0.0))
        return max(0.0, retry_at - time.monotonic()) if failures else 0.0

    def waiting_apps(self) -> set[str]:
        """Apps whose init() failed and whose retry delay has not passed."""
        now = time.monotonic()
        return {app for app, (n, at) in list(self._init_failures.items()) if n and now < at}

    def _initblock(self, app: str) -> tuple[bool, Any]:
        """The app's init block, or (False, None) while init() fails (and during its retry delay)."""
        failures, retry_at = self._init_failures.get(app, (0, 0.0))
        if failures and time.monotonic() < retry_at:
            return False, None
        try:
            block = self.svc.initblocks.get(app)
        except Exception as exc:
            failures += 1
            delay = min(INIT_RETRY_MAX_SEC, INIT_RETRY_SEC * 2 ** (failures - 1))
            with self._lock:
                self._init_failures[app] = (failures, time.monotonic() + delay)
            self.identity.log.error("init_failed", app=app, error=describe(exc), failures=failures,
                                    retry_in=delay)
            return False, None
        with self._lock:
            self._init_failures.pop(app, None)
        return True, block

    # ------------------------------------------------------------------ claims in flight
    def claims_of(self, batch: str) -> list[Claimed]:
        with self._lock:
            return list(self._claims.get(batch, ()))

    def pause_noticed(self, batch: str, paused: bool) -> list[Claimed]:
        """A pause (or resume) notice of ``batch``: its claims held here. After a pause, a claim of the batch
        that registers within PAUSE_RACE_SEC is cancelled at once: its statement read the batch before the
        pause committed (a later one cannot see it), and the notice may have come before it registered."""
        with self._lock:
            if paused:
                now = time.monotonic()
                if len(self._paused) >= HINTS_KEPT:  # notices of batches never claimed again
                    self._paused = {b: t for b, t in self._paused.items() if t > now}
                self._paused[batch] = now + PAUSE_RACE_SEC
            else:
                self._paused.pop(batch, None)
            return list(self._claims.get(batch, ()))

    def forget(self, c: Claimed) -> None:
        """The claim ended (or was abandoned): it no longer counts as held here."""
        with self._turn:
            claims = self._claims.get(c.batch)
            if claims is not None:
                claims.discard(c)
                if not claims:
                    del self._claims[c.batch]
            if c.suspect:
                self._suspect_active = False
            self._turn.notify_all()

    # ------------------------------------------------------------------ claiming
    def claim(self, reg: Registration, only: str | None, size: int | None, log: Any) -> Claimed | None:
        """A claim of (app, op) rows (of batch ``only`` if given) with its init block; None when there is
        nothing to claim, the gate is shut, or the app's init() is failing."""
        ok, initblock = self._initblock(reg.app)
        if not ok:
            return None
        claimed = self.take(reg.app, reg.op, reg.type, only, size or self.claim_size(reg.app, reg.op), defer=True)
        self._full[(reg.app, reg.op)] = claimed is not None and claimed.full
        if claimed is None:
            return None
        claimed.processor, claimed.initblock, claimed.log = reg.processor, initblock, log
        if claimed.suspect:
            log.warning("suspect_row_alone", batch=claimed.batch, line=claimed.rows[0].line,
                        attempt=claimed.rows[0].attempts, note="its worker died holding it; run with nothing else")
        return claimed

    def take(self, app: str, op: str, type_: str, only: str | None, n: int | None = None,
             defer: bool = False) -> Claimed | None:
        """One claim of up to ``n`` rows (default ``ALYA_BATCHCHUNK_NROWS``) through the suspect gate: a
        claim that starts while this process holds and claims nothing else may take a suspect (the others
        wait for it, a few ms); while a suspect runs, nothing else is claimed. ``defer``: a batch the claim
        moved to ``inprog`` is announced (:meth:`announce`) by the caller, once the rows run (the claim loop)."""
        n = n or self.svc.config.batchchunk_nrows
        with self._turn:
            self._turn.wait_for(lambda: not self._alone_claiming, timeout=5.0)
            if self._suspect_active or self._alone_claiming:
                return None  # a suspect runs alone in this process
            alone = not self._claims and self._claiming == 0
            self._alone_claiming = alone
            self._claiming += 1
        claimed = None
        try:
            claimed = self._claim(app, op, type_, only, n, alone=alone, defer=defer)
        finally:
            with self._turn:
                self._claiming -= 1
                if alone:
                    self._alone_claiming = False
                if claimed is not None:
                    self._claims.setdefault(claimed.batch, set()).add(claimed)
                    if self._paused and self._paused_now(claimed.batch):
                        claimed.cancelled = True  # it raced a pause: its rows are given back unstarted
                    self._suspect_active = claimed.suspect
                self._turn.notify_all()
        return claimed

    def _paused_now(self, batch: str) -> bool:
        """(Under the lock.) Whether a pause notice of the batch came less than PAUSE_RACE_SEC ago."""
        until = self._paused.get(batch)
        if until is not None and time.monotonic() >= until:
            del self._paused[batch]
            until = None
        return until is not None

    def _claim(self, app: str, op: str, type_: str, only: str | None, n: int, alone: bool,
               defer: bool) -> Claimed | None:
        worker = self.identity.worker_id
        moved: list[tuple[str, int, int]] = []
        claimed = None
        limit = self.svc.config.app_limits.get(app)
        t0 = time.perf_counter()
        with self.svc.store.tx() as tx:
            if limit is not None:  # ALYA_APP_LIMITS: never more of the app's rows in progress, all workers together
                total, mine, live = tx.app_rows_in_progress(app=app, worker=worker,
                                                            sec=self.svc.config.recovery_sec).as_tuple()
                fair = -(-limit // max(1, live))  # a fair share each, so that every live worker gets some
                n = min(n, limit - total, fair - mine)
                if n <= 0:
                    return None
            for ob in self._in_turn((app, op), tx.open_batches(app=app, op=op, type=type_, only=only)):
                batch, ver = ob.id, ob.ver
                if ob.status is BatchStatus.QUEUED and (bumped := tx.batch_to_inprog(batch=batch)) is not None:
                    # The batch row is locked before its rows, the order abort takes them in: rows first
                    # would deadlock with an abort arriving during the claim (and fail one of the two).
                    ver = bumped[0]
                    moved.append((batch, ver, bumped[1]))
                if alone:
                    suspect = tx.claim_suspect(batch=batch, worker=worker)
                    if suspect:
                        claimed = Claimed(batch, app, op, type_, self._context(tx, batch), suspect, worker, ver,
                                          priority=ob.priority, suspect=True)
                        self._remember(batch, 0, (app, op, ob.priority))
                        break
                after = self._hint.get(batch, 0)
                rows = tx.claim_rows(batch=batch, n=n, worker=worker, after=after)
                if len(rows) < n and after > 0:  # rows requeued behind the hint (faults, recovery)
                    rows += tx.claim_rows(batch=batch, n=n - len(rows), worker=worker, after=0)
                if rows:
                    self._remember(batch, max(r.line for r in rows), (app, op, ob.priority))
                    claimed = Claimed(batch, app, op, type_, self._context(tx, batch),
                                      sorted(rows, key=lambda r: r.line), worker, ver, priority=ob.priority,
                                      full=len(rows) >= n)
                    break
        self.svc.metrics.claimed(time.perf_counter() - t0)  # per claim statement, never per row
        if claimed is None or not defer:
            self.announce(app, op, type_, moved)
        else:  # announced by the claim loop once the rows are in the pool: a slow query starts first
            claimed.moved = moved
        return claimed

    def announce(self, app: str, op: str, type_: str, moved: list[tuple[str, int, int]]) -> None:
        """Batches a claim's UPDATE moved queued -> inprog: logged (and their events) once, their cached status
        invalidated (the claim won that UPDATE, so no other process does this for them)."""
        for batch, ver, nrows in moved:
            status_change(app, op, batch, "inprog", old="queued", nrows=nrows, type=type_)
            self.svc.statuses.invalidate(batch, ver)

    def forget_hints(self) -> None:
        """Start every batch's next scan from its first line (rows were requeued behind the hints)."""
        with self._lock:
            self._hint.clear()

    def _context(self, tx: Any, batch: str) -> dict[str, Any]:
        """A batch's context, read once per process and kept (it never changes after the submit): reading
        it with every claim made each claim carry it again (0.3 s per claim for a 40 MiB one, issue 18)."""
        ctx = self._contexts.get(batch)
        if ctx is None:
            ctx = tx.batch_context(id=batch) or {}
            with self._contexts_lock:
                while len(self._contexts) >= MAX_CONTEXTS:
                    self._contexts.pop(next(iter(self._contexts)))  # the oldest: batches end
                self._contexts[batch] = ctx
        return ctx

    def _in_turn(self, type_: tuple[str, str], batches: list[OpenBatch]) -> list[OpenBatch]:
        """The order to try the type's open batches in (they come highest priority first, then oldest):
        the highest priority first, its batches in turn, starting after the one that priority's last claim
        came from, so a 10-row batch submitted behind a big one is claimed at the next claim instead of when
        the big one runs out of rows. While several priorities wait, every ``RESERVED_TURN``-th claim tries
        a lower priority first (each lower one in turn, its batches in turn): higher-priority work slows
        lower-priority work down, never stops it (the row pool takes their rows by the same rule)."""
        if not batches:
            return batches
        levels = sorted({b.priority for b in batches}, reverse=True)
        first = levels[0]
        with self._lock:
            if len(levels) > 1:
                n = self._turns.get(type_, 0) + 1
                self._turns[type_] = n
                if n % RESERVED_TURN == 0:
                    first = levels[1 + (n // RESERVED_TURN - 1) % (len(levels) - 1)]
            last = self._turn_of.get((*type_, first))
        level = [b for b in batches if b.priority == first]
        return _rotated(level, last) + [b for b in batches if b.priority != first]

    def _remember(self, batch: str, line: int, level: tuple[str, str, int]) -> None:
        with self._lock:
            if len(self._hint) > HINTS_KEPT:
                self._hint.clear()
                self._turn_of.clear()
                self._turns.clear()
            if line:
                self._hint[batch] = line
            self._turn_of[level] = batch


def _rotated(batches: list[OpenBatch], last: str | None) -> list[OpenBatch]:
    """``batches`` starting after ``last`` (as they are when ``last`` is not among them)."""
    for i, b in enumerate(batches):
        if b.id == last:
            return batches[i + 1:] + batches[:i + 1]
    return batches
