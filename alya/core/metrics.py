"""What an operator watches: the process's own counters (rows finished and failed per batch type, claim and
write-back latency) and the snapshot ``jm.metrics()`` returns (these counters, plus queue depths and live
workers read from PostgreSQL).

The counters cost one lock and a few additions per claim statement and per write-back (a chunk of rows),
never per row. They count this process's work since it started, as Prometheus counters do: rates and
totals over a fleet come from summing every worker's counters (``rate(alya_rows_finished_total[5m])``).
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds (seconds) of the latency histograms' buckets; a last, unbounded one follows."""


@dataclass(frozen=True, slots=True)
class Latency:
    """A latency histogram: ``counts[i]`` observations of at most ``BUCKETS[i]`` seconds (and above the last
    bound, the last), not cumulative; ``total_sec`` their sum."""

    count: int = 0
    total_sec: float = 0.0
    counts: tuple[int, ...] = (0,) * (len(BUCKETS) + 1)

    @property
    def mean_ms(self) -> float | None:
        return None if not self.count else 1000 * self.total_sec / self.count

    def quantile_ms(self, q: float) -> float | None:
        """The upper bound of the bucket holding the ``q`` quantile (None: no observation, or above 10 s)."""
        if not self.count:
            return None
        seen, rank = 0, q * self.count
        for bound, n in zip(BUCKETS, self.counts, strict=False):
            seen += n
            if seen >= rank:
                return bound * 1000
        return None


@dataclass(frozen=True, slots=True)
class TypeMetrics:
    """One batch type (``kind`` B: batches, Q: slow queries). ``queued``/``inprog`` and the oldest queued
    row's age are the whole cluster's (PostgreSQL); ``finished`` (rows ended success or failed) and
    ``failed`` are this process's since it started."""

    app: str
    op: str
    kind: str
    queued: int = 0
    inprog: int = 0
    oldest_queued_sec: float | None = None
    finished: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True)
class Metrics:
    """``jm.metrics()``: per-type queues and counts, live workers (heartbeat within ALYA_RECOVERY_SEC), and
    this process's claim and write-back latency (one claim statement; one write-back transaction)."""

    types: list[TypeMetrics]
    live_workers: int
    claim: Latency
    write: Latency
    started: float  # this process's counters since (Unix time)
    read_sec: float = 0.0  # what reading the queues from PostgreSQL took


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    count: int = 0
    total: float = 0.0

    def add(self, sec: float) -> None:
        self.counts[bisect_left(BUCKETS, sec)] += 1
        self.count += 1
        self.total += sec

    def value(self) -> Latency:
        return Latency(self.count, self.total, tuple(self.counts))


class WorkMetrics:
    """The process's counters, fed by the engine (one call per claim statement, one per write-back)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self._finished: Counter[tuple[str, str, str]] = Counter()  # (app, op, kind)
        self._failed: Counter[tuple[str, str, str]] = Counter()
        self._claim = _Histogram()
        self._write = _Histogram()

    def claimed(self, sec: float) -> None:
        with self._lock:
            self._claim.add(sec)

    def written(self, app: str, op: str, kind: str, sec: float, statuses: Iterable[str]) -> None:
        """A write-back of these row outcomes (``queued``: a retry, not finished) took ``sec``."""
        finished = failed = 0
        for s in statuses:
            if s != "queued":
                finished += 1
                failed += s == "failed"
        with self._lock:
            self._write.add(sec)
            self._finished[(app, op, kind)] += finished
            self._failed[(app, op, kind)] += failed

    def counts(self) -> tuple[dict[tuple[str, str, str], int], dict[tuple[str, str, str], int], Latency, Latency]:
        """(finished per type, failed per type, claim latency, write-back latency)."""
        with self._lock:
            return dict(self._finished), dict(self._failed), self._claim.value(), self._write.value()
