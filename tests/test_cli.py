"""The ``alya`` command against the real database: submit from JSON lines, inspect, abort."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alya.cli import app


@pytest.fixture
def env(database_url: str, redis_url: str, file_store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALYA_DATABASE_URL", database_url)
    monkeypatch.setenv("ALYA_REDIS_URL", redis_url)
    monkeypatch.setenv("ALYA_OBJECT_STORE_URL", file_store_url)


def test_submit_status_abort_list(env: None, tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"n": i}) for i in range(5)) + "\n\n")
    runner = CliRunner()
    res = runner.invoke(app, ["submit", "cliapp", "Echo", str(rows), "--context", '{"u": 1}'])
    assert res.exit_code == 0, res.output
    batch_id = res.stdout.strip().splitlines()[-1]

    res = runner.invoke(app, ["status", batch_id])
    assert res.exit_code == 0 and json.loads(res.stdout)["nrows"] == 5

    res = runner.invoke(app, ["list", "cliapp"])
    listed = json.loads(res.stdout)
    assert [b["id"] for b in listed] == [batch_id] and listed[0]["op"] == "echo"

    res = runner.invoke(app, ["abort", batch_id])
    assert json.loads(res.stdout)["status"] == "aborted" and json.loads(res.stdout)["naborted"] == 5

    res = runner.invoke(app, ["done", batch_id, "--rows"])
    done = json.loads(res.stdout)
    assert done["status"] == "aborted" and [r["line"] for r in done["rows"]] == [1, 2, 3, 4, 5]


def test_bad_input_is_a_clear_error(env: None, tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"n": 1}\n[1, 2]\n')
    res = CliRunner().invoke(app, ["submit", "cliapp", "echo", str(rows)])
    assert res.exit_code != 0
    assert "InvalidInput" in repr(res.exception) or "InvalidInput" in res.output
