"""What the Prefect UI reads, as pure functions: a running batch's state message, the summary table's
column order, an aborted batch's progress, and what a file intake says of a repeated file."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from alya.core.models import BatchStatus, BatchSummary, FileIntake
from alya.prefect.artifacts import progress_of, running_message, table_row
from alya.prefect.intake import _took, file_name_of


def summary(status: BatchStatus, nsuccess: int, nfailed: int = 0, naborted: int = 0, nrows: int = 5000) -> BatchSummary:
    left = nrows - nsuccess - nfailed - naborted
    return BatchSummary(status=status, outputfiles={"ledger.csv": "s3://b/bank/txn/x/ledger.csv"}, nrows=nrows,
                        nsuccess=nsuccess, nfailed=nfailed, naborted=naborted, nqueued=left, ninprog=0)


def test_running_message_counts_final_rows() -> None:
    assert running_message(summary(BatchStatus.INPROG, 1197, 3)) == "1,200 of 5,000 rows done, 3 failed"
    assert running_message(summary(BatchStatus.INPROG, 0)) == "0 of 5,000 rows done"


def test_summary_table_puts_counts_before_output_files() -> None:
    row = table_row("b1", summary(BatchStatus.FAILED, 4949, 51))
    cols = list(row)
    assert cols[:6] == ["batch", "status", "nrows", "nsuccess", "nfailed", "naborted"]
    assert cols[-1] == "outputfiles" and row["outputfiles"] == "s3://b/bank/txn/x/ledger.csv"
    assert set(cols) == {"batch", *summary(BatchStatus.FAILED, 1).as_row()}  # every field, once


def test_an_aborted_batch_never_shows_100_percent() -> None:
    percent, text = progress_of("bank/txn", "b1", summary(BatchStatus.ABORTED, 1200, 0, 3800))
    assert percent == 24.0 and "aborted" in text
    assert progress_of("bank/txn", "b1", summary(BatchStatus.SUCCESS, 5000))[0] == 100.0


def test_a_repeated_file_says_which_batch_took_it() -> None:
    fi = FileIntake(url="s3://in/done/b1/t.csv", filetype="txn", status="submitted", batch_id="b1", size=9,
                    error=None, reqat=datetime.now(UTC), source="s3://in/t.csv", nrows=2, moved=True)
    assert file_name_of(fi) == "t.csv"
    assert _took(fi) == "t.csv: batch b1 (2 rows)"
    again = replace(fi, repeat=True)
    assert _took(again) == "t.csv: already taken as batch b1"
