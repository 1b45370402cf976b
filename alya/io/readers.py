"""Files of rows (CSV, Parquet, JSON lines) from a local path or any fsspec URL, read as a stream of pandas
DataFrames, and those frames turned into batch rows.

One module decides which files are understood and how a cell becomes a JSON value, so that a row reads the
same whether it came through ``alya submit``, ``alya append`` or the file intake (``IncomingFile.frames``).

Rules (they hold for every format):

- The format comes from the extension: ``.csv``, ``.parquet``/``.pq``, ``.jsonl``/``.ndjson``, optionally
  followed by a compression suffix (``.gz``, ``.bz2``, ``.xz``, ``.zst``, ``.zip``) for CSV and JSON lines.
- Files are read in chunks of ``chunksize`` rows, so memory stays flat whatever the file's size.
- A missing value (an empty CSV cell, a JSON ``null`` or absent key, a Parquet null, NaN) makes the key
  absent from the row's input: a processor never sees a float NaN, which JSON cannot carry anyway.
- CSV columns are typed by pandas per chunk with nullable dtypes (a column of integers stays integers even
  with empty cells); ``dtype=str`` keeps every cell as text (leading zeros, codes). Only an empty cell is
  missing: ``NA`` or ``null`` in a CSV are text.
- JSON lines keep each object's own JSON types exactly (the frames have object columns).
- A column named ``line`` gives the row's line number; without it rows are numbered in file order.
- CSV and JSON lines are bounded as they stream: a line longer than ``max_line_bytes`` or more than
  ``max_bytes`` once decompressed is refused (InvalidInput) before it is held in memory, so a small
  ``.csv.gz`` cannot expand to gigabytes (``ALYA_MAX_LINE_BYTES``, ``ALYA_MAX_FILE_BYTES``). A Parquet file
  is read by row groups and bounded by its own size.
"""

from __future__ import annotations

import datetime as dt
import decimal
import io
import math
import uuid
from base64 import b64encode
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import fsspec
import orjson

from alya.core.errors import InvalidInput
from alya.core.models import BatchInput

if TYPE_CHECKING:
    import pandas as pd

FORMATS: dict[str, str] = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl",
                           ".ndjson": "jsonl"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".zip")
LINE_COLUMN = "line"
MAX_LINE_BYTES = 2**20  # ALYA_MAX_LINE_BYTES' default: a line of a CSV or JSON lines file
MAX_FILE_BYTES = 16 * 2**30  # ALYA_MAX_FILE_BYTES' default: a whole file, decompressed
_BUFFER = 2**16


class _Bounded(io.RawIOBase):
    """A decompressed stream that refuses to yield a line longer than ``max_line`` bytes or more than
    ``max_bytes`` in all: the check runs on each chunk as it is read, so at most one buffer past the limit
    is ever held."""

    def __init__(self, raw: Any, name: str, max_line: int, max_bytes: int) -> None:
        self._raw, self._name = raw, name
        self._max_line, self._max_bytes = max_line, max_bytes
        self._total = 0
        self._line = 0  # bytes of the current (unfinished) line

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self._total += n
        if self._total > self._max_bytes:
            raise InvalidInput(f"{self._name}: more than {self._max_bytes} bytes once decompressed "
                               "(ALYA_MAX_FILE_BYTES)")
        last = data.rfind(b"\n")
        if last < 0:
            self._line += n
        else:
            first = data.find(b"\n")
            longest = self._line + first
            if n > self._max_line:  # a line may lie wholly inside this chunk: look at each
                longest = max(longest, max(len(x) for x in data[first + 1:last].split(b"\n")))
            self._check(longest)
            self._line = n - last - 1
        self._check(self._line)
        return n

    def _check(self, length: int) -> None:
        if length > self._max_line:
            raise InvalidInput(f"{self._name}: a line is longer than {self._max_line} bytes (ALYA_MAX_LINE_BYTES)")


def _bounded(fh: Any, url: str, max_line_bytes: int, max_bytes: int) -> io.BufferedReader:
    return io.BufferedReader(_Bounded(fh, _name(url), max_line_bytes, max_bytes), buffer_size=_BUFFER)


def file_format(url: str) -> str:
    """``csv``, ``parquet`` or ``jsonl`` from the file's extension; InvalidInput for anything else."""
    name = url.rsplit("/", 1)[-1].split("?", 1)[0].lower()
    stem = name
    for suffix in COMPRESSIONS:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    for ext, fmt in FORMATS.items():
        if stem.endswith(ext):
            if fmt == "parquet" and stem != name:
                raise InvalidInput(f"{name}: Parquet files carry their own compression; name it .parquet")
            return fmt
    known = ", ".join(FORMATS)
    raise InvalidInput(f"{name}: unknown file type (the extension must be one of {known})")


def read_frames(url: str, chunksize: int = 50_000, storage_options: dict[str, Any] | None = None,
                dtype: Any = None, *, max_line_bytes: int = MAX_LINE_BYTES,
                max_bytes: int = MAX_FILE_BYTES) -> Iterator[pd.DataFrame]:
    """The file's rows as DataFrames of at most ``chunksize`` rows, in file order.

    ``url`` is a local path or any fsspec URL (``s3://bucket/key.csv``; credentials from the usual AWS
    variables or ``storage_options``). ``dtype`` applies to CSV only (``str``: no type inference).
    A missing file raises FileNotFoundError; an unreadable one InvalidInput (both before or while
    iterating: the reading is lazy). A line or a file past its bound: InvalidInput."""
    if chunksize < 1:
        raise InvalidInput("chunksize must be at least 1")
    fmt = file_format(url)
    opts = storage_options or {}
    limits = (max_line_bytes, max_bytes)
    if fmt == "csv":
        return _csv_frames(url, chunksize, opts, dtype, limits)
    if fmt == "parquet":
        return _parquet_frames(url, chunksize, opts)
    return _jsonl_frames(url, chunksize, opts, limits)


def _csv_frames(url: str, chunksize: int, opts: dict[str, Any], dtype: Any,
                limits: tuple[int, int]) -> Iterator[pd.DataFrame]:
    import pandas as pd

    # Opened through fsspec, never by pandas: pandas reads a file:// (or http) URL whole into memory.
    with fsspec.open(url, "rb", compression="infer", **opts) as raw, _bounded(raw, url, *limits) as fh:
        try:
            reader = pd.read_csv(fh, chunksize=chunksize, dtype=dtype, dtype_backend="numpy_nullable",
                                 keep_default_na=False, na_values=[""])
            with reader:
                yield from reader
        except InvalidInput:
            raise
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
            raise InvalidInput(f"{_name(url)}: not a readable CSV file: {_first_line(exc)}") from None


def _parquet_frames(url: str, chunksize: int, opts: dict[str, Any]) -> Iterator[pd.DataFrame]:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fsspec.open(url, "rb", **opts) as fh:
        try:
            pfile = pq.ParquetFile(fh)
            for batch in pfile.iter_batches(batch_size=chunksize):
                # Arrow-backed columns keep integers with nulls as integers, and nested values as values.
                yield batch.to_pandas(types_mapper=pd.ArrowDtype)
        except (pa.ArrowInvalid, OSError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise InvalidInput(f"{_name(url)}: not a readable Parquet file: {_first_line(exc)}") from None


def _jsonl_frames(url: str, chunksize: int, opts: dict[str, Any], limits: tuple[int, int]) -> Iterator[pd.DataFrame]:
    """Parsed with orjson, not ``pandas.read_json``: that one turns integers with nulls into floats and
    strings that look like dates into timestamps; here every value stays what the JSON said."""
    import pandas as pd

    records: list[dict[str, Any]] = []
    with fsspec.open(url, "rb", compression="infer", **opts) as stream, _bounded(stream, url, *limits) as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise InvalidInput(f"{_name(url)} line {number}: not JSON: {exc}") from None
            if not isinstance(obj, dict):
                raise InvalidInput(f"{_name(url)} line {number}: not a JSON object")
            records.append(obj)
            if len(records) >= chunksize:
                yield pd.DataFrame(records, dtype=object)
                records = []
    if records:
        yield pd.DataFrame(records, dtype=object)


def column_summary(columns: Iterable[Any], max_names: int = 8, max_len: int = 32) -> str:
    """Column names fit to echo in a rejection: the names when few, short and plain, else only how many.
    A rejection must never carry a file's content back to whoever named the file (a header of secrets
    read from the wrong place is content)."""
    names = [str(c) for c in columns]
    plain = all(len(n) <= max_len and n.replace("_", "").replace("-", "").replace(" ", "").isalnum()
                for n in names)
    if len(names) <= max_names and plain:
        return repr(names)
    return f"{len(names)} columns"


def frames_to_inputs(frames: Iterable[pd.DataFrame], first_line: int = 1) -> Iterator[BatchInput]:
    """Batch rows from DataFrames: each row's columns become its input object (missing values left out);
    its line is the ``line`` column when the frames have one, else ``first_line``, ``first_line + 1``, ...
    in order across all frames."""
    next_line = first_line
    for df in frames:
        columns = [str(c) for c in df.columns]
        has_line = LINE_COLUMN in columns
        data_cols = [c for c in columns if c != LINE_COLUMN]
        col_index = [columns.index(c) for c in data_cols]
        line_index = columns.index(LINE_COLUMN) if has_line else -1
        for values in df.itertuples(index=False, name=None):
            line = _line_number(values[line_index], next_line - first_line + 1) if has_line else next_line
            next_line += 1
            row: dict[str, Any] = {}
            for name, i in zip(data_cols, col_index, strict=True):
                value = _json_value(values[i], name)
                if value is not _MISSING:
                    row[name] = value
            yield BatchInput(line, row)


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()
_PLAIN = (str, bool, int)


def _json_value(value: Any, column: str, nested: bool = False) -> Any:
    """A cell as a JSON value. Top-level missing values become ``_MISSING`` (the key is left out); inside
    lists and objects they become null, since position and keys matter there."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, float):  # numpy.float64 too (a float subclass, which orjson refuses): made a float
        return float(value) if math.isfinite(value) else (None if nested else _MISSING)
    if value is None or _is_na(value):
        return None if nested else _MISSING
    import numpy as np

    if isinstance(value, np.generic):
        return _json_value(value.item(), column, nested)
    if isinstance(value, dict):
        return {str(k): _json_value(v, column, True) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_value(v, column, True) for v in value]
    if isinstance(value, (dt.datetime, dt.date, dt.time)):  # pandas Timestamps are datetimes
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, uuid.UUID, dt.timedelta)):
        return str(value)  # exact: a Decimal is text rather than a rounded float
    if isinstance(value, (bytes, bytearray, memoryview)):
        return b64encode(bytes(value)).decode("ascii")
    raise InvalidInput(f"column {column!r}: a {type(value).__name__} value cannot be turned into JSON")


def _is_na(value: Any) -> bool:
    import pandas as pd

    try:
        return value is pd.NA or value is pd.NaT or bool(pd.isna(value))
    except (TypeError, ValueError):  # arrays and other containers: not a scalar NA
        return False


def _line_number(value: Any, row: int) -> int:
    if isinstance(value, bool):
        raise InvalidInput(f"row {row}: line must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    import numpy as np

    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise InvalidInput(f"row {row}: line must be an integer, got {value!r}")


def _name(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
