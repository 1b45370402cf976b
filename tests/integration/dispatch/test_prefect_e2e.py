"""End to end against a real ``prefect server start`` on loopback (PREFECT_HOME in a temporary folder):

- the example deployments and a slow test batch type served from one process (``flows.serve``), with
  ALYA_DISPATCH=prefect: batches submitted through the library are dispatched, their flow runs complete,
  the batches end final (bank balances exact, UI artifacts present);
- Prefect unreachable at submit: the batch is stored, and the served sweeper dispatches it later;
- ``prefect deploy --all`` (deployments/deploy.sh, prefect.yaml) to a process work pool, and a process
  worker running a dispatched batch.
(A running batch aborted, its flow run Cancelled by its runner: tests/integration/abort/test_abort_e2e.py.)
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from alya import BatchInput, BatchStatus, JobManager
from tests.support.config import make_config
from tests.support.prefect_server import (
    PREFECT,
    REPO,
    Proc,
    api,
    base_env,
    client,
    example,
    final_status,
    free_port,
    prefect_server,
    runs_of,
    serve_examples,
    state_of,
    wait_for,
)

pytestmark = pytest.mark.slow
RUN_STATE = {BatchStatus.SUCCESS: "COMPLETED", BatchStatus.FAILED: "FAILED"}  # a dispatched run's, by its batch's


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, template_db: str) -> Iterator[dict[str, Any]]:
    """A Prefect server, a database, and ``flows.serve`` (plus e2e/slow) serving with ALYA_DISPATCH=prefect."""
    with serve_examples(tmp_path_factory.mktemp("e2e-serve"), template_db) as stack:
        yield stack


@pytest.fixture
def s(served: dict[str, Any]) -> Iterator[dict[str, Any]]:
    with api(served["url"]):
        yield served


# ---------------------------------------------------------------------------------------------- serve
def test_served_batches_are_dispatched_and_complete(s: dict[str, Any]) -> None:
    bank, mail = example("bank"), example("mail")
    jm: JobManager = s["jm"]
    txns, opening = bank.make_transactions(2000, naccounts=10, seed=3)
    bank.open_accounts(s["database_url"], opening)
    t0 = time.monotonic()
    ids = bank.submit_transactions(jm, txns, nbatches=2)
    mail_id = jm.batch_submit("mail", "send", {}, [BatchInput(i, r) for i, r in enumerate(mail.make_mailing(30), 1)])
    submitted = time.monotonic() - t0
    for bid in ids + [mail_id]:
        wait_for(f"batch {bid} final", lambda b=bid: final_status(jm, b), 150, s["serve"])  # type: ignore[misc]
    done = time.monotonic() - t0
    print(f"3 batches submitted in {submitted:.2f}s, all final {done:.1f}s after the first submit")

    expected, refused = bank.expected_balances(txns, opening)
    assert bank.read_balances(s["database_url"], expected) == expected
    assert sum(jm.batch_status(b).nfailed for b in ids) == refused
    assert sorted(jm.batch_done(mail_id).outputfiles) == ["bounced.csv", "sent.csv"]

    for bid in ids + [mail_id]:  # each run ends in its batch's outcome (a batch with failed rows: Failed)
        run = runs_of(bid)[0]
        assert run.name.endswith(bid) and run.parent_task_run_id is None
        want = RUN_STATE[jm.batch_status(bid).status]
        assert wait_for(f"flow run of {bid} {want}", lambda r=run, w=want: state_of(r.id)[0] == w,  # type: ignore[misc]
                        60)
    # the UI shows each batch's progress and a summary table
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with client() as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[runs_of(mail_id)[0].id])))
    by_type = {a.type: a for a in arts}
    assert {"progress", "table"} <= set(by_type), by_type
    assert float(by_type["progress"].data) == 100.0  # type: ignore[arg-type]
    assert mail_id in str(by_type["table"].data) and "failed" in str(by_type["table"].data)


def test_dispatch_to_final_latency_of_small_batches(s: dict[str, Any]) -> None:
    jm: JobManager = s["jm"]
    times = []
    for _ in range(3):
        t0 = time.monotonic()
        bid = jm.batch_submit("mail", "send", {}, [BatchInput(1, {"to": "a@example.org"})])
        wait_for("one-row batch final", lambda b=bid: final_status(jm, b), 60, s["serve"], every=0.05)  # type: ignore[misc]
        times.append(time.monotonic() - t0)
    print("submit -> final, one-row batches, served: " + ", ".join(f"{t:.1f}s" for t in times))
    assert min(times) < 30


def test_prefect_unreachable_at_submit_then_sweeper_dispatches(s: dict[str, Any]) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    jm: JobManager = s["jm"]
    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        t0 = time.monotonic()
        bid = jm.batch_submit("mail", "send", {}, [BatchInput(1, {"to": "a@example.org"})])
        took = time.monotonic() - t0
    assert took < 10
    assert jm.batch_status(bid).status is BatchStatus.QUEUED and runs_of(bid) == []
    # the sweeper (served; scheduled every 5 minutes in real life, triggered here) dispatches it
    with client() as c:
        dep = c.read_deployment_by_name("alya-sweeper/sweeper")
        sweep = c.create_flow_run_from_deployment(dep.id)
    wait_for("batch dispatched by the sweeper and final", lambda: final_status(jm, bid), 120, s["serve"])
    assert runs_of(bid)[0].idempotency_key.startswith(f"alya:{bid}:sweep:")
    wait_for("sweeper run completed", lambda: state_of(sweep.id)[0] == "COMPLETED", 60, s["serve"])


# ---------------------------------------------------------------------------------------------- deploy
def test_prefect_deploy_all_and_process_worker(tmp_path: Path, database_url: str, redis_url: str) -> None:
    mail = example("mail")
    store_url = (tmp_path / "objects").as_uri()
    with prefect_server(tmp_path) as url, api(url):
        alya_env = {"ALYA_DATABASE_URL": database_url, "ALYA_REDIS_URL": redis_url,
                    "ALYA_OBJECT_STORE_URL": store_url, "ALYA_DISPATCH": "prefect"}
        env = base_env(tmp_path / "prefect-home", url, PREFECT=PREFECT, **alya_env)
        t0 = time.monotonic()
        out = subprocess.run(["bash", "deployments/deploy.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=240)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        print(f"deploy.sh (work pool + prefect deploy --all) took {time.monotonic() - t0:.1f}s")
        with client() as c:
            deps = {f"{c.read_flow(d.flow_id).name}/{d.name}": d for d in c.read_deployments()}
        assert set(deps) == {"alya-bank-txn/bank-txn", "alya-mail-send/mail-send", "alya-report-summary/report-summary",
                             "alya-sweeper/sweeper", "alya-intake/intake", "alya-submit-file/submit-file"}
        assert {d.work_pool_name for d in deps.values()} == {"alya-pool"}
        assert deps["alya-bank-txn/bank-txn"].entrypoint == "flows/bank.py:bank_txn_flow"
        sweeper = deps["alya-sweeper/sweeper"]
        assert [sch.schedule.interval.total_seconds() for sch in sweeper.schedules] == [300.0]
        # nothing to scan in this environment: the intake is deployed unscheduled, not failing every minute
        assert deps["alya-intake/intake"].schedules == []
        assert "alya-intake/intake deployed without a schedule" in out.stderr

        worker = Proc([PREFECT, "worker", "start", "--pool", "alya-pool", "--limit", "2"],
                      {**env, "PREFECT_WORKER_QUERY_SECONDS": "1"}, tmp_path / "worker.log")
        jm = JobManager(database_url=database_url, redis_url=redis_url, object_store_url=store_url,
                        config=make_config(dispatch="prefect"))
        try:
            t0 = time.monotonic()
            data = [BatchInput(i, r) for i, r in enumerate(mail.make_mailing(20), 1)]
            bid = jm.batch_submit("mail", "send", {}, data)
            wait_for("batch final via the process worker", lambda: final_status(jm, bid), 150, worker)
            print(f"process worker: submit -> final {time.monotonic() - t0:.1f}s (worker started with it)")
            assert sorted(jm.batch_done(bid).outputfiles) == ["bounced.csv", "sent.csv"]
            (run,) = runs_of(bid)
            want = RUN_STATE[jm.batch_status(bid).status]
            assert wait_for(f"flow run {want}", lambda: state_of(run.id)[0] == want, 60, worker)
        finally:
            worker.stop()
            jm.close()
