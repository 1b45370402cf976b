"""Fixtures on real services: each test gets its own PostgreSQL database (a clone of a migrated
template), the shared Redis (keys are per-batch UUIDs, so tests never collide), its own object-store
prefix, and, for flow tests, the session's one Prefect test harness."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from alya import JobManager, JobManagerConfig

# Test Prefect servers must not try to send telemetry (no network here; it only adds noise).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
from tests import services

_services = contextlib.ExitStack()


def pytest_configure(config: pytest.Config) -> None:
    """Before any test: PostgreSQL and Redis where configured, or private ones where nothing answers."""
    _services.enter_context(services.ensure_pg_and_redis())


def pytest_unconfigure(config: pytest.Config) -> None:
    _services.close()


def pytest_report_header(config: pytest.Config) -> list[str]:
    started = services.STARTED or ["none (PostgreSQL and Redis answered where configured)"]
    return [f"alya test services started for this session: {', '.join(started)}"]


@pytest.fixture(scope="session")
def template_db() -> Iterator[str]:
    name = services.create_template(f"alya_tpl_{os.getpid()}")
    yield name
    services.drop_database(name)


@pytest.fixture
def database_url(template_db: str) -> Iterator[str]:
    name = services.clone_database(template_db)
    yield f"{services.PG_SERVER}/{name}"
    services.drop_database(name)


@pytest.fixture
def redis_url() -> str:
    return services.REDIS_URL


@pytest.fixture
def file_store_url(tmp_path: Any) -> str:
    return (tmp_path / "objects").as_uri()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    with services.seaweed_s3() as s3:
        os.environ["AWS_ACCESS_KEY_ID"] = s3["key"]
        os.environ["AWS_SECRET_ACCESS_KEY"] = s3["secret"]
        os.environ["AWS_ENDPOINT_URL"] = s3["endpoint"]
        os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
        yield s3


@pytest.fixture
def s3_url(s3_server: dict[str, str]) -> str:
    return f"s3://{s3_server['bucket']}/t-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One Prefect test server per session (it takes ~11 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def make_config(**overrides: Any) -> JobManagerConfig:
    base: dict[str, Any] = {"batchchunk_nrows": 100, "retry_backoff_sec": 0.0, "poll_sec": 0.1, "recovery_sec": 60}
    base.update(overrides)
    return JobManagerConfig(**base)


@pytest.fixture
def jm(database_url: str, redis_url: str, file_store_url: str) -> Iterator[JobManager]:
    manager = JobManager(database_url=database_url, redis_url=redis_url, object_store_url=file_store_url,
                         config=make_config())
    yield manager
    manager.close()
