"""Which replies carry an RFC 3463 enhanced status code, as the docs say.

Every reply the gateway makes itself has one, except the greeting (220), the
HELO/EHLO reply (250) and the go-ahead for DATA (354): RFC 2034 puts no code
on those. (mailgate does not advertise ENHANCEDSTATUSCODES, because replies
relayed from the upstream are passed on as the upstream wrote them.)
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.rawsmtp import RawClient
from tests.support import MESSAGE

ENHANCED = re.compile(rb"^[245]\.\d{1,3}\.\d{1,3} ")


def _coded(reply: tuple[int, bytes]) -> bool:
    code, text = reply
    return all(
        ENHANCED.match(line) and line[:1] == str(code)[:1].encode() for line in text.split(b"\n")
    )


def test_every_own_reply_but_220_ehlo_and_354_has_an_enhanced_code(make_gateway, tmp_path: Path):
    gw = make_gateway(upstream=f"maildir:{tmp_path / 'mail'}")
    with RawClient(gw.port) as c:
        assert c.banner is not None and c.banner[0] == 220 and not _coded(c.banner)
        helo = c.cmd(b"HELO client.example.net")
        ehlo = c.cmd(b"EHLO client.example.net")
        assert helo[0] == ehlo[0] == 250 and not _coded(helo) and not _coded(ehlo)
        coded = [
            c.cmd(b"NOOP"),
            c.cmd(b"VRFY bob"),
            c.cmd(b"HELP"),
            c.cmd(b"BOGUS"),
            c.cmd(b"RCPT TO:<bob@example.com>"),
            c.cmd(b"MAIL FROM:<alice@example.net>"),
            c.cmd(b"RCPT TO:<bob@elsewhere.example>"),
            c.cmd(b"RCPT TO:<bob@example.com>"),
        ]
        data = c.cmd(b"DATA")
        assert data[0] == 354 and not _coded(data)
        c.send(MESSAGE + b".\r\n")
        coded += [c.reply(), c.cmd(b"RSET"), c.cmd(b"QUIT")]
    assert [code for code, _ in coded] == [250, 252, 214, 500, 503, 250, 554, 250, 250, 250, 221]
    assert all(_coded(reply) for reply in coded), [r for r in coded if not _coded(r)]
