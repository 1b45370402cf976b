"""The backends one process works with, wired once by the facade and handed down to the engine and the
Prefect layer. Nothing here does work: it exists so that lower layers receive what they use instead of
reaching into the ``JobManager`` (which would point an import up the layers)."""

from __future__ import annotations

from dataclasses import dataclass, field

from alya.batch.status import Statuses
from alya.core.metrics import WorkMetrics
from alya.core.registry import InitBlocks, Registry
from alya.core.settings import JobManagerConfig
from alya.db.store import Store
from alya.io.cache import StatusCache
from alya.io.outputs import ObjectStore


@dataclass(frozen=True)
class Services:
    config: JobManagerConfig
    store: Store
    cache: StatusCache
    objects: ObjectStore
    statuses: Statuses
    registry: Registry
    initblocks: InitBlocks
    metrics: WorkMetrics = field(default_factory=WorkMetrics)  # this process's counters (jm.metrics())
