"""What the content-scanner plugins (``rspamd``, ``spamassassin``, ``clamav``) do alike.

Not a plugin. Each scanner plugin composes a :class:`ScanSupport` and gets:

- **servers with failover**: ``servers`` is a list of ``host:port``,
  ``[v6addr]:port`` or ``unix:/path``; they are tried in order. A server that
  failed is put last for ``retry_after``, so the others are asked first.
  Each attempt may take an equal share of the time left of the plugin's
  ``timeout`` (the common plugin key), so a hanging first
  server still leaves the second its turn, and the plugin answers with its own
  ``on_error`` policy before the core's hook timeout (``451 4.3.0``) fires.
- **on_error**: when no server gives a usable answer, ``tempfail`` (the
  default) answers ``451 4.7.1``; ``accept`` lets the message through with a
  score-0 tag that records why. The rule id says what happened:
  ``NAME.unavailable`` (refused, unreachable, timed out) or ``NAME.error``
  (a server answered something we cannot use: truncated, garbled, an unknown
  action, a scanner-side error).
- **max_size**: a bigger message is not sent; ``NAME.too_big`` records it.
- **exemptions**: clients in ``trusted_networks`` (``exempt_trusted``), in
  ``exempt_networks``, and transactions whose every recipient is in
  ``exempt_recipients`` (addresses or whole domains): one DATA reply covers
  every recipient, so one unlisted recipient means a scan. ``NAME.exempt``
  records the reason. (There is no exemption for authenticated senders:
  mailgate offers no SMTP AUTH and accepts no XCLIENT, so a session never
  carries an authenticated identity.)
- **actions**: each outcome (rule id ``NAME.<outcome>``) has a default action
  that ``actions: {outcome: reject | tempfail | tag}`` re-maps.
- **a decision-line entry**: ``NAME="<result> <ms>ms"`` (the scanner's score,
  action, symbols or signature) and the scan's latency, in the transaction's
  one log line.

Rule ids are declared per plugin in its ``RULES`` (:class:`mailgate.Rule`:
id, default action, one-line description, score), as every plugin declares them;
:func:`scanner_rules` gives the four above.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar, Literal, TypeVar

from pydantic import Field, field_validator, model_validator

from mailgate import (
    Duration,
    Envelope,
    HeaderStrip,
    NetworkField,
    PluginConfig,
    Rule,
    Session,
    Size,
    Verdict,
)
from mailgate.plugins._throttle import WarningThrottle

log = logging.getLogger("mailgate.plugins")

ActionName = Literal["reject", "tempfail", "tag", "quarantine"]
OnError = Literal["tempfail", "accept"]
T = TypeVar("T")

TIMEOUT_MARGIN = 0.2
"""Seconds kept back from the plugin's ``timeout`` so that ``on_error`` answers, not the core."""
WARN_INTERVAL = 10.0
_SERVER = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+)):(?P<port>\d{1,5})$")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True, slots=True)
class Server:
    """One scanner address: TCP (``host``, ``port``) or a unix socket (``path``)."""

    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> Server:
        """``127.0.0.1:11333``, ``[::1]:3310``, ``localhost:783`` or ``unix:/run/clamd.ctl``."""
        if text.startswith("unix:"):
            path = text.removeprefix("unix:")
            if not path.startswith("/"):
                raise ValueError(f"expected unix:/absolute/path, got {text!r}")
            return cls(path=path)
        m = _SERVER.match(text.strip())
        if m is None or not 0 < int(m.group("port")) < 65536:
            raise ValueError(f"expected host:port, [v6]:port or unix:/path, got {text!r}")
        host = m.group("v6") or m.group("host")
        if m.group("v6"):
            ipaddress.IPv6Address(host)
        return cls(host=host, port=int(m.group("port")))

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class ScanUnavailable(Exception):
    """The server could not be reached or did not answer in time."""


class ScanBadAnswer(Exception):
    """The server answered something the plugin cannot use."""


class ScanFailed(Exception):
    """No server gave a usable answer; ``kind`` is ``unavailable`` or ``error``."""

    def __init__(self, kind: Literal["unavailable", "error"], detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class ScannerConfig(PluginConfig):
    """Keys every scanner plugin takes (besides the common ``mode``, ``timeout``...)."""

    servers: list[str] = Field(min_length=1)
    max_size: Size = 20 * 1024**2
    on_error: OnError = "tempfail"
    retry_after: Duration = 10.0
    """How long a failed server is skipped before it is tried again."""
    exempt_trusted: bool = True
    exempt_networks: list[NetworkField] = Field(default_factory=list)
    exempt_recipients: list[str] = Field(default_factory=list)
    actions: dict[str, ActionName] = Field(default_factory=dict)

    outcomes: ClassVar[tuple[str, ...]] = ()
    """The scanner's own outcomes (rule ids ``NAME.<outcome>``): what ``actions`` may name."""

    @field_validator("servers")
    @classmethod
    def _servers(cls, servers: list[str]) -> list[str]:
        for server in servers:
            Server.parse(server)
        return servers

    @model_validator(mode="after")
    def _known_actions(self) -> ScannerConfig:
        unknown = sorted(set(self.actions) - set(self.outcomes))
        if unknown:
            known = ", ".join(self.outcomes)
            raise ValueError(f"unknown outcome {', '.join(unknown)} (known: {known})")
        return self


def scanner_rules(name: str, *, unavailable: str, error: str) -> tuple[Rule, ...]:
    """The four rules :class:`ScanSupport` answers with, for the scanner ``name``.

    ``NAME.exempt`` and ``NAME.too_big`` (score-0 tags), ``NAME.unavailable``
    and ``NAME.error`` (``on_error``), these two described by the arguments.
    """
    return (
        Rule(f"{name}.exempt", "tag", "not scanned: exempt client or recipients", 0.0),
        Rule(f"{name}.too_big", "tag", "not scanned: message over max_size", 0.0),
        Rule(f"{name}.unavailable", "tempfail", unavailable, 0.0),
        Rule(f"{name}.error", "tempfail", error, 0.0),
    )


def one_line(text: str, limit: int = 200) -> str:
    """``text`` with control characters as spaces, cut to ``limit``: safe in a reply or header."""
    return _UNSAFE.sub(" ", text).strip()[:limit]


def folded(text: str, width: int = 76) -> str:
    """``text`` as a header value: control characters out, folded at spaces near ``width``.

    The core keeps CRLF-tab folds, so a long symbol list stays within the
    998-octet line limit of RFC 5322.
    """
    lines: list[str] = []
    current = ""
    for word in one_line(text, 20_000).split():
        word = word[:900]
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    return "\r\n\t".join(lines)


class ScanSupport:
    """Servers, failover, timeouts, exemptions and outcome mapping for one scanner plugin."""

    def __init__(self, name: str, config: ScannerConfig, rules: Iterable[Rule]) -> None:
        self.name = name
        self.config = config
        self.rules = {rule.id: rule for rule in rules}
        self.servers = [Server.parse(s) for s in config.servers]
        self.timeout = 10.0
        self._down_until: dict[Server, float] = {}
        self._exempt_rcpts = frozenset(r.lower() for r in config.exempt_recipients)
        self._warnings = WarningThrottle(WARN_INTERVAL)

    def set_timeout(self, timeout: float) -> None:
        """The plugin's common ``timeout``: the budget of one scan, every server included."""
        self.timeout = timeout

    # ------------------------------------------------------------ before the scan

    def exemption(self, session: Session, envelope: Envelope) -> str | None:
        """Why this transaction is not scanned, or None."""
        cfg = self.config
        if cfg.exempt_trusted and session.trusted:
            return f"client {session.client_ip} is in trusted_networks"
        if any(session.client_ip in net for net in cfg.exempt_networks):
            return f"client {session.client_ip} is in exempt_networks"
        if self._exempt_rcpts and envelope.recipients:
            rcpts = [r.lower() for r in envelope.recipients]
            if all(r in self._exempt_rcpts or r.rpartition("@")[2] in self._exempt_rcpts
                   for r in rcpts):  # fmt: skip
                return "every recipient is in exempt_recipients"
        return None

    def skip(self, session: Session, envelope: Envelope, size: int) -> Verdict | None:
        """A score-0 tag when the message is exempt or over ``max_size``; None to scan it."""
        reason = self.exemption(session, envelope)
        if reason is not None:
            self.note(envelope, "exempt", 0.0)
            return Verdict.tag(f"{self.name}.exempt", f"not scanned: {reason}")
        if size > self.config.max_size:
            self.note(envelope, "too_big", 0.0)
            return Verdict.tag(
                f"{self.name}.too_big",
                f"not scanned: message of {size} bytes is over max_size {self.config.max_size}",
            )
        return None

    # ------------------------------------------------------------ the scan

    def _candidates(self) -> list[Server]:
        """The servers in policy order, those that failed within ``retry_after`` last."""
        now = time.monotonic()
        up = [s for s in self.servers if self._down_until.get(s, 0.0) <= now]
        return up + [s for s in self.servers if s not in up]

    async def scan(self, attempt: Callable[[Server], Awaitable[T]]) -> T:
        """Run ``attempt`` on each server in turn until one answers; raise :class:`ScanFailed`.

        ``attempt`` raises :class:`ScanUnavailable` or :class:`ScanBadAnswer`
        (anything else is a bug and propagates). Each attempt runs under an
        equal share of the time that is left.
        """
        deadline = time.monotonic() + max(self.timeout - TIMEOUT_MARGIN, 0.05)
        servers = self._candidates()
        problems: list[str] = []
        kind: Literal["unavailable", "error"] = "unavailable"
        for index, server in enumerate(servers):
            left = deadline - time.monotonic()
            if left <= 0:
                problems.append(f"{server}: no time left")
                break
            share = left / (len(servers) - index)
            try:
                async with asyncio.timeout(share):
                    result = await attempt(server)
            except TimeoutError:
                problems.append(f"{server}: no answer within {share:.2g}s")
            except ScanUnavailable as exc:
                problems.append(f"{server}: {exc}")
            except ScanBadAnswer as exc:
                kind = "error"
                problems.append(f"{server}: bad answer: {exc}")
            else:
                self._down_until.pop(server, None)
                return result
            self._down_until[server] = time.monotonic() + self.config.retry_after
        raise ScanFailed(kind, "; ".join(problems))

    async def check(
        self,
        session: Session,
        envelope: Envelope,
        size: int,
        attempt: Callable[[Server], Awaitable[T]],
        decide: Callable[[T, float], Verdict],
    ) -> Verdict:
        """One scanner's ``on_data``: :meth:`skip`, else :meth:`scan` and ``decide``.

        ``decide`` gets the answer and the scan's seconds; a scan that got no
        usable answer is the :meth:`failure` verdict.
        """
        skipped = self.skip(session, envelope, size)
        if skipped is not None:
            return skipped
        started = time.perf_counter()
        try:
            answer = await self.scan(attempt)
        except ScanFailed as failed:
            return self.failure(envelope, failed)
        return decide(answer, time.perf_counter() - started)

    # ------------------------------------------------------------ after the scan

    def failure(self, envelope: Envelope, failed: ScanFailed) -> Verdict:
        """The ``on_error`` verdict for a scan that got no usable answer."""
        rule = f"{self.name}.{failed.kind}"
        self.note(envelope, failed.kind, 0.0)
        if (suppressed := self._warnings.due()) is not None:
            log.warning(
                "content scan failed: txn=%s plugin=%s kind=%s error=%s on_error=%s suppressed=%d",
                envelope.id,
                self.name,
                failed.kind,
                failed.detail,
                self.config.on_error,
                suppressed,
            )
        if self.config.on_error == "accept":
            return Verdict.tag(rule, f"{failed.detail}; not scanned (on_error: accept)")
        return Verdict.tempfail(
            rule,
            failed.detail,
            code=451,
            status="4.7.1",
            text="Content scanner unavailable, try again later",
        )

    def action(self, outcome: str) -> ActionName:
        """The action in force for ``outcome``: the policy's ``actions``, else the rule's."""
        configured = self.config.actions.get(outcome)
        if configured is not None:
            return configured
        default = self.rules[f"{self.name}.{outcome}"].action
        assert default != "accept", "no scanner rule accepts by default"
        return default

    def verdict(
        self,
        outcome: str,
        reason: str,
        *,
        text: str,
        score: float | None = None,
        headers: dict[str, str] | None = None,
        strip: Iterable[HeaderStrip] = (),
        reject_code: tuple[int, str] = (550, "5.7.1"),
        tempfail_code: tuple[int, str] = (451, "4.7.1"),
    ) -> Verdict:
        """The verdict for ``outcome`` under its action; a tag carries ``score`` and headers."""
        rule = f"{self.name}.{outcome}"
        action = self.action(outcome)
        if action == "reject":
            code, status = reject_code
            return Verdict.reject(rule, reason, code=code, status=status, text=one_line(text))
        if action == "tempfail":
            code, status = tempfail_code
            return Verdict.tempfail(rule, reason, code=code, status=status, text=one_line(text))
        if action == "quarantine":
            return Verdict.quarantine(
                rule, reason, score=self.rules[rule].score if score is None else score
            )
        return Verdict.tag(
            rule,
            reason,
            score=self.rules[rule].score if score is None else score,
            headers=headers,
            strip=strip,
        )

    def note(self, envelope: Envelope, result: str, seconds: float) -> None:
        """Put ``NAME="<result> <ms>ms"`` on the transaction's decision line."""
        envelope.log_fields[self.name] = f"{result} {seconds * 1000:.0f}ms" if seconds else result
