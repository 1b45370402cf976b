"""Fixtures on real services, for every test under tests/integration (tests/unit needs none of them):
each test gets its own PostgreSQL database (a clone of a migrated template), the shared Redis (keys are
per-batch UUIDs, so tests never collide), its own object-store prefix, and, for flow tests, the session's
one Prefect test harness. PostgreSQL and Redis are made sure of when this file is loaded (pytest_configure):
those configured (ALYA_TEST_PG, ALYA_TEST_REDIS), or private ones started for the session where nothing
answers (tests/support/services.py)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from alya import JobManager
from alya.core import names

# Test Prefect servers must not try to send telemetry (no network here; it only adds noise).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
from tests.support import dispatch, services
from tests.support.config import make_config

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


@pytest.fixture
def jm(database_url: str, redis_url: str, file_store_url: str) -> Iterator[JobManager]:
    manager = JobManager(database_url=database_url, redis_url=redis_url, object_store_url=file_store_url,
                         config=make_config())
    yield manager
    manager.close()


@pytest.fixture
def env(database_url: str, redis_url: str, file_store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """ALYA_DATABASE_URL, ALYA_REDIS_URL and ALYA_OBJECT_STORE_URL set to this test's services, for code that
    reads them (the ``alya`` command, JobManager.from_env)."""
    monkeypatch.setenv("ALYA_DATABASE_URL", database_url)
    monkeypatch.setenv("ALYA_REDIS_URL", redis_url)
    monkeypatch.setenv("ALYA_OBJECT_STORE_URL", file_store_url)


@pytest.fixture
def djm(database_url: str, redis_url: str, file_store_url: str, prefect_harness: None) -> Iterator[JobManager]:
    """A JobManager with ALYA_DISPATCH=prefect on the session's Prefect test harness, serving the batch type
    ``disp/work`` (tests/support/dispatch.py) with a no-op processor."""
    manager = JobManager(database_url=database_url, redis_url=redis_url, object_store_url=file_store_url,
                         config=make_config(dispatch="prefect", cancel_timeout_sec=1.0))
    manager.register_batch_processor(dispatch.APP, dispatch.OP, dispatch.Noop())
    yield manager
    manager.close()


@pytest.fixture
def deployment_id(djm: JobManager) -> uuid.UUID:
    """The batch type's deployment ``alya-disp-work/disp-work`` (applied, not served)."""
    return djm.flow(dispatch.APP, dispatch.OP).to_deployment(
        name=names.type_deployment(dispatch.APP, dispatch.OP, djm.config.deployment_name)).apply()  # type: ignore[no-any-return]
