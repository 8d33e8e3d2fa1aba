"""Time per DKIM verification: dkimpy as shipped against the OpenSSL signature step.

For RSA 1024, 2048 and 4096 bits and Ed25519, one message of ``--size``
bytes (relaxed/relaxed, signed by dkimpy) is verified ``--count`` times in a
tight loop by each path: ``dkimpy`` (``dkim.DKIM(...).verify``, its
pure-Python RSA) and ``openssl`` (``mailgate.plugins._dkimverify.FastDKIM``:
the same dkimpy code with the RSA step in OpenSSL). Both are given the key
record directly (no DNS). The paths alternate in ``--rounds`` rounds; the
median per verification is printed, with the parts of a verification that
do not depend on the key (parsing the message, evaluating the key record).

Run: ``python -m bench.dkim_cost [--count 300] [--rounds 5] [--size 4096] [--blanks]``
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import dkim
import nacl.encoding
import nacl.signing
from cryptography.hazmat.primitives.asymmetric import rsa

from mailgate.plugins._dkimverify import FastDKIM
from tests.authsupport import rsa_pem_and_record

KEYS = ("rsa-1024", "rsa-2048", "rsa-4096", "ed25519")


def make_key(kind: str) -> tuple[bytes, bytes, bytes]:
    """(private key as dkimpy takes it, key record, signature algorithm)."""
    if kind == "ed25519":
        signing = nacl.signing.SigningKey.generate()
        public = signing.verify_key.encode(encoder=nacl.encoding.Base64Encoder)
        seed = signing.encode(encoder=nacl.encoding.Base64Encoder)
        return seed, b"v=DKIM1; k=ed25519; p=" + public, b"ed25519-sha256"
    key = rsa.generate_private_key(public_exponent=65537, key_size=int(kind.split("-")[1]))
    pem, record = rsa_pem_and_record(key)
    return pem, record.encode(), b"rsa-sha256"


def message(size: int, blanks: bool = False) -> bytes:
    """A plain message of about ``size`` bytes; ``blanks``: double spaces and trailing blanks."""
    head = (
        b"From: Bench <bench@sender.example>\r\nTo: <rcpt@example.com>\r\n"
        b"Subject: dkim cost\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n"
        b"Message-ID: <cost@sender.example>\r\n\r\n"
    )
    line = b"The quick brown fox jumps over the lazy dog; mailgate bench filler text.\r\n"
    if blanks:  # the relaxed canonicalisation has work to do: dkimpy's regular expressions
        line = b"The quick  brown fox jumps over the lazy dog;\tmailgate bench filler text. \r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def per_call(fn: Callable[[], object], count: int) -> float:
    """Microseconds per call of ``fn`` over ``count`` calls."""
    start = time.perf_counter()
    for _ in range(count):
        fn()
    return (time.perf_counter() - start) * 1e6 / count


def main(argv: list[str] | None = None) -> int:
    """Print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--blanks", action="store_true", help="double spaces, tabs, trailing blanks")
    args = p.parse_args(argv)
    body = message(args.size, args.blanks)
    print(f"message: {len(body)} bytes; {args.count} verifications x {args.rounds} rounds\n")
    print("| key | dkimpy us/verify | openssl us/verify | ratio |")
    print("|---|---|---|---|")
    for kind in KEYS:
        private, record, algorithm = make_key(kind)
        signed = (
            dkim.sign(
                body,
                b"sel",
                b"sender.example",
                private,
                canonicalize=(b"relaxed", b"relaxed"),
                signature_algorithm=algorithm,
            )
            + body
        )

        def dnsfunc(name: bytes, timeout: float = 5, record: bytes = record) -> bytes:
            return record

        def slow(signed: bytes = signed, dnsfunc: Callable[..., bytes] = dnsfunc) -> None:
            assert dkim.DKIM(signed, minkey=1024).verify(dnsfunc=dnsfunc)

        def fast(signed: bytes = signed, dnsfunc: Callable[..., bytes] = dnsfunc) -> None:
            assert FastDKIM(signed, minkey=1024).verify(dnsfunc=dnsfunc)

        slow_t: list[float] = []
        fast_t: list[float] = []
        for _ in range(args.rounds):
            slow_t.append(per_call(slow, args.count))
            fast_t.append(per_call(fast, args.count))
        s, f = statistics.median(slow_t), statistics.median(fast_t)
        print(f"| {kind} | {s:.0f} | {f:.0f} | {s / f:.2f} |", flush=True)
        if kind == "rsa-2048":
            parse = statistics.median(
                per_call(functools.partial(dkim.DKIM, signed), args.count)
                for _ in range(args.rounds)
            )
            key = statistics.median(
                per_call(functools.partial(dkim.evaluate_pk, b"", record), args.count)
                for _ in range(args.rounds)
            )
            parts = f"parse the message {parse:.0f} us, evaluate the key record {key:.0f} us"
    print(f"\nparts of an rsa-2048 verification (either path): {parts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
