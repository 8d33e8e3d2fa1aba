"""clamav: scan the message for malware with clamd's ``INSTREAM`` command.

Hook: ``on_data``. The raw message is streamed to clamd over TCP or a unix
socket (``zINSTREAM``, 64 KiB chunks, then a zero-length chunk) and clamd's
one-line answer is read (at most 4 KiB, up to its NUL). Rule ids:

=====================  ========  =================================================
rule id                default   clamd said
=====================  ========  =================================================
``clamav.found``       reject    ``stream: <signature> FOUND``: ``554 5.7.1 Virus
                                 found: <signature>``; as a tag it adds ``score``
``clamav.clean``       tag       ``stream: OK``: adds ``X-Virus-Scanned``
``clamav.error``       tempfail  ``... ERROR`` (a size limit, a scan error), or an
                                 answer that is none of these; then ``on_error``
=====================  ========  =================================================

``actions: {found: tag}`` lets infected mail through, tagged with
``X-Virus-Found: <signature>`` and ``score`` (default 10). The client is
our own (clamd's protocol is a few lines): aioclamd, the library the issue
names, speaks TCP only and reads the message through a thread hop per KiB.

Shared with the other scanners (``mailgate.plugins.scanning``): ``servers``
(``host:port`` or ``unix:/path`` of clamd), ``max_size`` (keep it at or below
clamd's ``StreamMaxLength``, 25M by default, or clamd answers ERROR),
``on_error``, ``retry_after``, exemptions, ``actions``, the rule ids
``clamav.exempt``, ``.too_big``, ``.unavailable``, ``.error``, and the
decision-line field ``clamav="<OK|FOUND signature> <ms>ms"``.

Config (defaults): ``servers`` (required), ``score`` [10.0], plus the shared keys.
"""

from __future__ import annotations

import asyncio
import contextlib

from pydantic import Field

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
    one_line,
    scanner_rules,
)

_RULES = (
    Rule("clamav.found", "reject", "clamd found malware (signature in the reason)", 10.0),
    Rule("clamav.clean", "tag", "clamd found nothing; X-Virus-Scanned added", 0.0),
    *scanner_rules(
        "clamav",
        unavailable="no clamd answered in time",
        error="clamd answered ERROR or something unusable",
    ),
)
OUTCOMES = ("found", "clean")
CHUNK = 64 * 1024
MAX_ANSWER = 4096


class ClamavConfig(ScannerConfig):
    """The ``plugins.clamav`` section."""

    outcomes = OUTCOMES
    score: float = Field(default=10.0, ge=0)


async def instream(server: Server, data: bytes) -> str:
    """clamd's answer to ``INSTREAM`` of ``data``, without ``stream: `` and the NUL.

    Raises :class:`ScanUnavailable` when clamd cannot be reached and
    :class:`ScanBadAnswer` when its answer is empty, cut short or too long.
    """
    try:
        if server.path:
            reader, writer = await asyncio.open_unix_connection(server.path)
        else:
            reader, writer = await asyncio.open_connection(server.host, server.port)
    except OSError as exc:
        raise ScanUnavailable(f"cannot connect: {exc.strerror or exc}") from None
    try:
        writer.write(b"zINSTREAM\0")
        view = memoryview(data)
        for start in range(0, len(data), CHUNK):
            chunk = view[start : start + CHUNK]
            writer.write(len(chunk).to_bytes(4, "big"))
            writer.write(chunk)
            await writer.drain()
        writer.write(b"\0\0\0\0")
        await writer.drain()
        answer = b""
        while b"\0" not in answer and len(answer) <= MAX_ANSWER:
            more = await reader.read(MAX_ANSWER)
            if not more:
                break
            answer += more
    except OSError as exc:
        raise ScanBadAnswer(f"connection failed during the scan: {exc.strerror or exc}") from None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if b"\0" not in answer:
        raise ScanBadAnswer("answer cut short" if answer else "connection closed without an answer")
    return answer.partition(b"\0")[0].decode("utf-8", "replace").removeprefix("stream: ")


class Clamav:
    """Scan the message with clamd; refuse what it finds."""

    name = "clamav"
    RULES = _RULES
    Config = ClamavConfig

    def __init__(self, config: ClamavConfig) -> None:
        self.config = config
        self.support = ScanSupport(self.name, config, self.RULES)

    @hookimpl
    def on_startup(self, context: StartupContext) -> None:
        """Take the plugin's ``timeout``."""
        self.support.set_timeout(context.settings_of(self).timeout)

    async def _ask(self, server: Server, raw: bytes) -> str:
        answer = await instream(server, raw)
        if answer == "OK" or (answer.endswith(" FOUND") and len(answer) > len(" FOUND")):
            return answer
        if answer.endswith("ERROR"):
            raise ScanBadAnswer(f"clamd: {one_line(answer, 120)}")
        raise ScanBadAnswer(f"unexpected answer {one_line(answer, 120)!r}")

    @hookimpl
    async def on_data(self, session: Session, envelope: Envelope, message: Message) -> Verdict:
        """Scan; refuse (or tag) on FOUND, tag clean mail with X-Virus-Scanned."""
        return await self.support.check(
            session,
            envelope,
            len(message.raw),
            lambda server: self._ask(server, message.raw),
            lambda answer, seconds: self._verdict(envelope, answer, seconds),
        )

    def _verdict(self, envelope: Envelope, answer: str, seconds: float) -> Verdict:
        self.support.note(envelope, one_line(answer, 120), seconds)
        strip = [HeaderStrip("X-Virus-Scanned"), HeaderStrip("X-Virus-Found")]
        if answer == "OK":
            reason = f"clamd: OK ({seconds * 1000:.0f} ms)"
            return self.support.verdict(
                "clean",
                reason,
                text="",
                headers={"X-Virus-Scanned": "clamav (mailgate)"},
                strip=strip,
            )
        signature = one_line(answer.removesuffix(" FOUND"), 120)
        return self.support.verdict(
            "found",
            f"clamd: {signature} FOUND ({seconds * 1000:.0f} ms)",
            text=f"Virus found: {signature}",
            score=self.config.score,
            headers={"X-Virus-Scanned": "clamav (mailgate)", "X-Virus-Found": signature},
            strip=strip,
            reject_code=(554, "5.7.1"),
        )
