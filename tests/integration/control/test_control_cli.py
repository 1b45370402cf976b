"""``alya pause`` and ``alya resume`` on the real services (with ``status`` and ``abort`` around them)."""

from __future__ import annotations

from pathlib import Path

from tests.support.cli import as_json, cli, write

APP = "cliapp"


def test_pause_resume_and_their_refusals(env: None, tmp_path: Path) -> None:
    src = write(tmp_path / "in.jsonl", "jsonl", [{"n": i} for i in range(5)])
    batch_id = cli("submit", APP, "Echo", src).stdout.strip()
    s = as_json("pause", batch_id)
    assert (s["status"], s["paused"], s["nqueued"]) == ("queued", True, 5)
    assert as_json("status", batch_id)["paused"] is True
    out = cli("pause", batch_id).stdout  # idempotent; the table shows the flag only when set
    assert "paused" in out and "True" in out
    s = as_json("resume", batch_id)
    assert (s["status"], s["paused"]) == ("queued", False)
    assert "paused" not in cli("status", batch_id).stdout
    cli("pause", batch_id)
    assert as_json("abort", batch_id)["status"] == "aborted"
    err = cli("resume", batch_id, code=2)
    assert "already ended aborted" in err.stderr
    assert cli("pause", "00000000-0000-4000-8000-000000000000", code=2)
