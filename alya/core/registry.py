"""Processors and initializers registered by the application, and the per-process init blocks.

Registration may happen from any thread (a web app registering at startup while a worker runs), so the
maps are guarded by a lock; lookups copy nothing and take the lock only briefly.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from alya.core.errors import ConfigError, InvalidInput, ProcessorNotFound
from alya.core.models import BatchDetails, BatchJobResult, SlowQueryResult
from alya.core.names import flow_name
from alya.core.validate import app_name, op_name


@runtime_checkable
class InitBlock(Protocol):
    def is_alive(self) -> bool: ...
    def close(self) -> None: ...


@runtime_checkable
class Initializer(Protocol):
    def init(self, app: str) -> InitBlock: ...


@runtime_checkable
class BatchProcessor(Protocol):
    def do_batch_job(
        self, initblock: Any, context: dict[str, Any], line: int, input: dict[str, Any]
    ) -> BatchJobResult: ...
    def mark_done(self, initblock: Any, context: dict[str, Any], details: BatchDetails) -> None: ...


@runtime_checkable
class BulkBatchProcessor(Protocol):
    """A batch processor answering many rows per call (up to ``ALYA_BULK_ROWS``): one result per row, in
    order. It may define ``do_batch_job`` too; alya calls ``do_batch_jobs`` (a row retried alone: a list of one)."""

    def do_batch_jobs(
        self, initblock: Any, context: dict[str, Any], rows: list[tuple[int, dict[str, Any]]]
    ) -> list[BatchJobResult]: ...
    def mark_done(self, initblock: Any, context: dict[str, Any], details: BatchDetails) -> None: ...


@runtime_checkable
class SlowQueryProcessor(Protocol):
    def do_slow_query(self, initblock: Any, context: dict[str, Any], input: dict[str, Any]) -> SlowQueryResult: ...
    def mark_done(self, initblock: Any, context: dict[str, Any], details: BatchDetails) -> None: ...


@dataclass(frozen=True)
class Registration:
    app: str
    op: str
    type: str  # "B" or "Q"
    processor: Any


class Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._initializers: dict[str, Initializer] = {}
        self._processors: dict[tuple[str, str], Registration] = {}

    def add_initializer(self, app: str, initializer: Initializer) -> None:
        app = app_name(app)
        if not callable(getattr(initializer, "init", None)):
            raise InvalidInput("an initializer needs an init(app) method")
        with self._lock:
            self._initializers[app] = initializer

    def add_processor(self, app: str, op: str, type_: str, processor: Any) -> Registration:
        app, op = app_name(app), op_name(op)
        method = "do_batch_job" if type_ == "B" else "do_slow_query"
        # a bulk processor (do_batch_jobs: many rows per call, alya.engine.executor) needs no do_batch_job
        calls = callable(getattr(processor, method, None)) or (
            type_ == "B" and callable(getattr(processor, "do_batch_jobs", None)))
        if not calls or not callable(getattr(processor, "mark_done", None)):
            raise InvalidInput(f"a {'batch' if type_ == 'B' else 'slow-query'} processor needs {method} and mark_done")
        reg = Registration(app, op, type_, processor)
        with self._lock:
            old = self._processors.get((app, op))
            if old is not None and old.type != type_:
                # One (app, op) is one batch type and one Prefect flow: it cannot be both kinds.
                raise InvalidInput(f"{app}/{op} is already registered as a "
                                   f"{'batch' if old.type == 'B' else 'slow-query'} processor")
            # Prefect names fold '_' and '.' into '-': (bank_x, y) and (bank, x_y) would be one flow and one
            # deployment, and a run of one could serve the other.
            name = flow_name(app, op)
            clash = next((k for k in self._processors if k != (app, op) and flow_name(*k) == name), None)
            if clash is not None:
                raise ConfigError(f"{app}/{op} and {clash[0]}/{clash[1]} would both be the Prefect flow {name}: "
                                  "rename one of them")
            self._processors[(app, op)] = reg  # the same kind again replaces the processor
        return reg

    def processor(self, app: str, op: str) -> Registration:
        reg = self._processors.get((app, op))
        if reg is None:
            raise ProcessorNotFound(f"no processor registered for {app}/{op}")
        return reg

    def initializer(self, app: str) -> Initializer | None:
        return self._initializers.get(app)

    def batch_types(self) -> list[Registration]:
        with self._lock:
            return list(self._processors.values())


class InitBlocks:
    """One init block per app and process, reused across chunks, re-created when no longer alive."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._lock = threading.Lock()
        self._blocks: dict[str, Any] = {}

    def get(self, app: str) -> Any:
        with self._lock:
            block = self._blocks.get(app)
            if block is not None:
                try:
                    alive = bool(block.is_alive())
                except Exception:
                    alive = False
                if alive:
                    return block
                _close(block)
                del self._blocks[app]
            initializer = self._registry.initializer(app)
            if initializer is None:
                return None  # an app without an initializer gets None as its init block
            block = initializer.init(app)
            self._blocks[app] = block
            return block

    def close_all(self) -> None:
        with self._lock:
            for block in self._blocks.values():
                _close(block)
            self._blocks.clear()


def _close(block: Any) -> None:
    with contextlib.suppress(Exception):  # a block that fails to close is dropped all the same
        block.close()
