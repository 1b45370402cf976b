"""The Prefect UI's view of batches served by ``jm.run`` (worker mode: one flow run per batch type serves
every batch of it): each batch gets its own progress artifact and summary table, linked to the flow run of
its type, read back here through the Prefect API of the session's test server. (A dispatched run's:
tests/integration/engine/test_worker.py.)"""

from __future__ import annotations

import json
import threading
import time
import warnings
from typing import Any

import pytest

from alya import BatchStatus, JobManager
from alya.core import names
from tests.support.procs import Proc, QueryProc, manager, rows

pytestmark = pytest.mark.usefixtures("prefect_harness")


def artifacts_of(key: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return list(client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))))


def test_worker_run_makes_a_summary_and_a_progress_artifact_per_batch(jm: JobManager) -> None:
    """Two batches of one type and one of another, all served by one jm.run: each batch has its summary
    table (its own counts, status and output file) and its progress at 100, made inside its type's flow run;
    each run also lists the batches it worked on. No artifact is made outside a run (no FutureWarning)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    jm.register_batch_processor("art", "one", Proc())
    jm.register_batch_processor("art", "two", Proc())
    a1 = jm.batch_submit("art", "one", {}, [(n, {"x": n, "blobs": {"f.txt": str(n)}}) for n in range(1, 251)]
                         + [(251, {"x": 251, "mode": "fail"})])
    a2 = jm.batch_submit("art", "one", {}, rows(120))
    b = jm.batch_submit("art", "two", {}, rows(40))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jm.run(stop_when_idle=True)
    assert not [w for w in caught if "Artifact creation outside" in str(w.message)]
    expected = {a1: ("alya-art-one", BatchStatus.FAILED, 251, 250, 1),
                a2: ("alya-art-one", BatchStatus.SUCCESS, 120, 120, 0),
                b: ("alya-art-two", BatchStatus.SUCCESS, 40, 40, 0)}
    ops = {a1: "one", a2: "one", b: "two"}
    runs: dict[str, Any] = {}
    with get_client(sync_client=True) as client:
        for bid, (flow, status, nrows, nsuccess, nfailed) in expected.items():
            s = jm.batch_status(bid)
            assert (s.status, s.nrows, s.nsuccess, s.nfailed) == (status, nrows, nsuccess, nfailed)
            summaries = artifacts_of(names.summary_artifact_key("art", ops[bid], bid))
            assert len(summaries) == 1, summaries  # one worker: the batch was summarised once
            summary = summaries[0]
            assert summary.type == "table" and summary.flow_run_id is not None
            table = json.loads(summary.data)  # type: ignore[arg-type]
            assert len(table) == 1
            row = table[0]
            assert row["batch"] == bid and row["status"] == status.value
            assert (row["nrows"], row["nsuccess"], row["nfailed"], row["naborted"], row["nqueued"],
                    row["ninprog"]) == (nrows, nsuccess, nfailed, 0, 0, 0)
            if bid == a1:
                assert row["outputfiles"] == s.outputfiles["f.txt"] and row["outputfiles"].endswith("/f.txt")
            run = client.read_flow_run(summary.flow_run_id)
            assert client.read_flow(run.flow_id).name == flow
            assert run.parameters.get("batch_id") is None  # a worker run, not a dispatched one
            runs[bid] = run.id
            progress = artifacts_of(names.progress_artifact_key("art", ops[bid], bid))
            assert progress, f"no progress artifact for {bid}"
            for p in progress:
                assert p.type == "progress" and float(p.data) == 100.0  # type: ignore[arg-type]
                assert p.flow_run_id is not None
                assert client.read_flow(client.read_flow_run(p.flow_run_id).flow_id).name == flow
        for bid, run_id in runs.items():  # the run's overview lists the batch among those it worked on
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
            overviews = [a for a in arts if a.key is None and a.type == "table"]
            assert any(bid in {r["batch"] for r in json.loads(a.data)} for a in overviews), overviews  # type: ignore[arg-type]


def test_worker_run_progress_follows_the_batch_per_wave(database_url: str, redis_url: str, file_store_url: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """While a worker run works on a batch, its progress artifact moves with the batch's done rows (per
    wave of chunk tasks), never back, and ends at 100."""
    import alya.batch.status

    monkeypatch.setattr(alya.batch.status, "OPEN_TTL_SEC", 0.2)  # counts of an open batch cached 0.2 s, not 5
    jm = manager(database_url, redis_url, file_store_url, batchchunk_nrows=10, task_seconds=0.2)
    try:
        jm.register_batch_processor("art", "slow", Proc())
        bid = jm.batch_submit("art", "slow", {}, rows(400, sleep=0.04))  # about 2 s at 8 rows at once
        key = names.progress_artifact_key("art", "slow", bid)
        seen: list[float] = []
        worker = threading.Thread(target=lambda: jm.run(stop_when_idle=True), daemon=True)
        worker.start()
        while worker.is_alive():
            found = artifacts_of(key)
            if found:
                assert len(found) == 1  # made once, then updated in place
                seen.append(float(found[0].data))  # type: ignore[arg-type]
            time.sleep(0.05)
        worker.join()
        assert jm.batch_status(bid).status is BatchStatus.SUCCESS
        final = artifacts_of(key)
        assert len(final) == 1 and float(final[0].data) == 100.0  # type: ignore[arg-type]
        assert seen == sorted(seen), seen
        assert any(0.0 < v < 100.0 for v in seen), seen
    finally:
        jm.close()


def test_a_batch_ended_by_maintenance_gets_its_summary_from_a_run_of_its_type(jm: JobManager) -> None:
    """A paused batch whose deadline passes is ended by the maintenance leader, not by a flow run (none ever
    claimed a row of it): the worker hands it to a run of its type, which makes its summary table."""
    from datetime import UTC, datetime, timedelta

    jm.register_batch_processor("art", "late", Proc())
    bid = jm.batch_submit("art", "late", {}, rows(5), deadline=datetime.now(UTC) + timedelta(seconds=2))
    jm.batch_pause(bid)  # no run ever claims a row of it
    runner = threading.Thread(target=jm.run, daemon=True)
    runner.start()
    try:
        key = names.summary_artifact_key("art", "late", bid)
        deadline = time.monotonic() + 60
        while not artifacts_of(key) and time.monotonic() < deadline:
            time.sleep(0.2)
        s = jm.batch_status(bid)
        assert (s.status, s.error, s.naborted) == (BatchStatus.ABORTED, "deadline passed", 5)
        (art,) = artifacts_of(key)
        assert art.flow_run_id is not None  # made by a run, not from outside one
        row = json.loads(art.data)[0]  # type: ignore[arg-type]
        assert (row["batch"], row["status"], row["naborted"]) == (bid, "aborted", 5)
    finally:
        jm.engine.stopping.set()
        runner.join(60)


def runs_of(flow: str) -> list[Any]:
    """Every flow run of the flow named ``flow`` on the session's Prefect server, with their final states."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        return list(client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow]))))


def overviews_of(run_id: Any) -> list[Any]:
    """The unkeyed tables (overviews) of one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    return [a for a in arts if a.key is None and a.type == "table"]


def test_slow_queries_get_no_artifact_each_by_default(jm: JobManager) -> None:
    """ALYA_ARTIFACTS_SLOW_QUERIES off (the default): a worker run that answered slow queries made no
    progress or summary artifact for any of them, but its overview and its final state count them, failed
    ones too."""
    import re

    jm.register_slowquery_processor("art", "sqquiet", QueryProc())
    ids = [jm.slowquery_submit("art", "sqquiet", {}, {"q": n, **({"mode": "fail"} if n % 4 == 0 else {})})
           for n in range(1, 13)]  # 3 of 12 fail
    jm.run(stop_when_idle=True)
    assert [jm.slowquery_done(q).status for q in ids].count(BatchStatus.FAILED) == 3
    for q in ids:
        assert artifacts_of(names.summary_artifact_key("art", "sqquiet", q)) == []
        assert artifacts_of(names.progress_artifact_key("art", "sqquiet", q)) == []
    runs = runs_of(names.flow_name("art", "sqquiet"))
    assert runs
    answered = failed = 0
    for run in runs:
        assert run.state is not None and run.state.type.value == "COMPLETED", run.state
        m = re.fullmatch(r"([\d,]+) slow quer(?:ies|y) answered: ([\d,]+) success, ([\d,]+) failed",
                         run.state.message or "")
        if m is None:
            assert run.state.message == "no slow query answered", run.state.message
            continue
        n, ok, bad = (int(g.replace(",", "")) for g in m.groups())
        assert ok + bad == n
        answered, failed = answered + n, failed + bad
        (overview,) = overviews_of(run.id)  # one aggregate row, not a row per query
        assert json.loads(overview.data) == [{"slow queries answered": n, "success": ok, "failed": bad}]  # type: ignore[arg-type]
    assert (answered, failed) == (12, 3)


def test_slow_queries_get_their_artifacts_when_asked(database_url: str, redis_url: str,
                                                     file_store_url: str) -> None:
    """ALYA_ARTIFACTS_SLOW_QUERIES on: each slow query gets its summary table and its progress, as before."""
    jm = manager(database_url, redis_url, file_store_url, artifacts_slow_queries=True)
    try:
        jm.register_slowquery_processor("art", "sqloud", QueryProc())
        ids = [jm.slowquery_submit("art", "sqloud", {}, {"q": n}) for n in range(1, 4)]
        jm.run(stop_when_idle=True)
        for q in ids:
            (summary,) = artifacts_of(names.summary_artifact_key("art", "sqloud", q))
            assert json.loads(summary.data)[0]["status"] == "success"  # type: ignore[arg-type]
            assert [float(p.data) for p in artifacts_of(names.progress_artifact_key("art", "sqloud", q))]  # type: ignore[arg-type]
        for run in runs_of(names.flow_name("art", "sqloud")):
            assert run.state is not None and "slow quer" not in (run.state.message or "")  # batches, as before
    finally:
        jm.close()


def test_a_worker_run_of_many_batches_lists_a_bounded_overview(jm: JobManager, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker run that served more batches than its overview lists (the bound lowered to 20 here, so that
    60 one-row batches pass it: 200 by default): the overview lists 20, the failed ones first, then a row
    with the total; the run's final state counts all 60 by status."""
    import re

    from alya.prefect import ledger

    monkeypatch.setattr(ledger, "OVERVIEW_ROWS", 20)
    jm.register_batch_processor("art", "many", Proc())
    ids = [jm.batch_submit("art", "many", {}, [(1, {"x": n, **({"mode": "fail"} if n % 12 == 0 else {})})])
           for n in range(1, 61)]  # 5 of 60 fail
    jm.run(stop_when_idle=True)
    failed = {b for b in ids if jm.batch_status(b).status is BatchStatus.FAILED}
    assert len(failed) == 5
    counted: dict[str, int] = {}
    biggest = 0
    for run in runs_of(names.flow_name("art", "many")):
        assert run.state is not None
        if run.state.message == "no batch to work on":  # a run woken for rows another run had taken
            continue
        m = re.fullmatch(r"([\d,]+) batch(?:es)?: (.*)", run.state.message or "")
        assert m is not None, run.state.message
        for part in m.group(2).split(", "):
            n, status = part.split(" ")
            counted[status] = counted.get(status, 0) + int(n.replace(",", ""))
        nbatches = int(m.group(1).replace(",", ""))
        (overview,) = overviews_of(run.id)
        table = json.loads(overview.data)  # type: ignore[arg-type]
        listed = table[:-1] if nbatches > 1 else table  # then the total, when more than one
        assert len(listed) == min(20, nbatches)
        if nbatches > 1:
            assert table[-1]["batch"] == f"all {m.group(1)} batches"
        biggest = max(biggest, nbatches)
        bad = [r["status"] == "failed" for r in listed]
        assert bad == sorted(bad, reverse=True), bad  # failed first
        assert {r["batch"] for r in listed if r["status"] == "failed"} <= failed
    assert counted == {"success": 55, "failed": 5}
    assert biggest > 20  # a run served more batches than its overview lists
