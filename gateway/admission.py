"""Who may hold a connection, and who may send a message now: connections, DATA, memory.

One :class:`ConnectionCounter` is shared by every listener of a process (the
``workers`` of a multi-process gateway count separately). The protocol
(``mailgate.smtpserver``) takes a slot when a connection is accepted and checks the
total there, before anything else runs; it checks the per-address limit just
before the greeting, once the real client address is known (after a PROXY
header). Clients in ``trusted_networks`` are exempt from the per-address limit,
as Postfix exempts ``$mynetworks``. A refused client gets ``421 4.7.0`` and is
disconnected. The same counter counts the DATA phases of each address
(``limits.data_per_ip``, trusted networks exempt too): one more gets
``451 4.7.1`` before the 354.

:class:`MemoryBudget` counts the bytes of message data the process holds
(``limits.memory``, split between the ``workers``): a DATA phase charges its
buffer as it grows and the message until its reply is sent. One budget serves
the whole process (:data:`PROCESS_BUDGET`), whatever listener or policy (after
a reload) a connection has.
"""

from __future__ import annotations

import ctypes
import logging
from collections import Counter

from mailgate.context import IPAddress
from mailgate.verdict import Reply

log = logging.getLogger("mailgate.admission")

TOO_MANY_CONNECTIONS = Reply(421, "Too many connections, try again later", "4.7.0")
TOO_MANY_FROM_YOU = Reply(421, "Too many connections from your address, try again later", "4.7.0")
TOO_MANY_MESSAGES = Reply(
    451, "Too many messages in transfer from your address, try again later", "4.7.1"
)
OUT_OF_MEMORY = Reply(452, "Insufficient system storage", "4.3.1")
MEMORY_RULE = "limits.memory"
"""The rule id of a refusal for the memory budget, in the decision line."""
DATA_PER_IP_RULE = "limits.data_per_ip"
"""The rule id of a refusal for ``limits.data_per_ip``, in the decision line."""


class ConnectionCounter:
    """Open connections: how many in total and how many per client address."""

    def __init__(self) -> None:
        self.total = 0
        self.per_ip: Counter[IPAddress] = Counter()
        self.data_per_ip: Counter[IPAddress] = Counter()
        """DATA phases under way, per client address (trusted clients are not counted)."""

    def open(self, limit: int) -> bool:
        """Count a new connection; False (and not counted) when ``limit`` are already open."""
        if self.total >= limit:
            return False
        self.total += 1
        return True

    def close(self) -> None:
        """Forget a connection that :meth:`open` counted."""
        self.total -= 1

    def claim(self, ip: IPAddress, limit: int) -> bool:
        """Count ``ip``'s connection; False (and not counted) when it already has ``limit``."""
        return _take(self.per_ip, ip, limit)

    def release(self, ip: IPAddress) -> None:
        """Forget a connection of ``ip`` that :meth:`claim` counted."""
        _give_back(self.per_ip, ip)

    def claim_data(self, ip: IPAddress, limit: int) -> bool:
        """Count a DATA phase of ``ip``; False (and not counted) when it already has ``limit``."""
        return _take(self.data_per_ip, ip, limit)

    def release_data(self, ip: IPAddress) -> None:
        """Forget a DATA phase of ``ip`` that :meth:`claim_data` counted."""
        _give_back(self.data_per_ip, ip)


# An address is hashed on every dict access (ipaddress computes hash(hex(int)) each
# time), four times a message each way: one read and one write each, no __missing__.
def _take(counts: Counter[IPAddress], ip: IPAddress, limit: int) -> bool:
    held = counts.get(ip, 0)
    if held >= limit:
        return False
    counts[ip] = held + 1
    return True


def _give_back(counts: Counter[IPAddress], ip: IPAddress) -> None:
    held = counts.get(ip, 0) - 1
    if held <= 0:
        counts.pop(ip, None)
    else:
        counts[ip] = held


class MemoryBudget:
    """The bytes of message data the process holds, against ``limits.memory``.

    The limit is passed to each check (it comes from the policy a connection
    started with, so a reload changes it for new DATA phases at once).
    """

    def __init__(self) -> None:
        self.in_flight = 0
        """Bytes charged now: DATA buffers being filled and messages not yet answered."""

    def has_room(self, limit: int) -> bool:
        """True while less than ``limit`` is charged: a new DATA phase may start."""
        return self.in_flight < limit

    def charge(self, size: int, limit: int) -> bool:
        """Charge ``size`` bytes; False (and nothing charged) if that would pass ``limit``."""
        if self.in_flight + size > limit:
            return False
        self.in_flight += size
        return True

    def release(self, size: int) -> None:
        """Give back ``size`` bytes that :meth:`charge` took."""
        self.in_flight -= size


PROCESS_BUDGET = MemoryBudget()
"""The budget of this process (a forked worker starts its own at zero)."""


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD = 1024 * 1024
"""Allocations from this size up are mapped on their own (see :func:`tune_allocator`)."""


def tune_allocator() -> bool:
    """Have glibc map every buffer of ``MMAP_THRESHOLD`` or more on its own; True if it took.

    By default glibc raises that threshold to the size of the last big block
    freed (up to 32 MB), so once a first round of big messages is gone, the
    next round's buffers come from the heap, which fragments and is not given
    back: measured, the peak RSS of a second round of 20 x 10 MB messages was
    1.4-1.5 x the bytes in flight instead of 0.9 x. A fixed threshold keeps
    every message buffer in its own mapping, returned to the system when freed
    (and grown in place by ``mremap``). Elsewhere than glibc it does nothing.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    if not ok:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused")
    return ok
