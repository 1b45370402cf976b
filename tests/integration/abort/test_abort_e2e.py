"""Abort end to end, on a real ``prefect server start`` with the examples and a slow batch type served by
``flows.serve`` (ALYA_DISPATCH=prefect): a running batch aborted, its flow run ending Cancelled "Aborted" by
itself (not killed, not forced), its unfinished rows aborted, counts whole, and the UI's artifacts showing it
aborted with the settled counts."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from alya import BatchInput, BatchStatus, JobManager
from alya.core import names
from tests.support.prefect_server import api, client, row_counts, runs_of, serve_examples, state_of, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, template_db: str) -> Iterator[dict[str, Any]]:
    """A Prefect server, a database, and ``flows.serve`` (plus e2e/slow) serving with ALYA_DISPATCH=prefect."""
    with serve_examples(tmp_path_factory.mktemp("e2e-serve"), template_db) as stack:
        yield stack


@pytest.fixture
def s(served: dict[str, Any]) -> Iterator[dict[str, Any]]:
    with api(served["url"]):
        yield served


def test_abort_running_batch_cancels_its_flow_run(s: dict[str, Any]) -> None:
    jm: JobManager = s["jm"]
    bid = jm.batch_submit("e2e", "slow", {}, [BatchInput(i, {"sleep": 0.5}) for i in range(1, 61)])
    (run,) = runs_of(bid)
    # (batch_status is cached for ALYA_BATCHSTATUS_CACHEDUR_SEC while running: ask the database)
    wait_for("slow batch running", lambda: row_counts(jm, bid).get("success", 0) >= 2, 90, s["serve"])
    assert state_of(run.id)[0] == "RUNNING"
    t0 = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing made outside a run (Prefect's FutureWarning)
        summary = jm.batch_abort(bid)
    assert summary.status is BatchStatus.ABORTED and summary.naborted > 0
    wait_for("flow run cancelled", lambda: state_of(run.id)[0] == "CANCELLED", 60, s["serve"])
    took = time.monotonic() - t0
    state, message = state_of(run.id)
    print(f"abort -> flow run Cancelled in {took:.1f}s ({message!r})")
    with client() as c:
        name = c.read_flow_run(run.id).state.name
    assert name == "Aborted"  # the run saw the abort and ended so itself: not killed, not forced
    after = jm.batch_status(bid)
    assert after.status is BatchStatus.ABORTED
    assert after.nsuccess + after.nfailed + after.naborted == after.nrows == 60
    assert message == f"{after.nsuccess:,} of 60 rows, {after.naborted:,} aborted"
    counts = row_counts(jm, bid)
    assert set(counts) <= {"success", "aborted"} and counts["aborted"] == after.naborted
    assert counts.get("success", 0) == after.nsuccess
    # the UI shows the aborted batch as such: its progress stops at the rows that ran and says aborted, and
    # its summary table, made by the run once its rows settled, equals batch_status
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with client() as c:
        pkey, skey = names.progress_artifact_key("e2e", "slow", bid), names.summary_artifact_key("e2e", "slow", bid)
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[pkey, skey])))
    (progress,) = [a for a in arts if a.key == pkey]
    assert float(progress.data) == round(100 * after.nsuccess / 60, 2) < 100  # type: ignore[arg-type]
    assert "aborted" in (progress.description or "")
    (table,) = [a for a in arts if a.key == skey]
    assert table.flow_run_id == run.id
    (row,) = json.loads(table.data)  # type: ignore[arg-type]
    assert (row["status"], row["nsuccess"], row["naborted"]) == ("aborted", after.nsuccess, after.naborted)
