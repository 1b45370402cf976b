"""The ``alya`` command: migrate, submit, inspect and abort batches, run workers and the cleanup.

Settings come from the same ALYA_* variables as the library (see README)."""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

from alya.errors import AlyaError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _jm() -> Any:
    from alya import JobManager

    return JobManager.from_env()


def _print(obj: Any) -> None:
    from dataclasses import asdict, is_dataclass

    def default(o: Any) -> Any:
        if is_dataclass(o):
            return asdict(o)  # type: ignore[arg-type]
        return str(o)

    typer.echo(json.dumps(asdict(obj) if is_dataclass(obj) else obj, default=default, indent=2))  # type: ignore[arg-type]


@app.command()
def migrate(database_url: Optional[str] = typer.Option(None, envvar="ALYA_DATABASE_URL")) -> None:  # noqa: UP045
    """Bring the database schema to the newest revision."""
    from alya import migrate_database
    from alya.embedded import embedded_database_url

    migrate_database(database_url or embedded_database_url())
    typer.echo("schema at head")


@app.command()
def submit(
    app_name: str = typer.Argument(..., metavar="APP"),
    op: str = typer.Argument(...),
    rows_file: Path = typer.Argument(..., help="JSON lines, one input object per line (line numbers 1..n)"),
    context: str = typer.Option("{}", help="the batch context, a JSON object"),
    wait: bool = typer.Option(False, help="hold the batch in `wait` for appends"),
) -> None:
    """Submit a batch from a JSON-lines file (streamed: the file is never loaded whole)."""
    from alya import BatchInput

    with rows_file.open("rb") as fh:
        rows = (BatchInput(i, line) for i, line in enumerate((ln for ln in fh if ln.strip()), start=1))
        batch_id = _jm().batch_submit(app_name, op, context, rows, wait=wait, inputfile=str(rows_file))
    typer.echo(batch_id)


@app.command()
def status(batch_id: str) -> None:
    """Counts and status of a batch (from the cache when fresh)."""
    _print(_jm().batch_status(batch_id))


@app.command()
def done(batch_id: str, rows: bool = typer.Option(False, help="print every row (final batches)")) -> None:
    """The batch's result; with --rows, every row ordered by line."""
    d = _jm().batch_done(batch_id)
    out = {"status": d.status.value, "outputfiles": d.outputfiles, "nsuccess": d.nsuccess, "nfailed": d.nfailed,
           "naborted": d.naborted}
    if rows and d.rows is not None:
        out["rows"] = d.rows
    _print(out)


@app.command()
def abort(batch_id: str) -> None:
    """Abort a batch: rows not yet final become aborted."""
    _print(_jm().batch_abort(batch_id))


@app.command("list")
def list_batches(app_name: str = typer.Argument(..., metavar="APP"), op: Optional[str] = None,  # noqa: UP045
                 age_days: int = 7, slow_queries: bool = False) -> None:
    """Batches (or slow queries) of an app from the last AGE_DAYS days."""
    jm = _jm()
    items = (jm.slowquery_list if slow_queries else jm.batch_list)(app_name, op, age_days)
    _print([{"id": d.id, "op": d.op, "status": d.status.value, "nrows": d.nrows, "reqat": str(d.reqat)}
            for d in items])


@app.command()
def worker(target: str = typer.Argument(..., help="module[:attribute] holding a JobManager (default attr: jm)"),
           stop_when_idle: bool = typer.Option(False, help="return once no work of its types is left")) -> None:
    """Run the batch-type flows of the processors registered on an app's JobManager."""
    module_name, _, attr = target.partition(":")
    sys.path.insert(0, str(Path.cwd()))
    jm = getattr(importlib.import_module(module_name), attr or "jm")
    jm.run(stop_when_idle=stop_when_idle)


@app.command()
def cleanup() -> None:
    """One idempotent recovery pass: requeue rows of dead workers, summarise missed batches."""
    from alya.recovery import cleanup as run_cleanup

    _print(run_cleanup(_jm()))


@app.command()
def demo(rows: int = 2000) -> None:
    """A self-contained run: submit a batch, process it with an in-process worker, print the result."""
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no phoning home from a demo
    from alya.demo import run_demo

    t = time.perf_counter()
    run_demo(rows)
    typer.echo(f"demo finished in {time.perf_counter() - t:.1f} s")


@app.command()
def intake(
    folder_url: str = typer.Argument(..., help="the folder to scan: a path or fsspec URL (s3://bucket/inbox)"),
    pattern: list[str] = typer.Option(..., "--pattern", "-p", help="GLOB=FILETYPE, e.g. '*.csv=txn' (repeat)"),
    module: str = typer.Option(..., help="module[:attribute] holding the JobManager with the file checkers"),
    min_age_sec: float = typer.Option(10.0, help="files younger than this wait for a later pass"),
) -> None:
    """One file-intake pass: matching files become batches exactly once and move to done/ or failed/."""
    from alya.validate import file_patterns

    patterns = file_patterns(",".join(pattern))  # a bad pattern is a one-line error before anything is read
    module_name, _, attr = module.partition(":")
    sys.path.insert(0, str(Path.cwd()))
    jm = getattr(importlib.import_module(module_name), attr or "jm")
    taken = jm.intake_scan(folder_url, patterns, min_age_sec=min_age_sec)
    _print([{"file": fi.source, "filetype": fi.filetype, "status": fi.status, "batch_id": fi.batch_id,
             "nrows": fi.nrows, "error": fi.error, "url": fi.url} for fi in taken])


def main() -> None:
    try:
        app()
    except AlyaError as exc:
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
