"""Validation of what callers hand in, done before anything is written."""

from __future__ import annotations

import re
import uuid
from typing import Any

import orjson

from alya.errors import BatchNotFound, InvalidInput

# Always used with fullmatch: ``$`` alone would let a trailing newline through ("app\n").
_APP = re.compile(r"[a-z][a-z0-9_]{0,63}")
_OP = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_FILE = re.compile(r"[A-Za-z0-9_.-]{1,200}")
MAX_LINE = 2**31 - 1
MAX_AGE_DAYS = 1_000_000
# orjson writes a NUL character as \u0000; a literal backslash before "u0000" is written as \\u0000.
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def has_nul(data: bytes) -> bool:
    """Whether JSON text written by orjson holds a NUL character (jsonb cannot store one)."""
    return b"\\u0000" in data and _NUL_ESCAPE.search(data) is not None


def app_name(app: Any) -> str:
    if not isinstance(app, str) or not _APP.fullmatch(app):
        raise InvalidInput(f"app must match [a-z][a-z0-9_]* (at most 64 chars), got {app!r}")
    return app


def op_name(op: Any) -> str:
    """Ops are accepted in any case and stored lower-case."""
    if not isinstance(op, str) or not _OP.fullmatch(op.lower()):
        raise InvalidInput(f"op must be an identifier of at most 64 chars, got {op!r}")
    return op.lower()


def json_object(value: Any, what: str) -> dict[str, Any]:
    """A dict, or the JSON text of an object; anything else is refused."""
    if isinstance(value, (str, bytes)):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {type(value).__name__}")
    try:
        data = orjson.dumps(value)
    except TypeError as exc:
        raise InvalidInput(f"{what} is not JSON-serialisable: {exc}") from None
    if has_nul(data):
        raise InvalidInput(f"{what} contains a NUL character, which PostgreSQL cannot store")
    return value


def age_days(value: Any) -> int:
    """A list window in whole days; anything beyond MAX_AGE_DAYS (2,700 years) means "everything"."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"age_days must be a non-negative integer, got {value!r}")
    return min(value, MAX_AGE_DAYS)


def batch_id(value: Any) -> str:
    try:
        return str(uuid.UUID(str(value)))
    except (ValueError, TypeError):
        raise BatchNotFound(f"not a batch id: {value!r}") from None


def file_name(name: Any) -> str:
    """Output file names become object keys: keep them to a safe alphabet."""
    if not isinstance(name, str) or not _FILE.fullmatch(name) or ".." in name:
        raise InvalidInput(f"unsafe output file name: {name!r}")
    return name


def file_type(value: Any) -> str:
    """A file type of the file intake (``txn``): named like an op, and stored lower-case."""
    if not isinstance(value, str) or not _OP.fullmatch(value.lower()):
        raise InvalidInput(f"file type must be an identifier of at most 64 chars, got {value!r}")
    return value.lower()


def file_patterns(value: Any) -> dict[str, str]:
    """Glob -> file type, from a mapping or the text form ``"*.csv=txn,*.parquet=txn"`` (first match wins)."""
    if isinstance(value, str):
        pairs = []
        for item in (p.strip() for p in value.split(",")):
            if not item:
                continue
            glob, sep, ftype = item.rpartition("=")
            if not sep or not glob.strip():
                raise InvalidInput(f"pattern {item!r} is not GLOB=FILETYPE (e.g. *.csv=txn)")
            pairs.append((glob.strip(), ftype.strip()))
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise InvalidInput(f"patterns must map globs to file types, got {type(value).__name__}")
    out: dict[str, str] = {}
    for glob, ftype in pairs:
        if not isinstance(glob, str) or not glob or "/" in glob:
            raise InvalidInput(f"a pattern matches a file name (no '/'), got {glob!r}")
        out[glob] = file_type(ftype)
    if not out:
        raise InvalidInput("no file patterns given (e.g. *.csv=txn)")
    return out
