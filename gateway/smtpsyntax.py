"""SMTP command arguments: the path in MAIL and RCPT, and ESMTP parameters.

:func:`parse_path` reads ``<local@domain> PARAMS`` with one regular
expression when the path is a plain dot-atom address, the shape nearly every
client sends; anything else (quoted local parts, source routes, non-ASCII,
a missing ``<``) goes to Python's RFC 5322 address parser, which is what
aiosmtpd uses, so both ways give the same answers (``tests/test_smtpsyntax.py``
checks that). Unlike aiosmtpd, a path with an RFC 2047 encoded word is
refused rather than decoded (RFC 2047 §5 forbids them there, and decoding
could put a CR, LF or NUL in an address).
"""

from __future__ import annotations

import re
from email._header_value_parser import TokenList, get_addr_spec, get_angle_addr
from email.errors import HeaderParseError

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOMAIN = r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[!-Z^-~]+\]"
_PLAIN_PATH = re.compile(rf"<(?!=\?)({_ATOM}(?:\.{_ATOM})*@(?:{_DOMAIN}))>(.*)", re.DOTALL)
_BODY_TYPES = ("7BIT", "8BITMIME")


class ParameterError(ValueError):
    """ESMTP parameters that do not parse (RFC 5321 §4.1.2 ``esmtp-param``)."""


def parse_path(arg: str) -> tuple[str, str] | None:
    """Split ``<address> rest`` into the address and the rest; None when malformed.

    The null path ``<>`` comes back as ``"<>"``, and an address without angle
    brackets is taken as it is (as aiosmtpd does). ``rest`` has its leading
    white space removed.
    """
    plain = _PLAIN_PATH.fullmatch(arg)
    if plain is not None and not (rest := plain[2].lstrip()).startswith("("):
        return plain[1], rest
    if not arg:
        return "", ""
    parse = get_angle_addr if arg.lstrip().startswith("<") else get_addr_spec
    try:
        address, rest = parse(arg)
        addr_spec = address.addr_spec
    except (HeaderParseError, IndexError, AttributeError):  # the last two: the parser's bugs
        return None
    if _has_encoded_word(address):
        return None  # RFC 2047 §5: never in an addr-spec (the parser would decode it)
    return addr_spec, str(rest).lstrip()


def _has_encoded_word(token: object) -> bool:
    if getattr(token, "token_type", None) == "encoded-word":
        return True
    return isinstance(token, TokenList) and any(_has_encoded_word(t) for t in token)


def parse_parameters(words: list[str]) -> dict[str, str | bool]:
    """``KEY=value`` and ``KEY`` words as a dict (a bare keyword maps to True)."""
    params: dict[str, str | bool] = {}
    for word in words:
        key, eq, value = word.partition("=")
        if not key.isalnum() or (eq and not value):
            raise ParameterError(word)
        params[key] = value if eq else True
    return params


def body_type_ok(params: dict[str, str | bool]) -> bool:
    """True when ``BODY`` is absent or one of the types we relay (7BIT, 8BITMIME)."""
    return params.get("BODY", "7BIT") in _BODY_TYPES
