"""File intake on real services (PostgreSQL, Redis, SeaweedFS S3, a Prefect test server): files become
batches exactly once, rejected files go to failed/ with their reason, memory stays flat in the file's size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import pytest
from structlog.testing import capture_logs

from alya import BatchInput, BatchStatus, FileCheck, IncomingFile, InvalidInput, JobManager
from alya.core.errors import ProcessorNotFound
from tests.support import services
from tests.support.intake_app import APP, FILE_TYPE, OP, RowsChecker

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def ijm(jm: JobManager) -> JobManager:
    jm.register_file_checker(FILE_TYPE, RowsChecker(chunksize=2))  # small chunks: rows span several frames
    return jm


def write(path: Path, text: str, age_sec: float = 60) -> Path:
    """A file as a producer leaves it, ``age_sec`` old (the intake leaves younger files alone)."""
    path.write_text(text)
    t = time.time() - age_sec
    os.utime(path, (t, t))
    return path


def batches(database_url: str) -> list[tuple[Any, ...]]:
    return services.sql(database_url, "SELECT id::text, app, op, nrows, inputfile FROM batches ORDER BY reqat")


def rows_of(database_url: str, batch_id: str) -> list[tuple[int, dict[str, Any]]]:
    return [(line, inp) for line, inp in services.sql(
        database_url, "SELECT line, input FROM batchrows WHERE batch = %s ORDER BY line", batch_id)]


def names_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------- the API
def test_good_csv_becomes_a_batch_and_missing_cells_stay_missing(ijm: JobManager, database_url: str,
                                                                 tmp_path: Path) -> None:
    f = write(tmp_path / "a.csv", "id,name,amount\n1,ann,10\n2,,\n3,bob,7.5\n")
    fi = ijm.file_submit(str(f), FILE_TYPE, {"user": "ann"})
    assert fi.status == "submitted" and fi.error is None and fi.nrows == 3 and fi.size == f.stat().st_size
    assert fi.url == fi.source == f.as_uri() and f.exists()  # file_submit leaves the file where it is
    [(batch_id, app, op, nrows, inputfile)] = batches(database_url)
    assert (batch_id, app, op, nrows, inputfile) == (fi.batch_id, APP, OP, 3, f.as_uri())
    assert rows_of(database_url, batch_id) == [
        (1, {"id": 1, "name": "ann", "amount": 10.0}),
        (2, {"id": 2}),  # empty cells are absent, never NaN
        (3, {"id": 3, "name": "bob", "amount": 7.5}),
    ]
    assert ijm.batch_status(batch_id).status is BatchStatus.QUEUED and ijm.batch_status(batch_id).nrows == 3
    ctx = services.sql(database_url, "SELECT context FROM batches")[0][0]
    assert ctx == {"user": "ann", "file": "a.csv"}
    assert [x.batch_id for x in ijm.file_list()] == [batch_id]


def test_the_same_file_twice_returns_the_first_intake(ijm: JobManager, database_url: str, tmp_path: Path) -> None:
    f = write(tmp_path / "a.csv", "id\n1\n2\n")
    first = ijm.file_submit(f.as_uri(), FILE_TYPE)
    assert not first.repeat
    with capture_logs() as logs:
        again = ijm.file_submit(str(f), FILE_TYPE)
    assert again == replace(first, repeat=True)  # a path and its file:// URL are one file: a repeat of it
    (line,) = [e for e in logs if e["event"] == "file_already_taken"]
    assert line["batch"] == first.batch_id and line["detail"] == f"already taken as batch {first.batch_id}"
    assert not [e for e in logs if e["event"] == "file_submitted"]
    # racing submits of one new file: one batch, the same answer for all
    g = write(tmp_path / "b.csv", "id\n1\n")
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(ijm.file_submit(str(g), FILE_TYPE)), daemon=True)
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 4 and len({r.batch_id for r in results}) == 1
    assert sorted(r.repeat for r in results) == [False, True, True, True]  # one took it, three were told
    assert len(batches(database_url)) == 2
    # the file rewritten is a new file
    write(f, "id\n1\n2\n3\n")
    rewritten = ijm.file_submit(str(f), FILE_TYPE)
    assert rewritten.batch_id != first.batch_id and not rewritten.repeat
    assert len(batches(database_url)) == 3


def test_bad_calls_raise_typed_errors_and_store_nothing(ijm: JobManager, database_url: str, tmp_path: Path) -> None:
    f = write(tmp_path / "a.csv", "id\n1\n")
    with pytest.raises(ProcessorNotFound):
        ijm.file_submit(str(f), "nosuchtype")
    with pytest.raises(InvalidInput):
        ijm.file_submit(str(tmp_path / "missing.csv"), FILE_TYPE)
    with pytest.raises(InvalidInput):
        ijm.file_submit(str(f), FILE_TYPE, context="[1]")
    with pytest.raises(InvalidInput):
        ijm.register_file_checker(FILE_TYPE, RowsChecker())  # one checker per type
    with pytest.raises(InvalidInput):
        ijm.register_file_checker("other", object())  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        ijm.intake_scan(str(tmp_path), "*.csv")  # not GLOB=TYPE
    with pytest.raises(ProcessorNotFound):
        ijm.intake_scan(str(tmp_path), {"*.csv": "nosuchtype"})
    with pytest.raises(InvalidInput):
        ijm.intake_scan(str(tmp_path / "nofolder"), {"*.csv": FILE_TYPE})
    with pytest.raises(InvalidInput):
        ijm.intake_scan(str(tmp_path), {"*.csv": FILE_TYPE}, min_age_sec=-1)
    assert batches(database_url) == [] and ijm.file_list() == [] and f.exists()


class Raising:
    def check(self, file: IncomingFile, context: dict[str, Any]) -> FileCheck:
        raise RuntimeError("the checker broke")


class BadRows:
    """Rows that PostgreSQL or the COPY refuses, depending on the file's name."""

    def check(self, file: IncomingFile, context: dict[str, Any]) -> FileCheck:
        if file.name.startswith("dup"):
            return FileCheck(ok=True, app=APP, op=OP, rows=[BatchInput(1, {"a": 1}), BatchInput(1, {"a": 2})])
        if file.name.startswith("notobj"):
            return FileCheck(ok=True, app=APP, op=OP, rows=[(1, {"a": 1}), (2, [1, 2])])
        if file.name.startswith("badapp"):
            return FileCheck(ok=True, app="Bad App", op=OP, rows=[(1, {"a": 1})])
        return FileCheck(ok=True, app=APP, op=OP, rows=file.frames(chunksize=2))  # the file's own rows


def test_scan_submits_good_files_and_rejects_bad_ones(ijm: JobManager, database_url: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    ijm.register_file_checker("boom", Raising())
    ijm.register_file_checker("bad", BadRows())
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write(inbox / "good.csv", "id,x\n1,a\n2,b\n")
    write(inbox / "good2.jsonl", '{"id": 1, "nested": {"a": [1, null]}}\n{"id": 2, "x": null}\n')
    write(inbox / "noid.csv", "x\n1\n")  # the checker says no
    write(inbox / "raises.txt", "whatever")  # the checker raises
    write(inbox / "broken.parquet", "this is not parquet")  # cannot be parsed
    write(inbox / "empty.csv", "")  # no rows at all
    write(inbox / "dup.dat", "")  # repeated line numbers (PostgreSQL's unique key)
    write(inbox / "notobj.dat", "")  # an input that is not an object (the COPY stream)
    write(inbox / "badapp.dat", "")  # an app name the checker got wrong
    write(inbox / "late.jsonl", '{"id": 1}\n{"id": 2}\n{"id": 3}\nnot json\n')  # parse error after 1 chunk
    write(inbox / "ignored.xml", "<x/>")  # matches no pattern
    (inbox / "sub").mkdir()
    write(inbox / "sub" / "deeper.csv", "id\n1\n")  # subfolders are not scanned
    patterns = {"*.csv": FILE_TYPE, "*.jsonl": FILE_TYPE, "*.parquet": FILE_TYPE, "*.txt": "boom",
                "*.dat": "bad"}
    taken = ijm.intake_scan(inbox.as_uri(), patterns, min_age_sec=5)
    by_name = {fi.source.rsplit("/", 1)[-1]: fi for fi in taken}
    assert sorted(by_name) == ["badapp.dat", "broken.parquet", "dup.dat", "empty.csv", "good.csv", "good2.jsonl",
                               "late.jsonl", "noid.csv", "notobj.dat", "raises.txt"]
    assert all(fi.moved for fi in taken)
    good = [by_name["good.csv"], by_name["good2.jsonl"]]
    assert all(fi.status == "submitted" and fi.batch_id and fi.error is None for fi in good)
    assert {(b[0], b[3]) for b in batches(database_url)} == {(fi.batch_id, 2) for fi in good}
    assert rows_of(database_url, by_name["good2.jsonl"].batch_id or "") == [
        (1, {"id": 1, "nested": {"a": [1, None]}}), (2, {"id": 2})]
    errors = {name: fi.error for name, fi in by_name.items() if fi.status == "rejected"}
    assert all(by_name[n].batch_id is None and by_name[n].nrows == 0 for n in errors)
    assert errors["noid.csv"] == "no column id"
    assert "the checker broke" in (errors["raises.txt"] or "") and "RuntimeError" in (errors["raises.txt"] or "")
    assert "Parquet" in (errors["broken.parquet"] or "")
    assert "readable CSV" in (errors["empty.csv"] or "")
    assert "unique" in (errors["dup.dat"] or "")
    assert "JSON object" in (errors["notobj.dat"] or "")
    assert "app must match" in (errors["badapp.dat"] or "")
    assert "line 4" in (errors["late.jsonl"] or "")  # a file that breaks after its first chunk: rejected whole
    # where the files are now
    assert by_name["good.csv"].url == f"{inbox.as_uri()}/done/{by_name['good.csv'].batch_id}/good.csv"
    assert by_name["noid.csv"].url == f"{inbox.as_uri()}/failed/noid.csv"
    assert names_in(inbox) == sorted([
        *(f"done/{fi.batch_id}/{fi.source.rsplit('/', 1)[-1]}" for fi in good),
        *(f"failed/{n}" for n in errors), "ignored.xml", "sub/deeper.csv"])
    # the reasons are in the logs, with the file and its type
    logged = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    rejected = {e["url"].rsplit("/", 1)[-1]: e for e in logged if e.get("event") == "file_rejected"}
    assert rejected["raises.txt"]["filetype"] == "boom" and "the checker broke" in rejected["raises.txt"]["error"]
    assert set(rejected) == set(errors)
    # a second pass finds nothing new
    assert ijm.intake_scan(inbox.as_uri(), patterns, min_age_sec=5) == []
    assert len(batches(database_url)) == 2
    assert {fi.status for fi in ijm.file_list()} == {"submitted", "rejected"} and len(ijm.file_list()) == 10


def test_a_rejected_name_already_in_failed_keeps_both(ijm: JobManager, tmp_path: Path) -> None:
    write(tmp_path / "x.csv", "nope\n1\n")
    [first] = ijm.intake_scan(str(tmp_path), "*.csv=rows", min_age_sec=0)
    write(tmp_path / "x.csv", "nope\n2\n", age_sec=30)
    [second] = ijm.intake_scan(str(tmp_path), "*.csv=rows", min_age_sec=0)
    assert first.url.endswith("/failed/x.csv") and second.url.endswith("-x.csv") and second.url != first.url
    assert len(list((tmp_path / "failed").iterdir())) == 2


def test_young_files_wait(ijm: JobManager, tmp_path: Path) -> None:
    write(tmp_path / "new.csv", "id\n1\n", age_sec=0)
    write(tmp_path / "old.csv", "id\n1\n", age_sec=120)
    assert [fi.source.rsplit("/", 1)[-1] for fi in ijm.intake_scan(str(tmp_path), "*.csv=rows", 60)] == ["old.csv"]
    assert (tmp_path / "new.csv").exists()
    assert [fi.source.rsplit("/", 1)[-1] for fi in ijm.intake_scan(str(tmp_path), "*.csv=rows", 0)] == ["new.csv"]


def test_a_crash_between_commit_and_move_does_not_submit_again(ijm: JobManager, database_url: str,
                                                                tmp_path: Path) -> None:
    """The move fails for real after the commit (a file named ``done`` where the folder should be): the
    file stays in the inbox with its record; the next pass only moves it."""
    f = write(tmp_path / "a.csv", "id\n1\n2\n")
    (tmp_path / "done").write_text("in the way")
    [fi] = ijm.intake_scan(str(tmp_path), "*.csv=rows", min_age_sec=0)
    assert fi.status == "submitted" and not fi.moved and fi.url == f.as_uri() and f.exists()
    assert len(batches(database_url)) == 1
    assert ijm.intake_scan(str(tmp_path), "*.csv=rows", min_age_sec=0) == []  # still in the way: nothing new
    (tmp_path / "done").unlink()
    assert ijm.intake_scan(str(tmp_path), "*.csv=rows", min_age_sec=0) == []  # not taken again...
    assert not f.exists() and (tmp_path / "done" / str(fi.batch_id) / "a.csv").exists()  # ...only moved
    assert len(batches(database_url)) == 1
    [listed] = ijm.file_list()
    assert listed.moved and listed.url.endswith(f"/done/{fi.batch_id}/a.csv") and listed.batch_id == fi.batch_id


def test_a_file_submitted_by_url_is_moved_not_retaken_by_a_scan(ijm: JobManager, database_url: str,
                                                                tmp_path: Path) -> None:
    f = write(tmp_path / "a.csv", "id\n1\n")
    fi = ijm.file_submit(str(f), FILE_TYPE)
    assert ijm.intake_scan(str(tmp_path), "*.csv=rows", min_age_sec=0) == []
    assert (tmp_path / "done" / str(fi.batch_id) / "a.csv").exists() and len(batches(database_url)) == 1


def test_four_concurrent_scans_take_each_of_20_files_once(database_url: str, tmp_path: Path) -> None:
    """Four processes (as on four machines) scan one folder at the same moment; checks are slow, so the
    scans overlap on every file."""
    for i in range(20):
        write(tmp_path / f"f{i:02d}.csv", f"id,n\n{i},1\n{i},2\n")
    env = {**os.environ, "ALYA_DATABASE_URL": database_url, "ALYA_INTAKE_TEST_DELAY_SEC": "0.1",
           "ALYA_LOG_LEVEL": "WARNING"}
    start_at = time.time() + 8  # after every process has imported alya
    procs = [subprocess.Popen([sys.executable, "-m", "tests.support.intake_app", "scan", str(tmp_path), str(start_at)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err[-2000:] for _, err in outs]
    taken = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    print("files per scan:", [len(t) for t in taken])
    every = [u for t in taken for u in t]
    assert sorted(every) == sorted(f"{tmp_path.as_uri()}/f{i:02d}.csv" for i in range(20))  # each exactly once
    assert len(batches(database_url)) == 20
    assert services.sql(database_url, "SELECT count(*), count(DISTINCT url) FROM batch_files") == [(20, 20)]
    assert len(list((tmp_path / "done").glob("*/*.csv"))) == 20 and not list(tmp_path.glob("*.csv"))


def test_csv_parquet_and_json_lines_from_s3(ijm: JobManager, database_url: str, s3_url: str) -> None:
    inbox = f"{s3_url}/inbox"
    fs = fsspec.filesystem("s3")
    fs.pipe(f"{inbox}/a.csv", b"id,name\n1,ann\n2,\n")
    with fs.open(f"{inbox}/b.parquet", "wb") as fh:
        pd.DataFrame({"id": pd.array([1, 2, None], dtype="Int64"), "v": [0.5, None, 2.0]}).to_parquet(fh)
    fs.pipe(f"{inbox}/c.jsonl", b'{"id": 1, "tags": ["x"]}\n\n{"id": 2}\n')
    fs.pipe(f"{inbox}/d.csv", b"no_id\n1\n")
    patterns = "*.csv=rows,*.parquet=rows,*.jsonl=rows"
    taken = {fi.source.rsplit("/", 1)[-1]: fi for fi in ijm.intake_scan(inbox, patterns, min_age_sec=0)}
    assert {n: fi.status for n, fi in taken.items()} == {"a.csv": "submitted", "b.parquet": "submitted",
                                                         "c.jsonl": "submitted", "d.csv": "rejected"}
    assert rows_of(database_url, taken["a.csv"].batch_id or "") == [(1, {"id": 1, "name": "ann"}), (2, {"id": 2})]
    assert rows_of(database_url, taken["b.parquet"].batch_id or "") == [
        (1, {"id": 1, "v": 0.5}), (2, {"id": 2}), (3, {"v": 2.0})]
    assert rows_of(database_url, taken["c.jsonl"].batch_id or "") == [(1, {"id": 1, "tags": ["x"]}), (2, {"id": 2})]
    for fi in taken.values():
        assert fi.moved and fs.exists(fi.url) and not fs.exists(fi.source)
    assert taken["b.parquet"].url == f"{inbox}/done/{taken['b.parquet'].batch_id}/b.parquet"
    assert taken["d.csv"].url == f"{inbox}/failed/d.csv"
    assert ijm.intake_scan(inbox, patterns, min_age_sec=0) == []
    # by URL, and the same object twice
    fs.pipe(f"{s3_url}/one.parquet", fs.cat(taken["b.parquet"].url))
    fi = ijm.file_submit(f"{s3_url}/one.parquet", FILE_TYPE)
    assert fi.status == "submitted" and fi.nrows == 3
    assert ijm.file_submit(f"{s3_url}/one.parquet", FILE_TYPE) == replace(fi, repeat=True)
    assert len(batches(database_url)) == 4


def test_memory_stays_flat_in_the_file_size(database_url: str, tmp_path: Path) -> None:
    """A 600k-row CSV costs no more than 1.5x the peak memory of a 60k-row one (each submitted in a fresh
    process; peak RSS from getrusage)."""
    def make(n: int) -> Path:
        p = tmp_path / f"rows{n}.csv"
        with p.open("w") as fh:
            fh.write("id,account,kind,amount,note\n")
            for i in range(1, n + 1):
                fh.write(f"{i},acct-{i % 997:04d},{'deposit' if i % 3 else 'withdraw'},{i % 10_000},"
                         f"{'' if i % 7 == 0 else 'note number ' + str(i)}\n")
        return p

    env = {**os.environ, "ALYA_DATABASE_URL": database_url, "ALYA_LOG_LEVEL": "WARNING"}
    figures = {}
    for n in (60_000, 600_000):
        path = make(n)
        out = subprocess.run([sys.executable, "-m", "tests.support.intake_app", "memory", str(path)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        figures[n] = json.loads(out.stdout.strip().splitlines()[-1])
        assert figures[n]["status"] == "submitted" and figures[n]["nrows"] == n, figures[n]
        path.unlink()
    small, large = figures[60_000], figures[600_000]
    ratio = large["peak_kb"] / small["peak_kb"]
    growth = {n: (f["peak_kb"] - f["base_kb"]) / 1024 for n, f in figures.items()}
    print(f"peak RSS: 60k rows {small['peak_kb'] / 1024:.0f} MiB, 600k rows {large['peak_kb'] / 1024:.0f} MiB "
          f"(x{ratio:.2f}); growth over the warmed-up process: {growth[60_000]:.0f} MiB vs {growth[600_000]:.0f} MiB; "
          f"600k rows in {large['seconds']:.1f} s = {600_000 / large['seconds']:.0f} rows/s")
    assert ratio <= 1.5
    # the baseline (Python, pandas, Prefect) is most of the peak; what the file adds must be flat too
    assert growth[600_000] <= 1.5 * growth[60_000] + 16


# ---------------------------------------------------------------------------- Prefect, CLI, example
FLOW_SCRIPT = """
import json, sys
from flows.intake import intake_flow, submit_file_flow
from prefect.exceptions import FailedRun
try:
    intake_flow()  # neither ALYA_INTAKE_URL nor ALYA_INTAKE_PATTERNS set
except FailedRun as exc:
    out = {"unset": str(exc)}
out["taken"] = intake_flow(folder_url=sys.argv[1], patterns="*.csv=txn", min_age_sec=0)
again = intake_flow(folder_url=sys.argv[1], patterns="*.csv=txn", min_age_sec=0, return_state=True)
out["again"] = [again.result(), str(again.state_details.flow_run_id)]
try:
    submit_file_flow(file_url=sys.argv[1] + "/nothere.csv", file_type="txn")
except FailedRun as exc:
    out["bad"] = str(exc)
try:
    submit_file_flow(file_url=sys.argv[2], file_type="no such type!")
except FailedRun as exc:
    out["badtype"] = str(exc)
out["one"] = submit_file_flow(file_url=sys.argv[2], file_type="txn", context={"user": "ui"})
rep = submit_file_flow(file_url=sys.argv[2], file_type="txn", return_state=True)
out["repeat"] = [rep.result(), rep.type.value, rep.message, str(rep.state_details.flow_run_id)]
print(json.dumps(out))
"""


def test_intake_flow_takes_files_and_leaves_an_artifact(database_url: str, redis_url: str, file_store_url: str,
                                                       tmp_path: Path, prefect_harness: None) -> None:
    """The flows of flows/intake.py (the bank example's txn checker) run in a process of their own, as in a
    deployment, against the session's Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL

    from flows.bank import write_transactions_csv

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_transactions_csv(str(inbox / "t1.csv"), [
        {"account": "0042", "kind": "deposit", "amount": 500, "txn": "t-1"},
        {"account": "0042", "kind": "withdraw", "amount": 200, "txn": "t-2"}])
    write(inbox / "wrong.csv", "account,amount\nx,1\n")
    single = write(tmp_path / "single.csv", "account,kind,amount\nacct-1,deposit,5\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ALYA_INTAKE_")},
           "ALYA_DATABASE_URL": database_url, "ALYA_REDIS_URL": redis_url,
           "ALYA_OBJECT_STORE_URL": file_store_url, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
           "ALYA_LOG_LEVEL": "WARNING", "ALYA_INTAKE_ROOTS": tmp_path.as_uri()}  # the flows read under it only
    out = subprocess.run([sys.executable, "-c", FLOW_SCRIPT, inbox.as_uri(), str(single)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    # a run refused for a missing setting or a bad parameter fails with one line, not a traceback
    assert res["unset"].startswith("ALYA_INTAKE_URL is not set") and "\n" not in res["unset"]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "Failed('ALYA_INTAKE_URL is not set" in out.stderr
    taken = {fi["source"].rsplit("/", 1)[-1]: fi for fi in res["taken"]}
    assert taken["t1.csv"]["status"] == "submitted" and taken["t1.csv"]["nrows"] == 2
    assert taken["wrong.csv"]["status"] == "rejected" and "missing ['kind']" in taken["wrong.csv"]["error"]
    assert res["bad"].startswith("no file at") and "\n" not in res["bad"]
    assert res["badtype"].startswith("file type") and "\n" not in res["badtype"]
    assert res["one"]["status"] == "submitted" and res["one"]["url"] == single.as_uri()
    # the same file again: nothing submitted, and the run says it is a repeat of that batch
    again, kind, message, again_run = res["repeat"]
    assert again["repeat"] and again["batch_id"] == res["one"]["batch_id"] and not res["one"]["repeat"]
    assert (kind, message) == ("COMPLETED", f"single.csv: already taken as batch {res['one']['batch_id']}")
    rows = rows_of(database_url, taken["t1.csv"]["batch_id"])
    assert rows == [(1, {"account": "0042", "kind": "deposit", "amount": 500, "txn": "t-1"}),
                    (2, {"account": "0042", "kind": "withdraw", "amount": 200, "txn": "t-2"})]
    assert services.sql(database_url, "SELECT app, op FROM batches WHERE id = %s", taken["t1.csv"]["batch_id"]) == [
        ("bank", "txn")]
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["alya-intake"])))
    tables = [json.loads(a.data) if isinstance(a.data, str) else a.data for a in arts]
    assert any({r["file"] for r in t} == {"t1.csv", "wrong.csv"} for t in tables), tables
    assert res["again"][0] == []  # the files were taken: a pass that takes nothing leaves no artifact
    assert str(res["again"][1]) not in {str(a.flow_run_id) for a in arts}
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        lines = [lg.message for lg in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[again_run])))]
        versions = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["alya-file-single-csv"])))
    assert any(f"already taken as batch {res['one']['batch_id']}" in m for m in lines), lines
    latest = max(versions, key=lambda a: a.created)  # the repeat's (the server's default order is not by time)
    assert "already taken as batch" in (latest.description or "")


def test_cli_intake_runs_one_pass(database_url: str, tmp_path: Path) -> None:
    write(tmp_path / "a.csv", "id\n1\n2\n")
    write(tmp_path / "b.csv", "x\n1\n")
    env = {**os.environ, "ALYA_DATABASE_URL": database_url, "ALYA_LOG_LEVEL": "WARNING"}
    alya_cli = str(Path(sys.executable).parent / "alya")
    out = subprocess.run([alya_cli, "intake", tmp_path.as_uri(), "--pattern", "*.csv=rows", "--module",
                          "tests.support.intake_app:jm", "--min-age-sec", "0"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    printed = {Path(r["file"]).name: r for r in json.loads(out.stdout)}
    assert printed["a.csv"]["status"] == "submitted" and printed["a.csv"]["nrows"] == 2
    assert printed["b.csv"]["status"] == "rejected" and printed["b.csv"]["error"] == "no column id"
    bad = subprocess.run([alya_cli, "intake", tmp_path.as_uri(), "--pattern", "*.csv", "--module",
                          "tests.support.intake_app:jm"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "GLOB=FILETYPE" in bad.stderr


def test_bank_transactions_file_becomes_a_processed_batch(jm: JobManager, database_url: str, tmp_path: Path,
                                                          prefect_harness: None) -> None:
    saved = os.environ.get("ALYA_DATABASE_URL")
    os.environ.setdefault("ALYA_DATABASE_URL", "postgresql://nobody@127.0.0.1:9/unreachable")
    try:
        from flows import bank
    finally:
        if saved is None:
            os.environ.pop("ALYA_DATABASE_URL", None)
    bank.register(jm)
    txns, opening = bank.make_transactions(300, naccounts=5, seed=3)
    bank.open_accounts(database_url, opening)
    bank.write_transactions_csv(str(tmp_path / "day1.csv"), txns)
    os.utime(tmp_path / "day1.csv", (time.time() - 60, time.time() - 60))
    [fi] = jm.intake_scan(str(tmp_path), "*.csv=txn")
    assert fi.status == "submitted" and fi.nrows == 300
    jm.run(stop_when_idle=True)
    expected, refused = bank.expected_balances(txns, opening)
    assert jm.batch_status(fi.batch_id or "").nfailed == refused
    assert bank.read_balances(database_url, expected) == expected


@pytest.fixture
def fresh_s3_clients() -> Any:
    """S3 file systems made while a test has taken the AWS_* variables away must not be reused later."""
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    yield
    fsspec.get_filesystem_class("s3").clear_instance_cache()


@pytest.mark.usefixtures("fresh_s3_clients")
def test_s3_credentials_given_to_the_job_manager_reach_the_intake(
        database_url: str, redis_url: str, s3_server: dict[str, str], s3_url: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A JobManager configured with ``storage_options`` (no AWS_* variables) takes files in from its object
    store's S3 with them; a local file is read without them."""
    from tests.support.config import make_config

    opts = {"key": s3_server["key"], "secret": s3_server["secret"], "endpoint_url": s3_server["endpoint"],
            "client_kwargs": {"region_name": "us-east-1"}}
    fsspec.filesystem("s3", **opts).pipe(f"{s3_url}/in.csv", b"id,name\n1,ann\n2,bo\n")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    jm = JobManager(database_url=database_url, redis_url=redis_url, object_store_url=f"{s3_url}/out",
                    config=make_config(), storage_options=opts)
    try:
        jm.register_file_checker(FILE_TYPE, RowsChecker())
        fi = jm.file_submit(f"{s3_url}/in.csv", FILE_TYPE)
        assert (fi.status, fi.nrows) == ("submitted", 2)
        local = write(tmp_path / "local.csv", "id\n7\n")
        assert jm.file_submit(str(local), FILE_TYPE).status == "submitted"
    finally:
        jm.close()


@pytest.mark.usefixtures("fresh_s3_clients")
def test_a_store_that_refuses_us_is_backend_unavailable(
        database_url: str, redis_url: str, s3_server: dict[str, str], s3_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No credentials at all: the S3 client's own exception comes out as a typed AlyaError naming the file,
    and nothing is recorded."""
    from alya import BackendUnavailable
    from tests.support.config import make_config

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    jm = JobManager(database_url=database_url, redis_url=redis_url, config=make_config())
    try:
        jm.register_file_checker(FILE_TYPE, RowsChecker())
        before = services.sql(database_url, "SELECT count(*) FROM batch_files")
        with pytest.raises(BackendUnavailable, match="in.csv"):
            jm.file_submit(f"{s3_url}/in.csv", FILE_TYPE)
        with pytest.raises(BackendUnavailable, match="cannot list"):
            jm.intake_scan(f"{s3_url}/inbox", "*.csv=rows", min_age_sec=0)
        assert services.sql(database_url, "SELECT count(*) FROM batch_files") == before
    finally:
        jm.close()
