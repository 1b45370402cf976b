"""Abort end to end, on a real ``prefect server start`` with the examples and a slow batch type served by
``flows.serve`` (ALYA_DISPATCH=prefect): a running batch aborted, its flow run Cancelled by its runner (not
forced), its unfinished rows aborted, counts whole, and the UI's artifacts showing it final."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from alya import BatchInput, BatchStatus, JobManager
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
    summary = jm.batch_abort(bid)
    assert summary.status is BatchStatus.ABORTED and summary.naborted > 0
    assert state_of(run.id)[0] in ("CANCELLING", "CANCELLED")
    wait_for("flow run cancelled", lambda: state_of(run.id)[0] == "CANCELLED", 60, s["serve"])
    took = time.monotonic() - t0
    state, message = state_of(run.id)
    print(f"abort -> flow run Cancelled in {took:.1f}s ({message!r})")
    assert "forced by alya" not in message  # the runner cancelled it; no forcing was needed
    time.sleep(1.5)  # whatever was in flight has landed by now
    after = jm.batch_status(bid)
    assert after.status is BatchStatus.ABORTED
    assert after.nsuccess + after.nfailed + after.naborted == after.nrows == 60
    counts = row_counts(jm, bid)
    assert set(counts) <= {"success", "aborted"} and counts["aborted"] == after.naborted
    assert counts.get("success", 0) == after.nsuccess
    # the UI shows the aborted batch as final: progress at 100 % and a summary table saying aborted
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with client() as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[f"alya-progress-{bid}", f"alya-summary-{bid}"])))
    assert max(float(a.data) for a in arts if a.key == f"alya-progress-{bid}") == 100.0  # type: ignore[arg-type]
    assert any("aborted" in str(a.data) for a in arts if a.key == f"alya-summary-{bid}")
