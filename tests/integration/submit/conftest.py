from __future__ import annotations

from collections.abc import Iterator

import pytest

from alya import JobManager
from tests.support.config import make_config


@pytest.fixture
def client(database_url: str, file_store_url: str) -> Iterator[JobManager]:
    """No Redis: every call reaches PostgreSQL."""
    jm = JobManager(database_url=database_url, object_store_url=file_store_url, config=make_config())
    yield jm
    jm.close()
