"""What a worker run keeps of the batches it worked on (``alya.prefect.ledger``): bounded whatever the run's
length, and still counting every batch. Pure logic."""

from __future__ import annotations

from alya.core.models import BatchStatus, BatchSummary
from alya.prefect.artifacts import table_row
from alya.prefect.ledger import END_READS, FINISHED_KEPT, OPEN_KEPT, OVERVIEW_ROWS, Ledger
from alya.prefect.states import worker_state


def summary(status: BatchStatus, nrows: int = 1) -> BatchSummary:
    final = status.is_final
    return BatchSummary(status=status, outputfiles={}, nrows=nrows,
                        nsuccess=nrows if status is BatchStatus.SUCCESS else 0,
                        nfailed=nrows if status is BatchStatus.FAILED else 0,
                        naborted=nrows if status is BatchStatus.ABORTED else 0,
                        nqueued=0 if final else nrows, ninprog=0)


def test_ten_thousand_batches_leave_bounded_bookkeeping_and_exact_counts() -> None:
    led = Ledger()
    for i in range(10_000):
        b = f"b{i}"
        assert led.touch(b, 1)
        status = BatchStatus.FAILED if i % 100 == 7 else BatchStatus.SUCCESS
        assert led.read(b, summary(status))
        assert not led.read(b, summary(status))  # counted once
    assert led.open == {} and len(led._ended) == FINISHED_KEPT
    assert len(led._bad) <= OVERVIEW_ROWS and len(led._good) <= OVERVIEW_ROWS
    assert (led.nbatches, led.rows) == (10_000, 10_000)
    assert worker_state(led.statuses())["message"] == "10,000 batches: 9,900 success, 100 failed"
    rows, text = led.overview(table_row)
    assert len(rows) == OVERVIEW_ROWS + 1  # the listed batches, then the total
    assert [r["status"] for r in rows[:100]] == ["failed"] * 100  # failed ones first, most recent first
    assert rows[0]["batch"] == "b9907" and rows[100]["batch"] == "b9999"
    assert rows[-1] == {"batch": "all 10,000 batches", "status": "9,900 success, 100 failed",
                        "nrows": 10_000, "nsuccess": 9_900, "nfailed": 100, "naborted": 0}
    assert text.startswith("the 10,000 batches this run worked on: 9,900 success, 100 failed; 200 listed")


def test_a_late_report_of_an_ended_batch_is_not_a_new_batch() -> None:
    led = Ledger()
    led.touch("b1", 5)
    led.read("b1", summary(BatchStatus.SUCCESS, 5))
    assert not led.touch("b1", 3) and led.ended("b1")  # another chunk task's rows of it, reported later
    assert (led.nbatches, led.rows, led.open) == (1, 8, {})


def test_open_batches_are_bounded_and_counted_as_last_read() -> None:
    led = Ledger()
    for i in range(OPEN_KEPT + 5):
        led.touch(f"b{i}", 1)
        led.read(f"b{i}", summary(BatchStatus.INPROG))
    assert led.overflow() == [f"b{i}" for i in range(5)]  # the oldest, to be read again
    led.read("b0", summary(BatchStatus.SUCCESS))  # read again: it had ended
    assert led.drop_overflow() == [f"b{i}" for i in range(1, 5)]
    assert len(led.open) == OPEN_KEPT
    assert led.statuses() == {"success": 1, "inprog": OPEN_KEPT + 4}


def test_the_end_reads_a_bounded_number_of_statuses() -> None:
    """A run without its artifacts' thread (nothing read while it ran): its end reads END_READS statuses,
    the batches touched last; the others count as unknown."""
    led = Ledger()
    for i in range(END_READS + 50):
        led.touch(f"b{i}", 1)
    reads: list[str] = []

    def read(batch: str) -> BatchSummary:
        reads.append(batch)
        return summary(BatchStatus.SUCCESS)

    led.settle(read)
    assert len(reads) == END_READS and reads[0] == f"b{END_READS + 49}"
    assert led.statuses() == {"success": END_READS, "unknown": 50}
