"""Batch status changes as events for the outside world (Prefect events, issue 20 item 5), layer-neutral.

Every batch status change is stored by one statement that wins it (a conditional UPDATE, the summariser's
lock, the abort's lock) and is then logged once, after the commit, through
:func:`alya.core.logs.status_change`; that function also hands the change to :func:`publish` here. So an
event is sent exactly once per transition, by whichever process won it (a client, a worker, maintenance),
and a new transition gets its event by calling ``status_change`` as every transition does.

This module knows no Prefect: the Prefect layer installs the sink (``alya.prefect.events.install``), and
until one is installed (or with ``ALYA_EVENTS=off``) :func:`publish` does nothing. A sink must not block
or raise; :func:`publish` swallows whatever it raises anyway, so an event can never fail the business call.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

COUNT_FIELDS = ("nrows", "nsuccess", "nfailed", "naborted", "nqueued", "ninprog")


@dataclass(frozen=True, slots=True)
class BatchChange:
    """One batch status change: ``status`` is the new one, ``old`` the one it left (None on submit);
    ``counts`` holds what the transition knew (final statuses: exact counts; queued and inprog: nrows)."""

    app: str
    op: str
    batch_id: str
    status: str
    old: str | None = None
    type: str = "B"  # "B" a batch, "Q" a slow query
    counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    flow_run: str | None = None  # the Prefect flow run that made the change, if one did


Sink = Callable[[BatchChange], None]
_sinks: dict[str, Sink] = {}
_lock = threading.Lock()


def install(name: str, sink: Sink) -> None:
    """Register (or replace) the sink ``name``; every later change goes to it too."""
    with _lock:
        _sinks[name] = sink


def uninstall(name: str) -> None:
    with _lock:
        _sinks.pop(name, None)


def publish(app: str, op: str, batch_id: str, status: str, old: str | None = None,
            fields: dict[str, Any] | None = None, flow_run: Any = None) -> None:
    """Hand a change to every installed sink (none installed: nothing to build). Never raises."""
    if not _sinks:
        return
    fields = fields or {}
    counts = {k: int(v) for k in COUNT_FIELDS if isinstance(v := fields.get(k), int)}
    error = fields.get("error")
    change = BatchChange(app, op, batch_id, status, old, str(fields.get("type") or "B"), counts,
                         None if error is None else str(error), None if flow_run is None else str(flow_run))
    for sink in list(_sinks.values()):
        with contextlib.suppress(Exception):  # an event is best-effort: the business call already succeeded
            sink(change)
