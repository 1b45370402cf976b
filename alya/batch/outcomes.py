"""What a processor call comes to, as the values the write-back statement stores.

A call ends in one of three ways: an accepted answer (success or failed: final), a fault (it raised,
returned something malformed, or ran past its timeout), which requeues the row with a growing delay until
its attempts are used up and then fails it with ``processing_error``, or no outcome at all (the row was
never started: a stopping worker gives it back, an aborted batch drops it).
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from alya.core.models import BatchJobResult, BatchStatus, ErrorMessage, SlowQueryResult
from alya.core.validate import file_name, json_text_strict
from alya.db.store import json_text
from alya.io.outputs import normalise_blobrows

MAX_RESULT_BYTES = 64 * 2**20  # result + messages + blob rows of one row, as stored JSON text


class Outcome(NamedTuple):
    """One row's answer, in the column order of the ``write_results`` statement."""

    line: int
    attempts: int  # the attempt it was claimed at: the write-back only lands at that attempt
    status: str  # success | failed | queued (a fault with attempts left)
    res: str | None  # JSON text
    messages: str | None
    blobrows: str | None
    delay: float  # seconds before a requeued row may be claimed again
    finished: float  # wall-clock time the call returned (an abort keeps results finished before it)


def accepted(line: int, attempts: int, result: Any, is_query: bool) -> Outcome:
    """Check a processor's answer; anything malformed raises (and is then a fault)."""
    expected = SlowQueryResult if is_query else BatchJobResult
    if not isinstance(result, expected):
        raise TypeError(f"processor returned {type(result).__name__}, not {expected.__name__}")
    status = BatchStatus(result.status)
    if status not in (BatchStatus.SUCCESS, BatchStatus.FAILED):
        raise ValueError(f"processor returned status {status.value!r}; only success/failed are allowed")
    if result.result is not None and not isinstance(result.result, dict):
        raise TypeError("result must be a dict or None")
    messages = [m.to_dict() if isinstance(m, ErrorMessage) else ErrorMessage.from_dict(m).to_dict()
                for m in result.messages or []]
    if is_query:
        files = {file_name(k): str(v) for k, v in (result.outputfiles or {}).items()}  # type: ignore[union-attr]
        blobs = files or None
    else:
        blobs = normalise_blobrows(result.blobrows)  # type: ignore[union-attr]
    # NaN, Infinity, NUL and the like are refused (a fault), never stored as something else
    res = None if result.result is None else json_text_strict(result.result, "result")
    msgs = json_text_strict(messages, "messages") if messages else None
    blob = None if blobs is None else json_text_strict(blobs, "blob rows")
    size = stored_size(res, msgs, blob)
    if size > MAX_RESULT_BYTES:  # a fault: it would be refused again on every retry, and fails alone
        raise ValueError(f"result too large: {size / 2**20:.1f} MiB of result, messages and blob rows; "
                         f"at most {MAX_RESULT_BYTES // 2**20} MiB per row")
    return Outcome(line, attempts, status.value, res, msgs, blob, 0.0, time.time())


def stored_size(*texts: str | None) -> int:
    """What a row's result, messages and blob rows take as stored JSON text (for the per-row limit and
    for splitting large write-backs)."""
    return sum(len(t) for t in texts if t is not None)


def fault(line: int, attempts: int, error: str, max_attempts: int, backoff_sec: float) -> Outcome:
    """A fault: requeued after a delay that doubles per attempt, or failed once attempts are used up."""
    if attempts >= max_attempts:
        messages = json_text([ErrorMessage(msgid=0, errcode="processing_error", vals=[error]).to_dict()])
        return Outcome(line, attempts, "failed", None, messages, None, 0.0, time.time())
    return Outcome(line, attempts, "queued", None, None, None, backoff_sec * 2 ** (attempts - 1), time.time())
