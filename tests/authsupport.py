"""Helpers for the SPF/DKIM/DMARC/ARC tests: keys made at test time, signing, messages."""

from __future__ import annotations

import base64
import functools
import re
from dataclasses import dataclass

import dkim
import nacl.encoding
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.dnsserver import LoopbackDnsServer


@dataclass(frozen=True)
class Key:
    """A DKIM private key and the TXT record that publishes it."""

    private: bytes
    record: str
    algorithm: bytes


def rsa_pem_and_record(key: rsa.RSAPrivateKey) -> tuple[bytes, str]:
    """``key`` as PKCS#1 PEM (as dkimpy signs with it), and the DKIM record publishing it."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


@functools.cache
def rsa_key(n: int = 0) -> Key:
    """A 2048-bit RSA key (PKCS#1 PEM), made once per test session for each ``n``."""
    pem, record = rsa_pem_and_record(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return Key(pem, record, b"rsa-sha256")


@functools.cache
def ed25519_key() -> Key:
    """An Ed25519 key in dkimpy's format (base64 seed)."""
    signing = nacl.signing.SigningKey.generate()
    seed = signing.encode(encoder=nacl.encoding.Base64Encoder)
    public = signing.verify_key.encode(encoder=nacl.encoding.Base64Encoder).decode()
    return Key(seed, f"v=DKIM1; k=ed25519; p={public}", b"ed25519-sha256")


def publish(dns: LoopbackDnsServer, domain: str, selector: str, key: Key) -> None:
    """Serve ``key`` at ``<selector>._domainkey.<domain>``."""
    dns.add(f"{selector}._domainkey.{domain}", "TXT", key.record)


def sign(message: bytes, domain: str, selector: str = "sel", key: Key | None = None) -> bytes:
    """``message`` with a DKIM-Signature by ``domain`` prepended."""
    key = key or rsa_key()
    signature = dkim.sign(
        message,
        selector.encode(),
        domain.encode(),
        key.private,
        canonicalize=(b"relaxed", b"relaxed"),
        signature_algorithm=key.algorithm,
    )
    return bytes(signature) + message


def arc_seal(message: bytes, sealer: str, selector: str, key: Key, results: str) -> bytes:
    """``message`` as forwarder ``sealer`` would pass it on: its A-R, then an ARC set."""
    with_ar = f"Authentication-Results: {sealer}; {results}\r\n".encode() + message
    headers = dkim.arc_sign(
        with_ar,
        selector.encode(),
        sealer.encode(),
        key.private,
        sealer.encode(),
    )
    return b"".join(headers) + with_ar


def make_message(
    from_addr: str = "alice@example.net",
    to: str = "bob@example.com",
    size: int = 0,
    subject: str = "hello",
) -> bytes:
    """A small well-formed message; ``size`` pads the body to about that many bytes."""
    head = (
        f"From: Alice <{from_addr}>\r\n"
        f"To: Bob <{to}>\r\n"
        f"Subject: {subject}\r\n"
        "Date: Mon, 30 Nov 2026 10:00:00 +0000\r\n"
        "Message-ID: <auth-test@example.net>\r\n"
        "\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
    body = b"Hello Bob.\r\n" + line * max(0, (size - len(head)) // len(line))
    return head + body


def header_values(data: bytes, name: str) -> list[str]:
    """Every value of header ``name`` in ``data``'s header section, unfolded."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    unfolded = re.sub(r"\r\n[ \t]", " ", head)
    prefix = name.lower() + ":"
    return [
        line.split(":", 1)[1].strip()
        for line in unfolded.split("\r\n")
        if line.lower().startswith(prefix)
    ]


def ar_clauses(value: str) -> dict[str, list[str]]:
    """An Authentication-Results value as {method: [clause, ...]} (authserv-id under "")."""
    parts = [p.strip() for p in value.split(";")]
    out: dict[str, list[str]] = {"": [parts[0]]}
    for part in parts[1:]:
        method = part.split("=", 1)[0].strip()
        out.setdefault(method, []).append(part)
    return out
