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

A call that cannot complete within ``timeout`` (connect and reply together:
the whole call, retry included), or any Redis error, raises
:class:`~mailgate.state.StateError`. A call that fails on a broken connection
(one left from before a Redis restart is stale) is retried once at once on a
fresh one; a call that times out is not retried (a hung Redis would only cost
the time twice), and nothing waits for a backoff that would hold up mail.

Health: the first failed call after a good one logs one WARNING (``state
store unreachable``) and sets :attr:`RedisState.up` false; the first call
that succeeds again logs one INFO (``state store reachable again``, with how
long it was down and how many checks failed meanwhile).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio
import redis.commands.core
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from mailgate.state import GreylistDecision, GreylistStatus, RateDecision, StateError

log = logging.getLogger("mailgate.state")

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
        self.timeout = timeout
        self.up = True
        self._down_since = 0.0
        self._failures = 0
        self.client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # A broken connection is retried once on a new one; a timeout is final.
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
            health_check_interval=0,
        )
        self._rate = self.client.register_script(RATE_SCRIPT)
        self._greylist = self.client.register_script(GREYLIST_SCRIPT)

    async def _run(self, script: redis.commands.core.AsyncScript, key: str, args: list[Any]) -> Any:
        """Run ``script`` within ``timeout``, keeping :attr:`up` and its log lines."""
        try:
            async with asyncio.timeout(self.timeout):
                result = await script([key], args)
        except TimeoutError:
            raise self._failed(f"no answer within {self.timeout:g}s") from None
        except (redis.exceptions.RedisError, OSError) as exc:
            raise self._failed(str(exc) or type(exc).__name__) from exc
        if not self.up:
            self.up = True
            log.info(
                "state store reachable again: backend=%s down=%.1fs failed_checks=%d",
                self.description,
                time.monotonic() - self._down_since,
                self._failures,
            )
        return result

    def _failed(self, reason: str) -> StateError:
        self._failures += 1
        if self.up:
            self.up = False
            self._down_since, self._failures = time.monotonic(), 1
            log.warning("state store unreachable: backend=%s error=%s", self.description, reason)
        return StateError(f"redis {self.description}: {reason}")

    async def rate(self, key: str, interval: float, burst: int, cost: int = 1) -> RateDecision:
        """GCRA check-and-count in one script run."""
        args: list[str | int] = [f"{interval * 1e6:.3f}", burst, cost]
        allowed, retry_us, left = await self._run(self._rate, f"{self.prefix}rl:{key}", args)
        return RateDecision(bool(allowed), int(retry_us) / 1e6, int(left))

    async def greylist(
        self, key: str, delay: float, retry_window: float, lifetime: float
    ) -> GreylistDecision:
        """Greylist check-and-update in one script run."""
        args = [round(delay * 1000), max(1, round(retry_window * 1000)), round(lifetime * 1000)]
        status, retry_ms = await self._run(self._greylist, f"{self.prefix}gl:{key}", args)
        return GreylistDecision(_GREYLIST_STATUS[int(status)], int(retry_ms) / 1000)

    async def close(self) -> None:
        """Close the connection pool."""
        await self.client.aclose()
