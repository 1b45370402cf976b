"""Schema migrations (Alembic). The scripts live in the repository's ``migrations/`` folder, which the
wheel ships as ``alya.migrations`` (nothing of alya's is installed as a top-level package)."""

from __future__ import annotations

import threading
from importlib import resources

from alembic import command
from alembic.config import Config


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
        command.upgrade(alembic_config(database_url), revision)
