"""Logs and settings: JSON or console lines on stderr, no password in them, and every invalid setting
(of JobManagerConfig, the logs, the file intake) a ConfigError that names the variable. (alya's lines in a
Prefect run's logs: tests/integration/dispatch/test_flow_run_logs.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import structlog.testing

from alya import ConfigError, JobManagerConfig
from alya.core.logs import configure
from alya.core.names import summary_key
from alya.core.settings import IntakeSettings
from alya.io.cache import StatusCache


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


def test_intake_settings_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALYA_INTAKE_PATTERNS", "*.csv=txn, *.parquet=TXN")
    monkeypatch.setenv("ALYA_INTAKE_URL", "s3://bucket/inbox")
    s = IntakeSettings()  # type: ignore[call-arg]
    assert s.patterns == {"*.csv": "txn", "*.parquet": "txn"} and s.intake_min_age_sec == 10
    for name, value in (("ALYA_INTAKE_PATTERNS", "*.csv"), ("ALYA_INTAKE_PATTERNS", "dir/*.csv=txn"),
                        ("ALYA_INTAKE_MIN_AGE_SEC", "-1"), ("ALYA_INTAKE_EVERY_SEC", "often")):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            with pytest.raises(ConfigError, match=name):
                IntakeSettings()  # type: ignore[call-arg]


def test_logs_never_show_the_redis_password() -> None:
    configure()  # as a JobManager does first: configuring inside capture_logs would undo the capture
    with structlog.testing.capture_logs() as logs:
        cache = StatusCache("redis://:s3cret@127.0.0.1:1/0", ttl_sec=60)
        assert cache.get(summary_key("00000000-0000-4000-8000-000000000001")) is None
        cache.close()
    assert [e["event"] for e in logs] == ["redis_unavailable"]
    assert "s3cret" not in repr(logs) and logs[0]["redis"] == "127.0.0.1:1/0"


def test_a_failed_row_s_line_names_its_error_codes_and_fields() -> None:
    from alya.engine.executor import error_codes

    assert error_codes('[{"msgid": 1, "errcode": "bad_amount", "field": "amount"}, {"msgid": 2, "errcode": "late"}]') \
        == "bad_amount (amount), late"
    assert error_codes(None) == ""
    assert error_codes("not json") == "not json"
