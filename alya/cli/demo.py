"""``alya demo``: the smallest complete application, run end to end with a running commentary.

It uses whatever ALYA_* points at; with nothing set, an embedded PostgreSQL (stopped again at the end if
the demo started it), no Redis, output files under ``.alya-data/objects`` and Prefect's temporary local
server. Only the public API drives the batch (``batch_submit``, ``batch_status``, ``batch_done``,
``run(stop_when_idle=True)``), so the code below is also a template for an application."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import fsspec
from rich.console import Console
from rich.table import Table

from alya import BatchDetails, BatchInput, BatchJobResult, BatchStatus, ErrorMessage, JobManager, JobManagerConfig
from alya.cli import demo_prefect as prefect_side

APP, OP = "demo", "greet"
FAIL_EVERY = 100  # every 100th row has no name: a business failure, on purpose
CHUNK_ROWS = 100  # small chunks, so that the progress bar moves (the default, 1000, suits real work)


class Greeter:
    """Greets every row; a row without a name fails with a business error; greetings go to a file."""

    def __init__(self, row_seconds: float = 0.0) -> None:
        self.row_seconds = row_seconds
        self.marked: list[BatchDetails] = []

    def do_batch_job(self, initblock: Any, context: dict[str, Any], line: int, input: dict[str, Any]) -> BatchJobResult:
        if self.row_seconds:
            time.sleep(self.row_seconds)  # as if each greeting called an API
        name = input.get("name")
        if not name:
            return BatchJobResult(BatchStatus.FAILED, messages=[ErrorMessage(1, "missing", field="name")])
        greeting = f"{initblock['salutation']}, {name}!"
        return BatchJobResult(BatchStatus.SUCCESS, {"greeting": greeting}, blobrows={"greetings.txt": greeting})

    def mark_done(self, initblock: Any, context: dict[str, Any], details: BatchDetails) -> None:
        self.marked.append(details)  # a real app would notify context["user"] here


class Salutations:
    """The app's initializer: one init block per worker process, opened once and reused by every row."""

    def init(self, app: str) -> Any:
        return _Block()


class _Block(dict):  # type: ignore[type-arg]
    def __init__(self) -> None:
        super().__init__(salutation="Hello")

    def is_alive(self) -> bool:
        return True

    def close(self) -> None:
        pass


@dataclass
class _Tour:
    console: Console

    def step(self, what: str, detail: str, seconds: float | None = None) -> None:
        took = f"  [dim]{seconds:.1f} s[/]" if seconds is not None else ""
        self.console.print(f"  [green]✓[/] [bold]{what:<13}[/]{detail}{took}")


def run_demo(nrows: int = 2000, console: Console | None = None, row_ms: float = 2.0) -> bool:
    """Run the tour; True when the batch ended as designed (every row final, the nameless rows failed).
    Each row takes ``row_ms`` milliseconds, as if it called an API, so that there is progress to see."""
    tour = _Tour(console or Console(highlight=False))
    c = tour.console
    c.print(f"[bold]alya demo[/]: {nrows:,} rows through one Python function, run as a Prefect flow,\n"
            "with the state in PostgreSQL.\n\n[bold]Starting[/]")
    prefect = prefect_side.warm_up()  # Prefect's server starts on a thread while PostgreSQL starts here
    jm, stop_db = _start_database(tour)
    try:
        _tell_backends(tour, jm)
        prefect.wait(tour)
        return _run_batch(tour, jm, nrows, prefect, row_ms / 1000)
    finally:
        jm.close()
        stop_db()


def _start_database(tour: _Tour) -> tuple[JobManager, Any]:
    from alya.db import embedded

    config = JobManagerConfig(  # type: ignore[call-arg]  # the other fields come from ALYA_*
        batchchunk_nrows=int(os.environ.get("ALYA_BATCHCHUNK_NROWS", CHUNK_ROWS)))
    if os.environ.get("ALYA_DATABASE_URL"):
        tour.step("PostgreSQL", "ALYA_DATABASE_URL")
        return JobManager(config=config), lambda: None
    t = time.perf_counter()
    with tour.console.status("starting an embedded PostgreSQL (ALYA_DATABASE_URL is not set)"):
        url = embedded.embedded_database_url()
    where = os.path.relpath(embedded.data_dir())
    if embedded.started_here():
        tour.step("PostgreSQL", f"embedded in {where} (ALYA_DATABASE_URL unset)", time.perf_counter() - t)
    else:
        tour.step("PostgreSQL", f"embedded, in {where}: it was running, it stays running")

    def stop() -> None:
        if embedded.stop_if_started_here():
            tour.console.print(f"\nStopped the embedded PostgreSQL that the demo started (data kept in {where}).")

    return JobManager(database_url=url, config=config), stop


def _tell_backends(tour: _Tour, jm: JobManager) -> None:
    if os.environ.get("ALYA_REDIS_URL"):
        tour.step("Redis", "ALYA_REDIS_URL: status polls are served from it")
    else:
        tour.step("Redis", "none (ALYA_REDIS_URL unset): polls read PostgreSQL")
    tour.step("Output files", jm.objects.url)


def _run_batch(tour: _Tour, jm: JobManager, nrows: int, prefect: prefect_side.Prefect, row_seconds: float) -> bool:
    from alya.cli.views import watch

    c = tour.console
    greeter = Greeter(row_seconds)
    jm.register_initializer(APP, Salutations())
    jm.register_batch_processor(APP, OP, greeter)
    rows = (BatchInput(i, {"name": f"user{i}" if i % FAIL_EVERY else ""}) for i in range(1, nrows + 1))
    t = time.perf_counter()
    batch_id = jm.batch_submit(APP, OP, {"user": "demo"}, rows)
    nfail = nrows // FAIL_EVERY
    c.print(f"\n[bold]Batch[/] {batch_id}\n  {nrows:,} rows like "
            f'{{"name": "user1"}} for app {APP!r}, op {OP!r}, stored in {time.perf_counter() - t:.1f} s.'
            + (f"\n  {nfail} rows have no name: they fail on purpose." if nfail else "")
            + (f"\n  Each row takes {row_seconds * 1000:g} ms, as if it called an API." if row_seconds else ""))
    c.print(f"\n[bold]Processing[/]\n  jm.run(stop_when_idle=True) runs the Prefect flow [cyan]alya-{APP}-{OP}[/] "
            "on a thread;\n  the bar polls jm.batch_status:")

    errors: list[BaseException] = []

    def work() -> None:
        try:
            jm.run(stop_when_idle=True)
        except BaseException as exc:  # shown below, on the main thread
            errors.append(exc)

    worker = threading.Thread(target=work, name="alya-demo-worker", daemon=True)
    t = time.perf_counter()
    worker.start()
    try:
        watch(jm, batch_id, c, interval=0.2, give_up=lambda: not worker.is_alive())
        worker.join()
    except KeyboardInterrupt:
        c.print("interrupted: stopping the worker")
        jm.close()  # the worker thread ends after its current row and gives back the rest of its chunk
        worker.join(30)
        raise
    took = time.perf_counter() - t
    if errors:
        raise errors[0]
    done = jm.batch_done(batch_id)
    c.print()
    c.print(_result_table(jm, batch_id, greeter, prefect, took))
    _where_next(c, batch_id, prefect)
    return done.status.is_final and done.nfailed == nfail and done.nsuccess == nrows - nfail


def _result_table(jm: JobManager, batch_id: str, greeter: Greeter, prefect: prefect_side.Prefect,
                  took: float) -> Table:
    s = jm.batch_status(batch_id)
    t = Table(title="Result", title_justify="left", show_header=False, box=None, padding=(0, 2))
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    why = " (a batch is failed when any of its rows failed)" if s.status is BatchStatus.FAILED else ""
    t.add_row("status", f"{s.status.value}{why}")
    t.add_row("rows", f"{s.nrows:,}: {s.nsuccess:,} success, {s.nfailed:,} failed, processed in {took:.1f} s")
    for name, url in s.outputfiles.items():
        with fsspec.open(url, "rt") as fh:
            head = [next(fh, "").rstrip() for _ in range(3)]
        t.add_row("output file", f"{name}, first lines: [dim]" + " | ".join(h for h in head if h) + " | ...[/]")
        t.add_row("", url)
    for d in greeter.marked:
        t.add_row("mark_done", f"called once, after the files were stored (batch {d.status.value})")
    for run in prefect.runs(f"alya-{APP}-{OP}"):
        t.add_row("Prefect run", run)
    return t


def _where_next(c: Console, batch_id: str, prefect: prefect_side.Prefect) -> None:
    c.print("\n[bold]Next[/]")
    c.print("  • the demo's code (a processor, an init block, blob rows): alya/cli/demo.py")
    c.print("  • this batch's rows to a file:")
    c.print(f"      [cyan]alya done {batch_id} --export rows.csv[/]")
    c.print("  • your own rows (CSV, Parquet, JSON lines) and a worker with your processors:")
    c.print("      [cyan]alya submit APP OP rows.csv[/]; [cyan]alya worker mymodule:jm[/]; [cyan]alya watch BATCH[/]")
    if not prefect.api_url:
        c.print("  • the runs in Prefect's UI: [cyan]prefect server start[/] in another shell, then")
        c.print("      [cyan]PREFECT_API_URL=http://127.0.0.1:4200/api alya demo[/]")
