"""A worker on Prefect's ephemeral API (no PREFECT_API_URL) that is SIGKILLed must not leave its temporary
Prefect server running: nothing else would ever stop it, and every killed worker would leave one more. (The
reaper alone, on a stand-in process: tests/unit/test_reaper.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from alya.prefect.reaper import TOKEN_VAR, servers_of

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="Linux /proc only")

WORKER = """
import sys, time
from alya import BatchInput, BatchJobResult, BatchStatus, JobManager, JobManagerConfig

class Slow:
    def do_batch_job(self, initblock, context, line, input):
        time.sleep(0.5)
        return BatchJobResult(BatchStatus.SUCCESS, {"line": line})
    def mark_done(self, *args):
        pass

jm = JobManager(database_url=sys.argv[1], object_store_url=sys.argv[2],
                config=JobManagerConfig(batchchunk_nrows=5, poll_sec=0.1))
jm.register_batch_processor("eph", "op", Slow())
jm.batch_submit("eph", "op", {}, [BatchInput(i, {}) for i in range(1, 201)])
jm.run()
"""


def children(pid: int) -> list[tuple[int, bytes]]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append((int(entry.name), cmd))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_a_killed_worker_on_the_ephemeral_api_leaves_no_prefect_server(database_url: str, tmp_path: Any) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API") and k != TOKEN_VAR}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    worker = subprocess.Popen([sys.executable, "-c", WORKER, database_url, (tmp_path / "o").as_uri()], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = watchdog = None
    try:
        deadline = time.monotonic() + 120
        while server is None:
            assert worker.poll() is None, "the worker exited"
            assert time.monotonic() < deadline, f"no Prefect server started: {children(worker.pid)}"
            for pid, cmd in children(worker.pid):
                if b"prefect.server.api.server" in cmd:
                    server = pid
                elif b"alya.prefect.reaper" in cmd:
                    watchdog = pid
            time.sleep(0.2)
        assert watchdog is not None, "no watchdog next to the ephemeral server"
        token = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{server}/environ").read_bytes().split(b"\0")
                     if b"=" in kv)[TOKEN_VAR.encode()].decode()
        assert servers_of(token) == [server]
        time.sleep(2)  # rows in progress: the server is in use
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        killed = time.monotonic()
        while alive(server) or alive(watchdog):
            assert time.monotonic() - killed < 15, "the Prefect server outlived its killed worker"
            time.sleep(0.1)
        print(f"\nPrefect server of a SIGKILLed worker gone after {time.monotonic() - killed:.1f} s")
        assert servers_of(token) == []
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        for pid in (server, watchdog):  # never leak, even when the test fails
            if pid is not None and alive(pid):
                os.kill(pid, signal.SIGKILL)
