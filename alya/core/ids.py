"""Batch ids: UUIDv7 (RFC 9562), so that ids sort by the time they were made.

The first 48 bits are the Unix time in milliseconds, then the version (7), a 12-bit counter (method 1 of
RFC 9562, section 6.2: seeded at random each millisecond, incremented within one, so ids made by one process
are strictly increasing), the variant and 62 random bits. ``batchrows`` is partitioned by ranges of this id
(``alya.db.partitions``), one partition per period of submit time: a purge drops whole periods.

Ids made before migration 0012 are random (v4); they stay valid ids everywhere (``validate.batch_id``
accepts any UUID) and live in the default partition.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from datetime import UTC, datetime

_lock = threading.Lock()
_last_ms = -1
_counter = 0


def uuid7(now_ms: int | None = None) -> str:
    """A new UUIDv7 as text; ``now_ms`` (tests, benches): the time to stamp instead of the clock's."""
    global _last_ms, _counter
    if now_ms is not None:  # outside the process's sequence
        return _make(now_ms, secrets.randbits(12))
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms, _counter = ms, secrets.randbits(11)  # room to count up within the millisecond
        else:  # the same millisecond (or the clock stepped back): keep increasing
            _counter += 1
            if _counter >= 1 << 12:
                _last_ms, _counter = _last_ms + 1, secrets.randbits(11)
            ms = _last_ms
        counter = _counter
    return _make(ms, counter)


def _make(ms: int, counter: int) -> str:
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | secrets.randbits(62)
    return str(uuid.UUID(int=value))


def floor_id(at: datetime) -> str:
    """The smallest UUIDv7 of the millisecond ``at`` (aware): the bound of a partition starting then."""
    ms = int(at.astimezone(UTC).timestamp() * 1000)
    return str(uuid.UUID(int=ms << 80))


def id_time(batch_id: str) -> datetime:
    """The time a UUIDv7 was made (meaningless for the random v4 ids of batches older than migration 0012)."""
    return datetime.fromtimestamp((uuid.UUID(batch_id).int >> 80) / 1000, UTC)
