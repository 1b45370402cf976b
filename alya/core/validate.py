"""Validation of what callers hand in, done before anything is written."""

from __future__ import annotations

import numbers
import re
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson

from alya.core.errors import BatchNotFound, InvalidInput

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


def has_nonfinite(value: Any) -> bool:
    """Whether a JSON-like value holds a NaN or an infinite float anywhere (orjson writes them as null).
    Only called on values whose JSON text holds a null (nesting is at most 255 deep: orjson wrote it)."""
    if isinstance(value, float):
        return value - value != 0.0
    if not isinstance(value, (dict, list, tuple)):
        return False
    for v in value.values() if isinstance(value, dict) else value:
        t = type(v)
        if t is str or t is int or v is None or t is bool:
            continue
        if isinstance(v, float):
            if v - v != 0.0:  # inf - inf and nan - nan are nan
                return True
        elif isinstance(v, (dict, list, tuple)) and has_nonfinite(v):
            return True
    return False


def check_json_data(data: bytes, value: Any, what: str) -> None:
    """Refuse what orjson wrote from ``value`` if it cannot stand for it: a NUL character (jsonb cannot
    store one), NaN or Infinity (JSON has none; orjson writes null). Cheap when neither can be present:
    NaN can only hide where the text says null, NUL only behind a backslash."""
    if b"null" in data and has_nonfinite(value):
        raise InvalidInput(f"{what} contains NaN or Infinity, which JSON cannot represent")
    if b"\\u0000" in data and has_nul(data):
        raise InvalidInput(f"{what} contains a NUL character, which PostgreSQL cannot store")


def json_text_strict(value: Any, what: str = "result") -> str:
    """JSON text of ``value`` as it will be stored, or InvalidInput when it cannot be stored faithfully
    (not serialisable, non-string keys, integers beyond 64 bits, nesting deeper than 255, NaN or Infinity,
    a NUL character). For what processors return: the engine treats the InvalidInput as a row fault."""
    try:
        data = orjson.dumps(value)
    except TypeError as exc:
        raise InvalidInput(f"{what} is not JSON-serialisable: {exc}") from None
    check_json_data(data, value, what)
    return data.decode()


def text_value(value: Any, what: str, max_len: int | None = None) -> str:
    """A string PostgreSQL can store in a text column: no NUL character."""
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise InvalidInput(f"{what} contains a NUL character, which PostgreSQL cannot store")
    if max_len is not None and len(value) > max_len:
        raise InvalidInput(f"{what} is longer than {max_len} characters")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise InvalidInput(f"{what} is not valid Unicode (a lone surrogate)") from None
    return value


MAX_IDEMPOTENCY_KEY = 255


def idempotency_key(value: Any) -> str | None:
    """None, or a non-empty string of at most 255 characters that PostgreSQL can store."""
    if value is None:
        return None
    key = text_value(value, "idempotency_key", MAX_IDEMPOTENCY_KEY)
    if not key:
        raise InvalidInput("idempotency_key must not be empty")
    return key


PRIORITY_MIN, PRIORITY_MAX = -1000, 1000  # a smallint column; a wide range nobody needs would only mislead


def priority(value: Any) -> int:
    """An int in [-1000, 1000] (bool refused: ``priority=True`` is a mistake, not 1)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"priority must be an int, got {type(value).__name__}")
    if not PRIORITY_MIN <= value <= PRIORITY_MAX:
        raise InvalidInput(f"priority must be between {PRIORITY_MIN} and {PRIORITY_MAX}, got {value}")
    return value


def max_failures(value: Any) -> tuple[int | None, float | None]:
    """A failure threshold: ``(rows, None)`` for an int >= 0, ``(None, fraction)`` for a float in (0, 1) (a
    fraction of the batch's rows), ``(None, None)`` for None. A bool is a mistake, not 1; a float outside
    (0, 1), even 5.0, is refused rather than guessed at (rows or a fraction?)."""
    if value is None:
        return None, None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)  # numpy's integers too
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"max_failures must be an int (rows) or a float in (0, 1), got {type(value).__name__}")
    if isinstance(value, int):
        if not 0 <= value <= MAX_LINE:
            raise InvalidInput(f"max_failures must be between 0 and {MAX_LINE} rows, got {value}")
        return int(value), None
    if not 0.0 < value < 1.0:  # NaN fails this too
        raise InvalidInput(f"max_failures as a fraction must be in (0, 1), got {value!r}")
    return None, float(value)
def schedule(not_before: Any, deadline: Any) -> tuple[datetime | None, datetime | None]:
    """A batch's ``not_before`` and ``deadline``: aware datetimes or None (a naive one is ambiguous by hours:
    the server's zone or UTC?); a deadline must be in the future and after ``not_before`` (a batch that must
    end before it may start could never run a row)."""
    for what, value in (("not_before", not_before), ("deadline", deadline)):
        if value is not None and (not isinstance(value, datetime) or value.utcoffset() is None):
            raise InvalidInput(f"{what} must be a timezone-aware datetime, got {type(value).__name__}"
                               + (" without a time zone" if isinstance(value, datetime) else ""))
    if deadline is not None:
        if deadline <= datetime.now(UTC):
            raise InvalidInput(f"deadline {deadline.isoformat()} has already passed")
        if not_before is not None and deadline <= not_before:
            raise InvalidInput(f"deadline {deadline.isoformat()} must be after not_before {not_before.isoformat()}")
    return not_before, deadline


def app_name(app: Any) -> str:
    if not isinstance(app, str) or not _APP.fullmatch(app):
        raise InvalidInput(f"app must match [a-z][a-z0-9_]* (at most 64 chars), got {app!r}")
    return app


def op_name(op: Any) -> str:
    """Ops are accepted in any case and stored lower-case."""
    if not isinstance(op, str) or not _OP.fullmatch(op.lower()):
        raise InvalidInput(f"op must be an identifier of at most 64 chars, got {op!r}")
    return op.lower()


def json_object(value: Any, what: str, max_bytes: int | None = None) -> dict[str, Any]:
    """A dict, or the JSON text of an object; anything else is refused, and so is one whose JSON is longer
    than ``max_bytes`` (every claim and status read carries a batch's context: it must stay small)."""
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
    check_json_data(data, value, what)
    if max_bytes is not None and len(data) > max_bytes:
        setting = "ALYA_MAX_CONTEXT_BYTES" if what == "context" else "ALYA_MAX_INPUT_BYTES"
        raise InvalidInput(f"{what} is larger than {max_bytes} bytes of JSON ({setting})")
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
    """Output file names become object keys (and local paths): keep them to a safe alphabet, and refuse
    names a file system reads as a directory (``.``, ``..``): a summary could never store them."""
    if not isinstance(name, str) or not _FILE.fullmatch(name) or ".." in name or name == ".":
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
