"""A warning at most every few seconds, with a count of the ones held back.

Not a plugin: shared by the built-ins whose failures come in floods (a state
backend or a content scanner that is down fails every message).
"""

from __future__ import annotations

import time


class WarningThrottle:
    """Says when a repeated warning is due, and how many were held back since the last."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._warned_at = -interval
        self._suppressed = 0

    def due(self) -> int | None:
        """The number held back since the last warning if one is due now, else None (counted)."""
        now = time.monotonic()
        if now - self._warned_at < self.interval:
            self._suppressed += 1
            return None
        suppressed, self._warned_at, self._suppressed = self._suppressed, now, 0
        return suppressed
