"""The final state of a dispatched flow run when several runs served its batch: only the run that
summarised the batch ends in its outcome; the others say they helped (``alya.prefect.states``)."""

from __future__ import annotations

from alya.core.models import BatchStatus, BatchSummary
from alya.prefect.states import ABORTED_NAME, batch_state


def summary(status: BatchStatus, nsuccess: int, nfailed: int = 0, naborted: int = 0, open_: int = 0) -> BatchSummary:
    return BatchSummary(status=status, outputfiles={}, nrows=nsuccess + nfailed + naborted + open_,
                        nsuccess=nsuccess, nfailed=nfailed, naborted=naborted, nqueued=open_, ninprog=0)


def test_the_summarising_run_ends_in_the_batch_s_outcome() -> None:
    failed = summary(BatchStatus.FAILED, 4949, 51)
    assert batch_state(failed)["type"] == "FAILED"
    assert batch_state(failed, summarised=True)["message"] == "4,949 of 5,000 rows, 51 failed"
    assert batch_state(summary(BatchStatus.SUCCESS, 10), summarised=True)["type"] == "COMPLETED"


def test_a_run_that_only_helped_is_completed_and_says_who_summarised() -> None:
    for status, st in ((BatchStatus.FAILED, summary(BatchStatus.FAILED, 4949, 51)),
                       (BatchStatus.SUCCESS, summary(BatchStatus.SUCCESS, 5000))):
        state = batch_state(st, summarised=False)
        assert state["type"] == "COMPLETED" and state["name"] == "Completed"
        assert state["message"].startswith(f"batch {status.value}: ")
        assert "summarised by another run" in state["message"]


def test_every_run_of_an_aborted_batch_ends_aborted_and_open_batches_are_left_to_others() -> None:
    aborted = summary(BatchStatus.ABORTED, 1200, naborted=3800)
    for summarised in (True, False):
        assert batch_state(aborted, summarised=summarised) == {
            "type": "CANCELLED", "name": ABORTED_NAME, "message": "1,200 of 5,000 rows, 3,800 aborted"}
    running = summary(BatchStatus.INPROG, 100, open_=900)
    assert "left to other runs" in batch_state(running, summarised=False)["message"]
