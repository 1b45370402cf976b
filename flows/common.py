"""What the example apps share: a lazily connecting JobManager, an init block holding a SQLAlchemy engine
on the alya database, and the glue that turns a module-level batch-type flow into a served deployment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from alya import JobManager
from alya.batchflow import flow_name
from alya.logs import get_logger
from alya.store import sqlalchemy_url

DEPLOYMENT_NAME = "alya"  # the Dispatcher's default ALYA_DEPLOYMENT_NAME: deployments are "{flow}/alya"


def example_jobmanager() -> JobManager:
    """``JobManager.from_env()``. Constructing it opens no connection (the pools connect on first use), so
    importing an example module works without a reachable database (``prefect deploy`` imports it)."""
    return JobManager.from_env()


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


def deployment_of(flow: Any, module_file: str, attr: str, **kwargs: Any) -> Any:
    """A served deployment ``{flow}/alya`` of a module-level flow. The batch-type flows are built inside
    ``make_batch_flow``, so Prefect would guess their entrypoint wrong (``batchflow.py:make_batch_flow.
    <locals>...``); it is given explicitly, relative to the working directory as Prefect does it, so the
    runner's subprocess loads ``flows/<module>.py:<attr>``, the same entrypoint as in prefect.yaml."""
    from prefect.deployments.runner import RunnerDeployment

    deployment = RunnerDeployment.from_flow(flow, name=DEPLOYMENT_NAME, **kwargs)
    deployment.entrypoint = f"{os.path.relpath(Path(module_file).resolve(), Path.cwd())}:{attr}"
    return deployment


def deployment_full_name(app: str, op: str) -> str:
    return f"{flow_name(app, op)}/{DEPLOYMENT_NAME}"
