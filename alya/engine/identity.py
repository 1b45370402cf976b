"""Who this worker is, and the heartbeat that keeps its rows from being recovered from under it.

A worker's identity (``host:pid:random``) is what its claimed rows are held under. Recovery requeues the
rows of identities whose heartbeat stopped for ``ALYA_RECOVERY_SEC``. So when this process can no longer
vouch for rows it holds (a write-back or a give-back failed for good, PostgreSQL restarted and may have lost
acknowledged write-backs) it *retires* the identity: a fresh one is used from then on and the old one ages
out, which hands exactly those rows to recovery, as for a dead worker, without stopping the process.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from typing import Any

from alya.core.errors import AlyaError
from alya.core.logs import get_logger
from alya.db.store import Store


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Identity:
    """The current worker id and its heartbeat thread. One lock: the id changes only under it."""

    def __init__(self, store: Store, recovery_sec: float) -> None:
        self._store = store
        self._interval = max(0.5, recovery_sec / 4)
        self._lock = threading.RLock()  # _beat may retire the identity while start() holds it
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._server_started: Any = None  # PostgreSQL's start time at the last heartbeat
        self.worker_id = new_worker_id()
        self.log = get_logger().bind(worker=self.worker_id)

    def start(self) -> bool:
        """Register this worker and keep it alive. Returns False if it was already running."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return False
            self.beat()
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="alya-heartbeat", daemon=True)
            self._thread.start()
            return True

    def stop(self, forget: bool = True) -> None:
        """Stop beating and (``forget``) leave the ``workers`` table; rows still held are released by the
        caller first. Without ``forget`` the worker just falls silent, as a hung one would."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if not forget:
            return
        try:
            with self._store.tx() as tx:
                tx.forget_worker(id=self.worker_id)
        except AlyaError as exc:
            self.log.warning("forget_worker_failed", error=str(exc))

    def beat(self) -> None:
        """Say this worker is alive. A PostgreSQL restart since the last beat may have lost write-backs that
        were acknowledged (they commit with synchronous_commit off): their rows would stay inprog under
        this live worker for ever. So the worker stops vouching for what it held before the restart (a new
        identity): recovery requeues those rows after ALYA_RECOVERY_SEC, as for a dead worker, and rows
        whose results did land stay as they are."""
        with self._store.tx() as tx:
            started = tx.server_started()
            tx.heartbeat(id=self.worker_id, host=socket.gethostname(), pid=os.getpid())
        previous, self._server_started = self._server_started, started
        if previous is not None and started != previous:
            self.log.warning("postgres_restarted", previous=str(previous), now=str(started),
                             note="rows held before the restart are left to recovery")
            self.retire(self.worker_id)

    def retire(self, worker: str) -> None:
        """Stop vouching for rows held as ``worker``: a new identity is used from now on and the old one
        ages out of ``workers``, so recovery requeues whatever it still holds after ALYA_RECOVERY_SEC."""
        with self._lock:
            if self.worker_id != worker:
                return
            self.worker_id = new_worker_id()
            self.log = get_logger().bind(worker=self.worker_id)
        self.log.error("worker_identity_retired", old=worker)
        with contextlib.suppress(Exception):  # the heartbeat thread keeps trying
            self.beat()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.beat()
            except Exception as exc:  # keep beating through outages
                self.log.warning("heartbeat_failed", error=str(exc))
