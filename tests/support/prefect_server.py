"""A real ``prefect server start`` on loopback (PREFECT_HOME in a temporary folder) and processes around it,
for the end-to-end tests (tests/integration/dispatch/test_prefect_e2e.py, abort/test_abort_e2e.py,
examples/test_deploy_recipes.py): the server, its API as this process's Prefect settings, child processes
stopped by their own process group, and ``serve_examples``: the example deployments plus a slow batch
type served from one process (``flows.serve``), with ALYA_DISPATCH=prefect."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from alya import BatchStatus, JobManager
from bench.common import exited, free_port, wait_until
from tests.support import services
from tests.support.config import make_config

REPO = Path(__file__).resolve().parents[2]


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

    serve_all(extra=[deployment_of(slow_flow, "e2e", "slow", tags=["alya"])], limit=4, poll_sec=1.0,
              sweeper_interval_sec=0)
'''


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
    if proc is None:
        return wait_until(what, check, timeout, every)
    return wait_until(what, check, timeout, every, died=exited(proc.popen), tail=proc.tail)


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


@contextmanager
def serve_examples(work: Path, template_db: str) -> Iterator[dict[str, Any]]:
    """A Prefect server, a database, and ``flows.serve`` (plus e2e/slow) serving with ALYA_DISPATCH=prefect;
    yields the server's API URL ("url"), a dispatching JobManager on the database ("jm", "database_url")
    and the serving process ("serve"). For a module-scoped fixture (it takes 20-40 s to start)."""
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
            # the script is in a temporary folder, and flows/ is importable from the checkout only (the
            # wheel, and so the editable install, hold alya alone)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
            serve = Proc([sys.executable, str(script)], env, work / "serve.log")
            try:
                t0 = time.monotonic()
                with api(url):
                    names = ["alya-bank-txn/bank-txn", "alya-mail-send/mail-send", "alya-report-summary/report-summary",
                             "alya-sweeper/sweeper", "alya-e2e-slow/e2e-slow"]

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
