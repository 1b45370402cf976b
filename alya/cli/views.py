"""What the ``alya`` command shows on a terminal (rich): batch tables and a live progress bar.

Text that alya did not write itself (errors, output file names and URLs, a processor's messages) goes through
:func:`escape` before rich sees it: ``[/]`` in a summary error is text, never markup (it crashed ``alya
status`` with a MarkupError).

Only the public JobManager API is used (``batch_status``), so what a user sees is what their own code
would get. Piped output gets the same tables without colour, and a progress bar only once, at its end."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from alya.core.models import BatchDetails, BatchStatus, BatchSummary

STATUS_STYLE = {"success": "green", "failed": "red", "aborted": "yellow", "inprog": "cyan", "queued": "blue",
                "wait": "magenta"}


def styled(status: BatchStatus | str) -> str:
    value = status.value if isinstance(status, BatchStatus) else status
    return f"[{STATUS_STYLE.get(value, 'white')}]{value}[/]"


# How summary_table names BatchSummary's fields (any other field shows under its own name), which it shows
# only when set, which only while the batch is open, and which last (after the counts).
_LABELS = {"nrows": "rows", "nsuccess": "success", "nfailed": "failed", "naborted": "aborted", "nqueued": "queued",
          "ninprog": "in progress", "outputfiles": "output file"}
_WHEN_SET = {"naborted", "error", "paused"}
_WHILE_OPEN = {"nqueued", "ninprog"}
_LAST = ("outputfiles", "error")


def summary_table(batch_id: str, s: BatchSummary, title: str | None = None) -> Table:
    """A batch's status and counts, one per line: every field of ``s.as_row()``."""
    t = Table(show_header=False, title=title, title_justify="left", box=None, padding=(0, 2))
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow="fold")
    t.add_row("batch", batch_id)
    for name, value in sorted(s.as_row().items(), key=lambda item: item[0] in _LAST):
        if (name in _WHEN_SET and not value) or (name in _WHILE_OPEN and s.status.is_final):
            continue
        label = _LABELS.get(name, name)
        if name == "status":
            t.add_row(label, styled(s.status))
        elif isinstance(value, dict):
            for key, item in value.items():
                t.add_row(label, escape(f"{key}: {item}"))
        elif name == "error":
            t.add_row(label, f"[red]{escape(str(value))}[/]")
        elif isinstance(value, int) and not isinstance(value, bool):
            t.add_row(label, f"{value:,}")
        else:
            t.add_row(label, escape(str(value)))
    return t


def batches_table(items: Iterable[BatchDetails]) -> Table:
    """One line a batch; a paused batch says so after its status, and the columns "not before" and
    "deadline" are there when a batch listed has one."""
    items = list(items)
    t = Table(box=None, padding=(0, 1), collapse_padding=True, pad_edge=False, header_style="bold")
    t.add_column("id", no_wrap=True, min_width=36)  # ids are copied from here: never cut
    t.add_column("op", overflow="fold")
    t.add_column("status", no_wrap=True)
    for col in ("rows", "ok", "failed"):
        t.add_column(col, justify="right", no_wrap=True)
    t.add_column("requested", no_wrap=True)
    times = [name for name in ("not_before", "deadline") if any(getattr(d, name) for d in items)]
    for name in times:
        t.add_column(name.replace("_", " "), no_wrap=True)
    for d in items:
        status = styled(d.status) + (" [yellow]paused[/]" if d.paused else "")
        when = [_when(getattr(d, name)) for name in times]
        t.add_row(d.id, escape(d.op), status, f"{d.nrows:,}", f"{d.nsuccess:,}", f"{d.nfailed:,}", _when(d.reqat),
                  *when)
    return t


def _when(t: datetime | None) -> str:
    return t.strftime("%m-%d %H:%M") if t else ""


def progress_bar(console: Console) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console)


def _detail(s: BatchSummary) -> str:
    parts = [styled(s.status)]
    if s.status is BatchStatus.WAIT:
        parts.append("held: `alya wait-off` releases it")
    if s.nfailed:
        parts.append(f"[red]{s.nfailed:,} failed[/]")
    if s.naborted:
        parts.append(f"[yellow]{s.naborted:,} aborted[/]")
    return " · ".join(parts)


def watch(jm: Any, batch_id: str, console: Console, interval: float = 0.5, description: str = "rows",
          give_up: Callable[[], bool] | None = None) -> BatchSummary:
    """Poll ``jm.batch_status`` and show a progress bar until the batch is final (or ``give_up()`` says
    to stop, e.g. when the demo's worker thread has ended); returns the last summary."""
    s = jm.batch_status(batch_id)
    with progress_bar(console) as progress:
        task = progress.add_task(description, total=s.nrows or None, detail=_detail(s))
        while True:
            progress.update(task, total=s.nrows or None, completed=s.nsuccess + s.nfailed + s.naborted,
                            detail=_detail(s))
            if s.status.is_final or (give_up is not None and give_up()):
                break
            time.sleep(interval)
            s = jm.batch_status(batch_id)
    return s
