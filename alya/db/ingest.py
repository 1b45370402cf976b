"""Turn submitted rows into a COPY text stream without ever holding them all in memory.

The stream validates as it goes; an error raised mid-stream aborts the COPY and the transaction, so a
bad row anywhere in a million stores nothing.
"""

from __future__ import annotations

import io
import operator
from collections.abc import Iterable, Iterator
from typing import Any

import orjson

from alya.core.errors import InvalidInput
from alya.core.models import BatchInput
from alya.core.validate import MAX_LINE, check_json_data, has_nonfinite, has_nul

COPY_ROWS = "COPY batchrows (batch, line, input) FROM STDIN"


def iter_rows(rows: Any) -> Iterator[tuple[Any, Any]]:
    """(line, input) pairs from BatchInputs, (line, input) tuples, or a DataFrame with those columns."""
    try:
        from pandas import DataFrame
    except ImportError:  # pragma: no cover
        DataFrame = None  # type: ignore[assignment,misc]  # noqa: N806
    if DataFrame is not None and isinstance(rows, DataFrame):
        missing = {"line", "input"} - set(rows.columns)
        if missing:
            raise InvalidInput(f"DataFrame lacks column(s) {sorted(missing)}")
        return zip(rows["line"].tolist(), rows["input"], strict=True)
    if isinstance(rows, (str, bytes, dict)) or not isinstance(rows, Iterable):
        raise InvalidInput("rows must be an iterable of BatchInput or a DataFrame (line, input)")
    return _pairs(rows)


def _pairs(rows: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
    for row in rows:
        if type(row) is BatchInput:  # the common case, without a call or an isinstance walk
            yield row.line, row.input
        else:
            yield _pair(row)


def _pair(row: Any) -> tuple[Any, Any]:
    if isinstance(row, BatchInput):
        return row.line, row.input
    if isinstance(row, tuple) and len(row) == 2:
        return row
    raise InvalidInput(f"not a BatchInput: {type(row).__name__}")


def encode_input(value: Any, line: int) -> bytes:
    """JSON of one row's input, escaped for COPY text format (orjson escapes every control character,
    so backslashes are all that need doubling)."""
    try:
        if isinstance(value, (str, bytes)):
            value = orjson.loads(value)
        if not isinstance(value, dict):
            raise InvalidInput(f"line {line}: input must be a JSON object, got {type(value).__name__}")
        data = orjson.dumps(value)
    except (orjson.JSONDecodeError, TypeError) as exc:
        raise InvalidInput(f"line {line}: input is not a JSON object: {exc}") from None
    check_json_data(data, value, f"line {line}: input")
    return data.replace(b"\\", b"\\\\") if b"\\" in data else data


def check_line(line: Any, min_line: int) -> int:
    if isinstance(line, bool):
        raise InvalidInput(f"line numbers must be integers, got {line!r}")
    try:
        n = operator.index(line)
    except TypeError:
        raise InvalidInput(f"line numbers must be integers, got {line!r}") from None
    if n < min_line or n > MAX_LINE:
        raise InvalidInput(f"line {n} out of range (must be >= {min_line})")
    return n


class CopyStream(io.RawIOBase):
    """A file-like object for ``copy_expert`` that encodes rows lazily, counting them as it goes.

    psycopg2 turns an exception raised by ``read`` into a ``QueryCanceled`` database error (and the
    COPY is abandoned); the original is kept in ``error`` so that the caller can raise it instead."""

    def __init__(self, batch: str, pairs: Iterator[tuple[Any, Any]], max_rows: int, min_line: int = 1,
                 max_input_bytes: int = 2**62):
        self._prefix = batch.encode() + b"\t"
        self._pairs = pairs
        self._max = max_rows
        self._max_input = max_input_bytes
        self._min_line = min_line
        self._buf = b""
        self.count = 0
        self.error: BaseException | None = None

    def readable(self) -> bool:
        return True

    def _fill(self, want: int) -> None:
        """Encode rows until ``want`` bytes are buffered. The hot loop of a submit: plain ints and dicts
        take an inlined fast path; anything else goes through the general (validating) functions."""
        parts = [self._buf]
        size = len(self._buf)
        prefix, min_line, max_rows, dumps, max_input = self._prefix, self._min_line, self._max, orjson.dumps, \
            self._max_input
        count = self.count
        try:
            for line, value in self._pairs:
                if type(line) is not int or line < min_line or line > MAX_LINE:  # bool is not int here
                    line = check_line(line, min_line)
                count += 1
                if count > max_rows:
                    raise InvalidInput(f"too many rows: a batch holds at most {max_rows}")
                if type(value) is dict:
                    try:
                        data = dumps(value)
                    except TypeError as exc:
                        raise InvalidInput(f"line {line}: input is not a JSON object: {exc}") from None
                    if b"null" in data and has_nonfinite(value):
                        raise InvalidInput(f"line {line}: input contains NaN or Infinity, which JSON cannot "
                                           "represent")
                    if b"\\" in data:
                        if b"\\u0000" in data and has_nul(data):
                            raise InvalidInput(f"line {line}: input contains a NUL character, which PostgreSQL "
                                               "cannot store")
                        data = data.replace(b"\\", b"\\\\")
                else:
                    data = encode_input(value, line)
                if len(data) > max_input:
                    raise InvalidInput(f"line {line}: input is larger than {max_input} bytes of JSON "
                                       "(ALYA_MAX_INPUT_BYTES)")
                part = b"%s%d\t%s\n" % (prefix, line, data)
                parts.append(part)
                size += len(part)
                if size >= want:
                    break
        finally:
            self.count = count
            self._buf = b"".join(parts)

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        want = size if size and size > 0 else 1 << 18
        if len(self._buf) < want:
            try:
                self._fill(want)
            except BaseException as exc:
                self.error = exc
                raise
        out, self._buf = self._buf[:want], self._buf[want:]
        return out

    def readinto(self, b: Any) -> int:  # pragma: no cover - copy_expert calls read()
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)
