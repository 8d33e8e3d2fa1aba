"""The dkim plugin's OpenSSL path gives dkimpy's answers, over a generated corpus.

``mailgate.plugins.dkim.verify_all`` runs once with dkimpy's own ``DKIM``
(pure-Python RSA, dkimpy's canonicalisation on every signature) and once with
``FastDKIM`` (the plugin's default), and every signature of every message must
get the same ``DkimResult``: result, domain, selector, algorithm, reason and
``header.b``. The corpus (over 2,000 messages, made deterministically from one
seed; the keys are made at test time and reused) covers valid signatures,
body and header tampering, relaxed and simple canonicalisation, ``l=``,
multiple signatures, RSA 1024/2048/4096 with SHA-256 and SHA-1, Ed25519,
broken and missing keys, folded headers, whitespace that the relaxed
canonicalisation must fold, and RSA signatures that textbook RSA accepts in
another encoding (longer, shorter, above the modulus).
"""

from __future__ import annotations

import base64
import collections
import functools
import random
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import dkim
import nacl.encoding
import nacl.signing
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dkim.canonicalization import Relaxed, Simple
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.context import Message
from mailgate.dns import DnsTempError
from mailgate.dnsadapters import KeyRecord, signature_key_name
from mailgate.plugins._dkimverify import FastDKIM, canonical_body
from mailgate.plugins.dkim import verify_all
from tests.authsupport import rsa_pem_and_record

SEED = 20261205
BASES = 230
VARIANTS = 10
DOMAIN = "corpus.example"


@dataclass(frozen=True)
class CorpusKey:
    """A private key as dkimpy signs with it, its record, and the public modulus."""

    private: bytes
    record: bytes
    algorithms: tuple[bytes, ...]
    modulus: int = 0


def _rsa(bits: int) -> CorpusKey:
    if bits < 1024:  # cryptography will not make one; openssl still does
        pem = subprocess.run(
            ["openssl", "genrsa", "-traditional", str(bits)], capture_output=True, check=True
        ).stdout
        loaded = serialization.load_pem_private_key(pem, None)
        assert isinstance(loaded, rsa.RSAPrivateKey)
        key = loaded
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem, record = rsa_pem_and_record(key)
    n = key.public_key().public_numbers().n
    return CorpusKey(pem, record.encode(), (b"rsa-sha256", b"rsa-sha1"), n)


def _ed25519() -> CorpusKey:
    signing = nacl.signing.SigningKey.generate()
    public = signing.verify_key.encode(encoder=nacl.encoding.Base64Encoder)
    seed = signing.encode(encoder=nacl.encoding.Base64Encoder)
    return CorpusKey(seed, b"v=DKIM1; k=ed25519; p=" + public, (b"ed25519-sha256",))


@functools.cache
def corpus_keys() -> dict[str, CorpusKey]:
    """The signing keys, by selector (made once per test session)."""
    return {
        "r1024": _rsa(1024),
        "r2048": _rsa(2048),
        "r4096": _rsa(4096),
        "r768": _rsa(768),  # signs and verifies, but is under the 1024-bit minimum
        "ed": _ed25519(),
    }


def key_records() -> dict[bytes, KeyRecord]:
    """What the corpus's DNS holds: the real keys, broken ones, and failures."""
    keys = corpus_keys()
    good = keys["r2048"].record
    p = good.split(b"p=", 1)[1]
    other = _rsa(1024).record
    records: dict[str, KeyRecord] = {name: key.record for name, key in keys.items()}
    records |= {
        "badb64": b"v=DKIM1; k=rsa; p=" + p[:-3],  # bad base64 padding
        "truncated": b"v=DKIM1; k=rsa; p=" + base64.b64encode(base64.b64decode(p)[:120]),
        "revoked": b"v=DKIM1; k=rsa; p=",
        "unknownk": b"v=DKIM1; k=dsa; p=" + p,
        "badver": b"v=DKIM2; k=rsa; p=" + p,
        "tlsrpt": b"v=DKIM1; k=rsa; s=tlsrpt; p=" + p,
        "otherkey": other,
        "edrecord": keys["ed"].record,  # an RSA signature checked with an Ed25519 key
        "rsarecord": good,  # an Ed25519 signature checked with an RSA key
        "garbage": b"this is not a key record",
        "spaced": b"v = DKIM1 ;  k = rsa ; p = " + p[:40] + b" " + p[40:],
        "temperror": DnsTempError("SERVFAIL"),
        "missing": None,
    }
    return {
        f"{sel}._domainkey.{DOMAIN}.".encode(): value
        for sel, value in records.items()
        if value is not None
    }


# Selectors a signature may name, and the key that really signs for each.
ALIASES = {
    "badb64": "r2048",
    "truncated": "r2048",
    "revoked": "r2048",
    "unknownk": "r2048",
    "badver": "r2048",
    "tlsrpt": "r2048",
    "otherkey": "r1024",
    "edrecord": "r2048",
    "rsarecord": "ed",
    "garbage": "r1024",
    "spaced": "r2048",
    "temperror": "r1024",
    "missing": "r1024",
}
WEIGHTS = {"r1024": 22, "r2048": 30, "r4096": 7, "r768": 3, "ed": 25} | dict.fromkeys(ALIASES, 1)

WORDS = [b"alpha", b"beta", b"gamma", b"delta", b"\xc3\xa9t\xc3\xa9", b"x", b"mail", b"gate"]
CANON = [(b"relaxed", b"relaxed"), (b"simple", b"simple"), (b"relaxed", b"simple")]
CANON += [(b"simple", b"relaxed")]


def _body(rng: random.Random) -> bytes:
    kind = rng.randrange(8)
    if kind == 0:
        return b""
    if kind == 1:
        return b"\r\n\r\n"
    lines = []
    for _ in range(rng.randrange(1, 30)):
        words = [rng.choice(WORDS) for _ in range(rng.randrange(0, 12))]
        sep = rng.choice([b" ", b" ", b" ", b"  ", b"\t", b" \t "])
        line = sep.join(words)
        if rng.random() < 0.15:
            line += rng.choice([b" ", b"\t", b"   "])
        if rng.random() < 0.05:
            line = rng.choice([b" ", b"\t"]) + line
        lines.append(line)
    body = b"\r\n".join(lines) + b"\r\n"
    if kind == 2:
        body += b"\r\n" * rng.randrange(1, 4)
    if kind == 3:
        body = body[:-2]  # no final line break
    return body


def _headers(rng: random.Random, n: int) -> bytes:
    subject = b"Subject: " + b" ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 6)))
    if rng.random() < 0.3:
        subject += b"\r\n\t" + rng.choice(WORDS) + b"\r\n  " + rng.choice(WORDS)  # folded
    fields = [
        b"From: Corpus <sender@" + DOMAIN.encode() + b">",
        b"To: " + rng.choice([b"<bob@example.com>", b"Bob\r\n <bob@example.com>"]),
        subject,
        b"Date: Mon, 30 Nov 2026 10:00:00 +0000",
        b"Message-ID: <corpus." + str(n).encode() + b"@" + DOMAIN.encode() + b">",
    ]
    if rng.random() < 0.4:
        fields.append(b"X-Spaced:   a  \t b \t")
    if rng.random() < 0.3:
        fields.append(b"Received: from a\r\n\tby b; Mon, 30 Nov 2026 10:00:00 +0000")
    rng.shuffle(fields)
    return b"\r\n".join(fields) + b"\r\n\r\n"


def _sign(rng: random.Random, message: bytes) -> bytes:
    """One DKIM-Signature header (CRLF line ends) by a selector drawn from WEIGHTS."""
    selector = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
    key = corpus_keys()[ALIASES.get(selector, selector)]
    include = [b"from", b"to", b"subject", b"date", b"message-id"]
    if rng.random() < 0.3:
        include += [b"x-spaced", b"from"]  # an oversigned From
    header: bytes = dkim.sign(
        message,
        selector.encode(),
        DOMAIN.encode(),
        key.private,
        canonicalize=rng.choice(CANON),
        signature_algorithm=rng.choice(key.algorithms),
        include_headers=include,
        length=rng.random() < 0.2,
    )
    return header.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


_B = re.compile(rb"([;\s]b=)([A-Za-z0-9+/=\s]+)")


def _resign_b(sig: bytes, change: Callable[[bytes], bytes]) -> bytes:
    """``sig`` with its b= value (decoded) passed through ``change``."""
    m = _B.search(sig)
    assert m
    raw = base64.b64decode(re.sub(rb"\s+", b"", m.group(2)))
    return sig[: m.start(2)] + base64.b64encode(change(raw)) + b"\r\n"


def _modulus(sig: bytes) -> int:
    selector = re.search(rb"s=([a-z0-9]+)", sig)
    assert selector
    name = selector.group(1).decode()
    return corpus_keys()[ALIASES.get(name, name)].modulus


def _tamper(rng: random.Random, kind: int, sig: bytes, head: bytes, body: bytes) -> bytes:
    """Message variant number ``kind`` of a signed message."""
    msg = sig + head + body
    if kind == 1:
        return msg + b"appended on the way\r\n"
    if kind == 2 and body:
        i = rng.randrange(len(body))
        return sig + head + body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1 :]
    if kind == 3:
        return sig + head + body.replace(b"\r\n", b" \t\r\n", 1)
    if kind == 4:
        return sig + head + body.replace(b" ", b"  ", 2)
    if kind == 5:
        return msg + b"\r\n\r\n"
    if kind == 6:
        return sig + head.replace(b"Subject: ", b"Subject: Re: ", 1) + body
    if kind == 7:
        return sig + head.replace(b"Subject:", b"SUBJECT :", 1) + body
    if kind == 8:
        return sig + head.replace(b"Date: Mon,", b"Date:\r\n\tMon,", 1) + body
    if kind == 9:
        return sig + b"From: <mallory@" + DOMAIN.encode() + b">\r\n" + head + body
    if kind == 10:
        return _resign_b(sig, lambda b: b[:-1] + bytes([b[-1] ^ 0x80])) + head + body
    if kind == 11:
        return re.sub(rb"bh=([A-Za-z0-9+/])", rb"bh=A\1", sig, count=1) + head + body
    if kind == 12:
        return re.sub(rb"bh=[^;]*;", b"", sig, count=1) + head + body
    if kind == 13:
        return sig.replace(b"v=1;", b"v=1; x=1;", 1) + head + body
    if kind == 14:
        return sig.replace(b"d=" + DOMAIN.encode(), b"d=elsewhere.example", 1) + head + body
    if kind == 15 and b"rsa-sha" in sig:
        n = _modulus(sig)
        return (
            _resign_b(sig, lambda b: (int.from_bytes(b, "big") + n).to_bytes(600, "big"))
            + msg[len(sig) :]
        )
    if kind == 16 and b"rsa-sha" in sig:
        return _resign_b(sig, lambda b: b"\x00" + b) + head + body
    if kind == 17 and b"rsa-sha" in sig:
        return _resign_b(sig, lambda b: b.lstrip(b"\x00")[1:] or b"\x00") + head + body
    if kind == 18:
        return b"X-Added: later\r\n" + msg
    if kind == 19:
        return sig + b"not a header line\r\n" + head + body
    if kind == 20:
        return re.sub(rb"c=[a-z/]+", b"c=fancy/odd", sig, count=1) + head + body
    if kind == 21:
        return re.sub(rb"a=[a-z0-9-]+", b"a=rsa-sha512", sig, count=1) + head + body
    if kind == 22:
        return re.sub(rb"l=\d+", b"l=99999999", sig, count=1) + head + body
    if kind == 23:
        return sig.replace(b"\r\n", b"\n") + head.replace(b"\r\n", b"\n") + body
    if kind == 24:
        return sig + head + body.replace(b"\r\n", b"\n", 1)
    if kind == 25:
        return b"\r\n" + msg
    return msg


def corpus() -> list[bytes]:
    """The messages, deterministic for SEED (the keys are made at test time)."""
    rng = random.Random(SEED)
    out: list[bytes] = []
    for n in range(BASES):
        head, body = _headers(rng, n), _body(rng)
        sig = _sign(rng, head + body)
        extra = rng.random()
        if extra < 0.25:  # a second signature, over the first one
            sig = _sign(rng, sig + head + body) + sig
        if extra < 0.05:  # and a third
            sig = _sign(rng, sig + head + body) + sig
        kinds = [0, *rng.sample(range(1, 26), VARIANTS - 1)]
        out += [_tamper(rng, kind, sig, head, body) for kind in kinds]
    return out


def both(raw: bytes, keys: dict[bytes, KeyRecord]) -> tuple[tuple[object, ...], ...]:
    """dkimpy's answers and the OpenSSL path's, as the plugin computes them."""
    values = [v.encode("utf-8", "surrogateescape") for v in Message(raw).get_all("DKIM-Signature")]
    names = [signature_key_name(v) for v in values]
    return tuple(
        verify_all(raw, values, names, keys, verifier_class=cls) for cls in (dkim.DKIM, FastDKIM)
    )


def test_openssl_path_gives_dkimpys_answers_on_the_corpus() -> None:
    keys = key_records()
    messages = corpus()
    assert len(messages) >= 2000
    outcomes: collections.Counter[str] = collections.Counter()
    mismatches = []
    for raw in messages:
        reference, fast = both(raw, keys)
        if reference != fast:
            mismatches.append((raw[:300], reference, fast))
        outcomes.update(r.result for r in reference)
    assert not mismatches, f"{len(mismatches)} mismatches; first: {mismatches[0]}"
    # The corpus reaches every outcome, often.
    for outcome in ("pass", "fail", "neutral", "permerror", "temperror"):
        assert outcomes[outcome] >= 20, outcomes


@pytest.mark.parametrize(
    "body",
    [b"", b"\r\n", b"a\r\n", b"a  b\r\n", b"a\tb\r\n", b"a \r\n", b"a\r\n\r\n\r\n", b"a b"],
)
def test_canonical_body_is_dkimpys(body: bytes) -> None:
    for algorithm in (Relaxed, Simple):
        assert canonical_body(algorithm, body) == algorithm.canonicalize_body(body)


def test_signature_reencodings_textbook_rsa_accepts_pass_on_both_paths() -> None:
    keys = key_records()
    rng = random.Random(1)
    head, body = _headers(rng, 0), b"hello\r\n"
    sig = b""
    while b"s=r2048" not in sig:
        sig = _sign(rng, head + body)
    for kind in (0, 15, 16):
        reference, fast = both(_tamper(rng, kind, sig, head, body), keys)
        assert [r.result for r in reference] == [r.result for r in fast] == ["pass"]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=60).map(lambda b: bytes(b" \t\r\na"[x % 5] for x in b)))
def test_canonical_body_is_dkimpys_on_any_blanks(body: bytes) -> None:
    for algorithm in (Relaxed, Simple):
        assert canonical_body(algorithm, body) == algorithm.canonicalize_body(body)


def test_a_verifier_given_another_message_forgets_the_first_body() -> None:
    keys = key_records()
    rng = random.Random(2)
    head = _headers(rng, 0)
    first, second = b"one\r\n", b"two\r\n"
    sig = b""
    while b"s=r2048" not in sig:
        sig = _sign(rng, head + first)

    def dnsfunc(name: bytes, timeout: float = 5) -> KeyRecord:
        return keys.get(name)

    verifier = FastDKIM(sig + head + first, minkey=1024)
    assert verifier.verify(dnsfunc=dnsfunc)
    verifier.set_message(sig + head + second)
    with pytest.raises(dkim.ValidationError, match="body hash mismatch"):
        verifier.verify(dnsfunc=dnsfunc)
