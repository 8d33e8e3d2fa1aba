"""Sender-authentication results (SPF, DKIM, DMARC, ARC) and the Authentication-Results header.

The auth plugins publish these typed results on the transaction, under fixed
keys of ``Envelope.results``, for each other and for site plugins:

=====================  ==========================  ===================
key                    type                        published by
=====================  ==========================  ===================
``results["spf"]``     :class:`SpfResult`          ``spf``
``results["dkim"]``    ``tuple[DkimResult, ...]``  ``dkim`` (one per signature)
``results["arc"]``     :class:`ArcResult`          ``arc`` (or ``dmarc``)
``results["dmarc"]``   :class:`DmarcResult`        ``dmarc``
=====================  ==========================  ===================

The clauses are rendered by ``authres`` (quoting, property names).

:func:`header_value` turns whatever is there into one RFC 8601
``Authentication-Results`` value with our hostname as authserv-id (the
``auth_results`` plugin adds it), and :func:`authserv_id` reads the
authserv-id of an incoming header so that forged ones can be removed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import authres
import authres.arc
import authres.dkim_b
import authres.dmarc

SPF = "spf"
DKIM = "dkim"
ARC = "arc"
DMARC = "dmarc"


@dataclass(frozen=True, slots=True)
class SpfResult:
    """An RFC 7208 check of one identity."""

    result: str
    """pass, fail, softfail, neutral, none, temperror or permerror."""
    identity: str
    """``mailfrom``, or ``helo`` when the null sender made us check postmaster@HELO."""
    domain: str
    """The domain whose policy was evaluated."""
    sender: str
    """The address checked: the MAIL FROM, or ``postmaster@<helo>``."""
    client_ip: str
    helo: str
    explanation: str = ""
    received_spf: str = ""
    """The ``Received-SPF`` value (RFC 7208 §9.1)."""


@dataclass(frozen=True, slots=True)
class DkimResult:
    """The verification of one DKIM-Signature."""

    result: str
    """pass, fail, neutral, temperror or permerror."""
    domain: str
    """The signing domain, ``d=``."""
    selector: str
    """``s=``."""
    algorithm: str = ""
    """``a=``, e.g. rsa-sha256 or ed25519-sha256."""
    reason: str = ""
    """Why it did not pass, in a few words."""
    b: str = ""
    """The first characters of ``b=``, to tell signatures apart (RFC 6008)."""


@dataclass(frozen=True, slots=True)
class ArcResult:
    """The validation of the ARC chain (RFC 8617)."""

    result: str
    """none (no chain), pass or fail; temperror when a key lookup failed for now."""
    instances: int = 0
    sealers: tuple[str, ...] = ()
    """The ``d=`` of each ARC-Seal, from instance 1 up."""
    reason: str = ""

    @property
    def last_sealer(self) -> str:
        """The sealer of the newest instance (who handed the message on), or ``""``."""
        return self.sealers[-1] if self.sealers else ""


@dataclass(frozen=True, slots=True)
class DmarcResult:
    """The DMARC (RFC 7489) evaluation of the From domain."""

    result: str
    """pass, fail, none (no policy), temperror or permerror."""
    from_domain: str
    org_domain: str = ""
    policy: str = ""
    """The requested policy that applies (p=, or sp= for a subdomain): none, quarantine, reject."""
    disposition: str = "none"
    """What the policy asks after ``pct`` sampling: none, quarantine or reject."""
    spf_aligned: bool = False
    dkim_aligned: bool = False
    reason: str = ""
    override: str = ""
    """Why a failing policy was not applied (a trusted ARC sealer), or ``""``."""


def _clean(text: str, limit: int = 200) -> str:
    """Printable ASCII only, no parentheses (they delimit comments), bounded."""
    text = re.sub(r"[^\x20-\x7e]|[()\\]", "?", text)
    return text[:limit]


def _spf(result: SpfResult) -> Any:
    if result.identity == "helo":
        return authres.SPFAuthenticationResult(result=result.result, smtp_helo=result.helo)
    return authres.SPFAuthenticationResult(result=result.result, smtp_mailfrom=result.sender)


def _dkim(result: DkimResult) -> Any:
    clause = authres.dkim_b.DKIMAuthenticationResult(
        result=result.result,
        result_comment=_clean(result.reason) or None,
        header_d=result.domain or None,
        header_b=result.b[:8] or None,
    )
    # dkim_b's constructor lacks header.s / header.a; the properties exist on the class.
    if result.selector:
        clause.header_s = result.selector
    if result.algorithm:
        clause.header_a = result.algorithm
    return clause


def _arc(result: ArcResult) -> Any:
    comment = f"i={result.instances}" if result.instances else None
    if result.reason and result.result != "pass":
        comment = _clean(result.reason)
    if result.result == "temperror":
        # RFC 8617 registers only none/pass/fail for arc; a chain we could not check is not a pass.
        return authres.arc.ARCAuthenticationResult(result="fail", result_comment="temperror")
    return authres.arc.ARCAuthenticationResult(
        result=result.result,
        result_comment=comment,
        header_as_d=result.last_sealer or None,
    )


def _dmarc(result: DmarcResult) -> Any:
    comment = f"p={result.policy} dis={result.disposition}" if result.policy else None
    if result.override:
        comment = f"{comment} override={_clean(result.override)}"
    return authres.dmarc.DMARCAuthenticationResult(
        result=result.result,
        result_comment=comment,
        reason=_clean(result.reason) if result.result not in ("pass", "none") else None,
        header_from=result.from_domain or None,
    )


def header_value(authserv_id: str, results: Mapping[str, Any]) -> str | None:
    """The ``Authentication-Results`` value for ``results``; None if no auth check ran."""
    clauses: list[Any] = []
    spf = results.get(SPF)
    if isinstance(spf, SpfResult):
        clauses.append(_spf(spf))
    dkim = results.get(DKIM)
    if dkim == ():
        clauses.append(authres.DKIMAuthenticationResult(result="none"))
    clauses.extend(_dkim(r) for r in dkim or () if isinstance(r, DkimResult))
    dmarc = results.get(DMARC)
    if isinstance(dmarc, DmarcResult):
        clauses.append(_dmarc(dmarc))
    arc = results.get(ARC)
    if isinstance(arc, ArcResult):
        clauses.append(_arc(arc))
    if not clauses:
        return None
    # One clause per folded line: several signatures stay within the line limit.
    return authserv_id + "".join(f";\r\n\t{clause}" for clause in clauses)


def _skip_cfws(text: str) -> str:
    """``text`` without leading white space and (possibly nested) comments."""
    i, depth = 0, 0
    while i < len(text):
        c = text[i]
        if c == "\\" and depth:
            i += 2
            continue
        if c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
        elif not depth and not c.isspace():
            break
        i += 1
    return text[i:]


def authserv_id(value: str) -> str:
    """The authserv-id an ``Authentication-Results`` value claims, lower-cased.

    Reads leniently (leading comments and white space skipped, a quoted
    string unquoted), so that a malformed forgery is still recognised.
    """
    text = _skip_cfws(value)
    if text.startswith('"'):
        end = text.find('"', 1)
        return text[1 : end if end > 0 else None].strip().lower()
    return re.split(r"[\s;(]", text, maxsplit=1)[0].lower()
