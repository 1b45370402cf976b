"""Names a person reads in the Prefect UI: deployments after their batch type, artifact keys that Prefect
accepts (lower-case letters, digits, dashes), deterministic and unique per batch."""

from __future__ import annotations

import re
import uuid

import pytest

from alya.core import names
from alya.core.settings import JobManagerConfig

PREFECT_KEY = re.compile(r"^[a-z0-9-]+$")  # prefect.utilities.validation: artifact keys


@pytest.mark.parametrize(("text", "want"), [
    ("bank-txn", "bank-txn"),
    ("Bank_TXN", "bank-txn"),
    ("my.app__op", "my-app-op"),
    ("--a  b--", "a-b"),
    ("Überweisung März.csv", "berweisung-m-rz-csv"),
    ("", "x"),
    ("___", "x"),
])
def test_sanitize_keeps_prefects_alphabet(text: str, want: str) -> None:
    got = names.sanitize(text)
    assert got == want and PREFECT_KEY.match(got)
    assert names.sanitize(got) == got  # idempotent: a key made again is the same key


def test_artifact_keys_carry_type_and_batch_and_are_unique_per_batch() -> None:
    ids = [str(uuid.uuid4()) for _ in range(50)]
    keys = {names.summary_artifact_key("bank", "txn", b) for b in ids}
    keys |= {names.progress_artifact_key("bank", "txn", b) for b in ids}
    keys |= {names.summary_artifact_key("bank_x", "txn", b) for b in ids}
    assert len(keys) == 150
    assert all(PREFECT_KEY.match(k) for k in keys)
    b = ids[0]
    assert names.summary_artifact_key("bank", "txn", b) == f"bank-txn-summary-{b}"
    assert names.progress_artifact_key("Bank", "TXN", b) == f"bank-txn-progress-{b}"
    assert names.summary_artifact_key("bank", "txn", b) == names.summary_artifact_key("bank", "txn", b)
    # two types whose names sanitize alike still never share a key: the batch id differs
    assert names.summary_artifact_key("a_b", "c", ids[1]) != names.summary_artifact_key("a.b", "c", ids[2])


def test_file_artifact_key_names_the_file() -> None:
    assert names.file_artifact_key("Txns 2026-12.CSV") == "alya-file-txns-2026-12-csv"
    assert PREFECT_KEY.match(names.file_artifact_key("../../etc/passwd"))


def test_deployments_are_named_after_their_batch_type() -> None:
    cfg = JobManagerConfig()
    assert cfg.deployment_name == names.DEFAULT_DEPLOYMENT
    assert names.deployment_name("bank", "txn", cfg.deployment_name) == "alya-bank-txn/bank-txn"
    assert names.deployment_name("my_app", "do.it") == "alya-my-app-do-it/my-app-do-it"
    assert names.deployment_name("bank", "txn", "alya") == "alya-bank-txn/alya"  # the old, fixed name
    assert names.type_deployment("bank", "txn", "{app}-{op}-prod") == "bank-txn-prod"
    assert names.sweeper_deployment() == "alya-sweeper/sweeper"
    assert names.intake_deployment() == "alya-intake/intake"
    assert names.submit_file_deployment() == "alya-submit-file/submit-file"
