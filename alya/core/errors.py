"""Every error alya raises derives from :class:`AlyaError`, so callers can catch one base class.

A call that raises leaves the stored state exactly as it was: validation happens before writing, and
every write is one transaction that is rolled back on the way out.
"""

from __future__ import annotations


class AlyaError(Exception):
    """Base class of all alya errors."""


class InvalidInput(AlyaError, ValueError):
    """The caller passed something alya refuses: a bad app/op name, a context or input that is not a JSON
    object, a line number out of range or repeated, no rows at all, or more rows than ALYA_BATCHROWMAX."""


class BatchNotFound(AlyaError, LookupError):
    """No batch (or slow query) has this id, or the id is not a UUID."""


class InvalidState(AlyaError):
    """The batch is in a state that does not allow the call: append to a batch that is no longer `wait`,
    wait-off of a running batch, abort of a finished batch, slow-query calls on a batch id."""


class ProcessorNotFound(AlyaError, LookupError):
    """No processor (or initializer) is registered for this app/op in this process."""


class BackendUnavailable(AlyaError, ConnectionError):
    """PostgreSQL or the object store could not be reached; nothing was changed."""


class ConnectionLost(BackendUnavailable):
    """The connection to PostgreSQL died during the call (server restart, terminated backend, failover).
    ``at_commit`` False: it died before the commit was sent, so the server rolled the transaction back and
    nothing was stored. ``at_commit`` True: the commit itself may or may not have been applied."""

    def __init__(self, message: str, at_commit: bool = False) -> None:
        super().__init__(message)
        self.at_commit = at_commit


class ConfigError(AlyaError, ValueError):
    """A setting is invalid or inconsistent (unknown dispatch mode, a number out of range, a URL that is
    not one...). The message names the variable and what it allows."""


class DatabaseNotMigrated(ConfigError):
    """The database lacks alya's tables (or an up-to-date version of them): run ``alya migrate``."""


def describe(exc: BaseException) -> str:
    """One line naming an exception and its message, short enough for a log line or a stored error."""
    return f"{type(exc).__name__}: {exc}"[:500]
