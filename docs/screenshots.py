"""Remake the screenshots of README.md, "In the Prefect UI", from real alya batches on a real Prefect server.

    apt-get install chromium pngquant               # Debian's; pngquant only squeezes PNGs over 300 KB
    .venv/bin/python docs/screenshots.py            # from the repository top; about 2.5 minutes here
    .venv/bin/python docs/screenshots.py --keep     # leave the server running to look around (Ctrl-C)

What it does, as a user would: a ``prefect server start`` on a free port (its own PREFECT_HOME, the UI on,
PREFECT_UI_API_URL set first), a fresh migrated alya database on the local PostgreSQL
(``ALYA_BENCH_PG``, default ``postgresql://postgres@127.0.0.1:5432``), ``python -m flows.serve`` serving
the examples with ``ALYA_DISPATCH=prefect``, then three bank/txn batches submitted with dispatch: one that
succeeds, one whose overdrafts fail (``failed``), and a large one aborted while its run works on it.

Before it takes a picture it asserts through the Prefect API what the pictures must show: each batch's one
run in the state of its batch (Completed; Failed; Cancelled named "Aborted"), the running run's state
message counting rows, each batch's summary artifact equal to ``batch_status``, the aborted batch's progress
short of 100 % and saying aborted, the deployments named after their batch types. Then Debian's
``chromium --headless`` photographs the pages (``docs/ui-*.png``), each squeezed under 300 KB with
``pngquant`` when it is larger. A UI that changed its routes shows up as a picture without the runs: look
at the PNGs after remaking them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from bench.common import free_port, fresh_database, wait_until  # noqa: E402

DOCS = REPO / "docs"
MAX_PNG_BYTES = 300_000
CHROMIUM = shutil.which("chromium") or "chromium"


def wait(what: str, check: Callable[[], Any], timeout: float = 120, every: float = 0.5) -> Any:
    return wait_until(what, check, timeout, every)


class Proc:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._fh = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(args, env=env, cwd=REPO, stdout=self._fh, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)  # its own group: it and its flow-run subprocesses
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
        self._fh.close()


def shoot(url: str, name: str, budget_ms: int = 12000, height: int = 900) -> Path:
    """A 1400 pixels wide screenshot of ``url`` by headless chromium, under MAX_PNG_BYTES."""
    out = DOCS / name
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="alya-chromium-") as profile:
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--screenshot={out}", f"--window-size=1400,{height}",
                        f"--virtual-time-budget={budget_ms}", url],
                       check=True, capture_output=True, timeout=180)
    if out.stat().st_size > MAX_PNG_BYTES and shutil.which("pngquant"):
        subprocess.run(["pngquant", "--force", "--skip-if-larger", "--quality=60-90", "--output", str(out),
                        str(out)], check=False)
    size = out.stat().st_size
    assert size <= MAX_PNG_BYTES, f"{name}: {size} bytes (install pngquant)"
    print(f"{name}: {size // 1024} KB  <- {url}")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--keep", action="store_true", help="keep the server running afterwards, until Ctrl-C")
    ap.add_argument("--big-rows", type=int, default=60_000, help="rows of the batch that is aborted")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="alya-screenshots-"))
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ALYA_"))}
    env.update(PREFECT_HOME=str(work / "prefect-home"), PREFECT_API_URL=api_url, PREFECT_UI_API_URL=api_url,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    prefect = str(Path(sys.executable).parent / "prefect")
    server = Proc([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, work / "server.log")
    procs = [server]
    try:
        wait("prefect server", lambda: httpx.get(f"{api_url}/health", timeout=2).status_code == 200)
        with fresh_database() as db_url:
            env.update(ALYA_DATABASE_URL=db_url, ALYA_OBJECT_STORE_URL=(work / "objects").as_uri(),
                       ALYA_DISPATCH="prefect", ALYA_LOG_LEVEL="INFO")
            procs.append(Proc([sys.executable, "-m", "flows.serve", "--sweeper-interval-sec", "300"], env,
                              work / "serve.log"))
            os.environ.update({k: v for k, v in env.items() if k.startswith(("PREFECT_", "ALYA_"))})
            shots = run_batches(db_url, args.big_rows, f"http://127.0.0.1:{port}")
            for url, name, height in shots:
                shoot(url, name, height=height)
            if args.keep:
                print(f"UI at http://127.0.0.1:{port}/ ; Ctrl-C to stop")
                signal.pause()
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(work, ignore_errors=True)


def run_batches(db_url: str, big_rows: int, ui: str) -> list[tuple[str, str, int]]:
    """Submit, abort and check the three batches; the pages to photograph (url, file name, height)."""
    from prefect.client.orchestration import get_client

    from alya import BatchStatus, JobManager, JobManagerConfig
    from alya.core import names
    from flows import bank

    jm = JobManager(database_url=db_url, object_store_url=os.environ["ALYA_OBJECT_STORE_URL"],
                    config=JobManagerConfig(dispatch="prefect"))  # type: ignore[call-arg]
    with get_client(sync_client=True) as c:
        wait("the served deployments", lambda: c.read_deployment_by_name(names.deployment_name(bank.APP, bank.OP)))
        ok_txns, ok_open = bank.make_transactions(40, naccounts=5, seed=1, overdraft_every=0)
        bad_txns, bad_open = bank.make_transactions(250, naccounts=5, seed=2, overdraft_every=50)
        big_txns, big_open = bank.make_transactions(big_rows, naccounts=50, seed=3, overdraft_every=0)
        for i, opening in enumerate((ok_open, bad_open, big_open)):
            bank.open_accounts(db_url, {f"{a}-{i}": b for a, b in opening.items()})
        for i, txns in enumerate((ok_txns, bad_txns, big_txns)):
            for t in txns:
                t["account"] = f"{t['account']}-{i}"
        (ok,) = bank.submit_transactions(jm, ok_txns, 1, {"user": "ui-demo", "note": "all good"})
        (bad,) = bank.submit_transactions(jm, bad_txns, 1, {"user": "ui-demo", "note": "five overdrafts"})
        wait("the small batches final", lambda: all(jm.batch_status(b).status.is_final for b in (ok, bad)), 300)
        (big,) = bank.submit_transactions(jm, big_txns, 1, {"user": "ui-demo", "note": "aborted midway"})

        def run_of(batch: str) -> Any:
            from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

            tags = FlowRunFilterTags(all_=[names.batch_tag(batch)])
            runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(tags=tags))
            assert len(runs) == 1, (batch, runs)
            return runs[0]

        # while it runs, the run's own state says how far its batch is
        pattern = re.compile(rf"([\d,]+) of {big_rows:,} rows done")

        def moving() -> Any:
            r = run_of(big)
            m = pattern.fullmatch((r.state.message or "") if r.state and r.state.type.value == "RUNNING" else "")
            return r if m and int(m.group(1).replace(",", "")) > 0 else None

        running = wait("the big batch's run to show its progress", moving, 300, every=0.3)
        shoot(f"{ui}/runs/flow-run/{running.id}?tab=Details", "ui-running.png", height=1250)  # while it runs
        s = jm.batch_status(big)
        assert not s.status.is_final, f"the big batch ended before the abort: use more --big-rows ({s})"
        jm.batch_abort(big)
        wait("the aborted batch's run to end", lambda: run_of(big).state.is_final(), 180)
        time.sleep(2)  # the summary artifact is made by the run at its end
        expect = {ok: ("success", "COMPLETED", "Completed"), bad: ("failed", "FAILED", "Failed"),
                  big: ("aborted", "CANCELLED", "Aborted")}
        for batch, (status, kind, name) in expect.items():
            s = jm.batch_status(batch)
            run = run_of(batch)
            assert s.status is BatchStatus(status), (batch, s)
            assert (run.state.type.value, run.state.name) == (kind, name), (batch, run.state)
            (art,) = c.read_artifacts(artifact_filter=_key(names.summary_artifact_key(bank.APP, bank.OP, batch)),
                                      sort=_latest(), limit=1)
            (row,) = json.loads(str(art.data))
            got = {k: row[k] for k in ("status", "nrows", "nsuccess", "nfailed", "naborted")}
            want = {"status": s.status.value, "nrows": s.nrows, "nsuccess": s.nsuccess, "nfailed": s.nfailed,
                    "naborted": s.naborted}
            assert got == want, (batch, got, want)
            print(f"{status:8} batch {batch}: run {run.name} {run.state.name} '{run.state.message}', summary {got}")
        (progress,) = c.read_artifacts(artifact_filter=_key(names.progress_artifact_key(bank.APP, bank.OP, big)))
        assert float(str(progress.data)) < 100 and "aborted" in (progress.description or ""), progress
        deployments = {f"{c.read_flow(d.flow_id).name}/{d.name}" for d in c.read_deployments()}
        assert names.deployment_name(bank.APP, bank.OP) in deployments, deployments
        bad_run = run_of(bad)
        bad_art = c.read_artifacts(artifact_filter=_key(names.summary_artifact_key(bank.APP, bank.OP, bad)),
                                   sort=_latest(), limit=1)[0]
    jm.close()
    return [(f"{ui}/runs", "ui-runs.png", 1100),
            (f"{ui}/runs/flow-run/{bad_run.id}?tab=Details", "ui-failed-run.png", 1120),
            (f"{ui}/artifacts/artifact/{bad_art.id}", "ui-summary.png", 600),
            (f"{ui}/deployments", "ui-deployments.png", 650)]


def _latest() -> Any:
    from prefect.client.schemas.sorting import ArtifactSort

    return ArtifactSort.CREATED_DESC


def _key(key: str) -> Any:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    return ArtifactFilter(key=ArtifactFilterKey(any_=[key]))


if __name__ == "__main__":
    main()
