"""``alya done BATCH --export FILE --status failed [--inputs]``: only the rows of that status; with --inputs
the rows as submitted (line and input columns), which ``alya submit`` takes back with the same line numbers
and inputs. Without the options the export is unchanged (tests/integration/cli)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from alya import JobManager
from tests.support.cli import cli
from tests.support.procs import Proc, drain

APP = "exp"


def _inputs(jm: JobManager, bid: str) -> list[tuple[int, dict]]:
    from tests.support.services import store_sql

    return [(n, i) for n, i in store_sql(jm.store, "SELECT line, input FROM batchrows WHERE batch = %s "
                                                   "ORDER BY line", bid)]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_failed_rows_back_as_a_file_and_submitted_again(env: None, jm: JobManager, tmp_path: Path, fmt: str) -> None:
    jm.register_batch_processor(APP, "again", Proc())
    data = [(n, {"x": n, "name": f"row {n}", **({"mode": "fail", "flag": n % 2 == 0} if n % 4 == 0 else {})})
            for n in range(1, 21)]
    bid = jm.batch_submit(APP, "again", {}, data)
    drain(jm, APP, "again")
    failed = [(n, i) for n, i in data if n % 4 == 0]

    out = tmp_path / f"failed.{fmt}"
    res = cli("done", bid, "--export", str(out), "--status", "failed", "--inputs")
    assert "5 failed rows" in res.stderr and "as inputs" in res.stderr
    if fmt == "jsonl":
        assert [json.loads(x) for x in out.read_text().splitlines()] == [{"line": n, **i} for n, i in failed]
    again = cli("submit", APP, "again", str(out)).stdout.strip()
    assert _inputs(jm, again) == failed  # the same line numbers and inputs

    # --status alone: the results of those rows, in the usual columns
    res_out = tmp_path / f"results.{fmt}"
    assert "15 success rows" in cli("done", bid, "--export", str(res_out), "--status", "success").stderr
    if fmt == "csv":
        df = pd.read_csv(res_out, keep_default_na=False)
        assert list(df.columns) == ["line", "status", "res", "messages"]
        assert list(df["line"]) == [n for n in range(1, 21) if n % 4] and set(df["status"]) == {"success"}


def test_all_inputs_and_refusals(env: None, jm: JobManager, tmp_path: Path) -> None:
    jm.register_batch_processor(APP, "all", Proc())
    data = [(n, {"x": n, "nested": {"a": [n]}}) for n in range(1, 4)]
    bid = jm.batch_submit(APP, "all", {}, data)
    open_bid = jm.batch_submit(APP, "other", {}, data)
    drain(jm, APP, "all")
    out = tmp_path / "all.jsonl"
    cli("done", bid, "--export", str(out), "--inputs")
    assert [json.loads(x) for x in out.read_text().splitlines()] == [{"line": n, **i} for n, i in data]
    csv_out = tmp_path / "all.csv"
    cli("done", bid, "--export", str(csv_out), "--inputs")
    assert csv_out.read_text().splitlines()[:2] == ["line,nested,x", '1,"{""a"":[1]}",1']
    # an empty selection is an empty file with its header
    cli("done", bid, "--export", str(tmp_path / "none.csv"), "--status", "aborted", "--inputs")
    assert (tmp_path / "none.csv").read_text() == "line\n"
    assert "once it is final" in cli("done", open_bid, "--export", str(tmp_path / "x.csv"), "--status", "failed",
                                     code=2).stderr
    assert "status must be" in cli("done", bid, "--export", str(tmp_path / "x.csv"), "--status", "queued",
                                   code=2).stderr
    assert "go with --export" in cli("done", bid, "--status", "failed", code=2).stderr
    assert not (tmp_path / "x.csv").exists()
