"""DKIM verification with dkimpy's logic and OpenSSL's RSA: private to the dkim plugin.

dkimpy parses the message, the signature's tags and the key record,
canonicalises and hashes the signed header fields, and decides what every
outcome means, as it always does. The RSA signature check, which dkimpy
does in pure Python (``pow`` on Python integers and byte-at-a-time
conversions), goes to OpenSSL through ``cryptography`` (PKCS#1 v1.5 with
SHA-256 or SHA-1). Ed25519 stays with dkimpy, which already checks it in C
(libsodium through PyNaCl: 38 us against OpenSSL's 64 us on this machine).

How: :class:`FastDKIM` is dkimpy's ``DKIM`` with three methods,
``set_message``, ``verify_sig`` (load the key) and ``verify_sig_process``
(the step after), taken over from dkimpy 1.1.8 step for step, with the same
exceptions and messages. They differ in these places. dkimpy parses only the
header section of a message that is CRLF throughout (the body it would
rebuild is the same bytes). Key records are evaluated by dkimpy once per
distinct record (:func:`evaluate_key`), not once per signature. Only the
header fields a signature's ``h=`` names are canonicalised (dkimpy
canonicalises them all, then selects the last of each name, which the filter
keeps). The RSA check of a key of 1024 bits or more goes to OpenSSL (a key
OpenSSL will not take, and any smaller key, which is a permerror whatever
the signature says, stays with dkimpy's pure-Python check). And the
canonical body is computed once per message and canonicalisation rather than
once per signature (:func:`canonical_body`): dkimpy's relaxed substitutions
run only where they change something, where dkimpy rewrites every single
space into a space (about 0.1 ms per 4 KB). Message parsing, tag parsing,
key record parsing and the canonicalisation of each field stay dkimpy's.

Two places where textbook RSA (dkimpy) and OpenSSL disagree are evened out
before OpenSSL sees the signature: dkimpy reads the signature as an integer
of any length and reduces it modulo n, OpenSSL wants exactly the modulus
length and a value below n. ``tests/test_dkim_differential.py`` runs this
path and dkimpy's over a generated corpus and requires identical answers.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from typing import Any

import dkim
import nacl.exceptions
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from dkim import (
    DnsTimeoutError,
    HashThrough,
    KeyFormatError,
    MessageFormatError,
    UnknownKeyTypeError,
    ValidationError,
    hash_headers,
)
from dkim.canonicalization import (
    CanonicalizationPolicy,
    InvalidCanonicalizationPolicyError,
    Relaxed,
    correct_empty_body,
    strip_trailing_lines,
    strip_trailing_whitespace,
)
from dkim.crypto import HASH_ALGORITHMS, DigestTooLargeError, RSASSA_PKCS1_v1_5_verify

MIN_OPENSSL_BITS = 1024
"""Smaller RSA keys are left to dkimpy (they are refused after a pass anyway)."""

_PADDING = padding.PKCS1v15()
_PREHASHED = {
    "sha256": utils.Prehashed(hashes.SHA256()),
    "sha1": utils.Prehashed(hashes.SHA1()),
}


def _verify_rsa(
    key: rsa.RSAPublicKey, modulus: int, h: Any, signature: bytes, keysize: int, minkey: int
) -> bool:
    """dkimpy's RSA branch with OpenSSL's check: True, False, or KeyFormatError if too small."""
    modlen = (modulus.bit_length() + 7) // 8
    value = int.from_bytes(signature, "big")
    if len(signature) != modlen or value >= modulus:
        # dkimpy reads any length and reduces modulo n; OpenSSL wants exactly that
        signature = (value % modulus).to_bytes(modlen, "big")
    try:
        key.verify(signature, h.digest(), _PADDING, _PREHASHED[h.name])
    except InvalidSignature:
        return False
    if keysize < minkey:
        raise KeyFormatError(f"public key too small: {keysize}")
    return True


_openssl_keys: dict[tuple[int, int], rsa.RSAPublicKey | None] = {}


def _openssl_key(modulus: int, exponent: int) -> rsa.RSAPublicKey | None:
    """OpenSSL's key for (n, e), kept for the next message; None when OpenSSL will not take it."""
    try:
        return _openssl_keys[modulus, exponent]
    except KeyError:
        pass
    key: rsa.RSAPublicKey | None
    try:
        key = rsa.RSAPublicNumbers(exponent, modulus).public_key()
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if len(_openssl_keys) >= 256:
        _openssl_keys.clear()
    _openssl_keys[modulus, exponent] = key
    return key


@functools.lru_cache(maxsize=256)
def _evaluated(record: bytes) -> tuple[Any, int, bytes, bool]:
    return dkim.evaluate_pk(b"", record)  # type: ignore[no-any-return]


def evaluate_key(name: bytes, record: bytes | None) -> tuple[Any, int, bytes, bool]:
    """dkimpy's ``evaluate_pk(name, record)``, with the answers for valid records cached.

    dkimpy parses the key record (pure-Python ASN.1 for RSA, about 25 us) each
    time it is asked; a gateway sees the same few keys over and over. The
    parsed keys are only read, never changed, so sharing them is safe. A
    record that raises is not cached (``lru_cache`` keeps only results).
    """
    if not record:
        return dkim.evaluate_pk(name, record)  # type: ignore[no-any-return]
    return _evaluated(record)


_BLANK_RUNS = re.compile(rb"\t[\t ]*| [\t ]+")
"""The runs of blanks that dkimpy's ``[\t ]+`` -> space changes: all but a single space."""


def canonical_body(algorithm: Any, body: bytes) -> bytes:
    """dkimpy's ``algorithm.canonicalize_body(body)``, without its no-op substitutions.

    dkimpy's relaxed canonicalisation runs two regular-expression substitutions
    over the whole body; the second rewrites every run of blanks, every single
    space included, into a space. Here each runs only when the body has
    something for it to change (a blank before a line end; a tab or two blanks
    in a row), and the second only rewrites the runs that change (all but
    single spaces), which gives the same bytes. The simple canonicalisation,
    and the rest of the relaxed one, are dkimpy's functions unchanged.
    """
    if algorithm is not Relaxed:
        return bytes(algorithm.canonicalize_body(body))
    if b" \r\n" in body or b"\t\r\n" in body:
        body = strip_trailing_whitespace(body)
    if b"\t" in body or b"  " in body:
        body = _BLANK_RUNS.sub(b" ", body)
    return bytes(correct_empty_body(strip_trailing_lines(body)))


class FastDKIM(dkim.DKIM):  # type: ignore[misc]  # dkimpy has no type hints
    """dkimpy's ``DKIM`` whose RSA signature step runs in OpenSSL.

    ``verify_sig_process`` is dkimpy 1.1.8's, step for step and message for
    message; what differs is marked: the canonical body is computed once per
    message and canonicalisation (:func:`canonical_body`), and the RSA
    signature is checked by OpenSSL.
    """

    _bodies: dict[Any, bytes]

    def set_message(self, message: bytes) -> None:
        """dkimpy's, parsing only the header section when the message is CRLF throughout.

        dkimpy splits the whole message into lines and joins the body's lines
        again with CRLF; for a message whose every LF follows a CR, that join
        gives back the bytes after the blank line, so only the header section
        (through the blank line) goes to dkimpy's parser. Anything else (a bare
        LF anywhere, no blank line, an empty first line) is parsed whole.
        """
        self._bodies = {}  # canonical bodies of this message, by algorithm
        end = message.find(b"\r\n\r\n") if message else -1
        if (
            end <= 0
            or message.startswith(b"\r\n")
            or message.count(b"\n") != message.count(b"\r\n")
        ):
            super().set_message(message)
            return
        super().set_message(message[: end + 4])
        self.body = message[end + 4 :]

    def verify_sig(self, sig: Any, include_headers: Any, sig_header: Any, dnsfunc: Any) -> Any:
        """dkimpy's: load the key (here through :func:`evaluate_key`), then verify."""
        name = sig[b"s"] + b"._domainkey." + sig[b"d"] + b"."
        try:
            record = dnsfunc(name, timeout=self.timeout)
            self.pk, self.keysize, self.ktag, self.seqtlsrpt = evaluate_key(name, record)
        except (KeyFormatError, binascii.Error, DnsTimeoutError) as exc:
            self.logger.error("%s", exc)
            return False
        return self.verify_sig_process(sig, include_headers, sig_header, dnsfunc)

    def verify_sig_process(
        self, sig: Any, include_headers: Any, sig_header: Any, dnsfunc: Any
    ) -> Any:
        """Verify one signature whose key dkimpy has loaded (``self.pk``)."""
        if self.tlsrpt == "strict" and not self.seqtlsrpt:
            raise ValidationError("Message is tlsrpt and Service Type is not tlsrpt")
        if not self.tlsrpt and self.seqtlsrpt:
            raise ValidationError("Message is not tlsrpt and Service Type is tlsrpt")
        try:
            canon_policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
        except InvalidCanonicalizationPolicyError as e:
            raise MessageFormatError(f"invalid c= value: {e.args[0]}") from None
        hasher = HASH_ALGORITHMS[sig[b"a"]]
        if b"bh" in sig:
            # changed: the canonical body, once per message and algorithm
            bodies = self._bodies
            algorithm = canon_policy.body_algorithm
            if algorithm not in bodies:
                bodies[algorithm] = canonical_body(algorithm, self.body)
            body = bodies[algorithm]
            if b"l" in sig and not self.tlsrpt:
                body = body[: int(sig[b"l"])]
            bodyhash = hasher(body).digest()
            try:
                bh = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
            except TypeError as e:
                raise MessageFormatError(str(e)) from None
            if bodyhash != bh:
                raise ValidationError(
                    f"body hash mismatch (got {base64.b64encode(bodyhash)!r}, "
                    f"expected {sig[b'bh']!r})"
                )
        if b"from" in include_headers:
            include_headers.append(b"from")
        h = HashThrough(hasher(), self.debug_content)
        # changed: only the fields hash_headers can select are canonicalised (dkimpy
        # canonicalises every field; select_headers keeps the last of each name)
        wanted = set(include_headers)
        headers = canon_policy.canonicalize_headers(
            [field for field in self.headers if field[0].lower() in wanted]
        )
        self.signed_headers = hash_headers(
            h, canon_policy, headers, include_headers, sig_header, sig
        )
        signature = base64.b64decode(re.sub(rb"\s+", b"", sig[b"b"]))
        if self.ktag == b"rsa":
            # changed: OpenSSL for keys it takes of 1024 bits and more
            if self.keysize >= MIN_OPENSSL_BITS:
                key = _openssl_key(self.pk["modulus"], self.pk["publicExponent"])
                if key is not None:
                    return _verify_rsa(
                        key, self.pk["modulus"], h, signature, self.keysize, self.minkey
                    )
            try:
                res = RSASSA_PKCS1_v1_5_verify(h, signature, self.pk)
                if res and self.keysize < self.minkey:
                    raise KeyFormatError(f"public key too small: {self.keysize}")
                return res
            except (TypeError, DigestTooLargeError) as e:
                raise KeyFormatError(f"digest too large for modulus: {e}") from None
        elif self.ktag == b"ed25519":
            try:
                self.pk.verify(h.digest(), signature)
                return True
            except nacl.exceptions.BadSignatureError:
                return False
        else:
            raise UnknownKeyTypeError(self.ktag)
