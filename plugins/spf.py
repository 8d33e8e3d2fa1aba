"""spf: RFC 7208 check of the envelope sender (or of HELO, for the null sender).

Hooks: ``on_startup`` (binds pyspf to the gateway's resolver), ``on_mail``
(starts the check) and ``on_data`` (records it). pyspf resolves through the
shared resolver (absolute names, shared TTL cache; see
``mailgate.dnsadapters``). When every record the check needs is in that cache
it runs at once on the event loop (about 35 us; nothing to wait for); on any
miss it runs in this plugin's own thread pool, where its DNS waits block a
thread, never the event loop.

The check starts at MAIL FROM. When every result only tags (the default),
the gateway does not wait for it there: DNS runs while the client sends RCPT
and DATA, and the verdict is given at end of DATA. When some result is set to
``reject`` or ``tempfail``, MAIL FROM waits for the check and the verdict is
given there, so a forged sender is refused before any data is sent.

For the null sender (bounces) the identity checked is ``postmaster@<HELO>``
(RFC 7208 §2.4), unless ``helo: false``. Clients in ``trusted_networks`` are
not checked.

Rule ids (one per result; the action for each is configurable):

==================  ===========================================================
``spf.pass``        the client is authorised (tag)
``spf.fail``        the domain says the client is not authorised
``spf.softfail``    the domain says "probably not authorised"
``spf.neutral``     the domain makes no assertion
``spf.none``        no SPF record (or no usable domain)
``spf.temperror``   a DNS error that may go away (timeout, SERVFAIL)
``spf.permerror``   the record is broken (syntax, >10 lookups, >2 void lookups)
==================  ===========================================================

Replies (RFC 7372): ``reject`` on fail/softfail/neutral/none gives
``550 5.7.23``, on permerror ``550 5.7.24``; ``tempfail`` gives ``451 4.7.24``
for temperror and permerror, ``451 4.7.23`` otherwise. The text carries the
domain's explanation (``exp=``) for a fail, cleaned to printable ASCII.

Config (defaults observe first, as Haraka does: nothing is refused until the
operator says so):

================  ==========  ================================================
``fail``          ``tag``     tag, reject or tempfail; likewise ``softfail``,
                              ``neutral``, ``none``, ``temperror``, ``permerror``
``scores``        fail: 2,    score added by each result's tag
                  softfail: 1
``helo``          ``true``    check postmaster@HELO for the null sender
``header``        ``true``    add ``Received-SPF:`` (RFC 7208 §9.1)
``lookup_time``   ``8s``      DNS budget of one whole check (RFC 7208 §4.6.4);
                              past it the result is temperror. Keep it below
                              the plugin's ``timeout`` (10s)
``threads``       ``16``      worker threads for pyspf (its DNS waits block a thread)
================  ==========  ================================================

Publishes ``envelope.results["spf"]``, a ``mailgate.authresults.SpfResult``
(as soon as it is known: at MAIL when the check was awaited there, else at DATA).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import re
import typing
from typing import Literal

import spf
from pydantic import Field

from mailgate import (
    Duration,
    Envelope,
    PluginConfig,
    Resolver,
    Rule,
    Session,
    StartupContext,
    Verdict,
    hookimpl,
)
from mailgate.authresults import SPF, SpfResult
from mailgate.dnsadapters import bound_resolver, from_cache, install_spf_lookup

log = logging.getLogger("mailgate.plugins.spf")

Action = Literal["tag", "reject", "tempfail"]
Result = Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
RESULTS: tuple[Result, ...] = typing.get_args(Result)
DEFAULT_SCORES: dict[Result, float] = {"fail": 2.0, "softfail": 1.0}
_ERRORS = ("temperror", "permerror")


class SpfConfig(PluginConfig):
    """The ``plugins.spf`` section."""

    fail: Action = "tag"
    softfail: Action = "tag"
    neutral: Action = "tag"
    none: Action = "tag"
    temperror: Action = "tag"
    permerror: Action = "tag"
    scores: dict[Result, float] = Field(default_factory=lambda: dict(DEFAULT_SCORES))
    helo: bool = True
    header: bool = True
    lookup_time: Duration = 8.0
    threads: int = Field(default=16, ge=1, le=256)


def check_spf(
    resolver: Resolver, ip: str, sender: str, helo: str, receiver: str, lookup_time: float
) -> SpfResult:
    """Run one RFC 7208 check with pyspf through ``resolver`` (blocking: call it in a thread).

    An empty ``sender`` checks ``postmaster@<helo>``. Never raises: an
    unexpected error is reported as temperror.
    """
    try:
        with bound_resolver(resolver):
            query = spf.query(i=ip, s=sender, h=helo, receiver=receiver, querytime=lookup_time)
            result, _code, explanation = query.check()
            # pyspf writes one line: fold it between the comment and the key=value list.
            header = query.get_header(result, receiver=receiver)
            header = header.replace(") client-ip=", ")\r\n\tclient-ip=", 1)
    except Exception as exc:  # a pyspf bug must not become a 5xx or lose the mail
        log.warning(
            "spf check error: sender=%s helo=%s client=%s error=%s",
            sender,
            helo,
            ip,
            f"{type(exc).__name__}: {exc}",
        )
        domain = (sender or f"postmaster@{helo}").rpartition("@")[2]
        ident = "mailfrom" if sender else "helo"
        return SpfResult("temperror", ident, domain, sender, ip, helo, "SPF check failed")
    return SpfResult(
        result=result,
        identity=query.ident,
        domain=query.o or "",
        sender=query.s or "",
        client_ip=ip,
        helo=helo,
        explanation=explanation,
        received_spf=header,
    )


def _printable(text: str, limit: int = 160) -> str:
    return re.sub(r"[^\x20-\x7e]", "?", text)[:limit]


class Spf:
    """Check SPF at MAIL FROM; refuse or tag by result."""

    name = "spf"
    Config = SpfConfig
    RULES = (
        Rule("spf.pass", "tag", "the client is authorised"),
        Rule("spf.fail", "tag", "the domain says the client is not authorised", 2.0),
        Rule("spf.softfail", "tag", "the domain says probably not authorised", 1.0),
        Rule("spf.neutral", "tag", "the domain makes no assertion"),
        Rule("spf.none", "tag", "no SPF record, or no usable domain"),
        Rule("spf.temperror", "tag", "a DNS error that may go away (timeout, SERVFAIL)"),
        Rule("spf.permerror", "tag", "the record is broken (syntax, too many lookups)"),
    )

    def __init__(self, config: SpfConfig) -> None:
        self.config = config
        self.actions: dict[str, Action] = {r: getattr(config, r) for r in RESULTS if r != "pass"}
        self.actions["pass"] = "tag"
        self.scores: dict[str, float] = {str(k): v for k, v in config.scores.items()}
        self.decide_at_mail = any(a != "tag" for a in self.actions.values())
        self.resolver: Resolver | None = None
        self.hostname = "localhost"
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None

    @hookimpl
    def on_startup(self, context: StartupContext) -> None:
        """Bind pyspf to the shared resolver and start the worker threads."""
        install_spf_lookup()
        self.resolver = context.dns
        self.hostname = context.hostname
        self.pool = concurrent.futures.ThreadPoolExecutor(
            self.config.threads, thread_name_prefix="spf"
        )

    @hookimpl
    def on_shutdown(self) -> None:
        """Let running checks finish in the background; take no new ones."""
        if self.pool is not None:
            self.pool.shutdown(wait=False)

    @hookimpl
    async def on_mail(self, session: Session, envelope: Envelope, sender: str) -> Verdict | None:
        """Start the check; wait for it here only when some result refuses."""
        if session.trusted or (not sender and not self.config.helo):
            return None
        assert self.resolver is not None and self.pool is not None, "on_startup did not run"
        loop = asyncio.get_running_loop()
        args = (self.resolver, str(session.client_ip), sender, session.helo or "")
        check = functools.partial(check_spf, *args, self.hostname, self.config.lookup_time)
        result = from_cache(self.resolver, check)  # every record cached: no thread needed
        if result is not None:
            if self.decide_at_mail:
                return self._verdict(envelope, result)
            done: asyncio.Future[SpfResult] = loop.create_future()
            done.set_result(result)
            envelope.notes[self.name] = done
            return None
        try:
            future = loop.run_in_executor(self.pool, check)
        except RuntimeError:  # a reload shut our pool; this session still runs the old policy
            future = loop.run_in_executor(None, check)
        if not self.decide_at_mail:
            envelope.notes[self.name] = future
            return None
        return self._verdict(envelope, await future)

    @hookimpl
    async def on_data(self, envelope: Envelope) -> Verdict | None:
        """Record the check started at MAIL FROM (when it was not decided there)."""
        future = envelope.notes.pop(self.name, None)
        if future is None:
            return None
        return self._verdict(envelope, await future)

    def _verdict(self, envelope: Envelope, result: SpfResult) -> Verdict:
        envelope.results[SPF] = result
        rule = f"spf.{result.result}"
        what = result.sender or f"HELO {result.helo!r}"
        reason = f"{what} from {result.client_ip}: {result.result}"
        if result.explanation and result.result not in ("pass", "none"):
            reason += f" ({_printable(result.explanation, 120)})"
        action = self.actions[result.result]
        if action == "reject":
            status = "5.7.24" if result.result in _ERRORS else "5.7.23"
            return Verdict.reject(rule, reason, code=550, status=status, text=self._text(result))
        if action == "tempfail":
            status = "4.7.24" if result.result in _ERRORS else "4.7.23"
            return Verdict.tempfail(rule, reason, code=451, status=status, text=self._text(result))
        add_header = self.config.header and result.received_spf
        headers = {"Received-SPF": result.received_spf} if add_header else {}
        score = self.scores.get(result.result, 0.0)
        return Verdict.tag(rule, reason, score=score, headers=headers)

    @staticmethod
    def _text(result: SpfResult) -> str:
        domain = result.domain or result.helo
        if result.result == "fail" and result.explanation:
            return f"SPF fail for {domain}: {_printable(result.explanation)}"
        if result.result == "temperror":
            return f"SPF check of {domain} failed temporarily, try again later"
        if result.result == "permerror":
            return f"SPF record of {domain} is invalid"
        return f"SPF {result.result} for {domain}: sender not authorised"
