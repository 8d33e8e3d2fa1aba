"""dmarc: RFC 7489 evaluation of the From domain, using the SPF and DKIM results.

Hook: ``on_data``. It reads ``envelope.results["spf"]`` and ``["dkim"]``, so
list it after ``spf``, ``dkim`` and ``arc`` in the policy (the gateway logs a
warning at startup otherwise). Without the ``spf`` or ``dkim`` plugin that
side simply never aligns. Clients in ``trusted_networks`` are not checked.

1. The From domain: exactly one From header whose addresses share one domain
   (otherwise permerror; no From domain at all is none).
2. Its organizational domain, by the Public Suffix List (``publicsuffixlist``,
   offline).
3. The policy: the ``_dmarc.<from domain>`` TXT record, else
   ``_dmarc.<organizational domain>``; exactly one ``v=DMARC1`` record must
   be there. ``p=`` applies, or ``sp=`` when the record was found at the
   organizational domain for a subdomain. A lookup that fails for now is
   temperror. A record without a valid ``p=`` is permerror (or ``p=none`` if
   it has ``rua=``, as §6.6.3 says).
4. Alignment: SPF passed for a domain that matches the From domain (strict,
   ``aspf=s``) or shares its organizational domain (relaxed, the default);
   likewise any passing DKIM signature's ``d=`` (``adkim``). Either one
   aligned is a pass.
5. A failure gets the policy's disposition, after ``pct=`` sampling (a
   message outside the sample gets the next milder policy).
6. With ``trusted_arc_sealers``, a failure of mail whose ARC chain passes and
   whose newest seal is by a listed sealer is not enforced (RFC 7489 §7.2,
   local policy override; written as ``override=`` in Authentication-Results).

Rule ids:

=====================  ===============================================================
``dmarc.pass``         aligned SPF or DKIM pass (tag)
``dmarc.fail``         failed, but the disposition is none or ``enforce`` is off (tag)
``dmarc.quarantine``   failed, p=quarantine, enforced: tag with ``quarantine_score``
``dmarc.reject``       failed, p=reject, enforced: ``550 5.7.1``
``dmarc.arc_override`` failed, but forwarded by a trusted ARC sealer (tag)
``dmarc.temperror``    the policy lookup failed for now (tag, or ``451 4.7.1``)
``dmarc.permerror``    the From header or the DMARC record is unusable (tag)
=====================  ===============================================================

Config:

=======================  =========  ============================================
``enforce``              ``false``  apply p=reject (refuse) and p=quarantine (score)
``quarantine_score``     ``5``      score a p=quarantine failure adds when enforced
``temperror``            ``tag``    ``tag`` or ``tempfail`` (451 4.7.1)
``trusted_arc_sealers``  ``[]``     ARC sealer domains (ARC-Seal d=) whose chains
                                    excuse a DMARC failure
=======================  =========  ============================================

Publishes ``envelope.results["dmarc"]``, a ``mailgate.authresults.DmarcResult``.
"""

from __future__ import annotations

import functools
import logging
import random
import re
from typing import Literal

from publicsuffixlist import PublicSuffixList
from pydantic import Field

from mailgate import (
    DnsTempError,
    Envelope,
    Message,
    PluginConfig,
    Resolver,
    Rule,
    Session,
    StartupContext,
    Verdict,
    address_domain,
    from_addresses,
    hookimpl,
)
from mailgate.authresults import ARC, DKIM, DMARC, SPF, ArcResult, DmarcResult, SpfResult
from mailgate.plugins.arc import verify_arc

log = logging.getLogger("mailgate.plugins.dmarc")

POLICIES = ("none", "quarantine", "reject")
_DMARC1 = re.compile(r"^v\s*=\s*DMARC1\s*(;|$)")


@functools.cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """The registrable domain of ``domain`` by the Public Suffix List (itself if none)."""
    domain = domain.lower().rstrip(".")
    found: str | None = _psl().privatesuffix(domain)
    return found or domain


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    """DMARC identifier alignment: ``s`` exact, ``r`` same organizational domain."""
    a, b = identifier.lower().rstrip("."), from_domain.lower().rstrip(".")
    if not a or not b:
        return False
    return a == b if mode == "s" else organizational_domain(a) == organizational_domain(b)


def parse_record(text: str) -> dict[str, str]:
    """The tags of a DMARC record, names lower-cased, values stripped."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if eq and name.strip():
            tags.setdefault(name.strip().lower(), value.strip())
    return tags


class DmarcConfig(PluginConfig):
    """The ``plugins.dmarc`` section."""

    enforce: bool = False
    quarantine_score: float = 5.0
    temperror: Literal["tag", "tempfail"] = "tag"
    trusted_arc_sealers: list[str] = Field(default_factory=list)


class _NoPolicy(Exception):
    """A result reached before the policy could be applied."""

    def __init__(self, result: DmarcResult) -> None:
        super().__init__(result.reason)
        self.result = result


class Dmarc:
    """Evaluate DMARC for the From domain; enforce p=reject / p=quarantine when asked."""

    name = "dmarc"
    Config = DmarcConfig
    RULES = (
        Rule("dmarc.pass", "tag", "aligned SPF or DKIM pass"),
        Rule("dmarc.fail", "tag", "failed; disposition none, or enforce is off"),
        Rule("dmarc.quarantine", "tag", "failed, p=quarantine, enforced (quarantine_score)", 5.0),
        Rule("dmarc.reject", "reject", "failed, p=reject, enforced"),
        Rule("dmarc.arc_override", "tag", "failed, but forwarded by a trusted ARC sealer"),
        Rule("dmarc.temperror", "tag", "the policy lookup failed for now (or tempfail)"),
        Rule("dmarc.permerror", "tag", "the From header or the DMARC record is unusable"),
    )

    def __init__(self, config: DmarcConfig) -> None:
        self.config = config
        self.trusted_sealers = frozenset(d.lower().rstrip(".") for d in config.trusted_arc_sealers)
        self.random = random.Random()
        self.resolver: Resolver | None = None

    @hookimpl
    def on_startup(self, context: StartupContext) -> None:
        """Keep the shared resolver; load the Public Suffix List; check the plugin order."""
        self.resolver = context.dns
        _psl()
        order = list(context.policy.plugins)
        mine = order.index(self.name) if self.name in order else -1
        later = [p for p in (SPF, DKIM, ARC) if p in order and order.index(p) > mine]
        if later:
            log.warning(
                "dmarc runs before %s: list it after them in the policy, or it will not "
                "see their results",
                ", ".join(later),
            )

    @hookimpl
    async def on_data(
        self, session: Session, envelope: Envelope, message: Message
    ) -> Verdict | None:
        """Evaluate DMARC and turn the disposition into a verdict."""
        if session.trusted:
            return None
        try:
            result = await self.evaluate(envelope, message)
        except _NoPolicy as stop:
            result = stop.result
        envelope.results[DMARC] = result
        return self._verdict(result)

    async def evaluate(self, envelope: Envelope, message: Message) -> DmarcResult:
        """The DMARC result for this message (raises _NoPolicy for none/temperror/permerror)."""
        from_domain = self._from_domain(message)
        org = organizational_domain(from_domain)
        record, found_at = await self._lookup(from_domain, org)
        tags = parse_record(record)
        policy = tags.get("p", "").lower()
        if policy not in POLICIES:
            if not tags.get("rua"):
                raise _NoPolicy(DmarcResult("permerror", from_domain, org, reason="invalid p="))
            policy = "none"
        if found_at != from_domain and tags.get("sp", "").lower() in POLICIES:
            policy = tags["sp"].lower()
        spf = envelope.results.get(SPF)
        spf_aligned = (
            isinstance(spf, SpfResult)
            and spf.result == "pass"
            and aligned(spf.domain, from_domain, tags.get("aspf", "r"))
        )
        dkim_aligned = any(
            r.result == "pass" and aligned(r.domain, from_domain, tags.get("adkim", "r"))
            for r in envelope.results.get(DKIM, ())
        )
        if spf_aligned or dkim_aligned:
            return DmarcResult("pass", from_domain, org, policy, "none", spf_aligned, dkim_aligned)
        disposition = self._sample(policy, tags.get("pct", "100"))
        reason = "no aligned SPF or DKIM pass"
        override = ""
        if disposition != "none" and self.trusted_sealers:
            arc = await self._arc(envelope, message)
            if arc.result == "pass" and arc.last_sealer in self.trusted_sealers:
                override = f"trusted ARC sealer {arc.last_sealer}"
        return DmarcResult(
            "fail", from_domain, org, policy, disposition, False, False, reason, override
        )

    def _from_domain(self, message: Message) -> str:
        values = message.get_all("From")
        if not values:
            raise _NoPolicy(DmarcResult("none", "", reason="no From header"))
        if len(values) > 1:
            raise _NoPolicy(DmarcResult("permerror", "", reason="several From headers"))
        domains = {address_domain(addr) for addr in from_addresses(message)} - {""}
        if len(domains) > 1:
            raise _NoPolicy(DmarcResult("permerror", "", reason="From in several domains"))
        if not domains:
            raise _NoPolicy(DmarcResult("none", "", reason="no From domain"))
        return domains.pop()

    async def _lookup(self, from_domain: str, org: str) -> tuple[str, str]:
        """The DMARC record and the domain it was found at."""
        for domain in dict.fromkeys((from_domain, org)):
            try:
                records = await self._records(domain)
            except DnsTempError as exc:
                raise _NoPolicy(
                    DmarcResult("temperror", from_domain, org, reason=f"DNS: {exc}"[:120])
                ) from None
            if len(records) == 1:
                return records[0], domain
            if len(records) > 1:
                break  # several records: no policy (RFC 7489 §6.6.3)
        raise _NoPolicy(DmarcResult("none", from_domain, org, reason="no DMARC record"))

    async def _records(self, domain: str) -> list[str]:
        assert self.resolver is not None, "on_startup did not run"
        found = await self.resolver.txt(f"_dmarc.{domain}") or []
        texts = [t.decode("utf-8", "replace") for t in found]
        return [t for t in texts if _DMARC1.match(t)]

    def _sample(self, policy: str, pct_text: str) -> str:
        """The disposition after ``pct`` sampling (RFC 7489 §6.6.4)."""
        try:
            pct = min(max(int(pct_text), 0), 100)
        except ValueError:
            pct = 100
        if policy == "none" or self.random.random() * 100 < pct:
            return policy
        return "quarantine" if policy == "reject" else "none"

    async def _arc(self, envelope: Envelope, message: Message) -> ArcResult:
        arc = envelope.results.get(ARC)
        if not isinstance(arc, ArcResult):
            assert self.resolver is not None, "on_startup did not run"
            arc = envelope.results[ARC] = await verify_arc(self.resolver, message)
        return arc

    def _verdict(self, result: DmarcResult) -> Verdict | None:
        domain = result.from_domain
        reason = f"{domain or '-'}: {result.result}"
        if result.policy:
            reason += f" p={result.policy} disposition={result.disposition}"
        if result.reason:
            reason += f" ({result.reason})"
        if result.result == "none":
            return None
        if result.result == "temperror" and self.config.temperror == "tempfail":
            return Verdict.tempfail(
                "dmarc.temperror",
                reason,
                status="4.7.1",
                text=f"Cannot look up the DMARC policy of {domain} now, try again later",
            )
        if result.result != "fail":
            return Verdict.tag(f"dmarc.{result.result}", reason)
        if result.override:
            return Verdict.tag("dmarc.arc_override", f"{reason}; {result.override}")
        if not self.config.enforce or result.disposition == "none":
            return Verdict.tag("dmarc.fail", reason)
        if result.disposition == "quarantine":
            return Verdict.tag("dmarc.quarantine", reason, score=self.config.quarantine_score)
        return Verdict.reject(
            "dmarc.reject",
            reason,
            status="5.7.1",
            text=f"Email from {domain} rejected per its DMARC policy",
        )
