"""Tell the upstream who the real client is: XCLIENT, or XFORWARD for its logs.

Behind mailgate the upstream sees every message come from the gateway's
address. With ``upstream.client_identity`` it learns the real client instead:

``xclient``
    If the upstream advertises ``XCLIENT`` (Postfix does to the hosts in
    ``smtpd_authorized_xclient_hosts``), mailgate sends, outside any
    transaction, ``XCLIENT NAME=... HELO=... PROTO=... ADDR=...`` (only the
    attributes it advertises, xtext-encoded, ADDR last, as Postfix's
    XCLIENT_README asks), expects ``220`` and greets again with EHLO and the
    client's HELO name. The upstream then applies its own access rules to the
    real client, as if it had connected directly. An announced connection is
    reused only for the same client (address and HELO name); after XCLIENT the
    upstream no longer sees the gateway, so it cannot be announced again. If
    the upstream offers no XCLIENT, mailgate falls back to XFORWARD.
``xforward``
    ``XFORWARD NAME=... ADDR=... PORT=... PROTO=... HELO=...`` before each
    MAIL, when advertised (``smtpd_authorized_xforward_hosts``): the upstream
    logs and records the real client, but judges the gateway.

NAME is the client's verified reverse name: the PTR name whose own A/AAAA
records include the address (looked up through the shared resolver, once per
identity), else ``[UNAVAILABLE]`` (no name) or ``[TEMPUNAVAIL]`` (DNS failed).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import dns.reversename

from mailgate.context import IPAddress, Session
from mailgate.dns import DnsTempError, Resolver

UNAVAILABLE = "[UNAVAILABLE]"
TEMPUNAVAIL = "[TEMPUNAVAIL]"
_MAX_HELO = 255  # keeps every command well under the 512-character SMTP line limit


@dataclass(slots=True)
class ClientIdentity:
    """The client a transaction came from, as the upstream should see it."""

    addr: IPAddress
    port: int = field(compare=False)
    """Informational only: a pooled connection announced for this client stays usable."""
    helo: str | None
    proto: str
    """``SMTP`` (HELO) or ``ESMTP`` (EHLO), the values XCLIENT accepts."""
    name: str | None = field(default=None, compare=False)
    """The verified reverse name; None until looked up."""

    @classmethod
    def of(cls, session: Session) -> ClientIdentity:
        """The identity of a live session."""
        proto = "ESMTP" if session.esmtp else "SMTP"
        return cls(session.client_ip, session.client_port, session.helo, proto)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict, for the queue's spool."""
        return {"addr": str(self.addr), "port": self.port, "helo": self.helo, "proto": self.proto}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClientIdentity:
        """The inverse of :meth:`to_json`."""
        return cls(
            ipaddress.ip_address(data["addr"]), int(data["port"]), data["helo"], data["proto"]
        )

    async def resolve_name(self, resolver: Resolver) -> str:
        """Look up (once) and return the verified reverse name, or a bracketed placeholder."""
        if self.name is None:
            self.name = await _verified_name(resolver, self.addr)
        return self.name


async def _verified_name(resolver: Resolver, addr: IPAddress) -> str:
    try:
        answer = await resolver.query(dns.reversename.from_address(str(addr)).to_text(), "PTR")
        if answer is None:
            return UNAVAILABLE
        rdtype = "AAAA" if addr.version == 6 else "A"
        for rdata in answer:
            name: str = rdata.to_text().rstrip(".")
            addresses = await resolver.addresses(name, rdtype) or []
            if any(ipaddress.ip_address(a) == addr for a in addresses):
                return name
    except DnsTempError:
        return TEMPUNAVAIL
    return UNAVAILABLE


def xtext(value: str) -> str:
    """RFC 3461 xtext: printable ASCII except ``+`` and ``=`` as is, all else ``+HH``."""
    return "".join(
        ch if "!" <= ch <= "~" and ch not in "+=" else "".join(f"+{b:02X}" for b in ch.encode())
        for ch in value
    )


def _addr(addr: IPAddress) -> str:
    return f"IPV6:{addr}" if addr.version == 6 else str(addr)


def command(verb: str, identity: ClientIdentity, advertised: str) -> str | None:
    """``XCLIENT``/``XFORWARD`` with the attributes the upstream ``advertised`` (its EHLO line).

    Returns None when the upstream advertises none of them.
    """
    supported = set(advertised.upper().split())
    helo = (identity.helo or UNAVAILABLE)[:_MAX_HELO]
    attributes = [
        ("NAME", identity.name or UNAVAILABLE),
        ("HELO", helo),
        ("PROTO", identity.proto),
        ("PORT", str(identity.port)),
        ("ADDR", _addr(identity.addr)),
    ]
    parts = [f"{key}={xtext(value)}" for key, value in attributes if key in supported]
    return f"{verb} {' '.join(parts)}" if parts else None
