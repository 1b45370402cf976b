"""What the example apps share: one lazily connecting JobManager per process, an init block holding a
SQLAlchemy engine on the alya database, and the glue that turns a module-level flow into a served
deployment named as the dispatcher expects (``alya-bank-txn/bank-txn``: ``names.deployment_name``)."""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from alya import JobManager
from alya.core import names
from alya.core.logs import get_logger
from alya.db.store import sqlalchemy_url


@functools.cache
def example_jobmanager() -> JobManager:
    """The process's one ``JobManager.from_env()``, shared by every example module (and the sweeper, which
    registers them all). Constructing it opens no connection (the pools connect on first use), so
    importing an example module works without a reachable database (``prefect deploy`` imports it)."""
    return JobManager.from_env()


_registered: set[tuple[int, str]] = set()


def first_registration(jm: JobManager, app: str) -> bool:
    """True once per JobManager and example app. Prefect loads a flow's file by path, as a module of its
    own name, so an example module may run twice in one process against the one shared JobManager; its
    processors and file checkers are registered by the first run only."""
    key = (id(jm), app)
    if key in _registered:
        return False
    _registered.add(key)
    return True


class DbBlock:
    """An init block: a small connection pool on the alya database, shared by the rows of one process."""

    def __init__(self, database_url: str) -> None:
        # No pre-ping per checkout: alya calls is_alive() once per chunk, and a dead pool is then replaced.
        self.engine: Engine = create_engine(sqlalchemy_url(database_url), pool_size=4, max_overflow=4)
        self._closed = False

    def is_alive(self) -> bool:
        if self._closed:
            return False
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    def close(self) -> None:
        self._closed = True
        self.engine.dispose()


class LoggingDone:
    """``mark_done`` of the examples: one log line with the batch's final counts."""

    def mark_done(self, initblock: Any, context: dict[str, Any], details: Any) -> None:
        get_logger().info("example_mark_done", app=details.app, op=details.op, batch=details.id,
                          status=details.status.value, nsuccess=details.nsuccess, nfailed=details.nfailed,
                          files=sorted(details.outputfiles))


def deployment_of(flow: Any, app: str | None = None, op: str | None = None, *, name: str | None = None,
                  **kwargs: Any) -> Any:
    """A served deployment of a module-level flow (Prefect finds its entrypoint,
    ``flows/<module>.py:<function>``, the same as in prefect.yaml): for batch type (app, op) named as the
    dispatcher looks it up (``alya-bank-txn/bank-txn``, ALYA_DEPLOYMENT_NAME), else ``name``
    (``names.SWEEPER_DEPLOYMENT``, ...). Its description is the flow's unless ``description`` is given."""
    if app is not None and op is not None:
        name = names.type_deployment(app, op, example_jobmanager().config.deployment_name)
    if name is None:
        raise ValueError("deployment_of needs (app, op) or name")
    kwargs.setdefault("description", flow.description)
    return flow.to_deployment(name=name, **kwargs)
