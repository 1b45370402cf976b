from alya import BatchInput, BatchStatus, JobManager


def test_submit_and_status(jm: JobManager) -> None:
    bid = jm.batch_submit("smoke", "Op", {"u": 1}, [BatchInput(i, {"x": i}) for i in range(1, 11)])
    s = jm.batch_status(bid)
    assert s.status is BatchStatus.QUEUED and s.nrows == 10 and s.nqueued == 10
