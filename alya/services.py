"""The backends one process works with, wired once by the facade and handed down to the engine and the
Prefect layer. Nothing here does work: it exists so that lower layers receive what they use instead of
reaching into the ``JobManager`` (which would point an import up the layers)."""

from __future__ import annotations

from dataclasses import dataclass

from alya.cache import StatusCache
from alya.outputs import ObjectStore
from alya.registry import InitBlocks, Registry
from alya.settings import JobManagerConfig
from alya.store import Store
from alya.summary import Summaries


@dataclass(frozen=True)
class Services:
    config: JobManagerConfig
    store: Store
    cache: StatusCache
    objects: ObjectStore
    summaries: Summaries
    registry: Registry
    initblocks: InitBlocks
