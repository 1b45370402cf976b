"""A final batch's rows written to a file (``alya done BATCH --export FILE``): CSV, Parquet or JSON lines by
the file's extension (the same ones :mod:`alya.io.readers` reads), to a local path or any fsspec URL.

Columns: ``line``, ``status``, ``res`` and ``messages``. JSON lines keep ``res`` and ``messages`` as JSON;
CSV and Parquet hold them as JSON text (an empty cell when there is no result or no message), since a
result's shape is the processor's own and differs from row to row. Rows are written in pieces of
``chunk`` rows, so the file is never built in memory."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import fsspec
import orjson

from alya.core.models import BatchOutput
from alya.io.readers import file_format

COLUMNS = ("line", "status", "res", "messages")


def export_rows(rows: Iterable[BatchOutput], url: str, storage_options: dict[str, Any] | None = None,
                chunk: int = 50_000) -> int:
    """Write ``rows`` to ``url``; returns how many were written."""
    fmt = file_format(url)
    opts = storage_options or {}
    if fmt == "parquet":
        return _parquet(rows, url, opts, chunk)
    counted = _Counted(rows)
    lines = _jsonl_lines(counted) if fmt == "jsonl" else _csv_lines(counted)
    with fsspec.open(url, "wb", compression="infer", **opts) as fh:
        while piece := list(islice(lines, chunk)):
            fh.write(b"".join(piece))
    return counted.n


class _Counted:
    """Counts the rows that pass through (the CSV header is not one)."""

    def __init__(self, rows: Iterable[BatchOutput]) -> None:
        self.rows = rows
        self.n = 0

    def __iter__(self) -> Iterator[BatchOutput]:
        for r in self.rows:
            self.n += 1
            yield r


def _record(r: BatchOutput) -> dict[str, Any]:
    return {"line": r.line, "status": r.status.value, "res": r.res, "messages": [m.to_dict() for m in r.messages]}


def _jsonl_lines(rows: Iterable[BatchOutput]) -> Iterator[bytes]:
    for r in rows:
        yield orjson.dumps(_record(r)) + b"\n"


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode() if value else ""


def _csv_lines(rows: Iterable[BatchOutput]) -> Iterator[bytes]:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    yield buf.getvalue().encode()
    for r in rows:
        buf.seek(0)
        buf.truncate()
        rec = _record(r)
        writer.writerow((rec["line"], rec["status"], _json_text(rec["res"]), _json_text(rec["messages"])))
        yield buf.getvalue().encode()


def _parquet(rows: Iterable[BatchOutput], url: str, opts: dict[str, Any], chunk: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("line", pa.int64()), ("status", pa.string()), ("res", pa.string()),
                        ("messages", pa.string())])
    n = 0
    it = iter(rows)
    with fsspec.open(url, "wb", **opts) as fh, pq.ParquetWriter(fh, schema) as writer:
        while piece := list(islice(it, chunk)):
            recs = [_record(r) for r in piece]
            table = pa.table({
                "line": [r["line"] for r in recs], "status": [r["status"] for r in recs],
                "res": [_json_text(r["res"]) or None for r in recs],
                "messages": [_json_text(r["messages"]) or None for r in recs],
            }, schema=schema)
            writer.write_table(table)  # one row group per piece
            n += len(recs)
        if n == 0:
            writer.write_table(schema.empty_table())
    return n
