"""URL confinement (``alya.core.confine``): what a Prefect flow's parameters may name. Pure logic on
normalised URLs, plus real symlinks on a temporary folder: nothing is read or fetched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from alya.core.confine import Roots, parse_roots
from alya.core.errors import ConfigError, InvalidInput
from alya.core.settings import IntakeSettings


@pytest.mark.parametrize("url", [
    "s3://inbox/bank/a.csv", "s3://inbox/bank", "s3://inbox/bank/sub/b.parquet", "s3://INBOX/bank/a.csv",
    "https://files.example:8443/drop/a.csv",
])
def test_urls_under_a_root_are_allowed_as_given(url: str) -> None:
    roots = Roots(["s3://inbox/bank", "https://files.example:8443/drop/"])
    assert roots.check(url) == url


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/latest/meta-data/iam/security-credentials/#.csv",  # the probe of the issue
    "https://files.example:8443/drop/a.csv?x=.csv", "https://files.example:8443/drop/a.csv#.csv",
    "https://files.example:8443/drop/../admin/a.csv", "https://files.example:8443/drop/%2e%2e/admin/a.csv",
    "https://files.example:8443/drop/%2E%2e%2fadmin", "https://files.example:8443/drop//a.csv",
    "https://files.example:8443/drop/./a.csv", "https://files.example:8443/dropx/a.csv",
    "https://files.example/drop/a.csv", "http://files.example:8443/drop/a.csv",  # another port, scheme
    "https://u:pw@files.example:8443/drop/a.csv",  # user info: credentials go in storage options
    "s3://inbox/bankx/a.csv", "s3://inbox/a.csv", "s3://other/bank/a.csv", "s3a://inbox/bank/a.csv",
    "s3://inbox/bank/..", "s3://inbox/bank/a\\..\\b.csv", "s3://inbox/bank/a\x00.csv", "s3://inbox/bank/a\n.csv",
    "zip://a.csv::s3://inbox/bank/a.zip", "simplecache::s3://inbox/bank/a.csv", "memory://inbox/bank/a.csv",
    "/etc/passwd", "file:///etc/passwd", "", "   ",
])
def test_anything_else_is_refused(url: str) -> None:
    roots = Roots(["s3://inbox/bank", "https://files.example:8443/drop/"])
    with pytest.raises(InvalidInput) as exc:
        roots.check(url)
    assert "pw" not in str(exc.value)


def test_no_roots_refuse_everything(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="is not under ALYA_INTAKE_ROOTS: none"):
        Roots([]).check(str(tmp_path / "a.csv"))


def test_local_paths_are_resolved_before_they_are_compared(tmp_path: Path) -> None:
    inbox, private = tmp_path / "inbox", tmp_path / "private"
    inbox.mkdir()
    private.mkdir()
    (private / "hr.csv").write_text("name,salary,ssn\n")
    (inbox / "ok.csv").write_text("id\n1\n")
    os.symlink(private / "hr.csv", inbox / "hr.csv")
    os.symlink(private, inbox / "private")
    roots = Roots([str(inbox)])
    assert roots.check(str(inbox / "ok.csv")) == str(inbox / "ok.csv")
    assert roots.check((inbox / "ok.csv").as_uri()) == str(inbox / "ok.csv")  # the real path is what is read
    assert roots.check(f"{inbox}/sub/../ok.csv") == str(inbox / "ok.csv")
    for escape in (inbox / "hr.csv", inbox / "private" / "hr.csv", f"{inbox}/../private/hr.csv",
                   (private / "hr.csv").as_uri(), f"{inbox}x/a.csv"):
        with pytest.raises(InvalidInput, match="not under"):
            roots.check(str(escape))


def test_roots_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALYA_INTAKE_ROOTS", raising=False)
    monkeypatch.delenv("ALYA_INTAKE_URL", raising=False)
    assert IntakeSettings().roots == [] and IntakeSettings().intake_roots is None
    monkeypatch.setenv("ALYA_INTAKE_URL", "s3://inbox/bank")
    assert IntakeSettings().roots == ["s3://inbox/bank"]  # the default: ALYA_INTAKE_URL alone
    monkeypatch.setenv("ALYA_INTAKE_ROOTS", "s3://inbox/bank, https://files.example/drop")
    assert IntakeSettings().roots == ["s3://inbox/bank", "https://files.example/drop"]
    monkeypatch.setenv("ALYA_INTAKE_ROOTS", "s3://inbox/bank?x=1")
    with pytest.raises(ConfigError, match="ALYA_INTAKE_ROOTS"):
        IntakeSettings()
    assert parse_roots('s3://a/b,') == ["s3://a/b"]
