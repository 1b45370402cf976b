"""alya's own log lines in a batch flow run's logs (the run's page in the Prefect UI), on the session's
Prefect test harness: present, with a failed row's error code, without the level and time Prefect shows."""

from __future__ import annotations

from alya import BatchStatus, JobManager
from tests.support.config import make_config
from tests.support.procs import Proc, wait_until


def test_alya_lines_reach_the_prefect_run_logs(prefect_harness: None, database_url: str, redis_url: str,
                                                file_store_url: str) -> None:
    """A batch flow run's page in the Prefect UI shows alya's own lines (status changes with app, op and
    batch), not only Prefect's."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    jm = JobManager(database_url=database_url, redis_url=redis_url, object_store_url=file_store_url,
                    config=make_config())
    try:
        jm.register_batch_processor("logs", "ui", Proc())
        bid = jm.batch_submit("logs", "ui", {}, [(n, {"x": n, **({"mode": "fail"} if n == 7 else {})})
                                                  for n in range(1, 21)])
        state = jm.flow("logs", "ui")(batch_id=bid, return_state=True)
        assert jm.batch_status(bid).status is BatchStatus.FAILED
        run_id = state.state_details.flow_run_id
        APILogHandler().flush()

        def alya_lines() -> list[str]:
            with get_client(sync_client=True) as client:
                logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            return [log.message for log in logs if log.name == "alya"]

        lines = wait_until(lambda: [m for m in alya_lines() if "new='failed'" in m] and alya_lines(),
                           timeout=30, what="alya's lines in the run's logs")
        assert any("event='status_change'" in m and "app='logs'" in m and f"batch='{bid}'" in m for m in lines)
        assert any("event='rows_written'" in m for m in lines)
        # a row's own line, written on one of alya's row threads, reaches the run too, with its error code
        # and field
        assert any("event='row_status'" in m and "line=7" in m and "new='failed'" in m
                   and "errors='bad_value (x)'" in m for m in lines), lines
        assert not any("flow_run_id" in m for m in lines)
        # the UI shows each line's level and time itself: the line does not repeat them
        assert not any("level=" in m or "timestamp=" in m for m in lines), lines
    finally:
        jm.close()
