"""A final batch's rows written to a file (``alya done BATCH --export FILE``): CSV, Parquet or JSON lines by
the file's extension (the same ones :mod:`alya.io.readers` reads), to a local path or any fsspec URL.

Columns: ``line``, ``status``, ``res`` and ``messages`` (or, with :func:`export_inputs`, the rows as
submitted, which ``alya submit`` takes back). JSON lines keep ``res`` and ``messages`` as JSON;
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


def export_inputs(rows: Iterable[tuple[int, dict[str, Any]]], url: str, columns: list[str],
                  storage_options: dict[str, Any] | None = None, chunk: int = 50_000) -> int:
    """Write rows *as submitted* to ``url`` (``alya done --export F --inputs``): a ``line`` column and one
    column per input key (``columns``, a CSV's header), the shape ``alya submit`` reads back with the same
    line numbers and inputs. JSON lines keep every value exactly; CSV and Parquet write a nested value
    (object, list) as its JSON text and leave a missing key empty. Returns how many rows were written."""
    from alya.core.errors import InvalidInput

    if LINE in columns:
        raise InvalidInput(f"an input has a key {LINE!r}: its rows cannot be read back with their line numbers")
    fmt = file_format(url)
    opts = storage_options or {}
    counted = _CountedInputs(rows)
    if fmt == "parquet":
        return _parquet_inputs(counted, url, columns, opts, chunk)
    lines = _jsonl_inputs(counted) if fmt == "jsonl" else _csv_inputs(counted, columns)
    with fsspec.open(url, "wb", compression="infer", **opts) as fh:
        while piece := list(islice(lines, chunk)):
            fh.write(b"".join(piece))
    return counted.n


LINE = "line"


class _CountedInputs:
    def __init__(self, rows: Iterable[tuple[int, dict[str, Any]]]) -> None:
        self.rows = rows
        self.n = 0

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        for line, value in self.rows:
            if LINE in value:
                from alya.core.errors import InvalidInput

                raise InvalidInput(f"line {line}: its input has a key {LINE!r}: it cannot be read back")
            self.n += 1
            yield line, value


def _jsonl_inputs(rows: Iterable[tuple[int, dict[str, Any]]]) -> Iterator[bytes]:
    for line, value in rows:
        yield orjson.dumps({LINE: line, **value}) + b"\n"


def _cell(value: Any) -> Any:
    """A CSV or Parquet cell: scalars as they are, nested values as JSON text, missing as empty."""
    if isinstance(value, (dict, list)):
        return orjson.dumps(value).decode()
    return value


def _csv_inputs(rows: Iterable[tuple[int, dict[str, Any]]], columns: list[str]) -> Iterator[bytes]:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([LINE, *columns])
    yield buf.getvalue().encode()
    for line, value in rows:
        buf.seek(0)
        buf.truncate()
        writer.writerow([line, *(_cell(value.get(c)) if value.get(c) is not None else "" for c in columns)])
        yield buf.getvalue().encode()


def _parquet_inputs(rows: Iterable[tuple[int, dict[str, Any]]], url: str, columns: list[str],
                    opts: dict[str, Any], chunk: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    it = iter(rows)
    n = 0
    with fsspec.open(url, "wb", **opts) as fh:
        writer = None
        try:
            while piece := list(islice(it, chunk)):
                records = [{LINE: line, **{c: _cell(value.get(c)) for c in columns}} for line, value in piece]
                # the first piece's types fix the file's schema (a column of one type across the file)
                table = pa.Table.from_pylist(records, schema=writer.schema if writer else None)
                if writer is None:
                    writer = pq.ParquetWriter(fh, table.schema)
                writer.write_table(table)
                n += len(records)
            if writer is None:
                schema = pa.schema([(LINE, pa.int64()), *((c, pa.string()) for c in columns)])
                writer = pq.ParquetWriter(fh, schema)
                writer.write_table(schema.empty_table())
        finally:
            if writer is not None:
                writer.close()
    return n
