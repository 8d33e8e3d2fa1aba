"""The ``redis://`` state backend: one Lua script per check, keys with TTLs.

Every gateway process that points at the same Redis database shares the
counters. Each check is a single ``EVALSHA`` of a script below, so it is atomic
however many gateways ask at once, and it reads the time from Redis itself
(``TIME``), so gateways whose clocks disagree still agree on the limits.

Keys (after the configured prefix, ``mailgate:`` by default):

``rl:<rule>:<value>``  a string: the bucket's theoretical arrival time (GCRA)
                       in microseconds; expires when the bucket is full again.
``gl:<hash>``          a hash: ``f`` first attempt (ms), ``p`` when it passed;
                       expires ``retry_window`` after the first attempt, or
                       ``lifetime`` after the latest use once passed.

A call that cannot complete within ``timeout`` (connect or reply), or any
Redis error, raises :class:`~mailgate.state.StateError`. A failed call is
retried once at once on a fresh connection (a connection left from before a
Redis restart is stale), and never with a backoff that would hold up mail.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from mailgate.state import GreylistDecision, GreylistStatus, RateDecision, StateError

# GCRA. KEYS[1] bucket; ARGV interval (us), burst, cost. Returns {allowed, retry_after_us, left}.
RATE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + cost * interval
local allow_at = tat + (cost - burst) * interval
if now < allow_at then
  return {0, string.format('%.0f', allow_at - now), 0}
end
local ttl_ms = math.ceil((new_tat - now) / 1000)
if ttl_ms < 1 then ttl_ms = 1 end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl_ms)
return {1, 0, math.floor((now - allow_at) / interval)}
"""

# Greylist. KEYS[1] triplet; ARGV delay, retry_window, lifetime (ms).
# Returns {status, retry_after_ms}: 0 new, 1 early, 2 passed now, 3 known.
GREYLIST_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local delay = tonumber(ARGV[1])
local rec = redis.call('HMGET', KEYS[1], 'f', 'p')
local first = tonumber(rec[1])
if rec[2] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {3, 0}
end
if not first then
  redis.call('HSET', KEYS[1], 'f', now)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {0, delay}
end
if now - first < delay then
  return {1, delay - (now - first)}
end
redis.call('HSET', KEYS[1], 'p', now)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {2, 0}
"""

_GREYLIST_STATUS = (
    GreylistStatus.NEW,
    GreylistStatus.EARLY,
    GreylistStatus.PASSED,
    GreylistStatus.KNOWN,
)


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


class RedisState:
    """Rate buckets and greylist triplets in Redis."""

    def __init__(self, url: str, timeout: float, key_prefix: str) -> None:
        self.description = redact(url)
        self.prefix = key_prefix
        self.client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1),
            health_check_interval=0,
        )
        self._rate = self.client.register_script(RATE_SCRIPT)
        self._greylist = self.client.register_script(GREYLIST_SCRIPT)

    async def rate(self, key: str, interval: float, burst: int, cost: int = 1) -> RateDecision:
        """GCRA check-and-count in one script run."""
        args: list[str | int] = [f"{interval * 1e6:.3f}", burst, cost]
        try:
            allowed, retry_us, left = await self._rate([f"{self.prefix}rl:{key}"], args)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StateError(f"redis {self.description}: {exc}") from exc
        return RateDecision(bool(allowed), int(retry_us) / 1e6, int(left))

    async def greylist(
        self, key: str, delay: float, retry_window: float, lifetime: float
    ) -> GreylistDecision:
        """Greylist check-and-update in one script run."""
        args = [round(delay * 1000), max(1, round(retry_window * 1000)), round(lifetime * 1000)]
        try:
            status, retry_ms = await self._greylist([f"{self.prefix}gl:{key}"], args)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StateError(f"redis {self.description}: {exc}") from exc
        return GreylistDecision(_GREYLIST_STATUS[int(status)], int(retry_ms) / 1000)

    async def close(self) -> None:
        """Close the connection pool."""
        await self.client.aclose()
