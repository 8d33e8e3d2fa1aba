"""spamassassin: ask spamd (SPAMC/1.5, with aiospamc) whether the message is spam.

Hook: ``on_data``. The message goes to spamd as a ``SYMBOLS`` request (or
``REPORT`` with ``report_header: true``), with ``User: <user>`` when ``user``
is set (spamd's per-user preferences). spamd answers ``Spam: True|False ;
<score> / <threshold>`` and the rule names that hit (or the report text, whose
rule names are read from its table).

Rule ids (``spamassassin.<outcome>``), each outcome re-mappable under ``actions:``:

=======================  ========  ================================================
rule id                  default   when
=======================  ========  ================================================
``spamassassin.reject``  reject    score >= ``reject_score``: ``550 5.7.1``
                                   (``reject_text``)
``spamassassin.spam``    tag       ``Spam: True`` below ``reject_score``
``spamassassin.clean``   tag       ``Spam: False``: the headers only
=======================  ========  ================================================

A tag adds ``X-Spam-Flag: YES|NO``,
``X-Spam-Status: Yes|No, score=.. required=.. tests=..`` (``status_header``)
and ``X-Spam-Report`` (``report_header``), after removing those fields from
the message so a sender cannot forge them. With ``add_score: true`` spamd's
score (times ``score_factor``) is added to the message's score.

Shared with the other scanners (``mailgate.plugins.scanning``): ``servers``
(``host:port`` or ``unix:/path`` of spamd), ``max_size`` [20MiB here too;
spamc's own default is 500KB], ``on_error``, ``retry_after``, exemptions,
``actions``, the rule ids ``spamassassin.exempt``, ``.too_big``,
``.unavailable``, ``.error`` (an answer aiospamc cannot parse, a connection
closed mid-reply, an ``EX_*`` error code), and the decision-line field
``spamassassin="<True|False> <score>/<threshold> <rules> <ms>ms"``.

Config (defaults): ``servers`` (required), ``reject_score`` [10.0; null:
never reject], ``reject_text`` ["Spam message rejected"], ``user`` [none],
``add_score`` [false], ``score_factor`` [1.0], ``status_header`` [true],
``report_header`` [false], plus the shared keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

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

_RULES = (
    Rule("spamassassin.reject", "reject", "spamd score at or over reject_score", 0.0),
    Rule("spamassassin.spam", "tag", "spamd says spam, below reject_score", 0.0),
    Rule("spamassassin.clean", "tag", "spamd says not spam; headers added", 0.0),
    *scanner_rules(
        "spamassassin",
        unavailable="no spamd answered in time",
        error="spamd answered something unusable",
    ),
)
OUTCOMES = ("reject", "spam", "clean")
# Not X-Spam-Score: that is rspamd's summary, and both plugins may run.
OWN_HEADERS = ("X-Spam-Flag", "X-Spam-Status", "X-Spam-Report")
_REPORT_RULE = re.compile(r"^\s*-?\d+(?:\.\d+)?\s+([A-Z0-9_]+)\s", re.MULTILINE)


class SpamAssassinConfig(ScannerConfig):
    """The ``plugins.spamassassin`` section."""

    outcomes = OUTCOMES
    reject_score: float | None = 10.0
    reject_text: str = "Spam message rejected"
    user: str | None = None
    add_score: bool = False
    score_factor: float = 1.0
    status_header: bool = True
    report_header: bool = False


@dataclass(frozen=True, slots=True)
class SpamdAnswer:
    """What spamd said about one message."""

    spam: bool
    score: float
    threshold: float
    rules: tuple[str, ...]
    report: str = ""


class SpamAssassin:
    """Scan the message with spamd; reject over a score, tag otherwise."""

    name = "spamassassin"
    RULES = _RULES
    Config = SpamAssassinConfig

    def __init__(self, config: SpamAssassinConfig) -> None:
        self.config = config
        self.support = ScanSupport(self.name, config, self.RULES)

    @hookimpl
    def on_startup(self, context: StartupContext) -> None:
        """Take the plugin's ``timeout``; import aiospamc now rather than in the first scan."""
        import aiospamc  # noqa: F401

        self.support.set_timeout(context.settings_of(self).timeout)

    async def _ask(self, server: Server, raw: bytes) -> SpamdAnswer:
        # Imported here, not at the top: aiospamc (and its loguru) cost every CLI start otherwise.
        import aiospamc
        from aiospamc.exceptions import (
            AIOSpamcConnectionFailed,
            ClientException,
            TimeoutException,
        )
        from aiospamc.responses import ResponseException

        where: dict[str, Any] = {"host": server.host, "port": server.port}
        if server.path:
            where = {"socket_path": server.path}
        verb = aiospamc.report if self.config.report_header else aiospamc.symbols
        try:
            response = await verb(raw, user=self.config.user, **where)
        except AIOSpamcConnectionFailed as exc:
            raise ScanUnavailable(f"cannot connect: {exc.__cause__ or exc}") from None
        except (TimeoutException, TimeoutError):
            raise ScanUnavailable("timed out") from None
        except ResponseException as exc:
            raise ScanBadAnswer(f"spamd error {exc.code}: {one_line(str(exc), 80)}") from None
        except ClientException as exc:
            raise ScanBadAnswer(f"{type(exc).__name__}: {one_line(str(exc), 80)}") from None
        spam = response.headers.get("Spam")
        if spam is None or not hasattr(spam, "score"):
            raise ScanBadAnswer("no Spam header")
        body = bytes(response.body).decode("utf-8", "replace")
        verdict = (bool(spam.value), float(spam.score), float(spam.threshold))
        if self.config.report_header:
            return SpamdAnswer(*verdict, tuple(_REPORT_RULE.findall(body)), body)
        return SpamdAnswer(*verdict, tuple(r.strip() for r in body.split(",") if r.strip()))

    @hookimpl
    async def on_data(self, session: Session, envelope: Envelope, message: Message) -> Verdict:
        """Scan, then reject, tag as spam or tag as clean."""
        return await self.support.check(
            session,
            envelope,
            len(message.raw),
            lambda server: self._ask(server, message.raw),
            lambda answer, seconds: self._verdict(envelope, answer, seconds),
        )

    def _verdict(self, envelope: Envelope, answer: SpamdAnswer, seconds: float) -> Verdict:
        rules = [one_line(r, 64) for r in answer.rules]
        summary = f"{answer.spam} {answer.score:g}/{answer.threshold:g} {','.join(rules) or '-'}"
        self.support.note(envelope, summary, seconds)
        reason = f"spamd: {summary} ({seconds * 1000:.0f} ms)"
        reject_at = self.config.reject_score
        if reject_at is not None and answer.score >= reject_at:
            outcome = "reject"
        else:
            outcome = "spam" if answer.spam else "clean"
        yes = "Yes" if answer.spam else "No"
        headers = {"X-Spam-Flag": yes.upper()}
        if self.config.status_header:
            headers["X-Spam-Status"] = folded(
                f"{yes}, score={answer.score:.1f} required={answer.threshold:.1f} "
                f"tests={','.join(rules) or 'none'}".replace(",", ", ")
            )
        if self.config.report_header and answer.report:
            lines = [one_line(line, 200) for line in answer.report.splitlines() if line.strip()]
            headers["X-Spam-Report"] = "\r\n\t".join(lines[:60])
        return self.support.verdict(
            outcome,
            reason,
            text=self.config.reject_text,
            score=answer.score * self.config.score_factor if self.config.add_score else 0.0,
            headers=headers,
            strip=[HeaderStrip(name) for name in OWN_HEADERS],
        )
