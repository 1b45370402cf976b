"""What the ``alya`` command shows on a terminal (rich): batch tables and a live progress bar.

Only the public JobManager API is used (``batch_status``), so what a user sees is what their own code
would get. Piped output gets the same tables without colour, and a progress bar only once, at its end."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from alya.core.models import BatchDetails, BatchStatus, BatchSummary

STATUS_STYLE = {"success": "green", "failed": "red", "aborted": "yellow", "inprog": "cyan", "queued": "blue",
                "wait": "magenta"}


def styled(status: BatchStatus | str) -> str:
    value = status.value if isinstance(status, BatchStatus) else status
    return f"[{STATUS_STYLE.get(value, 'white')}]{value}[/]"


def summary_table(batch_id: str, s: BatchSummary, title: str | None = None) -> Table:
    """A batch's status and counts, one per line."""
    t = Table(show_header=False, title=title, title_justify="left", box=None, padding=(0, 2))
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow="fold")
    t.add_row("batch", batch_id)
    t.add_row("status", styled(s.status))
    t.add_row("rows", f"{s.nrows:,}")
    t.add_row("success", f"{s.nsuccess:,}")
    t.add_row("failed", f"{s.nfailed:,}")
    if s.naborted:
        t.add_row("aborted", f"{s.naborted:,}")
    if not s.status.is_final:
        t.add_row("queued", f"{s.nqueued:,}")
        t.add_row("in progress", f"{s.ninprog:,}")
    for name, url in s.outputfiles.items():
        t.add_row("output file", f"{name}: {url}")
    if s.error:
        t.add_row("error", f"[red]{s.error}[/]")
    return t


def batches_table(items: Iterable[BatchDetails]) -> Table:
    t = Table(box=None, padding=(0, 1), collapse_padding=True, pad_edge=False, header_style="bold")
    t.add_column("id", no_wrap=True, min_width=36)  # ids are copied from here: never cut
    t.add_column("op", overflow="fold")
    t.add_column("status", no_wrap=True)
    for col in ("rows", "ok", "failed"):
        t.add_column(col, justify="right", no_wrap=True)
    t.add_column("requested", no_wrap=True)
    for d in items:
        t.add_row(d.id, d.op, styled(d.status), f"{d.nrows:,}", f"{d.nsuccess:,}", f"{d.nfailed:,}",
                  d.reqat.strftime("%m-%d %H:%M"))
    return t


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
