"""Rows before their flow run: a type's rows start on the worker's free slots at once, while Prefect is
still creating the type's flow run.

Creating a flow run costs 0.1-0.2 s on an idle worker that has run flows before, about 2 s for a process's
very first, and measured 2.4 s on a warm worker while a big batch kept the Prefect server busy with its task
runs and logs (``bench mixed``: the first batch of a new type waited 6 s). Prefect is the face of the work,
not its gate: when a worker starts a type's flow run, a *bridge* claim loop of that type starts with it, off
Prefect, and stops claiming as soon as the run's body starts (or the run failed to start); its claimed rows
run to the end. Until then it lingers for new work of its type: a process's first run of a type takes
seconds to start, and a batch submitted during those seconds (after the one that started the run) must not
wait for it either (measured: 2.3 s before its first row, with a bridge that ended when idle). What it
did (rows, batches summarised) is handed to the run at its next wave, so the run's
counts and per-batch artifacts include it. Its log lines go to the worker's log, not to a run's, because
no run exists yet when they are written.
"""

from __future__ import annotations

import threading
from typing import Any

from alya.core.errors import describe
from alya.core.logs import get_logger
from alya.core.names import work_payload
from alya.engine.claim import ChunkReport
from alya.engine.engine import Engine

BRIDGE_MAX_SEC = 60.0  # a run that takes longer than this to start: its rows wait for it after all
BRIDGE_LOOPS = 2  # claim loops of a bridge (at most ALYA_WORKER_THREADS)


class Bridges:
    """The bridge claim loops of one worker process, at most one per batch type at a time."""

    def __init__(self, engine: Engine, linger: bool = False) -> None:
        self.engine = engine
        self.linger = linger  # claim new work until the run attaches (not with a worker that stops when idle)
        self._lock = threading.Lock()
        self._stop: dict[tuple[str, str], threading.Event] = {}
        self._threads: dict[tuple[str, str], threading.Thread] = {}
        self._reports: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._serving: set[tuple[str, str]] = set()  # types whose run is starting or in its body
        self._active: set[tuple[str, str]] = set()  # types whose bridge thread has not decided to end

    def serving(self, app: str, op: str) -> bool:
        """Whether the type's run is being created or in its body. A run whose body returned may still be
        reporting its end to Prefect (about a second measured): new work starts a new run meanwhile."""
        with self._lock:
            return (app, op) in self._serving

    def busy(self) -> bool:
        """Whether any bridge still runs rows."""
        return any(t.is_alive() for t in list(self._threads.values()))

    def detached(self, app: str, op: str, token: threading.Event | None = None) -> None:
        """The type's run body returned (or its run, started with ``token``, failed): it serves no more.
        A token that is no longer the type's current one changes nothing (a newer run serves)."""
        with self._lock:
            if token is None or self._stop.get((app, op)) is token:
                self._serving.discard((app, op))

    def start(self, app: str, op: str) -> threading.Event:
        """The type's flow run is being started: run its rows meanwhile. Returns the run's token."""
        key = (app, op)
        with self._lock:
            self._serving.add(key)
            stop = self._stop[key] = threading.Event()
            if key in self._active:
                return stop  # the last one still runs its rows: it goes on with this token when they are done
            self._active.add(key)
            t = self._threads[key] = threading.Thread(target=self._run, args=(app, op, stop), daemon=True,
                                                      name=f"alya-bridge-{app}-{op}")
        t.start()
        return stop

    def attached(self, app: str, op: str, token: threading.Event | None = None) -> None:
        """The type's run (the one started with ``token``, else the latest) has started its body, or
        failed to: its bridge claims no more."""
        with self._lock:
            stop = token or self._stop.get((app, op))
        if stop is not None:
            stop.set()
            self.engine.waker.nudge(work_payload(app, op))  # a lingering bridge stops waiting for work now

    def reports(self, app: str, op: str) -> list[dict[str, Any]]:
        """What the type's bridges did since the last call (chunk reports, as a task returns them)."""
        with self._lock:
            return self._reports.pop((app, op), [])

    def ended_elsewhere(self, app: str, op: str, batches: list[str]) -> None:
        """Batches of the type that maintenance ended (no run did): handed to the type's run like a bridge's
        report, so that it makes their summary artifacts and counts them."""
        with self._lock:
            self._reports.setdefault((app, op), []).append(
                {"nrows": 0, "nsuccess": 0, "nfailed": 0, "nretry": 0, "summarised": list(batches), "batches": {}})

    def undelivered(self) -> list[tuple[str, str]]:
        """Types with a report no run has taken (maintenance's, or a bridge's that ended after its run):
        the worker starts a run for each, or nothing would ever show them."""
        with self._lock:
            return [k for k, v in self._reports.items() if v and k not in self._serving]

    def join(self, timeout: float | None = None) -> None:
        for t in list(self._threads.values()):
            t.join(timeout)

    def _run(self, app: str, op: str, stop: threading.Event) -> None:
        key = (app, op)
        while True:
            reports = self._loops(app, op, stop)
            for report in reports:
                if report is not None and (report.nrows or report.summarised):
                    get_logger().debug("bridge_done", app=app, op=op, rows=report.nrows,
                                       summarised=len(report.summarised))
                    with self._lock:
                        self._reports.setdefault(key, []).append(report.as_dict())
            with self._lock:
                latest = self._stop.get(key)
                if all(r is None for r in reports) or latest is None or latest is stop or latest.is_set():
                    self._active.discard(key)
                    return
                stop = latest  # a newer run started while this bridge finished its rows: bridge for it too

    def _loops(self, app: str, op: str, stop: threading.Event) -> list[ChunkReport | None]:
        """Two claim loops of the type until ``stop`` (one with ``ALYA_WORKER_THREADS=1``): with one, a claim
        waited for the write-back before it (the first half second of a no-op batch ran at half the rate of
        the rest); more only raced for the pool's few connections while the run starts (16 made the first
        slow query after an idle spell take 110-140 ms). Their reports; None for a loop that failed."""
        linger = BRIDGE_MAX_SEC if self.linger else 0.0
        out: list[ChunkReport | None] = [None] * min(BRIDGE_LOOPS, max(1, self.engine.svc.config.worker_threads))

        def loop(i: int) -> None:
            try:
                out[i] = self.engine.work(app, op, None, seconds=BRIDGE_MAX_SEC, stop=stop, linger=linger)
            except Exception as exc:  # an outage: the run's own claim loops meet it too, and say so
                get_logger().warning("bridge_failed", app=app, op=op, error=describe(exc))

        helpers = [threading.Thread(target=loop, args=(i,), daemon=True, name=f"alya-bridge-{app}-{op}-{i}")
                   for i in range(1, len(out))]
        for t in helpers:
            t.start()
        loop(0)
        for t in helpers:
            t.join()
        return out
