"""dnsbl: weighted DNS block and allow lists, in the style of Postfix's postscreen.

Hooks: ``on_connect`` (starts the lookups; decides there with
``stage: connect``), ``on_mail`` (publishes the result; decides or scores with
``stage: mail``), ``on_rcpt`` (decides with ``stage: rcpt``, the default, so
the log shows sender and recipients and ``exempt_recipients`` such as
postmaster still get mail), ``on_disconnect`` (drops a lookup still running).

Each site is written as postscreen writes it: ``zone[=filter][*weight]``.

- ``zen.example*2``: a listing in ``zen.example`` weighs 2 (the default is 1);
- ``bl.example=127.0.0.[2..11]``: only replies in that pattern count. Each of
  the four parts is a number or a bracketed list of numbers and ranges, such
  as ``[2;4;10..12]``; without a filter any reply counts;
- ``wl.example=127.0.[0..15].[0..255]*-2``: a negative weight makes an allow
  list; listed clients get their score lowered.

The client's address is looked up in every zone at once (``d.c.b.a.zone`` for
IPv4, reversed nibbles for IPv6) through the gateway's shared resolver; each
site adds its weight once when a reply matches its filter. When the total
reaches ``threshold``, ``action`` applies: ``reject``, ``tempfail``, or
``score`` (add ``total * score_factor`` to the message's score, once per
transaction). A zone that times out or fails counts as not listed (and is
logged); answers are cached per zone and address, listings for their DNS TTL
(at most ``cache_ttl``), non-listings for ``cache_ttl``.

Rule ids:

================  ============================================================
``dnsbl.listed``  the weighted total reached ``threshold`` (reject, tempfail or
                  tag, by ``action``)
================  ============================================================

Replies: ``550 5.7.1 Service unavailable; client [IP] blocked using ZONE``
(554 at connect); with ``action: tempfail``, 450 (421 at connect) and 4.7.1.

Config (defaults in brackets): ``sites`` (required), ``threshold`` [1],
``action`` [reject], ``stage`` [rcpt; mail for ``score``], ``score_factor``
[1.0], ``exempt_trusted`` [true], ``exempt_networks`` [none],
``exempt_recipients`` [none]: addresses or domains, ``cache_ttl`` [5m],
``cache_size`` [10000].

Publishes ``envelope.results["dnsbl"]``, a :class:`DnsblResult` (total and the
sites that listed the client), at MAIL FROM.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator, model_validator

from mailgate import (
    DnsTempError,
    Duration,
    Envelope,
    IPAddress,
    NetworkField,
    PluginConfig,
    Resolver,
    Rule,
    Session,
    StartupContext,
    Verdict,
    address_domain,
    hookimpl,
    is_exempt,
    unmapped,
)
from mailgate.plugins._state import refusal

log = logging.getLogger("mailgate.plugins")

RESULT = "dnsbl"
NOTE = "dnsbl"
_SITE = re.compile(
    r"^(?P<zone>[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)+)\.?(?:=(?P<filter>[^*]+))?(?:\*(?P<weight>-?\d+))?$"
)
_OCTET = r"(\d{1,3}|\[[^\]]+\])"
_FILTER = re.compile(rf"^{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}$")


def _octet_values(text: str) -> frozenset[int]:
    items = text[1:-1].split(";") if text.startswith("[") else [text]
    values: set[int] = set()
    for item in items:
        low, sep, high = item.strip().partition("..")
        try:
            first, last = int(low), int(high) if sep else int(low)
        except ValueError:
            raise ValueError(f"bad number or range {item!r}") from None
        if not 0 <= first <= last <= 255:
            raise ValueError(f"bad range {item!r} (0..255, low to high)")
        values.update(range(first, last + 1))
    return frozenset(values)


@dataclass(frozen=True, slots=True)
class Site:
    """One ``zone[=filter][*weight]`` entry."""

    zone: str
    weight: int
    octets: tuple[frozenset[int], ...] | None
    text: str

    @classmethod
    def parse(cls, text: str) -> Site:
        """Parse postscreen's syntax; raise ValueError saying what is wrong."""
        m = _SITE.match(text.strip())
        if m is None:
            raise ValueError(f"expected zone[=filter][*weight] like zen.example*2, got {text!r}")
        octets = None
        if m.group("filter"):
            f = _FILTER.match(m.group("filter"))
            if f is None:
                raise ValueError(f"expected a filter like 127.0.0.[2..11] in {text!r}")
            octets = tuple(_octet_values(part) for part in f.groups())
        return cls(m.group("zone").lower(), int(m.group("weight") or 1), octets, text.strip())

    def matches(self, addresses: list[str]) -> list[str]:
        """The replies that this site's filter lets count."""
        if self.octets is None:
            return addresses
        out = []
        for address in addresses:
            parts = address.split(".")
            if len(parts) == 4 and all(
                p.isdigit() and int(p) in allowed
                for p, allowed in zip(parts, self.octets, strict=True)
            ):
                out.append(address)
        return out


@dataclass(frozen=True, slots=True)
class DnsblResult:
    """The weighted verdict of the block and allow lists for one client."""

    client_ip: str
    total: int
    hits: tuple[tuple[str, int, tuple[str, ...]], ...]
    """(site as written, weight, the matching replies) per site that listed the client."""
    errors: tuple[str, ...] = ()
    """Zones that could not be asked (timeout, SERVFAIL): counted as not listed."""


class DnsblConfig(PluginConfig):
    """The ``plugins.dnsbl`` section."""

    sites: list[str] = Field(min_length=1)
    threshold: int = 1
    action: Literal["reject", "tempfail", "score"] = "reject"
    stage: Literal["connect", "mail", "rcpt"] | None = None
    score_factor: float = 1.0
    exempt_trusted: bool = True
    exempt_networks: list[NetworkField] = Field(default_factory=list)
    exempt_recipients: list[str] = Field(default_factory=list)
    cache_ttl: Duration = 300.0
    cache_size: int = Field(default=10_000, ge=0)

    @field_validator("sites")
    @classmethod
    def _parse_sites(cls, sites: list[str]) -> list[str]:
        for site in sites:
            Site.parse(site)
        return sites

    @model_validator(mode="after")
    def _check_stage(self) -> DnsblConfig:
        if self.stage is None:
            object.__setattr__(self, "stage", "mail" if self.action == "score" else "rcpt")
        if self.action == "score" and self.stage == "rcpt":
            raise ValueError("action: score adds to the message once: use stage mail or connect")
        return self


def query_name(ip: IPAddress, zone: str) -> str:
    """``2.0.0.127.zone`` for 127.0.0.2; reversed nibbles for IPv6."""
    reverse = unmapped(ip).reverse_pointer.removesuffix(".in-addr.arpa").removesuffix(".ip6.arpa")
    return f"{reverse}.{zone}"


class Dnsbl:
    """Look the client up in weighted DNS lists; refuse or score past a threshold."""

    name = "dnsbl"
    Config = DnsblConfig
    RULES = (Rule("dnsbl.listed", "reject", "the weighted total reached threshold (by action)"),)

    def __init__(self, config: DnsblConfig) -> None:
        self.config = config
        self.sites = [Site.parse(s) for s in config.sites]
        self.zones = sorted({s.zone for s in self.sites})
        self.exempt_recipients = frozenset(r.lower() for r in config.exempt_recipients)
        self.dns: Resolver | None = None
        self._cache: OrderedDict[tuple[str, str], tuple[float, list[str]]] = OrderedDict()

    @hookimpl
    def on_startup(self, context: StartupContext) -> None:
        """Take the shared resolver."""
        self.dns = context.dns

    async def _zone(self, ip: IPAddress, zone: str) -> list[str]:
        """The A records for ``ip`` in ``zone`` (empty when not listed), cached."""
        assert self.dns is not None, "on_startup has not run"
        key = (zone, str(ip))
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            self._cache.move_to_end(key)
            return cached[1]
        answer = await self.dns.query(query_name(ip, zone), "A")
        addresses = [rdata.to_text() for rdata in answer] if answer is not None else []
        ttl = min(answer.rrset.ttl, self.config.cache_ttl) if answer and answer.rrset else None
        if self.config.cache_size:
            self._cache[key] = (
                now + (ttl if ttl is not None else self.config.cache_ttl),
                addresses,
            )
            self._cache.move_to_end(key)
            while len(self._cache) > self.config.cache_size:
                self._cache.popitem(last=False)
        return addresses

    async def lookup(self, ip: IPAddress, txn: str = "-") -> DnsblResult:
        """Ask every zone at once and add up the weights of the sites that match.

        ``txn`` (the session id) goes on the warning for a zone that does not answer.
        """
        replies = await asyncio.gather(
            *(self._zone(ip, zone) for zone in self.zones), return_exceptions=True
        )
        by_zone: dict[str, list[str]] = {}
        errors = []
        for zone, reply in zip(self.zones, replies, strict=True):
            if isinstance(reply, DnsTempError):
                log.warning(
                    "dnsbl zone not answered: txn=%s plugin=%s zone=%s client=%s error=%s",
                    txn,
                    self.name,
                    zone,
                    ip,
                    reply,
                )
                errors.append(zone)
            elif isinstance(reply, BaseException):
                raise reply
            else:
                by_zone[zone] = reply
        hits = []
        for site in self.sites:
            matched = site.matches(by_zone.get(site.zone, []))
            if matched:
                hits.append((site.text, site.weight, tuple(matched)))
        total = sum(weight for _, weight, _ in hits)
        return DnsblResult(str(ip), total, tuple(hits), tuple(errors))

    def _exempt(self, session: Session) -> bool:
        return is_exempt(session, self.config.exempt_networks, trusted=self.config.exempt_trusted)

    async def _result(self, session: Session) -> DnsblResult | None:
        task = session.notes.get(NOTE)
        return None if task is None else await asyncio.shield(task)

    def _verdict(
        self, result: DnsblResult, stage: Literal["connect", "mail", "rcpt"]
    ) -> Verdict | None:
        if result.total < self.config.threshold:
            return None
        listed = [
            site for site, weight, _ in sorted(result.hits, key=lambda h: -h[1]) if weight > 0
        ]
        reason = (
            f"client {result.client_ip} scores {result.total} "
            f"(threshold {self.config.threshold}): {', '.join(listed)}"
        )
        if self.config.action == "score":
            return Verdict.tag(
                "dnsbl.listed", reason, score=result.total * self.config.score_factor
            )
        zone = Site.parse(listed[0]).zone if listed else "DNS lists"
        return refusal(
            self.config.action,
            stage,
            "dnsbl.listed",
            reason,
            f"Service unavailable; client [{result.client_ip}] blocked using {zone}",
        )

    @hookimpl
    async def on_connect(self, session: Session) -> Verdict | None:
        """Start the lookups (the banner does not wait unless ``stage: connect``)."""
        if self._exempt(session):
            return None
        session.notes[NOTE] = asyncio.ensure_future(self.lookup(session.client_ip, session.id))
        if self.config.stage != "connect":
            return None
        result = await self._result(session)
        return None if result is None else self._verdict(result, "connect")

    @hookimpl
    async def on_mail(self, session: Session, envelope: Envelope) -> Verdict | None:
        """Publish the result; refuse or score here with ``stage: mail``."""
        result = await self._result(session)
        if result is None:
            return None
        envelope.results[RESULT] = result
        return self._verdict(result, "mail") if self.config.stage == "mail" else None

    @hookimpl
    async def on_rcpt(self, session: Session, recipient: str) -> Verdict | None:
        """Refuse here with ``stage: rcpt``, except for ``exempt_recipients``."""
        if self.config.stage != "rcpt":
            return None
        rcpt = recipient.lower()
        if rcpt in self.exempt_recipients or address_domain(rcpt) in self.exempt_recipients:
            return None
        result = await self._result(session)
        return None if result is None else self._verdict(result, "rcpt")

    @hookimpl
    def on_disconnect(self, session: Session) -> None:
        """Drop a lookup the session did not wait for."""
        task = session.notes.pop(NOTE, None)
        if task is None:
            return
        if task.done():
            if not task.cancelled():
                task.exception()  # retrieved, so asyncio does not warn about it
        else:
            task.cancel()
