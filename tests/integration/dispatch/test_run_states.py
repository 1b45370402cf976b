"""A batch flow run's final state tells its batch's outcome (``alya.prefect.states``), read back through the
Prefect API of the session's test harness: the dispatched run of a batch (``ALYA_DISPATCH=prefect``), run
here in-process as a worker would run it, ends Completed, Failed or Cancelled "Aborted" (also when the
abort comes while it processes), with the batch's counts in its message; its summary table is made by a run,
equal to ``batch_status`` once rows settled, never from outside a run (warnings are errors here). A worker
run (``jm.run``) ends Completed, counting its batches by outcome."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from alya import BatchStatus, JobManager
from alya.core import names
from tests.support.config import make_config
from tests.support.procs import Proc, rows, wait_until

pytestmark = pytest.mark.usefixtures("prefect_harness")
APP, OP = "states", "work"


@pytest.fixture
def sjm(database_url: str, redis_url: str, file_store_url: str) -> Iterator[JobManager]:
    """ALYA_DISPATCH=prefect, the type states/work (``Proc``: rows say what they do) and its deployment."""
    jm = JobManager(database_url=database_url, redis_url=redis_url, object_store_url=file_store_url,
                    config=make_config(dispatch="prefect", cancel_timeout_sec=60, batchchunk_nrows=4,
                                       task_seconds=0.3))
    jm.register_batch_processor(APP, OP, Proc())
    jm.flow(APP, OP).to_deployment(name=names.type_deployment(APP, OP, jm.config.deployment_name)).apply()
    yield jm
    jm.close()


def client() -> Any:
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def the_run(bid: str) -> Any:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with client() as c:
        (run,) = c.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[names.batch_tag(bid)])))
    return run


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def run_dispatched(jm: JobManager, bid: str) -> Any:
    """The batch's dispatched flow run, run in this process as a worker runs it (``prefect.engine``: the
    run's result asked for, errors to the run's logger); its final state as the API has it. The run logs no
    error of its own chosen outcome (``OwnOutcomeFilter``)."""
    from prefect.exceptions import CancelledRun, FailedRun
    from prefect.flow_engine import run_flow

    run = the_run(bid)
    lines = Lines()
    logger = logging.getLogger("prefect.flow_runs")
    logger.addHandler(lines)
    try:
        run_flow(jm.flow(APP, OP), flow_run=run, parameters=run.parameters, error_logger=logger)
    except (FailedRun, CancelledRun):
        pass
    finally:
        logger.removeHandler(lines)
    assert not [r for r in lines.records if r.levelno >= logging.ERROR], [r.getMessage() for r in lines.records]
    with client() as c:
        return c.read_flow_run(run.id)


def artifacts(key: str) -> list[Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with client() as c:
        return list(c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))))


def summary_row(bid: str, run_id: uuid.UUID) -> dict[str, Any]:
    """The batch's one summary table, which must be linked to the run ``run_id``."""
    (art,) = artifacts(names.summary_artifact_key(APP, OP, bid))
    assert art.flow_run_id == run_id
    (row,) = json.loads(art.data)  # type: ignore[arg-type]
    return row  # type: ignore[no-any-return]


def test_a_successful_batch_s_run_is_completed(sjm: JobManager) -> None:
    bid = sjm.batch_submit(APP, OP, {}, rows(5))
    run = run_dispatched(sjm, bid)
    assert sjm.batch_status(bid).status is BatchStatus.SUCCESS
    assert (run.state.type.value, run.state.name, run.state.message) == ("COMPLETED", "Completed", "5 of 5 rows")


def test_a_failed_batch_s_run_is_failed_and_says_which_rows(sjm: JobManager) -> None:
    bid = sjm.batch_submit(APP, OP, {}, [(n, {"x": n, **({"mode": "fail"} if n in (3, 7) else {})})
                                        for n in range(1, 1201)])
    run = run_dispatched(sjm, bid)
    s = sjm.batch_status(bid)
    assert (s.status, s.nsuccess, s.nfailed) == (BatchStatus.FAILED, 1198, 2)
    assert (run.state.type.value, run.state.name) == ("FAILED", "Failed")
    assert run.state.message == "1,198 of 1,200 rows, 2 failed"
    assert summary_row(bid, run.id)["nfailed"] == 2


def test_a_batch_aborted_before_its_run_started(sjm: JobManager) -> None:
    """Its Scheduled run is Cancelled "Aborted" at once, with the summary table made through the API with
    that run's id (no run of it ever starts to make it)."""
    bid = sjm.batch_submit(APP, OP, {}, rows(5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sjm.batch_abort(bid)
    run = the_run(bid)
    assert (run.state.type.value, run.state.name) == ("CANCELLED", "Aborted")
    row = summary_row(bid, run.id)
    assert (row["status"], row["nrows"], row["naborted"]) == ("aborted", 5, 5)


def test_a_batch_aborted_while_its_run_processes(sjm: JobManager) -> None:
    """The run sees the abort, lets its running rows settle and ends Cancelled "Aborted" by itself (not
    Completed, not killed); its summary table equals batch_status after the rows settled; its progress
    says aborted and stops short of 100 %. Nothing makes an artifact outside a run, and no line about the
    abort is a warning."""
    from structlog.testing import capture_logs

    bid = sjm.batch_submit(APP, OP, {}, rows(400, sleep=0.05))
    out: dict[str, Any] = {}
    with warnings.catch_warnings(), capture_logs() as logs:
        warnings.simplefilter("error")
        t = threading.Thread(target=lambda: out.update(run=run_dispatched(sjm, bid)))
        t.start()
        wait_until(lambda: _ran(sjm, bid) >= 20, timeout=60, what="rows done before the abort")
        sjm.batch_abort(bid)
        t.join(60)
    assert not t.is_alive()
    # an abort is asked for: nothing about it is a warning (results of aborted rows dropped: info)
    assert not [e for e in logs if e["log_level"] in ("warning", "error")], logs
    assert any(e["event"] == "status_change" and e.get("new") == "aborted" for e in logs)
    run = out["run"]
    time.sleep(0.5)
    s = sjm.batch_status(bid)
    assert s.status is BatchStatus.ABORTED and 20 <= s.nsuccess < 400
    assert s.nsuccess + s.naborted == 400
    assert (run.state.type.value, run.state.name) == ("CANCELLED", "Aborted")
    assert run.state.message == f"{s.nsuccess:,} of 400 rows, {s.naborted:,} aborted"
    row = summary_row(bid, run.id)
    assert (row["status"], row["nsuccess"], row["naborted"]) == ("aborted", s.nsuccess, s.naborted)
    (progress,) = artifacts(names.progress_artifact_key(APP, OP, bid))
    assert float(progress.data) == round(100.0 * s.nsuccess / 400, 2) < 100.0  # type: ignore[arg-type]
    assert "aborted" in (progress.description or "")


def test_a_worker_run_is_completed_and_counts_its_batches(jm: JobManager) -> None:
    """One run serving three batches of its type, one of which failed: Completed, not Failed (a healthy
    worker), saying how its batches ended."""
    jm.register_batch_processor(APP, "many", Proc())
    ids = [jm.batch_submit(APP, "many", {}, rows(30)) for _ in range(2)]
    ids.append(jm.batch_submit(APP, "many", {}, [(1, {"mode": "fail"}), (2, {})]))
    jm.run(stop_when_idle=True)
    assert [jm.batch_status(b).status for b in ids] == [BatchStatus.SUCCESS] * 2 + [BatchStatus.FAILED]
    (art,) = artifacts(names.summary_artifact_key(APP, "many", ids[0]))
    with client() as c:
        run = c.read_flow_run(art.flow_run_id)
    assert (run.state.type.value, run.state.name) == ("COMPLETED", "Completed")
    assert run.state.message == "3 batches: 2 success, 1 failed"


def _ran(jm: JobManager, bid: str) -> int:
    from tests.support.services import store_sql

    return int(store_sql(jm.store, "SELECT count(*) FROM batchrows WHERE batch = %s AND status = 'success'", bid)[0][0])


def test_a_running_dispatched_run_says_how_far_its_batch_is(sjm: JobManager, monkeypatch: pytest.MonkeyPatch) -> None:
    """While it runs, the run's own state message says how far its batch is ("120 of 400 rows done, 2
    failed"), read through the Prefect API while the run is Running; the run then ends Failed as usual."""
    import re

    import alya.batch.status
    import alya.prefect.artifacts

    monkeypatch.setattr(alya.prefect.artifacts, "RUNNING_MESSAGE_SEC", 0.3)
    monkeypatch.setattr(alya.batch.status, "OPEN_TTL_SEC", 0.2)  # counts of an open batch cached 0.2 s, not 5
    bid = sjm.batch_submit(APP, OP, {}, [(n, {"x": n, "sleep": 0.05, **({"mode": "fail"} if n in (2, 5) else {})})
                                         for n in range(1, 401)])  # 2.5 s at 8 rows at once, or longer
    run_id = the_run(bid).id
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(run=run_dispatched(sjm, bid)))
    t.start()
    seen: list[str] = []
    while t.is_alive():
        with client() as c:
            st = c.read_flow_run(run_id).state
        if st is not None and st.type.value == "RUNNING" and st.message and st.message not in seen:
            seen.append(st.message)
        time.sleep(0.1)
    t.join()
    assert seen, "no progress message while the run ran"
    done = []
    for m in seen:
        match = re.fullmatch(r"([\d,]+) of 400 rows done(, ([\d,]+) failed)?", m)
        assert match, m
        done.append(int(match.group(1).replace(",", "")))
    assert done == sorted(done) and done[0] < 400 and done[-1] > 0  # it moved forward while the batch ran
    with client() as c:
        history = c.read_flow_run_states(run_id)
    running = [s for s in history if s.type.value == "RUNNING"]
    assert all(s.name == "Running" for s in running)  # not "Rerunning": one run, several messages
    run = out["run"]
    assert (run.state.type.value, run.state.message) == ("FAILED", "398 of 400 rows, 2 failed")
