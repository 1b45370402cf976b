"""Wake-ups instead of polls: one LISTEN connection per worker process (PostgreSQL LISTEN/NOTIFY on
``alya.core.names.WORK_CHANNEL``), and any number of threads waiting for "work was queued".

Every commit that makes rows claimable (submit, append, wait-off, a slow query, recovery) notifies the
channel; an idle worker loop or a lingering flow run wakes within milliseconds instead of at its next
poll. Polling stays the fallback: a missed or failed notification costs at most one poll interval.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from alya.core.errors import AlyaError
from alya.core.logs import get_logger
from alya.core.names import ABORT_PREFIX, ANY_WORK_PAYLOAD, PAUSE_PREFIX, RESUME_PREFIX, WORK_CHANNEL
from alya.db.store import Listener, Store

_NOTICES = (ABORT_PREFIX, PAUSE_PREFIX, RESUME_PREFIX)  # payloads about one batch, not work to claim


class Waker:
    def __init__(self, store: Store) -> None:
        self._listener = Listener(store, WORK_CHANNEL)
        self._mutex = threading.Lock()  # one lock under every condition below
        self._cond = threading.Condition(self._mutex)  # for wait(): any notification
        self._type_conds: dict[str, threading.Condition] = {}  # for wait_turn(): one per type
        self._generation = 0
        self._turns: dict[str, bool] = {}  # type (app/op) -> a notification no claim loop has taken yet
        self._nudges: dict[str, int] = {}  # type -> times its waiters were told to look again (nudge)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.on_abort: Callable[[str], None] | None = None  # called with the batch id of each abort
        self.on_pause: Callable[[str, bool], None] | None = None  # (batch id, paused) of each pause / resume

    def start(self) -> None:
        self._ensure_started()

    def _ensure_started(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._listen, name="alya-waker", daemon=True)
                self._thread.start()

    def _listen(self) -> None:
        failed_at = 0.0
        while not self._stop.is_set():
            try:
                payloads = self._listener.wait(0.5)
            except AlyaError as exc:
                if time.monotonic() - failed_at > 60:  # one line a minute, not one per retry
                    get_logger().warning("wakeups_unavailable", error=str(exc), note="polling instead")
                failed_at = time.monotonic()
                self._stop.wait(2.0)
                continue
            work = [p for p in payloads if not p.startswith(_NOTICES)]
            for p in payloads:
                try:
                    if p.startswith(ABORT_PREFIX) and self.on_abort is not None:
                        self.on_abort(p[len(ABORT_PREFIX):])
                    elif p.startswith((PAUSE_PREFIX, RESUME_PREFIX)) and self.on_pause is not None:
                        paused = p.startswith(PAUSE_PREFIX)
                        self.on_pause(p[len(PAUSE_PREFIX if paused else RESUME_PREFIX):], paused)
                except Exception as exc:  # never let a callback stop the wake-ups
                    get_logger().warning("notice_callback_failed", notice=p[:80], error=str(exc))
            if work:
                with self._mutex:
                    self._generation += 1
                    for p in work:
                        for key in (self._turns if p == ANY_WORK_PAYLOAD else (p,)):
                            self._turns[key] = True
                            cond = self._type_conds.get(key)
                            if cond is not None:
                                cond.notify()  # one loop of the type: it takes the turn
                    self._cond.notify_all()

    def generation(self) -> int:
        """Take this before looking for work; ``wait(since=...)`` then returns at once if a notification
        arrived in between (none is lost between the look and the wait)."""
        self._ensure_started()
        return self._generation

    def wait(self, timeout: float, since: int | None = None) -> bool:
        """Wait until work is notified (True) or ``timeout`` passes (False)."""
        self._ensure_started()
        with self._cond:
            start = self._generation if since is None else since
            return self._cond.wait_for(lambda: self._generation != start, timeout=max(0.0, timeout))

    def wait_turn(self, type_key: str, timeout: float) -> bool:
        """Wait until work of type ``type_key`` (``names.work_payload``) is notified, and take the turn it
        gives: one notification wakes *one* idle claim loop of the type, not all of them. With 16 claim loops
        per run (``ALYA_WORKER_THREADS``), waking all for each slow query made 16 claim statements race for
        one row: 79 ms per slow query on an idle worker instead of 12. The one woken claims every row there
        is (it goes on claiming while its type's backlog is short); the others join at their next poll or
        task. A notification that arrived while no loop waited is kept (one per type) for the next to wait,
        so none is lost between a loop's look for work and its wait.

        Each type has its own condition, notified for one waiter: with one condition for all, every
        notification woke every idle claim loop of the process (16 threads x 5 types, each taking the GIL to
        look and sleep again), which made a slow query on an idle worker slower the more threads it had."""
        self._ensure_started()
        with self._mutex:
            self._turns.setdefault(type_key, False)
            cond = self._type_conds.setdefault(type_key, threading.Condition(self._mutex))
            nudged = self._nudges.get(type_key, 0)
            cond.wait_for(lambda: self._turns.get(type_key, False) or self._nudges.get(type_key, 0) != nudged,
                          timeout=max(0.0, timeout))
            if not self._turns.get(type_key, False):
                return False
            self._turns[type_key] = False
            return True

    def nudge(self, type_key: str) -> None:
        """Every waiter of the type returns now (with the turn if there is one, else False): a loop whose
        reason to wait ended (a bridge whose flow run started) must not hold its place in the queue of
        waiters, or the next notification would wake it instead of a loop that claims."""
        with self._mutex:
            self._nudges[type_key] = self._nudges.get(type_key, 0) + 1
            cond = self._type_conds.get(type_key)
            if cond is not None:
                cond.notify_all()

    def give_back(self, type_key: str) -> None:
        """A turn taken by a loop that then could not claim (its time was up, it was told to stop): the
        next waiter of the type gets it, or the notification would be lost (a slow query then waited out
        its run's linger, 2 s)."""
        with self._mutex:
            self._turns[type_key] = True
            cond = self._type_conds.get(type_key)
            if cond is not None:
                cond.notify()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        self._listener.close()
