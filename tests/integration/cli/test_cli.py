"""The ``alya`` command on the real PostgreSQL, Redis and S3: files in every format from a path or an s3://
URL, append and wait-off, status, watch, export, list, and user errors (one line, exit code 2); the
command-line worker and the demo. (`alya abort`: tests/integration/abort/test_abort_cli.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from alya import JobManager
from alya.core.names import summary_key
from tests.support import services
from tests.support.cli import as_json, cli, write
from tests.support.procs import ROOT, Proc, drain

APP = "cliapp"


def stored_inputs(jm: JobManager, batch_id: str) -> list[tuple[int, dict[str, Any]]]:
    rows = services.sql(jm.store.database_url, "SELECT line, input FROM batchrows WHERE batch = %s ORDER BY line",
                        batch_id)
    return [(line, inp) for line, inp in rows]


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_submit_each_format_then_process_and_export(env: None, jm: JobManager, tmp_path: Path, fmt: str) -> None:
    src = write(tmp_path / f"in.{fmt}", fmt, [{"x": i, "mode": "fail" if i == 3 else "ok"} for i in range(1, 6)])
    batch_id = cli("submit", APP, "Echo", src, "--context", '{"u": 1}').stdout.strip()
    assert stored_inputs(jm, batch_id) == [(i, {"x": i, "mode": "fail" if i == 3 else "ok"}) for i in range(1, 6)]
    s = as_json("status", batch_id)
    assert (s["status"], s["nrows"], s["nqueued"]) == ("queued", 5, 5)
    assert batch_id in cli("status", batch_id).stdout and "queued" in cli("status", batch_id).stdout

    jm.register_batch_processor(APP, "echo", Proc())
    drain(jm, APP, "echo")
    assert cli("watch", batch_id, code=1).stdout.count("failed") >= 1  # failed: exit code 1

    out = tmp_path / f"out.{fmt}"
    res = cli("done", batch_id, "--export", str(out))
    assert "5 rows" in res.stderr
    if fmt == "jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    else:
        df = pd.read_csv(out, keep_default_na=False) if fmt == "csv" else pd.read_parquet(out)
        rows = [{**r, "res": json.loads(r["res"]) if isinstance(r["res"], str) and r["res"] else None,
                 "messages": json.loads(r["messages"]) if isinstance(r["messages"], str) and r["messages"] else []}
                for r in df.to_dict("records")]
    assert [(r["line"], r["status"]) for r in rows] == [(i, "failed" if i == 3 else "success") for i in range(1, 6)]
    assert rows[0]["res"] == {"line": 1, "x": 1, "ctx": {"u": 1}} and rows[0]["messages"] == []
    assert rows[2]["messages"] == [{"msgid": 7, "errcode": "bad_value", "field": "x", "vals": ["3"]}]


def test_line_column_append_wait_off_and_watch_success(env: None, jm: JobManager, tmp_path: Path) -> None:
    first = write(tmp_path / "a.csv", "csv", [{"line": 10, "x": 1}, {"line": 20, "x": 2}])
    batch_id = cli("submit", APP, "echo", first, "--wait").stdout.strip()
    assert as_json("status", batch_id)["status"] == "wait"
    more = write(tmp_path / "b.jsonl", "jsonl", [{"x": 3}, {"x": 4}])
    assert cli("append", batch_id, more, "--wait").stdout.strip() == "4"  # numbered after the batch's rows
    last = write(tmp_path / "c.parquet", "parquet", [{"x": 5}])
    assert cli("append", batch_id, last, "--wait", "--first-line", "100").stdout.strip() == "5"
    assert [line for line, _ in stored_inputs(jm, batch_id)] == [3, 4, 10, 20, 100]
    assert cli("wait-off", batch_id).stdout.strip() == "5"
    assert as_json("status", batch_id)["status"] == "queued"

    jm.register_batch_processor(APP, "echo", Proc())
    worker = threading.Thread(target=drain, args=(jm, APP, "echo"), daemon=True)
    worker.start()
    res = cli("watch", batch_id, "--interval", "0.1", code=0)  # success: exit code 0
    worker.join()
    assert "5/5" in res.stdout and "success" in res.stdout


def test_submit_from_s3_and_export_to_s3(env: None, jm: JobManager, s3_url: str) -> None:
    import fsspec

    src = f"{s3_url}/in/rows.csv"
    with fsspec.open(src, "wt") as fh:
        fh.write("x,name\n1,ann\n2,\n")
    batch_id = cli("submit", APP, "echo", src).stdout.strip()
    assert stored_inputs(jm, batch_id) == [(1, {"x": 1, "name": "ann"}), (2, {"x": 2})]
    jm.register_batch_processor(APP, "echo", Proc())
    drain(jm, APP, "echo")
    out = f"{s3_url}/out/rows.jsonl"
    cli("done", batch_id, "--export", out)
    with fsspec.open(out, "rt") as fh:
        assert [json.loads(line)["status"] for line in fh] == ["success", "success"]


@pytest.mark.parametrize(("args", "message"), [
    (["submit", APP, "op", "{tmp}/missing.csv"], "no such file"),
    (["submit", APP, "op", "{tmp}/rows.txt"], "unknown file type"),
    (["submit", APP, "op", "{tmp}/bad.jsonl"], "InvalidInput"),
    (["submit", "Bad App", "op", "{tmp}/good.jsonl"], "InvalidInput"),
    (["status", "not-a-uuid"], "not a batch id"),
    (["status", "5b0d1d2c-0000-4000-8000-000000000000"], "BatchNotFound"),
    (["append", "{batch}", "{tmp}/good.jsonl"], "InvalidState"),  # the batch is queued, not wait
    (["done", "{batch}", "--export", "{tmp}/out.csv"], "once it is final"),
    (["done", "{batch}", "--export", "{tmp}/out.xlsx"], "unknown file type"),
])
def test_user_errors_are_one_line_and_exit_2(env: None, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "rows.txt").write_text("x\n")
    (tmp_path / "bad.jsonl").write_text('{"n": 1}\n[1, 2]\n')
    (tmp_path / "good.jsonl").write_text('{"n": 1}\n')
    batch_id = cli("submit", APP, "op", str(tmp_path / "good.jsonl")).stdout.strip()
    res = cli(*[a.format(tmp=tmp_path, batch=batch_id) for a in args], code=2)
    assert res.stderr.startswith("error: ") and message in res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert len(as_json("list", APP)) == 1  # a refused submit stored nothing


def run_alya(*args: str, env: dict[str, str], cwd: str = ROOT,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "alya.cli.main", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user who set nothing of alya's or Prefect's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALYA_", "PREFECT_"))}
    env["PYTHONPATH"] = ROOT
    env.update(extra)
    return env


def test_the_command_line_reports_errors_in_one_line(database_url: str, tmp_path: Path) -> None:
    res = run_alya("submit", APP, "op", str(tmp_path / "nope.csv"), env=clean_env(ALYA_DATABASE_URL=database_url))
    assert res.returncode == 2 and res.stderr.strip() == f"error: no such file: {tmp_path / 'nope.csv'}"


def test_worker_says_once_that_prefect_starts_a_temporary_server(database_url: str, tmp_path: Path) -> None:
    (tmp_path / "idle_app.py").write_text("from alya import JobManager\njm = JobManager()\n")
    env = clean_env(ALYA_DATABASE_URL=database_url, PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}",
                    PREFECT_HOME=str(tmp_path / "prefect"))
    res = run_alya("worker", "idle_app:jm", "--stop-when-idle", env=env, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "PREFECT_API_URL" in ln]
    assert len(lines) == 1 and "temporary local server" in lines[0]

    env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"  # set: nothing to say (and nothing is contacted: no work)
    res = run_alya("worker", "idle_app:jm", "--stop-when-idle", env=env, cwd=str(tmp_path))
    assert res.returncode == 0 and "temporary local server" not in res.stderr


@pytest.mark.slow
def test_demo_on_embedded_defaults_leaves_nothing_running(tmp_path: Path) -> None:
    """What a newcomer runs: no ALYA_* or PREFECT_* set, in a fresh folder."""
    import time

    from alya.db import embedded

    t = time.monotonic()
    res = run_alya("demo", "--rows", "300", "--row-ms", "1", env=clean_env(), cwd=str(tmp_path), timeout=300)
    took = time.monotonic() - t
    assert res.returncode == 0, res.stdout + res.stderr
    out = " ".join(res.stdout.split())  # as read, whatever the line wrapping
    for expected in ("embedded in .alya-data/pg", "temporary local server", "300/300", "success",
                     "greetings.txt, first lines: Hello, user1! | Hello, user2! | Hello, user3!",
                     "alya-demo-greet", "Completed", "Stopped the embedded PostgreSQL", "Next"):
        assert expected in out, (expected, out)
    noise = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.lstrip().startswith("{") or "Traceback" in ln
             or "| INFO" in ln or "ERROR" in ln]
    assert noise == [], noise
    pgdata = tmp_path / ".alya-data" / "pg"
    assert (pgdata / "PG_VERSION").exists() and not (pgdata / "postmaster.pid").exists()
    assert took < 120

    # A later command finds the demo's batch in the same folder, and stops the server it had to start.
    listed = run_alya("list", "demo", "--json", env=clean_env(), cwd=str(tmp_path))
    assert listed.returncode == 0, listed.stderr
    assert [(b["op"], b["nrows"], b["nfailed"]) for b in json.loads(listed.stdout)] == [("greet", 300, 3)]
    assert listed.stderr == ""  # no log lines on top of the answer
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert not embedded.is_running()
    finally:
        os.chdir(cwd)


def test_list_shows_paused_not_before_and_deadline(env: None, jm: JobManager,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``alya list`` (and BatchDetails) show batch control: paused after the status, the not_before and
    deadline columns when a listed batch has one, the same in --json; --paused lists only paused batches."""
    monkeypatch.setenv("COLUMNS", "200")  # rich's width: one line a batch
    now = datetime.now(UTC).replace(microsecond=0)
    not_before, deadline = now + timedelta(hours=1), now + timedelta(hours=2)
    plain = jm.batch_submit(APP, "echo", {}, [(1, {"x": 1})])
    assert "not before" not in cli("list", APP).stdout and "deadline" not in cli("list", APP).stdout
    later = jm.batch_submit(APP, "echo", {}, [(1, {"x": 1})], not_before=not_before, deadline=deadline)
    assert jm.batch_pause(later).paused
    details = {d.id: d for d in jm.batch_list(APP)}
    assert (details[plain].paused, details[plain].not_before, details[plain].deadline) == (False, None, None)
    assert (details[later].paused, details[later].not_before, details[later].deadline) == (True, not_before, deadline)

    listed = {b["id"]: b for b in as_json("list", APP)}
    assert (listed[plain]["paused"], listed[plain]["not_before"], listed[plain]["deadline"]) == (False, None, None)
    assert listed[later]["paused"] is True
    assert datetime.fromisoformat(listed[later]["not_before"]) == not_before
    assert datetime.fromisoformat(listed[later]["deadline"]) == deadline
    assert [b["id"] for b in as_json("list", APP, "--paused")] == [later]

    lines = cli("list", APP).stdout.splitlines()
    assert lines[0].split()[-4:] == ["requested", "not", "before", "deadline"]
    [row] = [line for line in lines if later in line]
    local = details[later]
    assert "queued paused" in row and row.endswith(f"{local.not_before:%m-%d %H:%M} {local.deadline:%m-%d %H:%M}")
    [row] = [line for line in lines if plain in line]
    assert "paused" not in row and row.rstrip().endswith(f"{details[plain].reqat:%m-%d %H:%M}")
    assert [line for line in cli("list", APP, "--paused").stdout.splitlines()[1:] if line.strip()] == [
        next(line for line in lines if later in line)]


def test_text_from_a_batch_is_never_read_as_markup(env: None, jm: JobManager, database_url: str) -> None:
    """Issue 18: a summary error holding ``[/]`` crashed ``alya status`` (rich MarkupError). Errors, output
    file names and URLs are printed as text, whatever brackets they hold."""
    batch_id = jm.batch_submit(APP, "marked", {}, [(1, {})])
    error = "summary failed: [/] [bold red]not markup[/bold red] [link=http://x]y"
    services.sql(database_url, "UPDATE batches SET status = 'failed', error = %s, outputfiles = %s::jsonb, "
                 "ver = ver + 1 WHERE id = %s", error, json.dumps({"a[/].csv": "file:///o/[b]/a.csv"}), batch_id)
    jm.cache.delete(summary_key(batch_id))
    for command in ("status", "done"):
        out = cli(command, batch_id).stdout
        flat = " ".join(out.split())
        assert "[/] [bold red]not markup[/bold red]" in flat and "a[/].csv" in flat, out


def test_migrate_errors_are_one_line_without_the_password() -> None:
    """Issue 18: `alya migrate` against an unreachable database printed SQLAlchemy's traceback."""
    out = cli("migrate", "--database-url", "postgresql://alya:Pa/ss@w0rd@127.0.0.1:1/alya", code=2)
    assert out.stderr.startswith("error: BackendUnavailable: migrating the database failed: ")
    assert out.stderr.strip().count("\n") == 0 and "Pa/ss" not in out.stderr and "w0rd" not in out.stderr
