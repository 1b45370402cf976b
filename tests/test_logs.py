"""Logs and settings: JSON or console lines on stderr, alya's lines in the Prefect run's logs, and every
invalid setting a ConfigError that names the variable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from alya import BatchStatus, ConfigError, JobManager, JobManagerConfig
from tests.conftest import make_config
from tests.procs import Proc, wait_until


@pytest.mark.parametrize(("env", "value", "allowed"), [
    ("ALYA_DISPATCH", "bogus", "'none' or 'prefect'"),
    ("ALYA_BATCHCHUNK_NROWS", "0", "greater than or equal to 1"),
    ("ALYA_CONCURRENCY", "many", "valid integer"),
    ("ALYA_LOG_FORMAT", "xml", "'json', 'console' or 'auto'"),
    ("ALYA_APP_LIMITS", "bank", "app=limit pairs"),
    ("ALYA_APP_LIMITS", "bank=0", "at least 1"),
])
def test_a_bad_setting_is_a_config_error_naming_it(monkeypatch: pytest.MonkeyPatch, env: str, value: str,
                                                   allowed: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as err:
        from alya.core.settings import JobManagerConfig, LogSettings

        JobManagerConfig() if env != "ALYA_LOG_FORMAT" else LogSettings()  # type: ignore[call-arg]
    assert env in str(err.value) and allowed in str(err.value) and repr(value) in str(err.value)


def test_constructor_arguments_are_checked_too() -> None:
    with pytest.raises(ConfigError, match="ALYA_FLUSH_SEC"):
        JobManagerConfig(flush_sec=-1)  # type: ignore[call-arg]


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("ALYA_LOG")}
    return subprocess.run([sys.executable, "-c", code], env={**full, **env}, capture_output=True, text=True,
                          timeout=60, check=True)


CODE = "from alya.core.logs import status_change; status_change('app1', 'op1', 'b-1', 'queued', nrows=3)"


def test_json_lines_when_piped_and_console_when_asked() -> None:
    line = json.loads(run_python(CODE).stderr.strip().splitlines()[-1])
    assert (line["event"], line["app"], line["op"], line["batch"], line["new"]) == \
        ("status_change", "app1", "op1", "b-1", "queued")
    console = run_python(CODE, ALYA_LOG_FORMAT="console").stderr
    assert "status_change" in console and "app=app1" in console and not console.lstrip().startswith("{")


def test_level_filters(tmp_path: Any) -> None:
    assert run_python(CODE, ALYA_LOG_LEVEL="warning").stderr.strip() == ""


def test_alya_lines_reach_the_prefect_run_logs(prefect_harness: None, database_url: str, redis_url: str,
                                                file_store_url: str) -> None:
    """A batch flow run's page in the Prefect UI shows alya's own lines (status changes with app, op and
    batch), not only Prefect's."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    jm = JobManager(database_url=database_url, redis_url=redis_url, object_store_url=file_store_url,
                    config=make_config())
    try:
        jm.register_batch_processor("logs", "ui", Proc())
        bid = jm.batch_submit("logs", "ui", {}, [(n, {"x": n, **({"mode": "fail"} if n == 7 else {})})
                                                  for n in range(1, 21)])
        state = jm.flow("logs", "ui")(batch_id=bid, return_state=True)
        assert jm.batch_status(bid).status is BatchStatus.FAILED
        run_id = state.state_details.flow_run_id
        APILogHandler().flush()

        def alya_lines() -> list[str]:
            with get_client(sync_client=True) as client:
                logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            return [log.message for log in logs if log.name == "alya"]

        lines = wait_until(lambda: [m for m in alya_lines() if "new='failed'" in m] and alya_lines(),
                           timeout=30, what="alya's lines in the run's logs")
        assert any("event='status_change'" in m and "app='logs'" in m and f"batch='{bid}'" in m for m in lines)
        assert any("event='rows_written'" in m for m in lines)
        # a row's own line, written on one of alya's row threads, reaches the run too
        assert any("event='row_status'" in m and "line=7" in m and "new='failed'" in m for m in lines)
        assert not any("flow_run_id" in m for m in lines)
    finally:
        jm.close()


def test_auto_migrate_brings_a_fresh_database_to_head(database_url: str, file_store_url: str) -> None:
    """ALYA_AUTO_MIGRATE: a worker on a database that was never migrated migrates it before its first
    claim (without it, the same call is a DatabaseNotMigrated saying to run `alya migrate`)."""
    import uuid

    import pytest as _pytest

    from alya import DatabaseNotMigrated
    from tests import services

    name = f"alya_fresh_{uuid.uuid4().hex[:8]}"
    services.admin_exec(f'CREATE DATABASE "{name}"')
    url = f"{services.PG_SERVER}/{name}"
    try:
        plain = JobManager(database_url=url, object_store_url=file_store_url, config=make_config())
        with _pytest.raises(DatabaseNotMigrated, match="alya migrate"):
            plain.batch_status("00000000-0000-4000-8000-000000000001")
        plain.close()
        jm = JobManager(database_url=url, object_store_url=file_store_url, config=make_config(auto_migrate=True))
        jm.register_batch_processor("logs", "mig", Proc())
        jm.run(stop_when_idle=True)  # migrates, then finds nothing to do
        bid = jm.batch_submit("logs", "mig", {}, [(1, {"x": 1})])
        jm.run(stop_when_idle=True)
        assert jm.batch_status(bid).status is BatchStatus.SUCCESS
        jm.close()
    finally:
        services.drop_database(name)
