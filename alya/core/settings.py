"""Settings from ALYA_* environment variables; constructor arguments win.

Every invalid value is a :class:`~alya.core.errors.ConfigError` that names the variable and what it allows,
raised when the settings are read (a JobManager is constructed), never later in a worker.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from alya.core.confine import parse_roots
from alya.core.errors import ConfigError, InvalidInput
from alya.core.redact import redact_text
from alya.core.validate import file_patterns


def _config_error(exc: ValidationError) -> ConfigError:
    problems = []
    for err in exc.errors():
        name = "ALYA_" + "_".join(str(p) for p in err["loc"]).upper()
        problems.append(redact_text(f"{name}={err.get('input')!r}: {err['msg']}"))
    return ConfigError("invalid setting: " + "; ".join(problems))


class _Settings(BaseSettings):
    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise _config_error(exc) from None
        except SettingsError as exc:  # a variable that could not even be parsed
            raise ConfigError(f"invalid setting: {exc}") from None


class JobManagerConfig(_Settings):
    """Tunables of a JobManager (all readable from ALYA_<NAME>)."""

    model_config = SettingsConfigDict(env_prefix="ALYA_", extra="ignore", frozen=True)

    batchchunk_nrows: int = Field(1000, ge=1, le=100_000, description="most rows one claim takes")
    batchstatus_cachedur_sec: int = Field(60, ge=1, description="Redis TTL of a non-final status")
    batchrowmax: int = Field(10_000_000, ge=1, description="most rows one batch may hold, across appends")
    max_attempts: int = Field(3, ge=1, description="processor faults (raise/bad status) before a row fails")
    retry_backoff_sec: float = Field(2.0, ge=0, description="first retry delay; doubles per attempt")
    dispatch: Literal["none", "prefect"] = "none"
    dispatch_rows_per_run: int = Field(10_000, ge=1, description="a dispatched batch gets a run per this many rows...")
    dispatch_max_runs: int = Field(4, ge=1, le=1000, description="...up to this many (machines share it)")
    recovery_sec: int = Field(60, ge=1, description="silence after which a worker's rows are requeued")
    summary_giveup_after: int = Field(10, ge=1, description="a summary failing the same way this many times...")
    summary_giveup_sec: float = Field(900.0, ge=0, description="...over at least this long fails the batch")
    concurrency: int = Field(8, ge=1, le=1024, description="rows a worker process runs at once")
    flush_sec: float = Field(1.0, gt=0, le=60, description="finished rows are written back at least this often")
    row_timeout_sec: float = Field(300.0, gt=0, description="a processor call running longer is a fault")
    linger_sec: float = Field(2.0, ge=0, le=600, description="an idle flow run waits this long for new work")
    worker_threads: int = Field(2, ge=1, le=32, description="Prefect task-runner threads per flow run")
    task_seconds: float = Field(2.0, gt=0, description="a chunk task keeps claiming this long")
    flow_max_tasks: int = Field(100, ge=1, le=1000, description="chunk tasks per flow run (Prefect limit)")
    deployment_name: str = Field("{app}-{op}", min_length=1,
                                 description="deployments are {flow}/{this}, {app} and {op} filled in")
    cancel_timeout_sec: float = Field(30.0, ge=0, description="Cancelling runs are forced Cancelled after")
    poll_sec: float = Field(0.5, gt=0, description="idle poll interval of jm.run workers (wake-ups aside)")
    done_cache_rows: int = Field(1000, ge=0, description="final batches this small cache their rows too")
    max_context_bytes: int = Field(64 * 2**10, ge=2, description="most bytes of a batch's context as JSON")
    max_input_bytes: int = Field(2**20, ge=2, le=64 * 2**20, description="most bytes of one row's input as JSON")
    max_line_bytes: int = Field(2**20, ge=1, description="longest line of a CSV / JSON lines file read in")
    max_file_bytes: int = Field(16 * 2**30, ge=1, description="most bytes of a file read in, decompressed")
    auto_migrate: bool = Field(False, description="workers (jm.run, served flows) migrate the database on start")
    retention_days: float = Field(30.0, ge=0, description="final batches older than this are purged (0: never)")
    retention_files: bool = Field(False, description="retention also deletes the purged batches' output files")
    events: bool = Field(True, description="emit a Prefect event per batch status change (on|off)")
    events_slow_queries: bool = Field(False, description="slow queries emit them too (off: one per request)")
    prepared_statements: bool = Field(True, description="named SQL as server-side prepared statements "
                                      "(off behind a pooler in transaction mode, e.g. PgBouncer)")
    artifacts_slow_queries: bool = Field(False, description="slow queries get progress and summary artifacts "
                                         "(off: counted in their run's overview and state only)")
    bulk_rows: int = Field(100, ge=1, le=10_000, description="most rows per do_batch_jobs call")
    app_limits: Annotated[dict[str, int], NoDecode] = Field(default_factory=dict,
                                       description="most rows of an app in progress at once, across all workers")

    @field_validator("app_limits", mode="before")
    @classmethod
    def _limits(cls, value: Any) -> Any:
        """``bank=20,mail=5`` (or a JSON object): apps named as in submits, limits of at least 1."""
        if isinstance(value, str) and value.strip().startswith("{"):
            import json

            value = json.loads(value)
        elif isinstance(value, str):
            pairs = [p.partition("=") for p in value.split(",") if p.strip()]
            if any(not sep for _, sep, _ in pairs):
                raise ValueError("expected app=limit pairs separated by commas, e.g. bank=20,mail=5")
            value = {k.strip(): v.strip() for k, _, v in pairs}
        if isinstance(value, dict):
            for app, limit in value.items():
                if not isinstance(app, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", app):
                    raise ValueError(f"not an app name: {app!r}")
                if int(limit) < 1:
                    raise ValueError(f"the limit of {app} must be at least 1")
        return value


class Backends(_Settings):
    """Where the state lives. Unset: an embedded PostgreSQL (if installed), no cache, a local folder."""

    model_config = SettingsConfigDict(env_prefix="ALYA_", extra="ignore")

    database_url: str | None = None
    redis_url: str | None = None
    object_store_url: str | None = None


class LogSettings(_Settings):
    """How alya logs: JSON lines for machines, or a readable console format."""

    model_config = SettingsConfigDict(env_prefix="ALYA_", extra="ignore")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["json", "console", "auto"] = "auto"

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        return value.upper() if value.lower() in ("debug", "info", "warning", "error", "critical") else value.lower()


DEFAULT_DATA_DIR = Path(".alya-data")


def default_object_store_url() -> str:
    return (DEFAULT_DATA_DIR / "objects").resolve().as_uri()


class IntakeSettings(_Settings):
    """The scheduled file intake (the flow ``alya-intake``): which folder, which files as which file type,
    how old a file must be before it is taken, and how often the deployment runs."""

    model_config = SettingsConfigDict(env_prefix="ALYA_", extra="ignore", frozen=True)

    intake_url: str | None = Field(None, description="the folder scanned: a path or any fsspec URL")
    intake_patterns: str = Field("", description='GLOB=FILETYPE,...: "*.csv=txn,*.parquet=txn"')
    intake_min_age_sec: float = Field(10.0, ge=0, description="younger files wait for a later pass")
    intake_every_sec: int = Field(60, ge=1, le=86_400, description="interval of the scheduled deployment")
    intake_roots: Annotated[list[str] | None, NoDecode] = Field(
        None, description="URL prefixes the intake flows (and, when set, file_submit/intake_scan) may read")

    @field_validator("intake_roots", mode="before")
    @classmethod
    def _roots(cls, value: Any) -> Any:
        """Comma-separated URL prefixes (or a JSON list); each a clean URL or path."""
        if isinstance(value, str) and value.strip().startswith("["):
            import json

            value = json.loads(value)
        try:
            return parse_roots(value) if value is not None else None
        except InvalidInput as exc:
            raise ValueError(str(exc)) from None

    @property
    def roots(self) -> list[str]:
        """What confines the intake flows' parameters: ALYA_INTAKE_ROOTS, or ALYA_INTAKE_URL alone when that
        is unset, or nothing at all (every URL refused)."""
        if self.intake_roots is not None:
            return list(self.intake_roots)
        return [self.intake_url] if self.intake_url else []

    @field_validator("intake_patterns")
    @classmethod
    def _patterns(cls, value: str) -> str:
        if value.strip():
            try:
                file_patterns(value)
            except InvalidInput as exc:
                raise ValueError(str(exc)) from None
        return value

    @property
    def patterns(self) -> dict[str, str]:
        """The patterns as glob -> file type ({} when unset)."""
        return file_patterns(self.intake_patterns) if self.intake_patterns.strip() else {}
