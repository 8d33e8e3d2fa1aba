"""dkim: verify every DKIM-Signature (RFC 6376) and sign mail relayed for trusted networks.

Hook: ``on_data``. For a client outside ``trusted_networks``, each
DKIM-Signature (up to ``max_signatures``, top first) is verified with dkimpy
and gets one result:

=============  ==============================================================
pass           the signature verifies
fail           the signature or the body hash does not verify
neutral        the signature cannot be processed (syntax error, missing tag,
               unknown algorithm, expired)
permerror      the key is missing (no TXT record), revoked, unparsable or too
               small (under 1024 bits for RSA)
temperror      the key lookup timed out or failed (SERVFAIL): never a fail
=============  ==============================================================

Keys are fetched first, all at once, through the shared resolver (async, TTL
cache); dkimpy then verifies against those keys without touching the network,
so a DNS failure can never be read as a bad signature. Verification is dkimpy's,
with the RSA signature step in OpenSSL (``mailgate.plugins._dkimverify``:
0.12 ms for a 4 KB message with RSA-2048, against dkimpy's 0.44 ms; a
differential test holds the two to the same answers). It runs on the event
loop for messages up to 256 KB and in a worker thread above that.

For a client in ``trusted_networks`` nothing is verified; if the From domain
(or a parent of it) is listed under ``sign``, the message is signed with that
domain's key, in a worker thread, and the ``DKIM-Signature`` is added.

Rule ids:

===================  =========================================================
``dkim.pass``        some signature passed (tag)
``dkim.fail``        no signature passed and the first one failed (tag, score)
``dkim.neutral``     likewise, first signature neutral (tag)
``dkim.permerror``   likewise, first signature permerror (tag)
``dkim.temperror``   likewise, first signature temperror (tag)
``dkim.reject``      a signature of a domain in ``reject_failed`` did not pass
                     and none of that domain did: ``550 5.7.20``
``dkim.tempfail``    the same, when the key lookup failed for now: ``451 4.7.20``
``dkim.signed``      the message was signed for a trusted client (tag)
===================  =========================================================

Config:

==================  ===========  ==============================================
``max_signatures``  ``5``        signatures verified per message (more are ignored)
``reject_failed``   ``[]``       domains whose failed signatures are refused
``scores``          fail: 1      score added by the tag of each result
``sign``            ``{}``       domain -> ``{selector, key, algorithm}``; ``key``
                                 is a file: an RSA PEM key (PKCS#1 or PKCS#8) for
                                 ``rsa-sha256`` (the default), or the base64
                                 seed that ``dknewkey --ktype ed25519`` writes for
                                 ``ed25519-sha256``
``sign_headers``    dkimpy's     header fields to sign (From is required)
                    default
==================  ===========  ==============================================

Publishes ``envelope.results["dkim"]``: a tuple of
``mailgate.authresults.DkimResult``, one per signature checked (empty when
the message is not signed).
"""

from __future__ import annotations

import asyncio
import binascii
import email.utils
import logging
import re
from pathlib import Path
from typing import Any, Literal

import dkim
import nacl.encoding
import nacl.exceptions
import nacl.signing
from dkim.crypto import UnparsableKeyError, parse_pem_private_key
from dkim.util import InvalidTagValueList, parse_tag_value
from pydantic import Field

from mailgate import (
    Envelope,
    Message,
    PluginConfig,
    Resolver,
    Rule,
    Session,
    StartupContext,
    Verdict,
    hookimpl,
)
from mailgate.authresults import DKIM, DkimResult
from mailgate.dnsadapters import KeyRecord, fetch_keys, signature_key_name
from mailgate.plugins._dkimverify import FastDKIM, evaluate_key

log = logging.getLogger("mailgate.plugins.dkim")

THREAD_ABOVE = 256 * 1024
"""Messages larger than this are verified in a worker thread, not on the event loop."""


class SigningKey(PluginConfig):
    """One domain's signing key."""

    selector: str
    key: str
    """Path of the private key file."""
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = "rsa-sha256"


class DkimConfig(PluginConfig):
    """The ``plugins.dkim`` section."""

    max_signatures: int = Field(default=5, ge=1, le=50)
    reject_failed: list[str] = Field(default_factory=list)
    scores: dict[str, float] = Field(default_factory=lambda: {"fail": 1.0})
    sign: dict[str, SigningKey] = Field(default_factory=dict)
    sign_headers: list[str] | None = None


def _load_key(domain: str, entry: SigningKey) -> bytes:
    """Read and check a signing key; raise ValueError with a clear message."""
    try:
        data = Path(entry.key).read_bytes()
    except OSError as exc:
        raise ValueError(f"sign.{domain}: cannot read key file {entry.key!r}: {exc}") from None
    try:
        if entry.algorithm == "ed25519-sha256":
            nacl.signing.SigningKey(data.strip(), encoder=nacl.encoding.Base64Encoder)
        else:
            parse_pem_private_key(data)
    except (UnparsableKeyError, nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
        raise ValueError(
            f"sign.{domain}: {entry.key!r} is not an {entry.algorithm} private key: {exc}"
        ) from None
    return data.strip() if entry.algorithm == "ed25519-sha256" else data


def _tags(value: bytes) -> dict[bytes, bytes]:
    try:
        tags: dict[bytes, bytes] = parse_tag_value(value)
    except InvalidTagValueList:
        return {}
    return tags


def _text(value: bytes | None) -> str:
    return (value or b"").decode("ascii", "replace")


def verify_signature(
    verifier: dkim.DKIM | None, idx: int, tags: dict[bytes, bytes], key: KeyRecord
) -> DkimResult:
    """Verify signature ``idx`` of the message parsed in ``verifier`` against a fetched key.

    ``verifier`` is None when dkimpy could not parse the message's header.
    """
    domain, selector = _text(tags.get(b"d")), _text(tags.get(b"s"))

    def result(outcome: str, reason: str = "") -> DkimResult:
        b = re.sub(r"\s+", "", _text(tags.get(b"b")))[:12]
        return DkimResult(outcome, domain, selector, _text(tags.get(b"a")), reason, b)

    if not tags or not domain or not selector:
        return result("neutral", "malformed signature")
    if verifier is None:
        return result("neutral", "unparsable header section")
    if isinstance(key, BaseException):
        return result("temperror", "key lookup failed")
    if key is None:
        return result("permerror", "no key")
    try:
        evaluate_key(b"", key)
    except binascii.Error as exc:  # dkimpy lets a bad base64 p= through
        return result("permerror", f"could not parse the public key: {exc}"[:80])
    except dkim.DKIMException as exc:
        return result("permerror", "revoked key" if re.search(rb"p=\s*(;|$)", key) else str(exc))
    fetched: bytes = key
    try:
        ok = verifier.verify(idx=idx, dnsfunc=lambda name, timeout=5: fetched)
    except dkim.KeyFormatError as exc:
        return result("permerror", str(exc)[:80])
    except dkim.ValidationError as exc:
        if "body hash mismatch" in str(exc):
            return result("fail", "body hash did not verify")
        return result("neutral", str(exc)[:80])
    except dkim.DKIMException as exc:
        return result("neutral", str(exc)[:80])
    except Exception as exc:  # a dkimpy bug on odd input: that signature is unverifiable
        log.warning(
            "dkim verify error: domain=%s selector=%s error=%s",
            domain,
            selector,
            f"{type(exc).__name__}: {exc}",
        )
        return result("neutral", f"cannot verify: {type(exc).__name__}")
    return result("pass") if ok else result("fail", "signature did not verify")


def verify_all(
    raw: bytes,
    values: list[bytes],
    names: list[bytes | None],
    keys: dict[bytes, KeyRecord],
    verifier_class: type[dkim.DKIM] = FastDKIM,
) -> tuple[DkimResult, ...]:
    """Verify the signatures whose header values are ``values``, top first, with fetched keys.

    ``verifier_class`` is dkimpy's ``DKIM`` or :class:`FastDKIM` (the default:
    the same answers, the RSA step in OpenSSL); the differential test runs both.
    """
    try:
        verifier: dkim.DKIM | None = verifier_class(raw, minkey=1024)
    except dkim.DKIMException:  # e.g. a header line without a colon
        verifier = None
    return tuple(
        verify_signature(verifier, i, _tags(v), keys.get(n.lower()) if n else None)
        for i, (v, n) in enumerate(zip(values, names, strict=True))
    )


class Dkim:
    """Verify DKIM signatures of inbound mail; sign mail from trusted networks."""

    name = "dkim"
    Config = DkimConfig
    RULES = (
        Rule("dkim.pass", "tag", "some signature passed"),
        Rule("dkim.fail", "tag", "no signature passed and the first one failed", 1.0),
        Rule("dkim.neutral", "tag", "no signature passed; the first was neutral"),
        Rule("dkim.permerror", "tag", "no signature passed; the first had a key problem"),
        Rule("dkim.temperror", "tag", "no signature passed; the first key lookup failed for now"),
        Rule("dkim.reject", "reject", "a reject_failed domain's signature did not pass"),
        Rule("dkim.tempfail", "tempfail", "the same, when its key lookup failed for now"),
        Rule("dkim.signed", "tag", "the message was signed for a trusted client"),
    )

    def __init__(self, config: DkimConfig) -> None:
        self.config = config
        self.reject_failed = frozenset(d.lower().rstrip(".") for d in config.reject_failed)
        self.keys = {
            domain.lower().rstrip("."): (entry, _load_key(domain, entry))
            for domain, entry in config.sign.items()
        }
        self.resolver: Resolver | None = None

    @hookimpl
    def on_startup(self, context: StartupContext) -> None:
        """Keep the shared resolver."""
        self.resolver = context.dns

    @hookimpl
    async def on_data(
        self, session: Session, envelope: Envelope, message: Message
    ) -> Verdict | None:
        """Sign for trusted clients; verify every signature for the others."""
        if session.trusted:
            return await self._sign(message)
        results = await self.verify(message)
        envelope.results[DKIM] = results
        return self._verdict(results)

    async def verify(self, message: Message) -> tuple[DkimResult, ...]:
        """Verify the message's signatures (up to ``max_signatures``)."""
        assert self.resolver is not None, "on_startup did not run"
        values = [v.encode("utf-8", "surrogateescape") for v in message.get_all("DKIM-Signature")][
            : self.config.max_signatures
        ]
        if not values:
            return ()
        names = [signature_key_name(v) for v in values]
        keys = await fetch_keys(self.resolver, [n for n in names if n])

        if len(message.raw) > THREAD_ABOVE:
            return await asyncio.to_thread(verify_all, message.raw, values, names, keys)
        return verify_all(message.raw, values, names, keys)

    def _verdict(self, results: tuple[DkimResult, ...]) -> Verdict | None:
        if not results:
            return None
        summary = "; ".join(
            f"d={r.domain} s={r.selector}: {r.result}" + (f" ({r.reason})" if r.reason else "")
            for r in results
        )
        passed = {r.domain.lower() for r in results if r.result == "pass"}
        for r in results:
            domain = r.domain.lower()
            if domain not in self.reject_failed or domain in passed:
                continue
            if r.result == "temperror":
                return Verdict.tempfail(
                    "dkim.tempfail",
                    summary,
                    status="4.7.20",
                    text=f"Cannot verify the DKIM signature of {domain} now, try again later",
                )
            return Verdict.reject(
                "dkim.reject",
                summary,
                status="5.7.20",
                text=f"DKIM signature of {domain} did not verify",
            )
        outcome = "pass" if passed else results[0].result
        return Verdict.tag(f"dkim.{outcome}", summary, score=self.config.scores.get(outcome, 0.0))

    def _signing_domain(self, message: Message) -> str | None:
        from_headers = message.get_all("From")
        if len(from_headers) != 1:
            return None
        domain = email.utils.parseaddr(from_headers[0])[1].rpartition("@")[2].lower()
        while domain:
            if domain in self.keys:
                return domain
            domain = domain.partition(".")[2]
        return None

    async def _sign(self, message: Message) -> Verdict | None:
        domain = self._signing_domain(message)
        if domain is None:
            return None
        entry, key = self.keys[domain]
        include: Any = (
            [h.encode() for h in self.config.sign_headers] if self.config.sign_headers else None
        )
        signature: bytes = await asyncio.to_thread(
            dkim.sign,
            message.raw,
            entry.selector.encode(),
            domain.encode(),
            key,
            canonicalize=(b"relaxed", b"relaxed"),
            signature_algorithm=entry.algorithm.encode(),
            include_headers=include,
        )
        value = signature.decode("ascii").partition(":")[2].strip()  # keeps dkimpy's folds
        return Verdict.tag(
            "dkim.signed",
            f"signed as d={domain} s={entry.selector}",
            headers={"DKIM-Signature": value},
        )
