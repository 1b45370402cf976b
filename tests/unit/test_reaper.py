"""alya.prefect.reaper without a server: it stops only the Prefect servers that carry its token (a
stand-in process here; the real case, a SIGKILLed worker's temporary server, is
tests/integration/faults/test_killed_ephemeral_worker.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from alya.prefect.reaper import TOKEN_VAR, reap, servers_of

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="Linux /proc only")


def test_reap_only_touches_servers_carrying_the_token(tmp_path: Any) -> None:
    """A stand-in process whose command line looks like Prefect's server: reaped with its token only."""
    fake = tmp_path / "prefect.server.api.server.py"
    fake.write_text("import time\ntime.sleep(60)\n")
    env = {**os.environ, TOKEN_VAR: "tok-a"}
    proc = subprocess.Popen([sys.executable, str(fake)], env=env)
    try:
        deadline = time.monotonic() + 10
        while not servers_of("tok-a"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert reap("tok-b") == []
        assert proc.poll() is None
        assert reap("tok-a", grace_sec=2) == [proc.pid]
        assert proc.wait(5) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
