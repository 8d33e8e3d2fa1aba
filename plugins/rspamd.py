"""rspamd: ask rspamd's normal worker (HTTP ``POST /checkv2``) what to do with the message.

Hook: ``on_data``. The request carries the raw message and what rspamd uses
of the transaction: ``IP`` (the client), ``Helo``, ``From`` (the envelope
sender, ``<>`` for the null sender), one ``Rcpt`` per recipient,
``Queue-Id`` (the transaction id), ``MTA-Name`` (our hostname) and
``Settings-ID`` (when ``settings_id`` is set). No ``Hostname``: the gateway
keeps no verified reverse name of the client, and rspamd looks up the PTR
itself when its modules need one. No ``User``: mailgate has no SMTP AUTH.
HTTP/1.1 connections are kept and reused (aiohttp, one pool per server).

Rule ids: rspamd's ``action`` becomes an outcome (rule id ``rspamd.<outcome>``)
whose action the policy may re-map under ``actions:``:

====================  ==========================  ========  =====================================
rspamd action         rule id                     default   reply / effect
====================  ==========================  ========  =====================================
``reject``            ``rspamd.reject``           reject    ``550 5.7.1`` + rspamd's
                                                            ``smtp_message`` (or ``reject_text``)
``soft reject``       ``rspamd.soft_reject``      tempfail  ``451 4.7.1`` + ``smtp_message``
``greylist``          ``rspamd.greylist``         tempfail  ``451 4.7.1 Greylisted...``
``add header``        ``rspamd.add_header``       tag       headers (+ score with ``add_score``)
``rewrite subject``   ``rspamd.rewrite_subject``  tag       ... and Subject becomes rspamd's
``no action``         ``rspamd.clean``            tag       the summary headers only
====================  ==========================  ========  =====================================

A tag adds rspamd's own header changes (``milter.add_headers``, and
``milter.remove_headers`` as removals) and a summary: ``X-Spam-Action``,
``X-Spam-Score: <score> / <required>``, ``X-Spam-Symbols`` (with
``symbols_header``) and ``X-Spam: Yes`` for any action other than
``no action``; copies of these fields already in the message are removed, so
a sender cannot forge them. With ``add_score: true`` rspamd's score (times
``score_factor``) is added to the message's score; by default it is not, as
rspamd already applied its own thresholds.

Shared with the other scanners (``mailgate.plugins.scanning``): ``servers``,
``max_size``, ``on_error``, ``retry_after``, exemptions, ``actions``, the
rule ids ``rspamd.exempt``, ``rspamd.too_big``, ``rspamd.unavailable``,
``rspamd.error`` (a truncated or non-JSON answer, an HTTP error, an unknown
action), and the decision-line field ``rspamd="<action> <score>/<required>
<symbols> <ms>ms"``.

Config (defaults): ``servers`` (required, ``host:port`` of a normal worker
or ``unix:/path``), ``settings_id`` [none], ``add_score`` [false],
``score_factor`` [1.0], ``symbols_header`` [true], ``milter_headers``
[true], ``rewrite_subject`` [true], ``reject_text`` ["Spam message
rejected"], plus the shared keys; the common ``timeout`` [10s] bounds a scan.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from mailgate import (
    Envelope,
    HeaderStrip,
    Message,
    Rule,
    Session,
    StartupContext,
    Verdict,
    hookimpl,
)
from mailgate.plugins.scanning import (
    ScanBadAnswer,
    ScannerConfig,
    ScanSupport,
    ScanUnavailable,
    Server,
    folded,
    one_line,
    scanner_rules,
)

if TYPE_CHECKING:  # aiohttp is imported when the plugin starts: `mailgate check` stays quick
    import aiohttp
    from multidict import CIMultiDict

OUTCOMES = {
    "reject": "reject",
    "soft reject": "soft_reject",
    "greylist": "greylist",
    "add header": "add_header",
    "rewrite subject": "rewrite_subject",
    "no action": "clean",
}
_RULES = (
    Rule("rspamd.reject", "reject", "rspamd says reject", 0.0),
    Rule("rspamd.soft_reject", "tempfail", "rspamd says soft reject (try later)", 0.0),
    Rule("rspamd.greylist", "tempfail", "rspamd says greylist", 0.0),
    Rule("rspamd.add_header", "tag", "rspamd says add header (probable spam)", 0.0),
    Rule("rspamd.rewrite_subject", "tag", "rspamd says rewrite the subject", 0.0),
    Rule("rspamd.clean", "tag", "rspamd says no action; summary headers added", 0.0),
    *scanner_rules(
        "rspamd",
        unavailable="no rspamd server answered in time",
        error="rspamd answered something unusable",
    ),
)
SUMMARY_HEADERS = ("X-Spam", "X-Spam-Action", "X-Spam-Score", "X-Spam-Symbols")
MAX_ANSWER = 4 * 1024**2


class RspamdConfig(ScannerConfig):
    """The ``plugins.rspamd`` section."""

    outcomes = tuple(OUTCOMES.values())
    settings_id: str | None = None
    add_score: bool = False
    score_factor: float = 1.0
    symbols_header: bool = True
    milter_headers: bool = True
    rewrite_subject: bool = True
    reject_text: str = "Spam message rejected"


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ScanBadAnswer(f"{what} is not a number: {value!r}")
    return float(value)


def _milter_headers(answer: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """rspamd's ``milter.add_headers`` (name -> value) and ``remove_headers`` (names)."""
    milter = answer.get("milter")
    if not isinstance(milter, dict):
        return {}, []
    added: dict[str, str] = {}
    for name, spec in (milter.get("add_headers") or {}).items():
        values = spec if isinstance(spec, list) else [spec]
        for value in values:
            text = value.get("value") if isinstance(value, dict) else value
            if isinstance(text, str):
                added[str(name)] = text
    removed = [str(name) for name in (milter.get("remove_headers") or {})]
    return added, removed


class Rspamd:
    """Scan the message with rspamd and act on its action."""

    name = "rspamd"
    RULES = _RULES
    Config = RspamdConfig

    def __init__(self, config: RspamdConfig) -> None:
        self.config = config
        self.support = ScanSupport(self.name, config, self.RULES)
        self.hostname = "localhost"
        self._http: dict[Server, aiohttp.ClientSession] = {}

    @hookimpl
    async def on_startup(self, context: StartupContext) -> None:
        """Open one keep-alive HTTP pool per server."""
        import aiohttp

        self.hostname = context.hostname
        self.support.set_timeout(context.settings_of(self).timeout)
        for server in self.support.servers:
            connector: aiohttp.BaseConnector = (
                aiohttp.UnixConnector(path=server.path)
                if server.path
                else aiohttp.TCPConnector(limit=64, keepalive_timeout=30)
            )
            self._http[server] = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=None)
            )

    @hookimpl
    async def on_shutdown(self) -> None:
        """Close the HTTP pools."""
        for http in self._http.values():
            await http.close()
        self._http.clear()

    def _request_headers(self, session: Session, envelope: Envelope) -> CIMultiDict[str]:
        from multidict import CIMultiDict

        headers: CIMultiDict[str] = CIMultiDict()
        headers["IP"] = str(session.client_ip)
        if session.helo:
            headers["Helo"] = one_line(session.helo, 255)
        headers["From"] = f"<{one_line(envelope.sender, 512)}>"
        for rcpt in envelope.recipients:
            headers.add("Rcpt", f"<{one_line(rcpt, 512)}>")
        headers["Queue-Id"] = envelope.id
        headers["MTA-Name"] = self.hostname
        if self.config.settings_id:
            headers["Settings-ID"] = self.config.settings_id
        return headers

    async def _ask(self, server: Server, headers: CIMultiDict[str], raw: bytes) -> dict[str, Any]:
        import aiohttp

        from mailgate.plugins._rspamdbody import MessageBody

        http = self._http[server]
        url = (
            "http://localhost/checkv2"
            if server.path
            else f"http://{server.host if ':' not in server.host else f'[{server.host}]'}"
            f":{server.port}/checkv2"
        )
        for retry in (True, False):
            try:
                async with http.post(url, data=MessageBody(raw), headers=headers) as response:
                    if response.status != 200:
                        raise ScanBadAnswer(f"HTTP {response.status}")
                    body = await response.content.read(MAX_ANSWER + 1)
                    if len(body) > MAX_ANSWER:
                        raise ScanBadAnswer("answer too large")
                    break
            except aiohttp.ClientConnectorError as exc:
                raise ScanUnavailable(f"cannot connect: {exc.os_error}") from None
            except aiohttp.ServerDisconnectedError:
                if retry:
                    continue  # a kept-alive connection the server had closed: once more
                raise ScanBadAnswer("connection closed without an answer") from None
            except aiohttp.ClientError as exc:
                raise ScanBadAnswer(f"{type(exc).__name__}: {exc}") from None
        try:
            answer = json.loads(body)
        except ValueError:
            raise ScanBadAnswer(f"not JSON ({len(body)} bytes)") from None
        if not isinstance(answer, dict):
            raise ScanBadAnswer("JSON answer is not an object")
        if answer.get("action") not in OUTCOMES:
            raise ScanBadAnswer(f"unknown action {one_line(str(answer.get('action')), 40)!r}")
        _number(answer.get("score"), "score")
        _number(answer.get("required_score", 0), "required_score")
        if not isinstance(answer.get("symbols", {}), dict):
            raise ScanBadAnswer("symbols is not an object")
        return answer

    @hookimpl
    async def on_data(self, session: Session, envelope: Envelope, message: Message) -> Verdict:
        """Scan, then turn rspamd's action into a verdict."""
        headers = self._request_headers(session, envelope)
        return await self.support.check(
            session,
            envelope,
            len(message.raw),
            lambda server: self._ask(server, headers, message.raw),
            lambda answer, seconds: self._verdict(envelope, answer, seconds),
        )

    def _verdict(self, envelope: Envelope, answer: dict[str, Any], seconds: float) -> Verdict:
        action: str = answer["action"]
        outcome = OUTCOMES[action]
        score = _number(answer.get("score"), "score")
        required = _number(answer.get("required_score", 0), "required_score")
        symbols = sorted(
            answer.get("symbols", {}).items(),
            key=lambda item: -abs(item[1].get("score", 0)) if isinstance(item[1], dict) else 0,
        )
        names = [one_line(str(name), 64) for name, _ in symbols]
        summary = f"{action} {score:g}/{required:g} {','.join(names) or '-'}"
        self.support.note(envelope, summary, seconds)
        reason = f"rspamd: {summary} ({seconds * 1000:.0f} ms)"
        messages = answer.get("messages")
        smtp_message = messages.get("smtp_message") if isinstance(messages, dict) else None
        if not isinstance(smtp_message, str) or not one_line(smtp_message):
            smtp_message = None
        texts = {
            "reject": smtp_message or self.config.reject_text,
            "soft_reject": smtp_message or "Try again later",
            "greylist": smtp_message or "Greylisted, try again later",
        }
        added: dict[str, str] = {}
        strip: list[HeaderStrip] = [HeaderStrip(name) for name in SUMMARY_HEADERS]
        if self.config.milter_headers:
            milter_added, removed = _milter_headers(answer)
            added.update({one_line(k, 76): folded(v) for k, v in milter_added.items()})
            strip += [HeaderStrip(name) for name in removed]
        if action != "no action":
            added["X-Spam"] = "Yes"
        added["X-Spam-Action"] = action
        added["X-Spam-Score"] = f"{score:.2f} / {required:.2f}"
        if self.config.symbols_header and names:
            added["X-Spam-Symbols"] = folded(", ".join(names))
        subject = answer.get("subject")
        if action == "rewrite subject" and self.config.rewrite_subject and isinstance(subject, str):
            strip.append(HeaderStrip("Subject"))
            added["Subject"] = one_line(subject, 900)
        return self.support.verdict(
            outcome,
            reason,
            text=texts.get(outcome, self.config.reject_text),
            score=score * self.config.score_factor if self.config.add_score else 0.0,
            headers=added,
            strip=strip,
        )
