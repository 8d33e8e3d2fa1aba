"""The ``memory`` state backend: dictionaries in this process, with expiry.

Each check runs without an ``await`` between its read and its write, so it is
atomic on the event loop. Expired entries are dropped on access and by a sweep
over the whole table at most once a minute, so memory follows the live keys.
State is lost when the process exits and is not shared between processes (use
Redis for that). The clock is injectable for unit tests.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from mailgate.state import GreylistDecision, GreylistStatus, RateDecision

SWEEP_INTERVAL = 60.0


class MemoryState:
    """Rate buckets and greylist triplets in a dict, each entry with an expiry time."""

    description = "memory"
    up = True

    def __init__(self, key_prefix: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self.prefix = key_prefix
        self.clock = clock
        self._entries: dict[str, tuple[float, Any]] = {}
        self._next_sweep = clock() + SWEEP_INTERVAL

    def __len__(self) -> int:
        return len(self._entries)

    def _get(self, key: str, now: float) -> Any:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._entries[key]
            return None
        return entry[1]

    def _set(self, key: str, value: Any, ttl: float, now: float) -> None:
        self._entries[key] = (now + ttl, value)
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL
            expired = [k for k, (expires, _) in self._entries.items() if expires <= now]
            for k in expired:
                del self._entries[k]

    async def rate(self, key: str, interval: float, burst: int, cost: int = 1) -> RateDecision:
        """GCRA: the bucket is its theoretical arrival time (TAT)."""
        key = f"{self.prefix}rl:{key}"
        now = self.clock()
        tat = max(self._get(key, now) or now, now)
        new_tat = tat + cost * interval
        allow_at = tat + (cost - burst) * interval  # not new_tat - burst*interval: rounding
        if now < allow_at:
            return RateDecision(False, allow_at - now, 0)
        self._set(key, new_tat, new_tat - now, now)
        return RateDecision(True, 0.0, math.floor((now - allow_at) / interval + 1e-9))

    async def greylist(
        self, key: str, delay: float, retry_window: float, lifetime: float
    ) -> GreylistDecision:
        """First attempt, too early, first pass, or known; see ``StateBackend.greylist``."""
        key = f"{self.prefix}gl:{key}"
        now = self.clock()
        record = self._get(key, now)
        if record is None:
            self._set(key, ("first", now), retry_window, now)
            return GreylistDecision(GreylistStatus.NEW, delay)
        kind, first = record
        if kind == "passed":
            self._set(key, record, lifetime, now)
            return GreylistDecision(GreylistStatus.KNOWN, 0.0)
        waited = now - first
        if waited < delay:
            return GreylistDecision(GreylistStatus.EARLY, delay - waited)
        self._set(key, ("passed", first), lifetime, now)
        return GreylistDecision(GreylistStatus.PASSED, 0.0)

    async def close(self) -> None:
        """Forget everything."""
        self._entries.clear()
