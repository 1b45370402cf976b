"""Schema migrations (Alembic). The scripts live in the top-level ``migrations`` package."""

from __future__ import annotations

import threading
from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.attributes["url"] = database_url
    return cfg


_lock = threading.Lock()  # Alembic keeps its running context in module globals: one upgrade per process


def migrate_database(database_url: str, revision: str = "head") -> None:
    """Bring the database to ``revision`` (default: the newest). Safe from many processes and threads at
    once (processes serialise on an advisory lock in ``migrations/env.py``)."""
    with _lock:
        command.upgrade(alembic_config(database_url), revision)
