"""Redis cache of batch summaries in front of PostgreSQL. Throw-away: every failure falls back to the
database, and every key can be deleted at any time.

Each cached value carries the batch's ``ver`` (bumped by every status change in PostgreSQL). A Lua script
stores a value only if its version is not older than the cached one, so a slow writer holding a stale
read can never put `inprog` over `success`.
"""

from __future__ import annotations

from typing import Any

import orjson
import redis

from alya.logs import get_logger
from alya.settings import redact_url

_PUT = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, obj = pcall(cjson.decode, cur)
  if ok and tonumber(obj['ver']) > tonumber(ARGV[2]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return 1
"""


def summary_key(batch_id: str) -> str:
    # The hash tag keeps all of a batch's keys in one Redis Cluster slot.
    return f"alya:{{{batch_id}}}:summary"


def done_key(batch_id: str) -> str:
    return f"alya:{{{batch_id}}}:done"


class StatusCache:
    def __init__(self, url: str | None, ttl_sec: int) -> None:
        self.ttl = ttl_sec
        self.final_ttl = ttl_sec * 100
        self._url = url
        self._redis: redis.Redis | None = None
        self._put: Any = None
        if url:
            self._redis = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
            self._put = self._redis.register_script(_PUT)

    @property
    def enabled(self) -> bool:
        return self._redis is not None

    def get(self, key: str) -> dict[str, Any] | None:
        if self._redis is None:
            return None
        try:
            raw = self._redis.get(key)
        except redis.RedisError as exc:
            self._warn("get", exc)
            return None
        return None if raw is None else orjson.loads(raw)  # type: ignore[arg-type]

    def put(self, key: str, value: dict[str, Any], ver: int, final: bool) -> bool:
        """Store ``value`` unless a newer version is cached. ``value`` gains the ``ver`` field."""
        if self._redis is None:
            return False
        data = orjson.dumps({**value, "ver": ver})
        try:
            return bool(self._put(keys=[key], args=[data, ver, self.final_ttl if final else self.ttl]))
        except redis.RedisError as exc:
            self._warn("put", exc)
            return False

    def delete(self, *keys: str) -> None:
        if self._redis is None:
            return
        try:
            self._redis.delete(*keys)
        except redis.RedisError as exc:
            self._warn("delete", exc)

    def _warn(self, what: str, exc: Exception) -> None:
        get_logger().warning("redis_unavailable", op=what, url=redact_url(self._url), error=str(exc))

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
