"""Line endings and NUL bytes in message content: the SMTP smuggling defence.

The SMTP server (``mailgate.smtpserver``) ends DATA only at ``CRLF.CRLF``, but a
bare LF or a bare CR *inside* a line is still in the bytes it received. A downstream server
that is lenient about line endings may read ``<LF>.<CR><LF>`` as the end of the
message and the bytes after it as a second, smuggled transaction (SEC Consult,
December 2023; CVE-2023-51764/51765/51766). Parsers also disagree about where
a header ends when a bare LF sits in it (``Subject: a<LF>X-Evil: b``).

So the session screens the message with :func:`screen` at end of DATA, before
any plugin (header checks, DKIM, Python's ``email``) sees it:

- ``reject`` (the default): a message with a bare LF or a bare CR gets
  ``550 5.6.0`` and nothing goes upstream (Postfix's
  ``smtpd_forbid_bare_newline = reject``);
- ``normalize``: every bare LF and bare CR becomes CRLF, and the normalised
  bytes are what the plugins judge and what is relayed, so the filtered bytes
  are the relayed bytes. A line that began after a bare line ending is not
  dot-unstuffed: it was not a line under RFC 5321, so its dot is content (it
  goes upstream dot-stuffed and arrives as written);
- a NUL byte is always refused (``550 5.6.0``): it has no line-ending
  meaning to normalise and truncates strings in C-based software.

Rule ids (in the decision log, recorded as plugin ``core``):

======================  ==================================================
``protocol.bare_lf``    a LF not preceded by CR (reject or normalize)
``protocol.bare_cr``    a CR not followed by LF (reject or normalize)
``protocol.nul``        a NUL byte in the message (reject)
======================  ==================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from mailgate.context import VerdictRecord
from mailgate.verdict import Reply

LineEndings = Literal["reject", "normalize"]

BARE_LF = Reply(550, "Bare LF in message content: lines must end in CRLF", "5.6.0")
BARE_CR = Reply(550, "Bare CR in message content: lines must end in CRLF", "5.6.0")
NUL = Reply(550, "NUL byte in message content", "5.6.0")

_ANY_LINE_ENDING = re.compile(rb"\r\n|\r|\n")
_BARE_CR = re.compile(rb"\r(?!\n)")


@dataclass(slots=True)
class Screened:
    """The outcome of :func:`screen`: the bytes to judge and relay, or a refusal."""

    data: bytes
    reply: Reply | None = None
    records: list[VerdictRecord] = field(default_factory=list)


def bare_line_endings(data: bytes) -> tuple[bool, bool]:
    """Whether ``data`` has a bare LF, and whether it has a bare CR."""
    if _BARE_CR.search(data) is None:
        # Every CR starts a CRLF, so there are as many CRLFs as CRs: counting the
        # one-byte CR is several times cheaper than counting the pair.
        return data.count(b"\n") != data.count(b"\r"), False
    return data.count(b"\n") != data.count(b"\r\n"), True


def normalize(data: bytes) -> bytes:
    """Every bare CR and bare LF in ``data`` turned into CRLF."""
    return _ANY_LINE_ENDING.sub(b"\r\n", data)


def _record(rule: str, action: str, reason: str) -> VerdictRecord:
    return VerdictRecord("core", "on_data", rule, action, reason, True)


def screen(data: bytes, mode: LineEndings) -> Screened:
    """Refuse or normalise a message's bare CR/LF; always refuse NUL.

    :param data: the message as received (dot-unstuffed).
    :param mode: ``reject`` or ``normalize`` for this client.
    """
    if b"\x00" in data:
        return Screened(data, NUL, [_record("protocol.nul", "reject", "NUL byte in message")])
    bare_lf, bare_cr = bare_line_endings(data)
    if not (bare_lf or bare_cr):
        return Screened(data)
    found = [
        (rule, what)
        for rule, what, present in (
            ("protocol.bare_lf", "bare LF", bare_lf),
            ("protocol.bare_cr", "bare CR", bare_cr),
        )
        if present
    ]
    if mode == "normalize":
        records = [_record(rule, "normalize", f"{what} turned into CRLF") for rule, what in found]
        return Screened(normalize(data), None, records)
    rule, what = found[0]
    return Screened(data, BARE_LF if bare_lf else BARE_CR, [_record(rule, "reject", what)])
