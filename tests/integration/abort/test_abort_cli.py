"""``alya abort`` (with ``list`` and ``done --json`` around it) on the real services."""

from __future__ import annotations

from pathlib import Path

from tests.support.cli import as_json, cli, write

APP = "cliapp"


def test_abort_list_and_done_json(env: None, tmp_path: Path) -> None:
    src = write(tmp_path / "in.jsonl", "jsonl", [{"n": i} for i in range(5)])
    batch_id = cli("submit", APP, "Echo", src).stdout.strip()
    listed = as_json("list", APP)
    assert [(b["id"], b["op"], b["nrows"]) for b in listed] == [(batch_id, "echo", 5)]
    assert batch_id in cli("list", APP, "--op", "echo").stdout
    s = as_json("abort", batch_id)
    assert (s["status"], s["naborted"]) == ("aborted", 5)
    done = as_json("done", batch_id)
    assert done["status"] == "aborted" and [r["line"] for r in done["rows"]] == [1, 2, 3, 4, 5]
    assert cli("watch", batch_id, code=1)
    assert "aborted" in cli("done", batch_id).stdout
