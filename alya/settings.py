"""Settings from ALYA_* environment variables; constructor arguments win.

Defaults are chosen for throughput: Prefect sees one task per chunk, so a chunk must be large enough that
Prefect's per-task cost (5-10 ms) is small next to the rows' own work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class JobManagerConfig(BaseSettings):
    """Tunables of a JobManager (all readable from ALYA_<NAME>)."""

    model_config = SettingsConfigDict(env_prefix="ALYA_", extra="ignore", frozen=True)

    batchchunk_nrows: int = Field(1000, ge=1, le=100_000, description="rows claimed per chunk (one task)")
    batchstatus_cachedur_sec: int = Field(60, ge=1, description="Redis TTL of a non-final status")
    batchrowmax: int = Field(10_000_000, ge=1, description="most rows one batch may hold, across appends")
    max_attempts: int = Field(3, ge=1, description="processor faults (raise/bad status) before a row fails")
    retry_backoff_sec: float = Field(2.0, ge=0, description="first retry delay; doubles per attempt")
    dispatch: Literal["none", "prefect"] = "none"
    recovery_sec: int = Field(60, ge=1, description="silence after which a worker's rows are requeued")
    worker_threads: int = Field(2, ge=1, le=32, description="task-runner threads per flow run")
    task_seconds: float = Field(2.0, gt=0, description="a chunk task keeps claiming chunks this long")
    flow_max_tasks: int = Field(100, ge=1, le=1000, description="chunk tasks per flow run (Prefect limit)")
    deployment_name: str = "alya"
    cancel_timeout_sec: float = Field(30.0, ge=0, description="Cancelling runs are forced Cancelled after")
    poll_sec: float = Field(0.5, gt=0, description="idle poll interval of jm.run workers")
    done_cache_rows: int = Field(1000, ge=0, description="final batches this small cache their rows too")


class Backends(BaseSettings):
    """Where the state lives. Unset: an embedded PostgreSQL (if installed), no cache, a local folder."""

    model_config = SettingsConfigDict(env_prefix="ALYA_", extra="ignore")

    database_url: str | None = None
    redis_url: str | None = None
    object_store_url: str | None = None


DEFAULT_DATA_DIR = Path(".alya-data")


def default_object_store_url() -> str:
    return (DEFAULT_DATA_DIR / "objects").resolve().as_uri()
