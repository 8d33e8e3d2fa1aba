"""What hook implementations see: the connection, the envelope and the message.

These are plain objects owned by the core. Plugins read them, keep their own
per-connection scratch data in ``notes``, and publish typed results for other
plugins in ``Envelope.results`` (DMARC reads what SPF and DKIM put there).
"""

from __future__ import annotations

import email.parser
import email.policy
import ipaddress
import re
import time
from dataclasses import dataclass, field
from email.message import Message as EmailMessage
from typing import Any

from mailgate.rewrite import HeaderStrip

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class VerdictRecord:
    """A verdict as the core recorded it: who gave it, where, and whether it counted."""

    plugin: str
    stage: str
    rule: str
    action: str
    reason: str
    enforced: bool
    score: float = 0.0
    headers: tuple[tuple[str, str], ...] = ()
    """The headers a tag asked to add (added only when enforced)."""

    def label(self) -> str:
        """``rule:action`` for the decision log, with ``(monitor)`` when not enforced."""
        suffix = "" if self.enforced else "(monitor)"
        return f"{self.rule}:{self.action}{suffix}"


@dataclass(slots=True)
class Scorecard:
    """Score, headers to add and verdicts, collected over a session or a transaction."""

    score: float = 0.0
    headers: list[tuple[str, str]] = field(default_factory=list)
    verdicts: list[VerdictRecord] = field(default_factory=list)
    strip: list[HeaderStrip] = field(default_factory=list)
    """Header fields to remove from the relayed message (``Verdict.tag(strip=...)``)."""


@dataclass(slots=True)
class Session:
    """One client connection, from accept to close."""

    id: str
    client_ip: IPAddress
    client_port: int
    local_hostname: str
    trusted: bool = False
    local_ip: IPAddress | None = None
    """The address of ours the client connected to, once known (set before the greeting)."""
    helo: str | None = None
    esmtp: bool = False
    tls: bool = False
    started: float = field(default_factory=time.monotonic)
    transactions: int = 0
    card: Scorecard = field(default_factory=Scorecard)
    notes: dict[str, Any] = field(default_factory=dict)
    """Per-connection scratch space for plugins, keyed by plugin name."""


@dataclass(slots=True)
class Envelope:
    """One mail transaction: MAIL FROM, the accepted recipients, and what was decided."""

    id: str
    sender: str
    mail_options: list[str] = field(default_factory=list)
    recipients: list[str] = field(default_factory=list)
    smtputf8: bool = False
    started: float = field(default_factory=time.monotonic)
    card: Scorecard = field(default_factory=Scorecard)
    results: dict[str, Any] = field(default_factory=dict)
    """Typed results that plugins publish for each other (``results["spf"]``)."""
    notes: dict[str, Any] = field(default_factory=dict)
    """Per-transaction scratch space for plugins, keyed by plugin name."""
    log_fields: dict[str, str] = field(default_factory=dict)
    """Extra ``key=value`` fields for the decision line (a scanner's score and symbols)."""
    kept: str = ""
    """``queued`` or ``held`` once the gateway's own spool took the message (its 250 is
    ours, not the upstream's); empty otherwise."""

    @property
    def sender_domain(self) -> str:
        """The domain of the envelope sender, lower-cased; empty for the null sender."""
        return self.sender.rpartition("@")[2].lower() if "@" in self.sender else ""


_FIELD_LINE = re.compile(r"[\x21-\x39\x3b-\x7e]+:")
"""A line that starts a header field for ``email``'s parser, with a non-empty name."""


def _simple_fields(header: bytes) -> tuple[tuple[str, str], ...] | None:
    """The header fields as ``email`` (compat32) parses them, for a plain header section.

    Plain: ASCII, every line ending CRLF (no lone CR or LF), every line a field
    (``name:`` with a non-empty name of printable characters) or a continuation
    of one. None for anything else, which :attr:`Message.headers` leaves to the
    ``email`` parser itself. Each value is made as compat32's
    ``header_source_parse`` makes it: the text after the first colon with the
    leading blanks removed, the continuation lines with their CRLFs, and the
    trailing CRs and LFs removed.
    """
    if not header.isascii():
        return None
    crlf = header.count(b"\r\n")
    if header.count(b"\n") != crlf or header.count(b"\r") != crlf:
        return None
    lines = header.decode("ascii").split("\r\n")
    fields: list[tuple[str, list[str]]] = []
    for number, line in enumerate(lines):
        if not line:
            if number < len(lines) - 1:  # the blank line that ends the section
                break
            continue  # after the last CRLF
        ending = "\r\n" if number < len(lines) - 1 else ""
        if line[0] in " \t":
            if not fields:
                return None
            fields[-1][1].append(line + ending)
        elif _FIELD_LINE.match(line):
            name, _, value = line.partition(":")
            fields.append((name, [(value + ending).lstrip(" \t")]))
        else:
            return None
    return tuple((name, "".join(parts).rstrip("\r\n")) for name, parts in fields)


class Message:
    """The message as received at end of DATA: raw bytes, with CRLF line endings.

    ``raw`` is the message as the client sent it, dot-unstuffed, after the core
    refused or normalised bare CR/LF (``mailgate.lineendings``). What is relayed
    is ``raw`` with the ``Received:`` and the plugins' added headers on top, less
    any header fields an enforced verdict asked to strip (``mailgate.rewrite``);
    every other byte, the body included, goes upstream as it is here.
    ``parsed`` is a lazily built header-only view from Python's ``email``
    package, for convenience; ``headers`` (and ``get_all``, which reads it)
    gives the same fields and values, parsed once per message for every plugin,
    without the ``email`` parser when the header section is plain (ASCII, CRLF,
    nothing but fields).
    """

    __slots__ = ("_by_name", "_headers", "_parsed", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._parsed: EmailMessage | None = None
        self._headers: tuple[tuple[str, str], ...] | None = None
        self._by_name: dict[str, list[str]] | None = None

    @property
    def header_bytes(self) -> bytes:
        """The header section, up to and including the empty line (or all of it if none)."""
        end = self.raw.find(b"\r\n\r\n")
        return self.raw if end < 0 else self.raw[: end + 4]

    @property
    def body(self) -> bytes:
        """Everything after the empty line that ends the header section."""
        end = self.raw.find(b"\r\n\r\n")
        return b"" if end < 0 else self.raw[end + 4 :]

    @property
    def parsed(self) -> EmailMessage:
        """The header section parsed by ``email`` (compat32: no surprises on bad input)."""
        if self._parsed is None:
            parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
            self._parsed = parser.parsebytes(self.header_bytes)
        return self._parsed

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """Every header field as ``(name, value)``, in order: what ``parsed`` holds, as text.

        Parsed once per message (the first plugin to ask pays). Values are as
        ``email``'s compat32 policy gives them: folds kept, no leading blanks.
        """
        if self._headers is None:
            fields = _simple_fields(self.header_bytes)
            if fields is None:
                fields = tuple((name, str(value)) for name, value in self.parsed.items())
            self._headers = fields
        return self._headers

    def get_all(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive), in order."""
        by_name = self._by_name
        if by_name is None:  # once per message: plugins ask for several names
            by_name = {}
            for field, value in self.headers:
                by_name.setdefault(field.lower(), []).append(value)
            self._by_name = by_name
        return list(by_name.get(name.lower(), ()))

    def __len__(self) -> int:
        return len(self.raw)
