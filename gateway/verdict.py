"""Verdicts: what a hook implementation may return, and the SMTP replies they become.

A hook returns ``None`` (no opinion) or a :class:`Verdict`. Every verdict names a
rule id (``spf.fail``) and a human reason; the SMTP reply carries the code, an
RFC 3463 enhanced status code and a short text, and the decision log carries the
rule id and the reason.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from mailgate.rewrite import HeaderStrip


class Action(enum.Enum):
    """What a verdict does to the stage it was returned in."""

    ACCEPT = "accept"  # ends the stage; later plugins of this stage do not run
    REJECT = "reject"  # 5xx; ends the stage
    TEMPFAIL = "tempfail"  # 4xx; ends the stage
    TAG = "tag"  # adds score and headers; the stage goes on
    QUARANTINE = "quarantine"  # holds the message in the spool (250); the stage goes on


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: a three-digit code, an optional enhanced status code and text."""

    code: int
    text: str
    status: str = ""

    def render(self) -> str:
        """The reply's lines joined by CRLF, without the final CRLF."""
        lines = self.text.splitlines() or [""]
        prefix = f"{self.status} " if self.status else ""
        out = [f"{self.code}-{prefix}{line}" for line in lines[:-1]]
        out.append(f"{self.code} {prefix}{lines[-1]}".rstrip())
        return "\r\n".join(out)

    @property
    def positive(self) -> bool:
        """True for a 2xx or 3xx reply."""
        return self.code < 400

    @property
    def transient(self) -> bool:
        """True for a 4xx reply."""
        return 400 <= self.code < 500

    def __str__(self) -> str:
        return self.render().replace("\r\n", " / ")


@dataclass(frozen=True, slots=True)
class Verdict:
    """One plugin's decision at one stage.

    Build verdicts with the class methods :meth:`accept`, :meth:`reject`,
    :meth:`tempfail`, :meth:`tag` and :meth:`quarantine` rather than the constructor.
    """

    action: Action
    rule: str
    reason: str
    code: int = 0
    status: str = ""
    text: str = ""
    score: float = 0.0
    headers: tuple[tuple[str, str], ...] = field(default=())
    strip: tuple[HeaderStrip, ...] = field(default=())

    @classmethod
    def accept(cls, rule: str, reason: str) -> Verdict:
        """End the stage with no objection (an allow-list hit, say)."""
        return cls(Action.ACCEPT, rule, reason)

    @classmethod
    def reject(
        cls, rule: str, reason: str, *, code: int = 550, status: str = "5.7.1", text: str = ""
    ) -> Verdict:
        """Refuse permanently (5xx). ``text`` is the reply text; it defaults to ``reason``."""
        if not 500 <= code <= 599:
            raise ValueError(f"a reject needs a 5xx code, not {code}")
        return cls(Action.REJECT, rule, reason, code, status, text or reason)

    @classmethod
    def tempfail(
        cls, rule: str, reason: str, *, code: int = 451, status: str = "4.7.1", text: str = ""
    ) -> Verdict:
        """Refuse for now (4xx): the client should try again later."""
        if not 400 <= code <= 499:
            raise ValueError(f"a tempfail needs a 4xx code, not {code}")
        return cls(Action.TEMPFAIL, rule, reason, code, status, text or reason)

    @classmethod
    def tag(
        cls,
        rule: str,
        reason: str,
        *,
        score: float = 0.0,
        headers: dict[str, str] | None = None,
        strip: Iterable[HeaderStrip] = (),
    ) -> Verdict:
        """Add ``score`` to the message's total and ``headers`` to the relayed message.

        ``strip`` names header fields to remove from the relayed message (see
        :mod:`mailgate.rewrite`); it applies to tags given from ``on_mail`` to ``on_data``.
        """
        return cls(
            Action.TAG,
            rule,
            reason,
            score=score,
            headers=tuple((headers or {}).items()),
            strip=tuple(strip),
        )

    @classmethod
    def quarantine(cls, rule: str, reason: str, *, score: float = 0.0) -> Verdict:
        """Hold the message in the spool instead of relaying it; the client gets ``250``.

        The stage goes on (a later reject still refuses the message); at end of
        DATA the message is kept, held, with ``reason`` and ``rule``, until an
        operator runs ``mailgate queue release`` or ``delete``.
        """
        return cls(Action.QUARANTINE, rule, reason, score=score)

    def reply(self) -> Reply | None:
        """The SMTP reply this verdict gives, or None for accept, tag and quarantine."""
        if self.action in (Action.REJECT, Action.TEMPFAIL):
            return Reply(self.code, self.text, self.status)
        return None
