"""The bench's test message: 4 KB, DKIM-signed, from a domain with SPF and DMARC on loopback DNS.

One message is built per bench run and sent by every load generator to every
system, so all of them move the same bytes. Its sender domain gets SPF, DKIM
and DMARC records on the bench's loopback DNS server, so the full policy's
checks all pass and do their whole work (no early exit on a missing record).
"""

from __future__ import annotations

import base64
import email.utils
import subprocess
from dataclasses import dataclass
from pathlib import Path

import dkim

SENDER_DOMAIN = "sender.example"
SENDER = f"bench@{SENDER_DOMAIN}"
HELO = "client.bench"
SELECTOR = "bench"
_LINE = b"The quick brown fox jumps over the lazy dog; mailgate bench filler text.\r\n"


@dataclass(frozen=True)
class BenchMessage:
    """The signed message and the DNS records that make it pass SPF, DKIM and DMARC."""

    data: bytes
    """The message with CRLF line endings, no line starting with a dot."""
    dns_records: list[tuple[str, str, str]]
    """(name, type, value) for the loopback DNS server."""

    def write_lf_file(self, path: Path) -> Path:
        """Write it for smtp-source ``-F``, which sends each line with CRLF."""
        path.write_bytes(self.data.replace(b"\r\n", b"\n"))
        return path


def _keypair(folder: Path) -> tuple[bytes, str]:
    key = folder / "dkim.key"
    if not key.exists():
        subprocess.run(
            ["openssl", "genrsa", "-traditional", "-out", str(key), "2048"],
            check=True,
            capture_output=True,
        )
    public_der = subprocess.run(
        ["openssl", "rsa", "-in", str(key), "-pubout", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    return key.read_bytes(), base64.b64encode(public_der).decode()


def _sign(unsigned: bytes, private_key: bytes) -> bytes:
    signature: bytes = dkim.sign(
        unsigned,
        SELECTOR.encode(),
        SENDER_DOMAIN.encode(),
        private_key,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[b"From", b"To", b"Subject", b"Date", b"Message-ID"],
    )
    return signature.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + unsigned


def build(folder: Path, size: int = 4096) -> BenchMessage:
    """Make the key pair (once per folder) and a signed message of about ``size`` bytes."""
    private_key, public_key = _keypair(folder)
    headers = (
        f"From: Bench Sender <{SENDER}>\r\n"
        "To: Bench Recipient <rcpt@example.com>\r\n"
        "Subject: mailgate bench message\r\n"
        f"Date: {email.utils.formatdate()}\r\n"
        f"Message-ID: <bench.{email.utils.make_msgid().strip('<>')}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode()
    signature_size = len(_sign(headers + _LINE, private_key)) - len(headers + _LINE)
    room = max(size - len(headers) - signature_size, len(_LINE))
    body = (_LINE * (room // len(_LINE) + 1))[:room]
    body = body[: body.rfind(b"\r\n") + 2] if len(body) > len(_LINE) else _LINE
    data = _sign(headers + body, private_key)
    records = [
        (SENDER_DOMAIN, "TXT", "v=spf1 ip4:127.0.0.0/8 -all"),
        (HELO, "TXT", "v=spf1 ip4:127.0.0.0/8 -all"),
        (HELO, "A", "127.0.0.1"),
        (f"{SELECTOR}._domainkey.{SENDER_DOMAIN}", "TXT", f"v=DKIM1; k=rsa; p={public_key}"),
        (f"_dmarc.{SENDER_DOMAIN}", "TXT", "v=DMARC1; p=reject; adkim=r; aspf=r"),
    ]
    return BenchMessage(data, records)


def big(size: int) -> bytes:
    """An unsigned plain message of ``size`` bytes (for the memory run)."""
    headers = (
        f"From: <{SENDER}>\r\nTo: <rcpt@example.com>\r\nSubject: big\r\n"
        f"Date: {email.utils.formatdate()}\r\nMessage-ID: {email.utils.make_msgid()}\r\n\r\n"
    ).encode()
    room = size - len(headers)
    return headers + (_LINE * (room // len(_LINE) + 1))[:room].rpartition(b"\r\n")[0] + b"\r\n"
