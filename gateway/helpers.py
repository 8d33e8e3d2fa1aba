"""Small helpers that many plugins need: domains of addresses, the client's address, exemptions.

Part of the public API (exported by ``mailgate``), so that every plugin reads
an address, a From domain or a client address the same way.
"""

from __future__ import annotations

import email.utils
import ipaddress
import re
from collections.abc import Iterable

from mailgate.context import IPAddress, Message, Session

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def address_domain(address: str) -> str:
    """The domain of ``user@domain``, lower-cased, without a trailing dot; ``""`` without ``@``."""
    if "@" not in address:
        return ""
    return address.rpartition("@")[2].lower().rstrip(".")


_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]"
_ADDR_SPEC = rf"{_ATEXT}+(?:\.{_ATEXT}+)*@{_ATEXT}+(?:\.{_ATEXT}+)*"
_NAME = r"[A-Za-z0-9]+(?: +[A-Za-z0-9]+)* *"
_PLAIN_MAILBOX = re.compile(rf"(?:{_NAME})?<({_ADDR_SPEC})>|({_ADDR_SPEC})")
"""``a@b.example`` or ``Some Name <a@b.example>``: what ``getaddresses`` reads as that address."""


def from_addresses(message: Message) -> list[str]:
    """The addresses (``user@domain``) of every From header, in order; no display names."""
    values = message.get_all("From")
    plain = [_PLAIN_MAILBOX.fullmatch(v) for v in values]
    if all(plain):  # the usual From: without the email package's address parser
        return [m[1] or m[2] for m in plain if m]
    return [addr for _name, addr in email.utils.getaddresses(values) if addr]


def from_domain(message: Message) -> str | None:
    """The one domain of the From header (RFC 5322.From, as DMARC uses it).

    None when there is no From header, more than one, or its mailboxes are in
    several domains or in none.
    """
    if len(message.get_all("From")) != 1:
        return None
    domains = {address_domain(a) for a in from_addresses(message)} - {""}
    return domains.pop() if len(domains) == 1 else None


def unmapped(ip: IPAddress) -> IPAddress:
    """``::ffff:192.0.2.1`` as ``192.0.2.1``; any other address unchanged."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def in_networks(ip: IPAddress, networks: Iterable[Network]) -> bool:
    """True when ``ip`` (IPv4-mapped addresses unwrapped) lies in one of ``networks``."""
    ip = unmapped(ip)
    return any(ip.version == net.version and ip in net for net in networks)


def is_exempt(session: Session, networks: Iterable[Network] = (), *, trusted: bool = True) -> bool:
    """True when the client is exempt from a check.

    :param networks: the plugin's ``exempt_networks``.
    :param trusted: when true (the usual ``exempt_trusted: true``), clients in
        the policy's ``trusted_networks`` are exempt too.
    """
    return (trusted and session.trusted) or in_networks(session.client_ip, networks)
