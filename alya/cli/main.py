"""The ``alya`` command: submit files of rows, follow, export and abort batches, run workers, migrate,
and a self-contained demo.

Settings come from the same ALYA_* variables as the library (see README). A user's mistake (a bad file, an
unknown batch, a refused call) is one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, fields, is_dataclass
from typing import Any, Optional

import typer
from typer.core import TyperGroup

from alya.core.errors import AlyaError, InvalidInput


class _Group(TyperGroup):
    """Turns the errors a user can fix into one line on stderr and exit code 2."""

    def invoke(self, ctx: Any) -> Any:  # typer's own (vendored) click Context
        try:
            return super().invoke(ctx)
        except (AlyaError, OSError) as exc:
            typer.echo(f"error: {_one_line(exc)}", err=True)
            raise typer.Exit(2) from None


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"no such file: {exc.filename or exc}"
    text = str(exc).strip().splitlines()
    kind = type(exc).__name__
    return f"{kind}: {text[0]}" if text else kind


HELP = ("Submit files of rows, follow, export and abort batches, run workers, migrate; `alya demo` for a tour. "
        "Settings come from the ALYA_* variables (see README).")
app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, help=HELP,
                  pretty_exceptions_show_locals=False)

JSON_OPT = typer.Option(False, "--json", help="print JSON instead of a table (for scripts)")


@app.callback()
def _setup(ctx: typer.Context) -> None:
    """A command prints its own answer, so the library's info logs would only be noise on top of it (a
    worker's logs are its output: it keeps ALYA_LOG_LEVEL's default). With ALYA_DATABASE_URL unset the
    commands use the embedded PostgreSQL; one that had to start it stops it when done, so that no server
    is left behind (the demo says so itself)."""
    if ctx.invoked_subcommand != "worker":
        os.environ.setdefault("ALYA_LOG_LEVEL", "WARNING")

    def stop() -> None:
        embedded = sys.modules.get("alya.db.embedded")
        if embedded is not None:
            embedded.stop_if_started_here()

    ctx.call_on_close(stop)


def _jm() -> Any:
    from alya import JobManager

    return JobManager.from_env()


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _print_json(obj: Any) -> None:
    def default(o: Any) -> Any:
        if is_dataclass(o):
            return asdict(o)  # type: ignore[arg-type]
        return str(o)

    typer.echo(json.dumps(asdict(obj) if is_dataclass(obj) else obj, default=default, indent=2))  # type: ignore[arg-type]


def _rows_of(path: str, chunksize: int, text: bool, first_line: int) -> Any:
    from alya.io.readers import file_format, frames_to_inputs, read_frames

    file_format(path)  # an unknown extension is refused before anything is stored
    return frames_to_inputs(read_frames(path, chunksize=chunksize, dtype=str if text else None), first_line)


TEXT_OPT = typer.Option(False, "--text", help="CSV: keep every cell as text (no number inference)")
CHUNK_OPT = typer.Option(50_000, help="rows read per piece (memory stays flat in the file's size)")


@app.command()
def migrate(database_url: Optional[str] = typer.Option(None, envvar="ALYA_DATABASE_URL")) -> None:  # noqa: UP045
    """Bring the database schema to the newest revision (run it once before the first use of a database)."""
    from alya import migrate_database
    from alya.db.embedded import embedded_database_url

    migrate_database(database_url or embedded_database_url())
    typer.echo("schema at head")


@app.command()
def submit(
    app_name: str = typer.Argument(..., metavar="APP"),
    op: str = typer.Argument(...),
    file: str = typer.Argument(..., help="CSV, Parquet or JSON lines: a path or any fsspec URL (s3://...)"),
    context: str = typer.Option("{}", help="the batch context, a JSON object"),
    wait: bool = typer.Option(False, "--wait", help="hold the batch in `wait` for appends (then wait-off)"),
    text: bool = TEXT_OPT,
    chunksize: int = CHUNK_OPT,
) -> None:
    """Submit a file of rows as one batch; prints the batch id.

    Each row's columns become its input; a `line` column gives line numbers, else rows are numbered 1..n.
    The file is streamed: a bad row anywhere stores nothing."""
    rows = _rows_of(file, chunksize, text, 1)
    batch_id = _jm().batch_submit(app_name, op, context, rows, wait=wait, inputfile=file)
    typer.echo(batch_id)


@app.command()
def append(
    batch_id: str = typer.Argument(..., metavar="BATCH"),
    file: str = typer.Argument(..., help="CSV, Parquet or JSON lines: a path or any fsspec URL"),
    wait: bool = typer.Option(False, "--wait", help="keep holding the batch for more appends"),
    first_line: Optional[int] = typer.Option(  # noqa: UP045
        None, help="line of the file's first row when it has no `line` column (default: after the batch's rows)"),
    text: bool = TEXT_OPT,
    chunksize: int = CHUNK_OPT,
) -> None:
    """Append a file's rows to a batch held in `wait`, then release it (unless --wait); prints the total."""
    jm = _jm()
    start = first_line if first_line is not None else jm.batch_status(batch_id).nrows + 1
    typer.echo(jm.batch_append(batch_id, _rows_of(file, chunksize, text, start), wait=wait))


@app.command("wait-off")
def wait_off(batch_id: str = typer.Argument(..., metavar="BATCH")) -> None:
    """Release a batch held in `wait` to the workers; prints its rows."""
    typer.echo(_jm().wait_off(batch_id))


@app.command()
def status(batch_id: str = typer.Argument(..., metavar="BATCH"), as_json: bool = JSON_OPT) -> None:
    """Status and counts of a batch."""
    from alya.cli.views import summary_table

    s = _jm().batch_status(batch_id)
    if as_json:
        _print_json(s)
    else:
        _console().print(summary_table(batch_id, s))


@app.command()
def watch(batch_id: str = typer.Argument(..., metavar="BATCH"),
          interval: float = typer.Option(0.5, help="seconds between polls")) -> None:
    """A live progress bar until the batch is final; exit code 0 on success, 1 on failed or aborted."""
    from alya.cli.views import summary_table
    from alya.cli.views import watch as watch_batch
    from alya.core.models import BatchStatus

    jm = _jm()
    console = _console()
    s = watch_batch(jm, batch_id, console, interval=interval)
    console.print(summary_table(batch_id, s))
    raise typer.Exit(0 if s.status is BatchStatus.SUCCESS else 1)


@app.command()
def done(batch_id: str = typer.Argument(..., metavar="BATCH"),
         export: Optional[str] = typer.Option(  # noqa: UP045
             None, metavar="FILE", help="write every row to FILE (.csv, .parquet or .jsonl; a path or URL)"),
         row_status: Optional[str] = typer.Option(  # noqa: UP045
             None, "--status", help="with --export: only the rows of this status (success, failed, aborted)"),
         inputs: bool = typer.Option(False, "--inputs", help="with --export: the rows as submitted (line and "
                                     "input columns), a file `alya submit` takes back"),
         as_json: bool = typer.Option(False, "--json", help="print the result and every row as JSON")) -> None:
    """The result of a batch; with --export its rows (line, status, res, messages) go to a file.

    `alya done BATCH --export failed.csv --status failed --inputs` writes the failed rows' inputs, ready for
    `alya submit APP OP failed.csv` (or retry them in place: `alya retry BATCH`)."""
    from alya.io.readers import file_format

    if export is None and (row_status is not None or inputs):
        raise InvalidInput("--status and --inputs go with --export FILE")
    if export is not None:
        from alya.batch import failures
        from alya.io.export import export_inputs, export_rows

        file_format(export)  # an unknown extension is refused before anything is read
        jm = _jm()
        svc, opts = jm.services, jm.services.objects.options_for(export)
        if inputs:  # streamed as below; the CSV header is the inputs' keys, read first
            columns = failures.input_columns(svc, batch_id, row_status)
            n = export_inputs(failures.stream_inputs(svc, batch_id, row_status), export, columns, opts)
        elif row_status is not None:
            n = export_rows(failures.stream_rows(svc, batch_id, row_status), export, opts)
        else:
            rows = jm.batch_rows(batch_id)  # streamed: a million-row batch is never held in memory at once
            n = export_rows(rows, export, opts)
        status = jm.batch_status(batch_id).status
        what = f"{row_status} rows" if row_status else "rows"
        typer.echo(f"{n} {what} of batch {batch_id} ({status.value}) written to {export}"
                   + (" as inputs" if inputs else ""), err=True)
        return
    d = _jm().batch_done(batch_id)
    if as_json:
        _print_json({**{f.name: getattr(d, f.name) for f in fields(d) if f.name != "rows"}, "rows": d.rows})
        return
    from rich.markup import escape

    from alya.cli.views import styled

    console = _console()
    console.print(f"batch {batch_id}: {styled(d.status)}, {d.nsuccess:,} success, {d.nfailed:,} failed"
                  + (f", {d.naborted:,} aborted" if d.naborted else ""))
    for name, url in d.outputfiles.items():
        console.print(f"  output file {escape(name)}: {escape(url)}")
    if d.error:
        console.print(f"  [red]{escape(d.error)}[/]")
    if d.rows is None:
        console.print("  not final yet: `alya watch` follows it")


@app.command()
def abort(batch_id: str = typer.Argument(..., metavar="BATCH"), as_json: bool = JSON_OPT) -> None:
    """Abort a batch: its rows not yet final become aborted."""
    _show_summary(batch_id, as_json, _jm().batch_abort(batch_id))


@app.command()
def retry(batch_id: str = typer.Argument(..., metavar="BATCH"),
          include_aborted: bool = typer.Option(False, "--include-aborted",
                                               help="requeue the aborted rows too (a batch stopped past its "
                                                    "failure threshold has some)")) -> None:
    """Run a failed batch's failed rows again (successful rows are kept); prints the rows requeued."""
    typer.echo(_jm().batch_retry_failed(batch_id, include_aborted=include_aborted))


@app.command()
def pause(batch_id: str = typer.Argument(..., metavar="BATCH"), as_json: bool = JSON_OPT) -> None:
    """Pause a batch: no new row starts (running rows finish) until `alya resume`."""
    _show_summary(batch_id, as_json, _jm().batch_pause(batch_id))


@app.command()
def resume(batch_id: str = typer.Argument(..., metavar="BATCH"), as_json: bool = JSON_OPT) -> None:
    """Resume a paused batch: its rows start again."""
    _show_summary(batch_id, as_json, _jm().batch_resume(batch_id))


def _show_summary(batch_id: str, as_json: bool, s: Any) -> None:
    from alya.cli.views import summary_table

    _print_json(s) if as_json else _console().print(summary_table(batch_id, s))


@app.command("list")
def list_batches(app_name: str = typer.Argument(..., metavar="APP"),
                 op: Optional[str] = typer.Option(None, help="only this op"),  # noqa: UP045
                 age_days: int = typer.Option(7, help="requested in the last AGE_DAYS days"),
                 slow_queries: bool = typer.Option(False, "--slow-queries", help="slow queries, not batches"),
                 paused: bool = typer.Option(False, "--paused", help="only paused batches"),
                 as_json: bool = JSON_OPT) -> None:
    """Batches (or slow queries) of an app, newest first; a batch's paused, not_before and deadline too."""
    from alya.cli.views import batches_table

    jm = _jm()
    items = (jm.slowquery_list if slow_queries else jm.batch_list)(app_name, op, age_days)
    if paused:
        items = [d for d in items if d.paused]
    if as_json:
        _print_json([{"id": d.id, "op": d.op, "status": d.status.value, "nrows": d.nrows, "nsuccess": d.nsuccess,
                      "nfailed": d.nfailed, "naborted": d.naborted, "reqat": str(d.reqat), "paused": d.paused,
                      "not_before": d.not_before and str(d.not_before), "deadline": d.deadline and str(d.deadline)}
                     for d in items])
    else:
        _console().print(batches_table(items))


@app.command()
def worker(target: str = typer.Argument(..., help="module[:attribute] holding a JobManager (default attr: jm)"),
           stop_when_idle: bool = typer.Option(False, help="return once no work of its types is left"),
           metrics_port: int = typer.Option(0, envvar="ALYA_METRICS_PORT",
                                            help="serve Prometheus metrics on this port (0: none)")) -> None:
    """Run the batch-type flows of the processors registered on an app's JobManager."""
    import importlib
    from pathlib import Path

    if not os.environ.get("PREFECT_API_URL"):
        # Prefect's temporary server is this process's own: it need not phone home (ERROR lines offline).
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        from prefect.settings import get_current_settings

        if not get_current_settings().api.url:  # nor set in a Prefect profile
            typer.echo("alya worker: PREFECT_API_URL is not set, so Prefect first starts a temporary local server "
                       "(about 10 s); a long-running worker should set PREFECT_API_URL to a Prefect server.",
                       err=True)
            from alya.prefect import reaper

            reaper.notice_shown = True  # said once, here, in words; not again as a log line
    module_name, _, attr = target.partition(":")
    sys.path.insert(0, str(Path.cwd()))
    jm = getattr(importlib.import_module(module_name), attr or "jm")
    if metrics_port:
        from alya.api.prometheus import serve_metrics

        serve_metrics(jm, metrics_port)
    jm.run(stop_when_idle=stop_when_idle)


@app.command()
def cleanup() -> None:
    """One idempotent recovery pass: requeue rows of dead workers, summarise missed batches."""
    _print_json(_jm().cleanup())


@app.command()
def purge(older_than: str = typer.Option(..., "--older-than", help="30d, 12h, 90m: batches that ended longer ago"),
          app_name: Optional[str] = typer.Option(None, "--app", help="only this app's batches"),  # noqa: UP045
          files: bool = typer.Option(False, "--files", help="delete their output files from the object store too"),
          as_json: bool = JSON_OPT) -> None:
    """Delete final batches and slow queries that ended before then, with their rows and records."""
    from datetime import UTC, datetime

    from alya.batch.retention import parse_age

    before = datetime.now(UTC) - parse_age(older_than)
    r = _jm().batch_purge(before, app=app_name, files=files)
    if as_json:
        _print_json(r)
    else:
        typer.echo(f"purged {r.nbatches:,} batches ({r.nrows:,} rows, {r.nfiles:,} output files, "
                   f"{r.nrecords:,} file-intake records) that ended before {before.isoformat(timespec='seconds')}")


@app.command("embedded-stop")
def embedded_stop() -> None:
    """Stop the embedded PostgreSQL of this folder (.alya-data/pg), if one is running; its data stay."""
    from alya.db import embedded

    typer.echo(f"stopped the embedded PostgreSQL in {embedded.data_dir()}" if embedded.stop()
               else "no embedded PostgreSQL is running here")


@app.command()
def demo(rows: int = typer.Option(2000, help="rows in the demo batch"),
         row_ms: float = typer.Option(2.0, help="milliseconds each row takes (as if it called an API)")) -> None:
    """A self-contained tour: an embedded PostgreSQL, a batch, a worker with a progress bar, the results."""
    # Before anything imports Prefect or configures logging: a terminal, not a log collector.
    os.environ.setdefault("ALYA_LOG_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # the temporary server's telemetry
    os.environ.setdefault("DO_NOT_TRACK", "1")  # Prefect's client-side analytics and its first-run notice
    from alya.cli.demo import run_demo
    from alya.prefect import reaper

    reaper.notice_shown = True  # the demo says what it starts itself

    t = time.perf_counter()
    ok = run_demo(rows, _console(), row_ms=row_ms)
    _console().print(f"[dim]demo finished in {time.perf_counter() - t:.1f} s[/]")
    raise typer.Exit(0 if ok else 1)


@app.command()
def intake(
    folder_url: str = typer.Argument(..., help="the folder to scan: a path or fsspec URL (s3://bucket/inbox)"),
    pattern: list[str] = typer.Option(..., "--pattern", "-p", help="GLOB=FILETYPE, e.g. '*.csv=txn' (repeat)"),
    module: str = typer.Option(..., help="module[:attribute] holding the JobManager with the file checkers"),
    min_age_sec: float = typer.Option(10.0, help="files younger than this wait for a later pass"),
) -> None:
    """One file-intake pass: matching files become batches exactly once and move to done/ or failed/."""
    import importlib
    from pathlib import Path

    from alya.core.validate import file_patterns

    patterns = file_patterns(",".join(pattern))  # a bad pattern is a one-line error before anything is read
    module_name, _, attr = module.partition(":")
    sys.path.insert(0, str(Path.cwd()))
    jm = getattr(importlib.import_module(module_name), attr or "jm")
    taken = jm.intake_scan(folder_url, patterns, min_age_sec=min_age_sec)
    _print_json([{"file": fi.source, "filetype": fi.filetype, "status": fi.status, "batch_id": fi.batch_id,
             "nrows": fi.nrows, "error": fi.error, "url": fi.url} for fi in taken])


def main() -> None:
    app()


if __name__ == "__main__":
    main()
