"""A Prometheus endpoint for a process's JobManager (``alya worker --metrics-port N``, or
``serve_metrics(jm, port)`` in your own process): each scrape is one ``jm.metrics()`` snapshot (its
database part reused for a few seconds, see ``alya.batch.monitor``).

Series (labels ``app``, ``op``, ``kind`` B/Q where per type):

- ``alya_rows_queued``, ``alya_rows_inprog``, ``alya_oldest_queued_seconds``: the cluster's queues (PostgreSQL)
- ``alya_rows_finished_total``, ``alya_rows_failed_total``: rows this process ended (success or failed), and failed
- ``alya_live_workers``: workers whose heartbeat is within ALYA_RECOVERY_SEC
- ``alya_claim_seconds``, ``alya_write_back_seconds``: histograms of this process's claim statements and
  write-back transactions
- ``alya_database_up``: 0 when the last scrape could not read PostgreSQL (the queue series are left out)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from alya.core.errors import describe
from alya.core.logs import get_logger
from alya.core.metrics import BUCKETS, Latency

if TYPE_CHECKING:
    from alya.api.client import JobManager

LABELS = ["app", "op", "kind"]


def _histogram(name: str, doc: str, lat: Latency) -> Any:
    from prometheus_client.core import HistogramMetricFamily

    cumulative, seen = [], 0
    for bound, n in zip(BUCKETS, lat.counts, strict=False):
        seen += n
        cumulative.append((repr(bound), seen))
    cumulative.append(("+Inf", lat.count))
    return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=lat.total_sec)


class AlyaCollector:
    """A ``prometheus_client`` collector reading ``jm.metrics()`` at each scrape."""

    def __init__(self, jm: JobManager) -> None:
        self.jm = jm

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        try:
            m = self.jm.metrics()
        except Exception as exc:  # PostgreSQL unreachable: say so, and let the scrape succeed
            get_logger().warning("metrics_failed", error=describe(exc))
            yield GaugeMetricFamily("alya_database_up", "1 when PostgreSQL answered the last scrape", value=0)
            return
        yield GaugeMetricFamily("alya_database_up", "1 when PostgreSQL answered the last scrape", value=1)
        fams: dict[str, Any] = {
            "queued": GaugeMetricFamily("alya_rows_queued", "rows queued, per batch type", labels=LABELS),
            "inprog": GaugeMetricFamily("alya_rows_inprog", "rows in progress, per batch type", labels=LABELS),
            "oldest": GaugeMetricFamily("alya_oldest_queued_seconds", "age of the oldest queued row", labels=LABELS),
            "finished": CounterMetricFamily("alya_rows_finished", "rows this process ended (success or failed)",
                                            labels=LABELS),
            "failed": CounterMetricFamily("alya_rows_failed", "rows this process ended failed", labels=LABELS),
        }
        for t in m.types:
            key = [t.app, t.op, t.kind]
            fams["queued"].add_metric(key, t.queued)
            fams["inprog"].add_metric(key, t.inprog)
            if t.oldest_queued_sec is not None:
                fams["oldest"].add_metric(key, max(0.0, t.oldest_queued_sec))
            fams["finished"].add_metric(key, t.finished)
            fams["failed"].add_metric(key, t.failed)
        yield from fams.values()
        yield GaugeMetricFamily("alya_live_workers", "workers with a recent heartbeat", value=m.live_workers)
        yield _histogram("alya_claim_seconds", "claim statements of this process", m.claim)
        yield _histogram("alya_write_back_seconds", "write-back transactions of this process", m.write)


def serve_metrics(jm: JobManager, port: int, addr: str = "0.0.0.0") -> Any:  # noqa: S104 (scraped from elsewhere)
    """Serve ``/metrics`` on ``addr:port`` from a daemon thread; returns the server (``shutdown()`` stops it)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(AlyaCollector(jm))  # type: ignore[arg-type]
    server, _thread = start_http_server(port, addr, registry=registry)
    get_logger().info("metrics_served", port=server.server_port, addr=addr)
    return server
