"""Schema migrations (Alembic). The scripts live in the repository's ``migrations/`` folder, which the
wheel ships as ``alya.migrations`` (nothing of alya's is installed as a top-level package)."""

from __future__ import annotations

import threading
from importlib import resources

from alembic import command
from alembic.config import Config

from alya.core.errors import BackendUnavailable
from alya.core.redact import MASK, redact_text, secrets_of


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("alya.migrations")))
    cfg.attributes["url"] = database_url
    return cfg


_lock = threading.Lock()  # Alembic keeps its running context in module globals: one upgrade per process


def migrate_database(database_url: str, revision: str = "head") -> None:
    """Bring the database to ``revision`` (default: the newest). Safe from many processes and threads at
    once (processes serialise on an advisory lock in ``migrations/env.py``)."""
    with _lock:
        try:
            command.upgrade(alembic_config(database_url), revision)
        except Exception as exc:
            import sqlalchemy.exc

            if not isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, OSError)):
                raise
            raise BackendUnavailable(f"migrating the database failed: {_first_line(exc, database_url)}") from None


def _first_line(exc: BaseException, database_url: str) -> str:
    """The driver's own first line (SQLAlchemy's wraps it over several, with a link), with no credential:
    ``alya migrate`` prints one line, as every command does."""
    orig = getattr(exc, "orig", None) or exc
    text = " ".join(str(orig).split()) or type(orig).__name__
    for secret in sorted(secrets_of(database_url), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return redact_text(f"{type(orig).__name__}: {text}")[:500]
