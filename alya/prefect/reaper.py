"""A worker on Prefect's ephemeral API must not leak its temporary Prefect server when it is killed.

Without ``PREFECT_API_URL``, Prefect 3 starts a temporary server for the process on first use
(``prefect.server.api.server.SubprocessASGIServer``: ``python -m uvicorn … prefect.server.api.server:create_app``
in a subprocess) and stops it only from an ``atexit`` hook. A worker killed hard (SIGKILL, the OOM killer, a
processor that crashes the interpreter) never runs that hook, and the server (~200 MB) lives on for ever.

``guard_ephemeral_server()`` starts, once per process, a small watchdog process (``python -m alya.prefect.reaper``)
that polls its parent every 0.2 s. When the parent is gone, it ends every Prefect server process that the
parent started: the parent put a random token in its environment, which the server inherited (Prefect
passes ``os.environ`` to it), so the watchdog finds them through ``/proc`` even though they have been
re-parented to init. ``PR_SET_PDEATHSIG`` was not used: it fires when the *thread* that started the child
ends, and Prefect starts its server from whichever thread first needs a client (alya's flow thread).

Long-running workers belong on a Prefect server (``PREFECT_API_URL``); the ephemeral API is for the demo
and for trying things out. Linux only (``/proc``); elsewhere the guard does nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

TOKEN_VAR = "ALYA_REAPER_TOKEN"
_SERVER_MARKERS = (b"prefect.server.api.server", b"prefect server start")
_POLL_SEC = 0.2

_lock = threading.Lock()
_started_in: int | None = None  # the pid that started the watchdog (a forked child needs its own)
_proc: subprocess.Popen[bytes] | None = None


def uses_ephemeral_api() -> bool:
    """Whether Prefect clients of this process would start a temporary server (no PREFECT_API_URL)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    return not PREFECT_API_URL.value() and bool(PREFECT_SERVER_EPHEMERAL_ENABLED.value())


notice_shown = False  # set by front ends (the CLI, the demo) that tell the user about the server themselves


def guard_ephemeral_server() -> bool:
    """Start the watchdog of this process if Prefect would use its ephemeral API here (idempotent).
    Returns whether a watchdog is running for this process."""
    global _started_in, _proc
    if not Path("/proc/self/environ").exists() or not uses_ephemeral_api():
        return False
    with _lock:
        if _started_in == os.getpid() and _proc is not None and _proc.poll() is None:
            return True
        # A fresh token per process (one inherited from a parent names the parent's servers), set before
        # any server starts: Prefect hands the server a copy of os.environ.
        token = uuid.uuid4().hex
        os.environ[TOKEN_VAR] = token
        _proc = subprocess.Popen(
            [sys.executable, "-m", "alya.prefect.reaper", str(os.getpid()), token],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
        )
        _started_in = os.getpid()
    return True


def servers_of(token: str, exclude: int | None = None) -> list[int]:
    """Pids of Prefect server processes whose environment holds ``token``."""
    needle = f"{TOKEN_VAR}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in (exclude, os.getpid()):
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            if not any(m in cmdline for m in _SERVER_MARKERS):
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if needle in env:
            found.append(int(entry.name))
    return found


def reap(token: str, grace_sec: float = 5.0) -> list[int]:
    """SIGTERM every server of ``token``, SIGKILL what is left after ``grace_sec``; returns their pids."""
    pids = servers_of(token)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_sec
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
    return pids


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def watch(parent: int, token: str) -> None:
    """The watchdog's body: wait for ``parent`` to go away, then reap its servers."""
    # A supervisor signalling the whole process group must not take the watchdog before its parent.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    while os.getppid() == parent:
        time.sleep(_POLL_SEC)
    reap(token)


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
