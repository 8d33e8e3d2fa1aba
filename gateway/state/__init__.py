"""Shared state for rate limits and greylisting: one small interface, two backends.

``state: memory`` (the default) keeps the state inside the process: nothing to
install, but every process (and every ``workers:`` process) counts on its own.
``state: redis://host:port/db`` keeps it in Redis, shared by every process and
every gateway that points at the same database, so several gateways behind a
load balancer enforce one limit.

Every check is one atomic check-and-update: a GCRA rate check
(:meth:`StateBackend.rate`) and a greylist triplet check
(:meth:`StateBackend.greylist`). In Redis each is one Lua script, timed by the
Redis server's clock (so gateways with skewed clocks still agree), and every
key carries a TTL, so nothing grows forever. A backend that cannot answer
within ``state.timeout`` (Redis down or hung) raises :class:`StateError`; what
a plugin does then is its own ``on_error`` policy (``tempfail`` or ``allow``).
The backend's ``up`` turns false (one WARNING) and true again (one INFO),
which ``/metrics`` shows as ``mailgate_state_up``.

One backend per configuration per process: :func:`acquire` hands every runtime
with the same ``state:`` settings the same backend, so a reload that starts the
new runtime before stopping the old one keeps the counters and greylist
entries of the memory backend.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mailgate.policy import State as StateSettings


class StateError(Exception):
    """The state backend could not answer now (unreachable, timed out, refused)."""


@dataclass(frozen=True, slots=True)
class RateDecision:
    """The outcome of one rate check."""

    allowed: bool
    retry_after: float
    """Seconds until the same request would be allowed; 0 when allowed."""
    remaining: int
    """How many more requests of cost 1 would be allowed right now (0 when refused)."""


class GreylistStatus(enum.Enum):
    """Where a greylist triplet stands after a check."""

    NEW = "new"  # first seen now: try again after the delay
    EARLY = "early"  # seen before, but the delay has not passed yet
    PASSED = "passed"  # retried after the delay: allowed, and remembered from now on
    KNOWN = "known"  # passed before: allowed

    @property
    def allowed(self) -> bool:
        """True when the message may go on."""
        return self in (GreylistStatus.PASSED, GreylistStatus.KNOWN)


@dataclass(frozen=True, slots=True)
class GreylistDecision:
    """The outcome of one greylist check."""

    status: GreylistStatus
    retry_after: float
    """Seconds until a retry passes; 0 when allowed."""


class StateBackend(Protocol):
    """What plugins may ask of the state store. Every method is atomic."""

    description: str
    """``memory`` or the Redis URL without its password, for logs."""
    up: bool
    """False from a check that failed until one succeeds (``mailgate_state_up``)."""

    async def rate(self, key: str, interval: float, burst: int, cost: int = 1) -> RateDecision:
        """Count ``cost`` requests against the GCRA bucket ``key``.

        The bucket refills one request per ``interval`` seconds and holds at
        most ``burst`` requests. A refused request is not counted.

        :raises StateError: when the backend cannot answer.
        """
        ...

    async def greylist(
        self, key: str, delay: float, retry_window: float, lifetime: float
    ) -> GreylistDecision:
        """Check and update the greylist triplet ``key``.

        A new triplet must come back after ``delay`` seconds and within
        ``retry_window`` seconds of its first attempt; once it has, it is
        allowed for ``lifetime`` seconds after its latest use.

        :raises StateError: when the backend cannot answer.
        """
        ...

    async def close(self) -> None:
        """Release connections; the backend is not used afterwards."""
        ...


def hashed(*parts: str) -> str:
    """A short, stable key component for values that may be long or contain anything."""
    digest = hashlib.blake2b("\0".join(parts).encode("utf-8", "surrogateescape"), digest_size=12)
    return digest.hexdigest()


def build(settings: StateSettings) -> StateBackend:
    """A new backend for ``settings``; nothing is connected until the first check."""
    if settings.url == "memory":
        from mailgate.state.memory import MemoryState

        return MemoryState(settings.key_prefix)
    from mailgate.state.redis import RedisState

    return RedisState(settings.url, settings.timeout, settings.key_prefix)


_shared: dict[StateSettings, tuple[StateBackend, int]] = {}


def acquire(settings: StateSettings) -> StateBackend:
    """The process's backend for ``settings``, shared by every runtime that uses them."""
    backend, users = _shared.get(settings) or (build(settings), 0)
    _shared[settings] = (backend, users + 1)
    return backend


async def release(settings: StateSettings) -> None:
    """Give back a backend from :func:`acquire`; the last user closes it."""
    entry = _shared.get(settings)
    if entry is None:
        return
    backend, users = entry
    if users > 1:
        _shared[settings] = (backend, users - 1)
        return
    del _shared[settings]
    await backend.close()


__all__ = [
    "GreylistDecision",
    "GreylistStatus",
    "RateDecision",
    "StateBackend",
    "StateError",
    "acquire",
    "build",
    "hashed",
    "release",
]
