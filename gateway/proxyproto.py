"""PROXY protocol v1/v2 on a listener: learn the real client address from a trusted proxy.

A listener with ``proxy_protocol: true`` sits behind a TCP load balancer
(HAProxy, an AWS NLB, ...). Every connection must come from one of the
listener's ``trusted_proxies`` and start with a PROXY header (v1 text or v2
binary), which names the real client; that address then drives every policy
decision (trusted networks, DNSBLs, rate limits, SPF, the Received header).

- A connection from any other address is refused with ``554 5.7.1`` before
  anything is read: only a trusted proxy may speak for a client.
- A trusted proxy that sends no header within ``proxy_timeout``, or a bad
  one, is disconnected without a reply (as aiosmtpd itself does).
- A v2 ``LOCAL`` header (health checks) or a v1 ``UNKNOWN`` one keeps the
  proxy's own address.

The header is read here, before the connect stage, because aiosmtpd's own
PROXY support runs inside its command loop, after our connect stage would
already have judged the load balancer's address. The parsing is aiosmtpd's
(``aiosmtpd.proxy_protocol.get_proxy``).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
from typing import Protocol

from aiosmtpd.proxy_protocol import get_proxy

from mailgate.policy import Listener
from mailgate.verdict import Reply

UNTRUSTED = Reply(554, "Connection refused: not a trusted proxy", "5.7.1")


class ByteReader(Protocol):
    """The reads the PROXY header parser makes (``asyncio.StreamReader`` has them)."""

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes."""

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        """Up to and including ``separator``."""

    async def read(self, n: int = -1) -> bytes:
        """At least one and at most ``n`` bytes."""


class ProxyRefused(Exception):
    """The connection may not go on; ``reply`` (if any) is sent before closing."""

    def __init__(self, reason: str, reply: Reply | None = None) -> None:
        super().__init__(reason)
        self.reply = reply


def peer_ip(peer: tuple[str, int]) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address of a socket peer, with any IPv6 zone and IPv4 mapping removed."""
    return _address(peer[0])


@functools.lru_cache(maxsize=1024)
def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """:func:`peer_ip` of a host string (the same few clients connect again and again)."""
    ip = ipaddress.ip_address(host.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


async def real_client(
    reader: ByteReader, peer: tuple[str, int], listener: Listener
) -> tuple[str, int]:
    """Read the PROXY header from ``reader``; return the client's (address, port).

    Raises :class:`ProxyRefused` when ``peer`` is not a trusted proxy or the
    header is missing, late or malformed.
    """
    if not listener.is_trusted_proxy(peer_ip(peer)):
        raise ProxyRefused(f"{peer[0]} is not in trusted_proxies", UNTRUSTED)
    try:
        async with asyncio.timeout(listener.proxy_timeout):
            data = await get_proxy(reader)
    except TimeoutError:
        raise ProxyRefused(f"no PROXY header within {listener.proxy_timeout:g}s") from None
    except (asyncio.IncompleteReadError, ConnectionError):
        raise ProxyRefused("connection closed before the PROXY header") from None
    if not data.valid:
        raise ProxyRefused(f"bad PROXY header: {data.error or 'unrecognized'}")
    if isinstance(data.src_addr, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(data.src_addr), int(data.src_port or 0)
    return peer
