"""Schema migrations (Alembic). The scripts live in the top-level ``migrations`` package."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.attributes["url"] = database_url
    return cfg


def migrate_database(database_url: str, revision: str = "head") -> None:
    """Bring the database to ``revision`` (default: the newest). Safe to run from many processes at once."""
    command.upgrade(alembic_config(database_url), revision)
