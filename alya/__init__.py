"""alya: batch processing of millions of JSON rows on Prefect, PostgreSQL and Redis.

Everything an application needs is importable from here; see README.md and the contract in the spec.
"""

from typing import Any

from alya.api.client import JobManager
from alya.core.errors import (
    AlyaError,
    BackendUnavailable,
    BatchNotFound,
    ConfigError,
    DatabaseNotMigrated,
    InvalidInput,
    InvalidState,
    ProcessorNotFound,
)
from alya.core.models import (
    BatchDetails,
    BatchDone,
    BatchInput,
    BatchJobResult,
    BatchOutput,
    BatchStatus,
    BatchSummary,
    ErrorMessage,
    FileCheck,
    FileIntake,
    PurgeReport,
    SlowQueryDone,
    SlowQueryResult,
)
from alya.core.registry import BatchProcessor, BulkBatchProcessor, InitBlock, Initializer, SlowQueryProcessor
from alya.core.settings import JobManagerConfig
from alya.db.migrate import migrate_database
from alya.io.files import FileChecker, IncomingFile


def __getattr__(name: str) -> Any:
    """``alya.batch_flow`` imports Prefect; a client that only submits and polls never pays for that."""
    if name == "batch_flow":
        from alya.prefect.flows import batch_flow

        return batch_flow
    raise AttributeError(f"module 'alya' has no attribute {name!r}")


__all__ = [
    "AlyaError",
    "BackendUnavailable",
    "BatchDetails",
    "BatchDone",
    "BatchInput",
    "BatchJobResult",
    "BatchNotFound",
    "BatchOutput",
    "BatchProcessor",
    "BatchStatus",
    "BatchSummary",
    "BulkBatchProcessor",
    "ConfigError",
    "DatabaseNotMigrated",
    "ErrorMessage",
    "FileCheck",
    "FileChecker",
    "FileIntake",
    "IncomingFile",
    "InitBlock",
    "Initializer",
    "InvalidInput",
    "InvalidState",
    "JobManager",
    "JobManagerConfig",
    "ProcessorNotFound",
    "PurgeReport",
    "SlowQueryDone",
    "SlowQueryProcessor",
    "SlowQueryResult",
    "batch_flow",
    "migrate_database",
]
