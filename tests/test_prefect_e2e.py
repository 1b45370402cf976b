"""End to end against a real ``prefect server start`` on loopback (PREFECT_HOME in a temporary folder):

- the example deployments and a slow test batch type served from one process (``flows.serve``), with
  ALYA_DISPATCH=prefect: batches submitted through the library are dispatched, their flow runs complete,
  the batches end final (bank balances exact, UI artifacts present);
- a running batch aborted: its flow run ends Cancelled, its unfinished rows aborted;
- Prefect unreachable at submit: the batch is stored, and the served sweeper dispatches it later;
- ``prefect deploy --all`` (deployments/deploy.sh, prefect.yaml) to a process work pool, and a process
  worker running a dispatched batch.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from alya import BatchInput, BatchStatus, JobManager
from tests import services
from tests.conftest import make_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect") if (BIN / "prefect").exists() else shutil.which("prefect") or "prefect"

SERVE_SCRIPT = '''
"""Serve the alya examples plus a slow batch type e2e/slow (for abort tests), like flows.serve."""
import time

from alya import BatchJobResult, BatchStatus, JobManager, JobManagerConfig, batch_flow
from flows.common import deployment_of


class Slow:
    def do_batch_job(self, initblock, context, line, input):
        time.sleep(float(input.get("sleep", 0.5)))
        return BatchJobResult(status=BatchStatus.SUCCESS, result={"line": line})

    def mark_done(self, initblock, context, details):
        pass


jm = JobManager(config=JobManagerConfig(batchchunk_nrows=4))  # results land every 4 rows (2 s)
jm.register_batch_processor("e2e", "slow", Slow())


@batch_flow("e2e", "slow", jm.config)
def slow_flow(batch_id=None):
    return jm.process_batches("e2e", "slow", batch_id)


if __name__ == "__main__":
    from flows.serve import serve_all

    serve_all(extra=[deployment_of(slow_flow, tags=["alya"])], limit=4, poll_sec=1.0,
              sweeper_interval_sec=0)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(prefect_home: Path, api_url: str | None = None, **alya: str) -> dict[str, str]:
    """This process's environment without its Prefect settings, pointed at our server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ALYA_"))}
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false", PREFECT_LOGGING_LEVEL="INFO", PYTHONUNBUFFERED="1")
    if api_url:
        env["PREFECT_API_URL"] = api_url
    env.update(alya)
    return env


class Proc:
    """A child process in its own session, with its output in a log file; stopped by its own id."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> None:
        self.log = log
        self._fh = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(args, env=env, cwd=cwd, stdout=self._fh, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)  # its own process group: it and its flow runs
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        self._fh.close()


def wait_for(what: str, check: Callable[[], Any], timeout: float, proc: Proc | None = None,
             every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        if proc is not None and proc.popen.poll() is not None:
            raise AssertionError(f"{what}: process exited {proc.popen.returncode}\n{proc.tail()}")
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})"
                         + (f"\n{proc.tail()}" if proc else ""))


@contextmanager
def prefect_server(workdir: Path) -> Iterator[str]:
    port = free_port()
    home = workdir / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    server = Proc([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                  base_env(home), workdir / "server.log")
    url = f"http://127.0.0.1:{port}/api"
    try:
        t0 = time.monotonic()
        wait_for("prefect server", lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, 120, server)
        print(f"prefect server up in {time.monotonic() - t0:.1f}s")
        yield url
    finally:
        server.stop()


@contextmanager
def api(url: str) -> Iterator[None]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


def client() -> Any:
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def runs_of(batch_id: str) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with client() as c:
        return list(c.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[f"alya-batch:{batch_id}"]))))


def state_of(run_id: Any) -> tuple[str, str]:
    with client() as c:
        run = c.read_flow_run(run_id)
    return (run.state.type.value, run.state.message or "") if run.state else ("NONE", "")


def example(name: str) -> Any:
    """An example module of flows/; importing it builds a JobManager from ALYA_* (never connecting)."""
    import importlib

    saved = os.environ.get("ALYA_DATABASE_URL")
    os.environ.setdefault("ALYA_DATABASE_URL", "postgresql://nobody@127.0.0.1:9/unreachable")
    try:
        return importlib.import_module(f"flows.{name}")
    finally:
        if saved is None:
            os.environ.pop("ALYA_DATABASE_URL", None)


def row_counts(jm: JobManager, bid: str) -> dict[str, int]:
    return dict(services.store_sql(jm.store,
                                   "SELECT status::text, count(*) FROM batchrows WHERE batch = %s GROUP BY 1", bid))


def final_status(jm: JobManager, bid: str) -> BatchStatus | None:
    s = jm.batch_status(bid).status
    return s if s.is_final else None


# ---------------------------------------------------------------------------------------------- serve
@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, template_db: str) -> Iterator[dict[str, Any]]:
    """A Prefect server, a database, and ``flows.serve`` (plus e2e/slow) serving with ALYA_DISPATCH=prefect."""
    work = tmp_path_factory.mktemp("e2e-serve")
    db = services.clone_database(template_db)
    database_url = f"{services.PG_SERVER}/{db}"
    store_url = (work / "objects").as_uri()
    script = work / "e2e_serve.py"
    script.write_text(textwrap.dedent(SERVE_SCRIPT))
    try:
        with prefect_server(work) as url:
            env = base_env(work / "prefect-home", url, ALYA_DATABASE_URL=database_url,
                           ALYA_REDIS_URL=services.REDIS_URL, ALYA_OBJECT_STORE_URL=store_url,
                           ALYA_DISPATCH="prefect", ALYA_BATCHCHUNK_NROWS="100", ALYA_WORKER_THREADS="2")
            env["PYTHONPATH"] = str(REPO)  # the example apps (flows/) run from a checkout: they are not installed
            serve = Proc([sys.executable, str(script)], env, work / "serve.log")
            try:
                t0 = time.monotonic()
                with api(url):
                    names = ["alya-bank-txn/alya", "alya-mail-send/alya", "alya-report-summary/alya",
                             "alya-sweeper/alya", "alya-e2e-slow/alya"]

                    def deployed() -> bool:
                        with client() as c:
                            return all(c.read_deployment_by_name(n) for n in names)

                    wait_for("served deployments", deployed, 120, serve, every=0.5)
                print(f"served in {time.monotonic() - t0:.1f}s")
                jm = JobManager(database_url=database_url, redis_url=services.REDIS_URL, object_store_url=store_url,
                                config=make_config(dispatch="prefect", cancel_timeout_sec=120))
                yield {"url": url, "jm": jm, "serve": serve, "database_url": database_url}
                jm.close()
            finally:
                serve.stop()
    finally:
        services.drop_database(db)


@pytest.fixture
def s(served: dict[str, Any]) -> Iterator[dict[str, Any]]:
    with api(served["url"]):
        yield served


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

    for bid in ids + [mail_id]:
        run = runs_of(bid)[0]
        assert run.name.endswith(bid) and run.parent_task_run_id is None
        assert wait_for(f"flow run of {bid} completed", lambda r=run: state_of(r.id)[0] == "COMPLETED",  # type: ignore[misc]
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


def test_prefect_unreachable_at_submit_then_sweeper_dispatches(s: dict[str, Any]) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    jm: JobManager = s["jm"]
    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        t0 = time.monotonic()
        bid = jm.batch_submit("mail", "send", {}, [BatchInput(1, {"to": "a@example.org"})])
        took = time.monotonic() - t0
    assert took < 10
    assert jm.batch_status(bid).status is BatchStatus.QUEUED and runs_of(bid) == []
    # the sweeper (served; scheduled every minute in real life, triggered here) dispatches it
    with client() as c:
        dep = c.read_deployment_by_name("alya-sweeper/alya")
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
        assert set(deps) == {"alya-bank-txn/alya", "alya-mail-send/alya", "alya-report-summary/alya",
                             "alya-sweeper/alya", "alya-intake/alya", "alya-submit-file/alya"}
        assert {d.work_pool_name for d in deps.values()} == {"alya-pool"}
        assert deps["alya-bank-txn/alya"].entrypoint == "flows/bank.py:bank_txn_flow"
        sweeper = deps["alya-sweeper/alya"]
        assert [sch.schedule.interval.total_seconds() for sch in sweeper.schedules] == [60.0]

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
            assert wait_for("flow run completed", lambda: state_of(run.id)[0] == "COMPLETED", 60, worker)
        finally:
            worker.stop()
            jm.close()
