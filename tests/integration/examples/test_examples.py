"""The example apps of ``flows/`` run end to end through ``jm.run(stop_when_idle=True)`` (the Prefect
batch-type flows, on the session's Prefect test harness), on real PostgreSQL, Redis and S3."""

from __future__ import annotations

import csv
import datetime as dt
import importlib
import os
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import fsspec
import pytest

from alya import BatchInput, BatchStatus, JobManager
from tests.support import services
from tests.support.config import make_config


@pytest.fixture(scope="module")
def examples() -> Iterator[dict[str, ModuleType]]:
    """The example modules. Importing them builds their module-level JobManager from the environment,
    which must work without touching the database: point it at a server that does not exist."""
    saved = os.environ.get("ALYA_DATABASE_URL")
    os.environ.setdefault("ALYA_DATABASE_URL", "postgresql://nobody@127.0.0.1:9/unreachable")
    try:
        mods = {name: importlib.import_module(f"flows.{name}") for name in ("bank", "mail", "report", "sweeper")}
    finally:
        if saved is None:
            os.environ.pop("ALYA_DATABASE_URL", None)
    yield mods


@pytest.fixture
def ejm(database_url: str, redis_url: str, s3_url: str, examples: dict[str, ModuleType],
        prefect_harness: None) -> Iterator[JobManager]:
    """A JobManager on this test's database and S3 prefix with every example registered."""
    manager = JobManager(database_url=database_url, redis_url=redis_url, object_store_url=s3_url,
                         config=make_config(batchchunk_nrows=500, worker_threads=4))
    for name in ("bank", "mail", "report"):
        examples[name].register(manager)
    yield manager
    manager.close()


def read_csv(url: str) -> list[list[str]]:
    with fsspec.open(url, "rt") as fh:
        return list(csv.reader(fh))


def test_importing_examples_needs_no_database(examples: dict[str, ModuleType]) -> None:
    bank = examples["bank"]
    assert bank.bank_txn_flow.name == "alya-bank-txn"
    assert examples["mail"].mail_send_flow.name == "alya-mail-send"
    assert examples["report"].report_summary_flow.name == "alya-report-summary"
    assert examples["sweeper"].sweeper_flow.name == "alya-sweeper"
    assert {(r.app, r.op) for r in examples["sweeper"].jm.registry.batch_types()} == {
        ("bank", "txn"), ("mail", "send"), ("report", "summary")}


@pytest.mark.slow
def test_bank_transactions_move_balances_exactly(ejm: JobManager, examples: dict[str, ModuleType]) -> None:
    bank = examples["bank"]
    txns, opening = bank.make_transactions(10_000, naccounts=25, seed=7)
    expected, refused = bank.expected_balances(txns, opening)
    assert refused > 50  # the overdrafts, refused in any processing order
    bank.open_accounts(ejm.store.database_url, opening)
    t0 = time.monotonic()
    ids = bank.submit_transactions(ejm, txns, nbatches=4)
    ejm.run(stop_when_idle=True)
    elapsed = time.monotonic() - t0
    print(f"bank: 10000 rows in {elapsed:.1f}s = {10000 / elapsed:.0f} rows/s")
    summaries = [ejm.batch_status(b) for b in ids]
    assert all(s.status is BatchStatus.FAILED for s in summaries)  # each batch holds some overdrafts
    assert sum(s.nsuccess for s in summaries) == len(txns) - refused
    assert sum(s.nfailed for s in summaries) == refused
    assert bank.read_balances(ejm.store.database_url, expected) == expected
    # every row has its ledger line, in line order; refused rows carry the message
    done = ejm.batch_done(ids[0])
    ledger = read_csv(done.outputfiles["ledger.csv"])
    assert [int(r[0]) for r in ledger] == list(range(1, 2501))
    rejected = [r for r in done.rows or [] if r.status is BatchStatus.FAILED]
    assert rejected and all(r.messages[0].errcode == "insufficient_funds" for r in rejected)
    assert {int(r[0]) for r in ledger if r[5] == "rejected"} == {r.line for r in rejected}


def test_bank_replays_a_transaction_instead_of_applying_it_twice(ejm: JobManager,
                                                                 examples: dict[str, ModuleType]) -> None:
    bank = examples["bank"]
    bank.open_accounts(ejm.store.database_url, {"acct-x": 100})
    proc, block = bank.BankTxnProcessor(), bank.BankInitializer(ejm.store.database_url).init("bank")
    try:
        row = {"account": "acct-x", "kind": "withdraw", "amount": 60, "txn": "t-1"}
        first = proc.do_batch_job(block, {}, 1, row)
        again = proc.do_batch_job(block, {}, 1, row)  # e.g. the worker died after committing
        over = proc.do_batch_job(block, {}, 2, {**row, "txn": "t-2"})
        bad = proc.do_batch_job(block, {}, 3, {"account": "acct-x", "kind": "gift", "amount": 1})
    finally:
        block.close()
    assert first.status is BatchStatus.SUCCESS and first.result == {"account": "acct-x", "balance": 40}
    assert again == first
    assert over.status is BatchStatus.FAILED and over.messages[0].vals == ["60", "40"]
    assert bad.status is BatchStatus.FAILED and bad.messages[0].field == "kind"
    assert bank.read_balances(ejm.store.database_url, ["acct-x"]) == {"acct-x": 40}


def test_mail_writes_files_only_for_some_rows(ejm: JobManager, examples: dict[str, ModuleType]) -> None:
    mail = examples["mail"]
    data = mail.make_mailing(60)
    bid = ejm.batch_submit("mail", "send", {"campaign": "c1"}, [BatchInput(i, r) for i, r in enumerate(data, 1)])
    ejm.run(stop_when_idle=True)
    done = ejm.batch_done(bid)
    invalid = [i for i in range(1, 61) if i % 5 == 0]
    optout = [i for i in range(1, 61) if i % 7 == 0 and i % 5 != 0]
    sent = [i for i in range(1, 61) if i not in invalid and i not in optout]
    assert done.status is BatchStatus.FAILED and (done.nsuccess, done.nfailed) == (60 - len(invalid), len(invalid))
    assert sorted(done.outputfiles) == ["bounced.csv", "sent.csv"]
    assert [int(r[0]) for r in read_csv(done.outputfiles["sent.csv"])] == sent
    assert [(int(r[0]), r[1]) for r in read_csv(done.outputfiles["bounced.csv"])] == [
        (i, f"user{i}@example") for i in invalid]
    rows = {r.line: r for r in done.rows or []}
    assert rows[7].res == {"skipped": "optout"} and rows[5].messages[0].field == "to"


def test_mail_batch_without_file_rows_has_no_files(ejm: JobManager) -> None:
    bid = ejm.batch_submit("mail", "send", {}, [BatchInput(1, {"to": "a@b.org", "optout": True})])
    ejm.run(stop_when_idle=True)
    done = ejm.batch_done(bid)
    assert done.status is BatchStatus.SUCCESS and done.outputfiles == {}


@pytest.mark.parametrize("bad, expected", [
    ({"app": "Bank!", "from": "2024-01-01", "to": "2024-01-02"}, [("invalid_app", "app", ["Bank!"])]),
    ({"app": "bank", "to": "2024-13-01"}, [("missing", "from", None), ("invalid_date", "to", ["2024-13-01"])]),
    ({"app": "bank", "from": "2024-05-02", "to": "2024-05-01"},
     [("bad_range", "to", ["2024-05-02", "2024-05-01"])]),
])
def test_report_bad_input_returns_messages(ejm: JobManager, bad: dict[str, Any],
                                           expected: list[tuple[str, str, Any]]) -> None:
    req = ejm.slowquery_submit("report", "summary", {"user": "u"}, bad)
    ejm.run(stop_when_idle=True)
    sq = ejm.slowquery_done(req)
    assert sq.status is BatchStatus.FAILED and sq.result is None
    assert [(m.errcode, m.field, m.vals) for m in sq.messages] == expected


def test_report_summarises_batches(ejm: JobManager) -> None:
    for _ in range(2):
        ejm.batch_submit("mail", "send", {}, [BatchInput(1, {"to": "a@b.org"}), BatchInput(2, {"to": "bad"})])
    ejm.run(stop_when_idle=True)
    today = dt.date.today()
    req = ejm.slowquery_submit("report", "summary", {}, {"app": "mail", "from": (today - dt.timedelta(days=1))
                                                        .isoformat(), "to": (today + dt.timedelta(days=1)).isoformat()})
    ejm.run(stop_when_idle=True)
    sq = ejm.slowquery_done(req)
    assert sq.status is BatchStatus.SUCCESS and sq.messages == []
    assert sq.result is not None
    assert (sq.result["batches"], sq.result["rows"], sq.result["by_status"]) == (2, 4, {"failed": 2})


def test_sweeper_finishes_a_missed_summary(ejm: JobManager, examples: dict[str, ModuleType]) -> None:
    bid = ejm.batch_submit("mail", "send", {}, [BatchInput(1, {"to": "a@b.org"})])
    # a worker wrote the row and died before summarising
    services.store_sql(ejm.store, "UPDATE batchrows SET status = 'success', doneat = now(), "
                       "blobrows = '{\"sent.csv\": \"1,a@b.org\\n\"}' WHERE batch = %s", bid)
    first = examples["sweeper"].sweep(ejm)
    again = examples["sweeper"].sweep(ejm)
    assert first["summarised"] == [bid] and first["forced_cancelled"] == 0
    assert again["summarised"] == [] and again["dispatched"] == []
    done = ejm.batch_done(bid)
    assert done.status is BatchStatus.SUCCESS and sorted(done.outputfiles) == ["sent.csv"]
