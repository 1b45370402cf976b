"""Alembic environment: run by ``alya.migrate_database`` (or the ``alembic`` CLI with -x url=...)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, text

from alya.db.schema import metadata
from alya.db.store import sqlalchemy_url

config = context.config
url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
    "sqlalchemy.url"
)


def run_migrations_online() -> None:
    engine = create_engine(sqlalchemy_url(url))
    with engine.connect() as conn:
        # Several workers may start at once: one migrates, the others wait and then find nothing to do.
        conn.execute(text("SELECT pg_advisory_lock(7242013)"))
        conn.commit()
        try:
            context.configure(connection=conn, target_metadata=metadata, compare_type=True)
            with context.begin_transaction():
                context.run_migrations()
            conn.commit()
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(7242013)"))
            conn.commit()
    engine.dispose()


run_migrations_online()
