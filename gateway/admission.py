"""Who may hold a connection: limits on connections in total and per client address.

One :class:`ConnectionCounter` is shared by every listener of a process (the
``workers`` of a multi-process gateway count separately). The protocol
(``mailgate.smtpserver``) takes a slot when a connection is accepted and checks the
total there, before anything else runs; it checks the per-address limit just
before the greeting, once the real client address is known (after a PROXY
header). Clients in ``trusted_networks`` are exempt from the per-address limit,
as Postfix exempts ``$mynetworks``. A refused client gets ``421 4.7.0`` and is
disconnected.
"""

from __future__ import annotations

from collections import Counter

from mailgate.context import IPAddress
from mailgate.verdict import Reply

TOO_MANY_CONNECTIONS = Reply(421, "Too many connections, try again later", "4.7.0")
TOO_MANY_FROM_YOU = Reply(421, "Too many connections from your address, try again later", "4.7.0")


class ConnectionCounter:
    """Open connections: how many in total and how many per client address."""

    def __init__(self) -> None:
        self.total = 0
        self.per_ip: Counter[IPAddress] = Counter()

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
        if self.per_ip[ip] >= limit:
            return False
        self.per_ip[ip] += 1
        return True

    def release(self, ip: IPAddress) -> None:
        """Forget a connection of ``ip`` that :meth:`claim` counted."""
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]
