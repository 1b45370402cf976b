"""``jm.metrics()``: queue depths and live workers from PostgreSQL, joined with this process's counters.

Reading the queues sums the counters of open batches (``alya.db.counters``: a few index entries per open
batch, whatever its size; it counted their rows, O(open rows), before migration 0011). A snapshot's
database part is still reused for ``reuse_sec`` (a few scrapers, or a dashboard refreshing often, cost one
read per interval); the process's own counters are always current.
"""

from __future__ import annotations

import threading
import time

from alya.batch.services import Services
from alya.core.metrics import Metrics, TypeMetrics

REUSE_SEC = 5.0


class Monitor:
    def __init__(self, svc: Services, reuse_sec: float = REUSE_SEC) -> None:
        self.svc = svc
        self.reuse_sec = reuse_sec
        self._lock = threading.Lock()
        self._read: tuple[float, list[tuple[str, str, str, int, int, float | None]], int, float] | None = None

    def snapshot(self) -> Metrics:
        with self._lock:  # one database read at a time; others reuse it
            if self._read is None or time.monotonic() - self._read[0] >= self.reuse_sec:
                t = time.perf_counter()
                with self.svc.store.tx() as q:
                    depths = q.queue_depths()
                    live = q.live_workers(sec=self.svc.config.recovery_sec)
                self._read = (time.monotonic(), depths, live, time.perf_counter() - t)
            _, depths, live, took = self._read
        finished, failed, claim, write = self.svc.metrics.counts()
        types: dict[tuple[str, str, str], TypeMetrics] = {}
        for app, op, kind, queued, inprog, oldest in depths:
            types[(app, op, kind)] = TypeMetrics(app, op, kind, queued, inprog, oldest)
        for key in finished.keys() - types.keys():  # types this process worked on, none open now
            types[key] = TypeMetrics(*key)
        types = {k: TypeMetrics(t.app, t.op, t.kind, t.queued, t.inprog, t.oldest_queued_sec, finished.get(k, 0),
                                failed.get(k, 0)) for k, t in types.items()}
        return Metrics(types=[types[k] for k in sorted(types)], live_workers=live, claim=claim, write=write,
                       started=self.svc.metrics.started, read_sec=took)
