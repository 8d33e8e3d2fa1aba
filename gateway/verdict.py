"""Verdicts: what a hook implementation may return, and the SMTP replies they become.

A hook returns ``None`` (no opinion) or a :class:`Verdict`. Every verdict names a
rule id (``spf.fail``) and a human reason; the SMTP reply carries the code, an
RFC 3463 enhanced status code and a short text, and the decision log carries the
rule id and the reason.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from mailgate.rewrite import HeaderStrip

_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")  # RFC 3463 class.subject.detail


class VerdictError(ValueError):
    """A verdict whose parts contradict each other (see :func:`contradiction`)."""


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
    :meth:`tempfail`, :meth:`tag` and :meth:`quarantine` rather than the
    constructor. Whichever way it is built, a verdict's code must agree with
    its action (reject 5xx, tempfail 4xx, accept, tag and quarantine no reply
    of their own) and its score must be a finite number: anything else raises
    :class:`VerdictError` (a ``ValueError``) here, and the stage runner checks
    again before it applies a verdict (:func:`contradiction`).
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

    def __post_init__(self) -> None:
        problem = contradiction(self)
        if problem is not None:
            raise VerdictError(problem)

    @classmethod
    def accept(cls, rule: str, reason: str) -> Verdict:
        """End the stage with no objection (an allow-list hit, say)."""
        return cls(Action.ACCEPT, rule, reason)

    @classmethod
    def reject(
        cls, rule: str, reason: str, *, code: int = 550, status: str = "5.7.1", text: str = ""
    ) -> Verdict:
        """Refuse permanently (5xx). ``text`` is the reply text; it defaults to ``reason``."""
        return cls(Action.REJECT, rule, reason, code, status, text or reason)

    @classmethod
    def tempfail(
        cls, rule: str, reason: str, *, code: int = 451, status: str = "4.7.1", text: str = ""
    ) -> Verdict:
        """Refuse for now (4xx): the client should try again later."""
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


def contradiction(verdict: Verdict) -> str | None:
    """What makes ``verdict`` unusable, or None when its parts agree.

    A reject needs a 5xx code, a tempfail a 4xx code; an accept, a tag or a
    quarantine gives no reply of its own, so it carries no code, status or
    text; the score is a finite number (NaN would compare false with every
    threshold, and infinity would decide alone). Checked when a verdict is
    built and again where the stage runner applies it.
    """
    # Typed as object: a verdict built past its constructor may hold anything.
    action: object = verdict.action
    code: object = verdict.code
    if not isinstance(action, Action):
        return f"action {action!r} is not an Action"
    if not isinstance(code, int) or isinstance(code, bool):
        return f"code {code!r} is not an integer"
    if action is Action.REJECT and not 500 <= code <= 599:
        return f"a reject needs a 5xx code, not {code}"
    if action is Action.TEMPFAIL and not 400 <= code <= 499:
        return f"a tempfail needs a 4xx code, not {code}"
    if action in (Action.ACCEPT, Action.TAG, Action.QUARANTINE) and (
        code or verdict.status or verdict.text
    ):
        what = f"{code} {verdict.status} {verdict.text}".strip()
        return f"{action.value} gives no reply of its own, yet carries {what!r}"
    status = verdict.status
    if status and (not isinstance(status, str) or not _STATUS.fullmatch(status)):
        return f"status {status!r} is not an enhanced status code like 5.7.1"
    if status and status[0] != str(code)[0]:
        return f"status {status} contradicts code {code}"
    score = verdict.score
    if not isinstance(score, int | float) or isinstance(score, bool):
        return f"score {score!r} is not a number"
    if not math.isfinite(score):
        return f"score {score!r} is not a finite number"
    if not isinstance(verdict.rule, str) or not verdict.rule:
        return "no rule id"
    return None
