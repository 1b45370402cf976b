"""Redis cache of batch statuses (and of small batches' final rows) in front of PostgreSQL. Throw-away:
every failure falls back to the database, and every key can be deleted at any time.

Each cached value carries the batch's ``ver`` (bumped by every status change in PostgreSQL). A Lua script
stores a value only if its version is not older than the cached one, and never puts a non-final value
over a final one, so a slow writer holding a stale read can never put `inprog` over `success`.

Redis trouble must not make alya slow: after a connection error or timeout the cache is switched off
for ``cooldown_sec`` (a circuit breaker), so a poll loop pays one timeout per cool-down, not one per
call. Writes skipped or failed meanwhile leave their keys possibly stale; those keys are deleted first
thing once Redis answers again.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import orjson
import redis

from alya.core.errors import ConfigError
from alya.core.logs import get_logger
from alya.core.redact import url_error

_PUT = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, obj = pcall(cjson.decode, cur)
  if ok and type(obj) == 'table' then
    if obj['final'] == true and ARGV[4] == '0' and ARGV[5] ~= '1' then return 0 end
    local v = tonumber(obj['ver'])
    if v and v > tonumber(ARGV[2]) then return 0 end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return 1
"""

_DOWN_ERRORS = (redis.ConnectionError, redis.TimeoutError)


class StatusCache:
    def __init__(self, url: str | None, ttl_sec: int, *, cooldown_sec: float = 5.0, timeout_sec: float = 1.0,
                 max_stale_keys: int = 100_000) -> None:
        self.ttl = ttl_sec
        self.final_ttl = ttl_sec * 100
        self.cooldown_sec = cooldown_sec
        self._where: str | None = None  # host:port/db for logs; never the URL (it may hold a password)
        self._redis: redis.Redis | None = None
        self._put: Any = None
        self._lock = threading.Lock()
        self._down_until = 0.0  # monotonic time before which Redis is not tried
        self._stale: dict[str, None] = {}  # keys whose write was skipped or failed (insertion-ordered)
        self._max_stale = max_stale_keys
        if url:
            try:
                self._redis = redis.Redis.from_url(url, socket_timeout=timeout_sec,
                                                   socket_connect_timeout=timeout_sec)
            except (ValueError, TypeError) as exc:
                raise ConfigError(url_error("ALYA_REDIS_URL", url, f"not a Redis URL ({exc})")) from None
            self._put = self._redis.register_script(_PUT)
            kw = self._redis.connection_pool.connection_kwargs
            self._where = kw.get("path") or f"{kw.get('host')}:{kw.get('port')}/{kw.get('db', 0)}"

    @property
    def enabled(self) -> bool:
        return self._redis is not None

    @property
    def available(self) -> bool:
        """Configured, and not switched off by a recent failure."""
        return self._redis is not None and time.monotonic() >= self._down_until

    def get(self, key: str, *, stale: bool = False) -> dict[str, Any] | None:
        """The cached JSON object, or None (a miss; also what is not a JSON object). Values are untrusted:
        whoever reaches Redis may have written them, so the reader checks every field (``alya.batch.status``).
        ``stale``: return an invalidation marker too (to see its version)."""
        if not self._ready():
            return None
        try:
            raw = self._redis.get(key)  # type: ignore[union-attr]
        except redis.RedisError as exc:
            self._failed("get", exc)
            return None
        if raw is None:
            return None
        try:
            value = orjson.loads(raw)  # type: ignore[arg-type]
        except orjson.JSONDecodeError:
            return None  # not ours or damaged: a miss, and the next put replaces it
        if not isinstance(value, dict) or (value.get("stale") and not stale):
            return None
        return value

    def put(self, key: str, value: dict[str, Any], ver: int, final: bool, ttl: int | None = None,
            reopen: bool = False) -> bool:
        """Store ``value`` unless a newer version (or a final value) is cached. The stored value gains
        ``ver`` and ``final`` fields. ``ttl`` (seconds) shortens the life of a non-final value. ``reopen``: a
        non-final value may replace a final one of an older version (a retried batch opens again)."""
        if not self._ready(key):
            return False
        data = orjson.dumps({**value, "ver": ver, "final": bool(final)})
        try:
            ttl = self.final_ttl if final else max(1, min(self.ttl, ttl or self.ttl))
            return bool(self._put(keys=[key], args=[data, ver, ttl, "1" if final else "0", "1" if reopen else "0"]))
        except redis.RedisError as exc:
            self._failed("put", exc, key)
            return False

    def invalidate(self, key: str, ver: int) -> bool:
        """Make the next read a miss, as a delete would, but leave version ``ver`` behind: a reader that
        read PostgreSQL before this change (an older version) can then not put its value back."""
        return self.put(key, {"stale": True}, ver, final=False)

    def delete(self, *keys: str) -> None:
        if not keys or not self._ready(*keys):
            return
        try:
            self._delete(keys)
        except redis.RedisError as exc:
            self._failed("delete", exc, *keys)

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()

    # ------------------------------------------------------------------ circuit breaker
    def _ready(self, *write_keys: str) -> bool:
        """Whether to talk to Redis now. While the breaker is open a write is skipped and its keys are
        remembered; once Redis answers again the remembered keys are deleted before anything else."""
        if self._redis is None:
            return False
        if time.monotonic() < self._down_until:
            self._remember(write_keys)
            return False
        if self._stale:
            with self._lock:
                keys = tuple(self._stale)
            try:
                self._delete(keys)
            except redis.RedisError as exc:
                self._failed("invalidate", exc, *write_keys)
                return False
            with self._lock:
                for k in keys:
                    self._stale.pop(k, None)
            get_logger().info("redis_recovered", redis=self._where, invalidated=len(keys))
        return True

    def _delete(self, keys: tuple[str, ...]) -> None:
        assert self._redis is not None
        if len(keys) == 1:
            self._redis.delete(keys[0])
            return
        # One DEL per key: keys of different batches live in different Redis Cluster slots.
        pipe = self._redis.pipeline(transaction=False)
        for i, k in enumerate(keys, 1):
            pipe.delete(k)
            if i % 1000 == 0:
                pipe.execute()
        pipe.execute()

    def _failed(self, what: str, exc: Exception, *write_keys: str) -> None:
        self._remember(write_keys)
        if isinstance(exc, _DOWN_ERRORS):
            with self._lock:
                was_up = time.monotonic() >= self._down_until
                self._down_until = time.monotonic() + self.cooldown_sec
            if was_up:
                get_logger().warning("redis_unavailable", op=what, redis=self._where, error=str(exc),
                                     retry_in_sec=self.cooldown_sec)
        else:
            get_logger().warning("redis_error", op=what, redis=self._where, error=str(exc))

    def _remember(self, keys: tuple[str, ...]) -> None:
        if not keys:
            return
        with self._lock:
            for k in keys:
                self._stale[k] = None
            while len(self._stale) > self._max_stale:
                # Bounded: the oldest are dropped; their stale values still expire with their TTL.
                self._stale.pop(next(iter(self._stale)))
