"""arc: validate the ARC chain (RFC 8617) of a forwarded message and record the result.

Hook: ``on_data``. The keys of every ARC-Seal and ARC-Message-Signature are
fetched at once through the shared resolver, then dkimpy validates the chain
against them (CPU only; in a worker thread above 256 KB). Clients in
``trusted_networks`` are not checked.

Results: ``none`` (no ARC headers), ``pass`` (every seal valid and the newest
message signature valid), ``fail`` (anything else: a broken seal, a missing
key, a malformed set), ``temperror`` (a key could not be fetched now; written
as ``arc=fail (temperror)`` in Authentication-Results, since RFC 8617 has no
temperror, and never trusted).

The ``dmarc`` plugin uses this result for ``trusted_arc_sealers``: a DMARC
failure of mail sealed by a trusted forwarder with a passing chain is not
enforced. It validates the chain itself if this plugin is not enabled.

Rule ids (tags, no score; nothing is refused on ARC alone):

=================  ==================================================
``arc.pass``       the chain validates
``arc.fail``       the chain does not validate
``arc.temperror``  a key lookup failed for now
=================  ==================================================

Config: none of its own.

Publishes ``envelope.results["arc"]``, a ``mailgate.authresults.ArcResult``
with the sealers (ARC-Seal ``d=``) from instance 1 up.
"""

from __future__ import annotations

import asyncio
import logging

import dkim

from mailgate import Envelope, Message, Resolver, Rule, Session, StartupContext, Verdict, hookimpl
from mailgate.authresults import ARC, ArcResult
from mailgate.dnsadapters import KeyTempError, fetch_keys, key_lookup, signature_key_name

log = logging.getLogger("mailgate.plugins.arc")

THREAD_ABOVE = 256 * 1024
_ARC_SIGNED = ("ARC-Seal", "ARC-Message-Signature")


async def verify_arc(resolver: Resolver, message: Message) -> ArcResult:
    """Validate the ARC chain of ``message``."""
    if not message.get_all("ARC-Seal"):
        return ArcResult("none")
    values = [v.encode("utf-8", "surrogateescape") for h in _ARC_SIGNED for v in message.get_all(h)]
    keys = await fetch_keys(resolver, [n for v in values if (n := signature_key_name(v))])

    def run() -> ArcResult:
        try:
            cv, data, reason = dkim.ARC(message.raw, minkey=1024).verify(dnsfunc=key_lookup(keys))
        except KeyTempError as exc:
            return ArcResult("temperror", reason=f"key lookup failed: {exc}")
        except dkim.DKIMException as exc:
            return ArcResult("fail", reason=str(exc)[:120])
        except Exception as exc:  # a dkimpy bug on odd input: the chain is not trusted
            log.warning("arc verify error: error=%s", f"{type(exc).__name__}: {exc}")
            return ArcResult("fail", reason=f"cannot verify: {type(exc).__name__}")
        ordered = sorted(data, key=lambda r: int(r.get("instance", 0)))
        sealers = tuple(r.get("as-domain", b"").decode("ascii", "replace").lower() for r in ordered)
        result = "pass" if cv == dkim.CV_Pass else "none" if cv == dkim.CV_None else "fail"
        return ArcResult(result, len(ordered), sealers, "" if result == "pass" else str(reason))

    if len(message.raw) > THREAD_ABOVE:
        return await asyncio.to_thread(run)
    return run()


class Arc:
    """Validate ARC chains and publish the result."""

    name = "arc"
    RULES = (
        Rule("arc.pass", "tag", "the chain validates"),
        Rule("arc.fail", "tag", "the chain does not validate"),
        Rule("arc.temperror", "tag", "a key lookup failed for now"),
    )

    def __init__(self) -> None:
        self.resolver: Resolver | None = None

    @hookimpl
    def on_startup(self, context: StartupContext) -> None:
        """Keep the shared resolver."""
        self.resolver = context.dns

    @hookimpl
    async def on_data(
        self, session: Session, envelope: Envelope, message: Message
    ) -> Verdict | None:
        """Validate the chain; tag with the result."""
        if session.trusted:
            return None
        assert self.resolver is not None, "on_startup did not run"
        result = await verify_arc(self.resolver, message)
        envelope.results[ARC] = result
        if result.result == "none":
            return None
        sealers = ",".join(result.sealers) or "-"
        reason = f"{result.instances} instance(s), sealers {sealers}"
        if result.reason:
            reason += f": {result.reason}"
        return Verdict.tag(f"arc.{result.result}", reason)
