"""alya.io.readers and alya.io.export on real files: every format, missing values, types, line numbers, chunks."""

from __future__ import annotations

import datetime as dt
import decimal
import gzip
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from alya import BatchOutput, BatchStatus, ErrorMessage, InvalidInput
from alya.io.export import export_rows
from alya.io.readers import file_format, frames_to_inputs, read_frames


def rows_of(path: Path | str, **kw: Any) -> list[tuple[int, dict[str, Any]]]:
    return [(r.line, r.input) for r in frames_to_inputs(read_frames(str(path), **kw))]  # type: ignore[misc]


@pytest.mark.parametrize(("name", "fmt"), [
    ("a.csv", "csv"), ("dir.x/A.CSV", "csv"), ("a.csv.gz", "csv"), ("s3://b/k/a.parquet", "parquet"),
    ("a.pq", "parquet"), ("a.jsonl", "jsonl"), ("a.ndjson.bz2", "jsonl"), ("https://h/a.jsonl?x=1", "jsonl"),
])
def test_format_by_extension(name: str, fmt: str) -> None:
    assert file_format(name) == fmt


@pytest.mark.parametrize("name", ["a.json", "a.txt", "csv", "a.parquet.gz", "a.gz"])
def test_unknown_extension(name: str) -> None:
    with pytest.raises(InvalidInput):
        file_format(name)


def test_csv_types_and_missing_cells(tmp_path: Path) -> None:
    p = tmp_path / "r.csv"
    p.write_text("name,amount,n,code,note\nann,10.5,1,007,NA\n,,,,\nbob,2,3,042,null\n")
    assert rows_of(p) == [
        (1, {"name": "ann", "amount": 10.5, "n": 1, "code": 7, "note": "NA"}),  # only an empty cell is missing
        (2, {}),
        (3, {"name": "bob", "amount": 2.0, "n": 3, "code": 42, "note": "null"}),
    ]
    n = rows_of(p)[2][1]["n"]
    assert type(n) is int  # an integer column with empty cells stays integers
    assert rows_of(p, dtype=str)[0] == (1, {"name": "ann", "amount": "10.5", "n": "1", "code": "007", "note": "NA"})


def test_csv_line_column_and_chunks(tmp_path: Path) -> None:
    p = tmp_path / "r.csv"
    p.write_text("line,x\n" + "".join(f"{10 * i},{i}\n" for i in range(1, 6)))
    assert rows_of(p, chunksize=2) == [(10 * i, {"x": i}) for i in range(1, 6)]
    q = tmp_path / "q.csv.gz"
    q.write_bytes(gzip.compress(b"x\n" + b"".join(b"%d\n" % i for i in range(5))))
    frames = list(read_frames(str(q), chunksize=2))
    assert [len(f) for f in frames] == [2, 2, 1]
    assert [(r.line, r.input) for r in frames_to_inputs(frames, first_line=7)] == [(7 + i, {"x": i}) for i in range(5)]


def test_jsonl_keeps_json_types(tmp_path: Path) -> None:
    p = tmp_path / "r.jsonl"
    big = 2**70
    p.write_text(
        '{"n": 1, "s": "2024-01-01", "o": {"k": [1, null]}, "b": true}\n\n'
        f'{{"n": null, "big": {big}}}\n'
        '{"n": 3, "f": 1.5}\n'
    )
    assert rows_of(p, chunksize=2) == [
        (1, {"n": 1, "s": "2024-01-01", "o": {"k": [1, None]}, "b": True}),  # a date-like string stays text
        (2, {"big": big}),
        (3, {"n": 3, "f": 1.5}),
    ]


@pytest.mark.parametrize(("text", "what"), [('{"a": 1}\n{"a": \n', "line 2: not JSON"),
                                           ('{"a": 1}\n[1, 2]\n', "line 2: not a JSON object")])
def test_jsonl_errors_name_the_line(tmp_path: Path, text: str, what: str) -> None:
    p = tmp_path / "r.jsonl"
    p.write_text(text)
    with pytest.raises(InvalidInput, match=what):
        rows_of(p)


def test_parquet_types_and_nulls(tmp_path: Path) -> None:
    p = tmp_path / "r.parquet"
    df = pd.DataFrame({
        "n": pd.array([1, None, 3], dtype="Int64"),
        "tags": [["a", "b"], [], None],
        "at": pd.to_datetime(["2024-01-02T03:04:05", None, "2024-02-01T00:00:00"]),
        "price": [decimal.Decimal("1.10"), None, decimal.Decimal("3")],
        "s": ["x", None, "z"],
    })
    df.to_parquet(p, row_group_size=2)
    assert rows_of(p, chunksize=2) == [
        (1, {"n": 1, "tags": ["a", "b"], "at": "2024-01-02T03:04:05", "price": "1.10", "s": "x"}),
        (2, {"tags": []}),
        (3, {"n": 3, "at": "2024-02-01T00:00:00", "price": "3.00", "s": "z"}),  # the column's scale
    ]


def test_frames_to_inputs_converts_every_scalar() -> None:
    df = pd.DataFrame({
        "i": np.array([1, 2], dtype=np.int64), "f": np.array([np.nan, 2.5], dtype=np.float32),
        "inf": [math.inf, 1.0], "na": [pd.NA, "x"], "nat": [pd.NaT, pd.Timestamp("2024-01-01")],
        "arr": [np.array([1.0, np.nan]), np.array([2])], "bytes": [b"\x00\x01", None],
        "d": [dt.date(2024, 1, 2), None], "nested": [{"k": np.int32(5), "m": math.nan}, None],
    })
    rows = [(r.line, r.input) for r in frames_to_inputs([df])]
    assert rows == [
        (1, {"i": 1, "arr": [1.0, None], "bytes": "AAE=", "d": "2024-01-02", "nested": {"k": 5, "m": None}}),
        (2, {"i": 2, "f": 2.5, "inf": 1.0, "na": "x", "nat": "2024-01-01T00:00:00", "arr": [2]}),
    ]
    assert all(type(v) is not float or math.isfinite(v) for _, r in rows for v in r.values())
    json.dumps([r for _, r in rows], allow_nan=False)  # JSON without NaN


@pytest.mark.parametrize("bad", [None, "x", 1.5, True])
def test_bad_line_values(bad: Any) -> None:
    df = pd.DataFrame({"line": pd.Series([1, bad], dtype=object), "x": [1, 2]})
    with pytest.raises(InvalidInput, match="row 2: line must be an integer"):
        list(frames_to_inputs([df]))


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        rows_of(tmp_path / "nope.csv")
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(InvalidInput, match="not a readable Parquet file"):
        rows_of(bad)


OUT = [
    BatchOutput(1, BatchStatus.SUCCESS, {"greeting": "hi, \"ann\"", "n": 1}, []),
    BatchOutput(2, BatchStatus.FAILED, None, [ErrorMessage(1, "missing", field="name", vals=["a,b"])]),
]


@pytest.mark.parametrize("ext", ["csv", "jsonl", "parquet", "csv.gz"])
def test_export_round_trip(tmp_path: Path, ext: str) -> None:
    p = tmp_path / f"rows.{ext}"
    assert export_rows(iter(OUT), str(p), chunk=1) == 2
    if ext == "jsonl":
        got = [json.loads(line) for line in p.read_text().splitlines()]
        assert got == [
            {"line": 1, "status": "success", "res": {"greeting": "hi, \"ann\"", "n": 1}, "messages": []},
            {"line": 2, "status": "failed", "res": None,
             "messages": [{"msgid": 1, "errcode": "missing", "field": "name", "vals": ["a,b"]}]},
        ]
        return
    df = pd.read_parquet(p) if ext == "parquet" else pd.read_csv(p, keep_default_na=False)
    assert list(df.columns) == ["line", "status", "res", "messages"]
    assert df["line"].tolist() == [1, 2] and df["status"].tolist() == ["success", "failed"]
    assert json.loads(df["res"][0]) == {"greeting": "hi, \"ann\"", "n": 1}
    assert all(v == "" or pd.isna(v) for v in (df["res"][1], df["messages"][0]))  # nothing: an empty cell
    assert json.loads(df["messages"][1])[0]["vals"] == ["a,b"]


def test_export_of_nothing_is_a_valid_file(tmp_path: Path) -> None:
    assert export_rows([], str(tmp_path / "e.parquet")) == 0
    assert list(pd.read_parquet(tmp_path / "e.parquet").columns) == ["line", "status", "res", "messages"]
    assert export_rows([], str(tmp_path / "e.csv")) == 0
    assert (tmp_path / "e.csv").read_text() == "line,status,res,messages\n"


def test_a_long_line_in_a_small_gzip_is_refused_before_it_is_held(tmp_path: Path) -> None:
    """The probe of issue 18: a 64 MiB line in a ~64 KiB .csv.gz (it was read whole: +340 MiB). Now the
    read stops at the first megabyte of the line, with a clear InvalidInput."""
    import gzip
    import resource

    path = tmp_path / "bomb.csv.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(b"id,x\n1," + b"a" * (64 * 2**20) + b"\n")
    assert path.stat().st_size < 300 * 2**10
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InvalidInput, match="longer than 1048576 bytes"):
        list(read_frames(str(path)))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 32 * 2**10  # KiB: < 32 MiB more
    jsonl = tmp_path / "long.jsonl"
    jsonl.write_text('{"a": 1}\n' + '{"a": "' + "x" * 2000 + '"}\n')
    with pytest.raises(InvalidInput, match="longer than 1000 bytes"):
        list(read_frames(str(jsonl), max_line_bytes=1000))


def test_the_decompressed_size_is_bounded(tmp_path: Path) -> None:
    import gzip

    path = tmp_path / "many.csv.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(b"id\n" + b"1\n" * 100_000)
    with pytest.raises(InvalidInput, match="more than 100000 bytes once decompressed"):
        list(read_frames(str(path), chunksize=1000, max_bytes=100_000))
    assert sum(len(df) for df in read_frames(str(path), chunksize=1000, max_bytes=200_003)) == 100_000


def test_lines_up_to_the_limit_are_read(tmp_path: Path) -> None:
    """The bound is on each line, wherever it falls in the chunks read (a line wholly inside a chunk too)."""
    path = tmp_path / "ok.csv"
    rows = ["id,x", *(f"{i},{'b' * (i % 700)}" for i in range(5000))]
    path.write_text("\n".join(rows) + "\n")
    assert sum(len(df) for df in read_frames(str(path), chunksize=999, max_line_bytes=710)) == 5000
    with pytest.raises(InvalidInput, match="longer than 600 bytes"):
        list(read_frames(str(path), max_line_bytes=600))
