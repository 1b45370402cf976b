"""The trust boundary of the file intake (issue 18): what a Prefect user (flow parameters), a dropped file
or a URL with credentials may make alya do. Each probe of the issue's table is a test here, on real
PostgreSQL, Redis, a Prefect test server and an HTTP server on loopback that counts the requests it gets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from alya import InvalidInput, JobManager
from tests.support import services
from tests.support.http_files import http_files
from tests.support.intake_app import FILE_TYPE, RowsChecker

REPO = Path(__file__).resolve().parents[3]
PASSWORD = "Http/Pa?ss#w@rd:1"  # every character that breaks a naive URL parser


def write(path: Path, text: str, age_sec: float = 60) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    t = time.time() - age_sec
    os.utime(path, (t, t))
    return path


def counts(database_url: str) -> tuple[int, int]:
    [(nb, nf)] = services.sql(database_url, "SELECT (SELECT count(*) FROM batches), (SELECT count(*) FROM batch_files)")
    return int(nb), int(nf)


PROBES = """
import json, sys
from flows.intake import intake_flow, submit_file_flow
from alya.core.errors import AlyaError
from prefect.exceptions import FailedRun
probes = json.loads(sys.argv[1])
out = {}
for name, (flow, kwargs) in probes.items():
    try:
        fn = intake_flow if flow == "intake" else submit_file_flow
        out[name] = {"ok": fn(**kwargs)}
    except AlyaError as exc:
        out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    except FailedRun as exc:  # the flow refused its parameters: its run ended Failed with one line
        out[name] = {"error": f"Refused: {exc}"}
print(json.dumps(out))
"""


def run_flows(probes: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", PROBES, json.dumps(probes)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert PASSWORD not in out.stderr and "salary" not in out.stderr  # nor in any log line
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_flow_parameters_reach_nothing_outside_the_intake_roots(database_url: str, redis_url: str,
                                                                 file_store_url: str, tmp_path: Path,
                                                                 prefect_harness: None) -> None:
    """``alya-submit-file`` and ``alya-intake`` run by anyone with the Prefect UI: the instance metadata
    URL, a private file, an application's config folder, a URL with a password, a symlink out of the
    inbox. Each is refused before any request or read; nothing is stored, moved or shown."""
    from prefect.settings import PREFECT_API_URL

    inbox = tmp_path / "inbox"
    write(inbox / "good.csv", "account,kind,amount\nacct-1,deposit,5\n")
    private = write(tmp_path / "private" / "hr.csv", "name,salary,ssn\nann,100,123-45-6789\n")
    os.symlink(private, inbox / "hr.csv")  # a symlink dropped in the inbox, pointing out of it
    config = tmp_path / "app-config"
    for name in ("settings.yaml", "prod.db", "keys.pem", "creds.csv"):
        write(config / name, "secret\n")
    creds = {"/latest/meta-data/iam/security-credentials/": b"AccessKeyId,role-name-prod-admin\nAKIA,x\n",
             "/in/a.csv": b"account,kind,amount\nacct-1,deposit,5\n"}
    with http_files(creds) as http:
        meta = f"{http.base}/latest/meta-data/iam/security-credentials/#.csv"
        env = {**os.environ, "ALYA_DATABASE_URL": database_url, "ALYA_REDIS_URL": redis_url,
               "ALYA_OBJECT_STORE_URL": file_store_url, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
               "ALYA_LOG_LEVEL": "INFO", "ALYA_INTAKE_URL": inbox.as_uri(), "ALYA_INTAKE_PATTERNS": "*.csv=txn",
               "ALYA_INTAKE_MIN_AGE_SEC": "0"}
        env.pop("ALYA_INTAKE_ROOTS", None)  # the default: ALYA_INTAKE_URL alone
        res = run_flows({
            "metadata": ["submit", {"file_url": meta, "file_type": "txn"}],
            "private": ["submit", {"file_url": private.as_uri(), "file_type": "txn"}],
            "private_dotdot": ["submit", {"file_url": f"{inbox}/../private/hr.csv", "file_type": "txn"}],
            "private_link": ["submit", {"file_url": str(inbox / "hr.csv"), "file_type": "txn"}],
            "config": ["intake", {"folder_url": str(config), "patterns": "*=txn", "min_age_sec": 0}],
            "password": ["submit", {"file_url": f"http://svc:{PASSWORD}@127.0.0.1:{http.port}/in/a.csv",
                                    "file_type": "txn"}],
            "inbox": ["intake", {}],  # the configured pass still works; the symlink is left alone
        }, env)
        assert http.requests == []  # not one HEAD or GET
    for probe in ("metadata", "private", "private_dotdot", "private_link", "config", "password"):
        assert res[probe]["error"].startswith("Refused: "), (probe, res[probe])
        assert "not under ALYA_INTAKE_ROOTS" in res[probe]["error"] or "credentials" in res[probe]["error"]
    text = json.dumps(res)
    assert "AccessKeyId" not in text and "salary" not in text and PASSWORD not in text and "Pa?ss" not in text
    assert sorted(p.name for p in config.iterdir()) == ["creds.csv", "keys.pem", "prod.db", "settings.yaml"]
    [taken] = res["inbox"]["ok"]
    assert taken["source"].endswith("/good.csv") and taken["status"] == "submitted"
    assert (inbox / "hr.csv").is_symlink() and private.read_text().startswith("name,salary")
    assert counts(database_url) == (1, 1)  # the good file alone


def test_http_sources_only_where_a_root_names_them(database_url: str, redis_url: str, file_store_url: str,
                                                   tmp_path: Path, prefect_harness: None) -> None:
    from prefect.settings import PREFECT_API_URL

    files = {"/in/a.csv": b"account,kind,amount\nacct-1,deposit,5\n", "/other/b.csv": b"account\nx\n"}
    with http_files(files) as http:
        env = {**os.environ, "ALYA_DATABASE_URL": database_url, "ALYA_REDIS_URL": redis_url,
               "ALYA_OBJECT_STORE_URL": file_store_url, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
               "ALYA_LOG_LEVEL": "WARNING", "ALYA_INTAKE_ROOTS": f"{http.base}/in,{tmp_path.as_uri()}"}
        res = run_flows({
            "allowed": ["submit", {"file_url": f"{http.base}/in/a.csv", "file_type": "txn"}],
            "sibling": ["submit", {"file_url": f"{http.base}/other/b.csv", "file_type": "txn"}],
            "encoded": ["submit", {"file_url": f"{http.base}/in/%2e%2e/other/b.csv", "file_type": "txn"}],
            "query": ["submit", {"file_url": f"{http.base}/in/a.csv?x=1", "file_type": "txn"}],
        }, env)
        paths = {p for _, p in http.requests}
    assert res["allowed"]["ok"]["status"] == "submitted" and res["allowed"]["ok"]["nrows"] == 1
    assert paths == {"/in/a.csv"}  # the refused ones made no request
    for probe in ("sibling", "encoded", "query"):
        assert res[probe]["error"].startswith("Refused: "), res[probe]


@pytest.fixture
def bounded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, jm: JobManager) -> JobManager:
    """A JobManager whose application set ALYA_INTAKE_ROOTS: its own file_submit and intake_scan are
    bounded too (it passes its users' URLs on)."""
    monkeypatch.setenv("ALYA_INTAKE_ROOTS", str(tmp_path / "allowed"))
    jm.register_file_checker(FILE_TYPE, RowsChecker())
    return jm


def test_with_roots_set_the_library_calls_are_bounded_too(bounded: JobManager, database_url: str,
                                                          tmp_path: Path) -> None:
    good = write(tmp_path / "allowed" / "a.csv", "id\n1\n")
    outside = write(tmp_path / "elsewhere" / "b.csv", "id\n1\n")
    with pytest.raises(InvalidInput, match="not under ALYA_INTAKE_ROOTS"):
        bounded.file_submit(str(outside), FILE_TYPE)
    with pytest.raises(InvalidInput, match="not under ALYA_INTAKE_ROOTS"):
        bounded.intake_scan(str(outside.parent), "*.csv=rows", min_age_sec=0)
    assert counts(database_url) == (0, 0) and outside.exists()
    assert bounded.file_submit(str(good), FILE_TYPE).status == "submitted"


def test_a_password_in_a_file_url_is_never_shown_nor_stored(jm: JobManager, database_url: str) -> None:
    """The application passes a URL with ``user:password@`` (hostile characters in the password, encoded as
    an HTTP client needs them): the file is read with it, but the error of a missing file, the stored
    ``inputfile`` and ``batch_files.url``, and the FileIntake carry ``***`` instead."""
    from urllib.parse import quote

    jm.register_file_checker(FILE_TYPE, RowsChecker())
    encoded = quote(PASSWORD, safe="")
    with http_files({"/in/a.csv": b"id\n1\n2\n"}, auth=("svc", PASSWORD)) as http:
        url = f"http://svc:{encoded}@127.0.0.1:{http.port}/in/a.csv"
        with pytest.raises(InvalidInput) as exc:
            jm.file_submit(url.replace("a.csv", "missing.csv"), FILE_TYPE)
        assert encoded not in str(exc.value) and "Pa" not in str(exc.value)
        assert f"http://***@127.0.0.1:{http.port}/in/missing.csv" in str(exc.value)
        fi = jm.file_submit(url, FILE_TYPE)
    assert (fi.status, fi.nrows) == ("submitted", 2)
    assert fi.url == f"http://***@127.0.0.1:{http.port}/in/a.csv"
    stored = services.sql(database_url, "SELECT b.inputfile, f.url FROM batches b JOIN batch_files f ON f.batch = b.id")
    assert stored == [(fi.url, fi.url)]
    jm.batch_submit("acme", "load", {}, [(1, {})], inputfile=url)
    assert "Pa" not in json.dumps(services.sql(database_url, "SELECT inputfile, url FROM batches, batch_files"))


def test_a_rejection_echoes_no_content(jm: JobManager, tmp_path: Path) -> None:
    """A file of the wrong kind inside the roots: the bank checker names its columns only when they are few
    and short; a header made of content shows as a count."""
    from flows.bank import TxnFileChecker

    jm.register_file_checker("txn", TxnFileChecker())
    few = write(tmp_path / "few.csv", "account,amount\nx,1\n")
    many = write(tmp_path / "many.csv", "account,kind,amount," + ",".join(f"sk_live_{i:032d}" for i in range(3)) + "\n")
    assert "unexpected []" in (jm.file_submit(str(few), "txn").error or "")
    error = jm.file_submit(str(many), "txn").error or ""
    assert "unexpected 3 columns" in error and "sk_live" not in error
