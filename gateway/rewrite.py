"""Header fields a plugin asks the core to remove before the message is relayed.

A tag verdict may carry :class:`HeaderStrip` entries (``Verdict.tag(...,
strip=[...])``); the core collects those of enforced verdicts and, at end of
DATA, removes every matching field from the message's header section (a field
with its folded continuation lines) before relaying. The body and every other
byte stay as received. This is how ``auth_results`` removes forged
``Authentication-Results`` headers that claim our authserv-id (RFC 8601 §5).

:func:`assemble` builds the relayed message (the core's headers, then the
message with those fields removed) in one copy: the body is never copied on
its own, and without a field to remove the message is copied once, behind the headers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HeaderStrip:
    """Remove header fields named ``name`` (case-insensitive) whose value ``match`` accepts.

    ``match`` gets the field's value unfolded (continuation CRLFs removed, the
    leading space kept off); ``None`` removes every field of that name.
    """

    name: str
    match: Callable[[str], bool] | None = None

    def applies(self, name: str, value: str) -> bool:
        """True when the field ``name: value`` is to be removed."""
        if name.lower() != self.name.lower():
            return False
        return self.match is None or self.match(value)


def _split(raw: bytes) -> tuple[list[bytes], int]:
    """The header fields (each with its folds and CRLF), and where the rest starts.

    The rest is the blank line and the body (``len(raw)`` when there is none);
    only the header section is copied.
    """
    end = raw.find(b"\r\n\r\n")
    rest = len(raw) if end < 0 else end + 2
    fields: list[bytes] = []
    for line in raw[:rest].splitlines(keepends=True):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
    return fields, rest


def _parse(field: bytes) -> tuple[str, str] | None:
    name, colon, value = field.partition(b":")
    if not colon:
        return None
    return (
        name.decode("ascii", "replace").strip(),
        value.decode("utf-8", "replace").replace("\r\n", "").strip(),
    )


def header_fields(raw: bytes) -> list[tuple[str, str]]:
    """Every header field of ``raw`` as ``(name, unfolded value)``, read as the core reads them.

    Lenient on purpose (white space before the colon is allowed), so that what
    a plugin counts here is exactly what :func:`strip_headers` would remove.
    """
    return [parsed for field in _split(raw)[0] if (parsed := _parse(field))]


def _kept(raw: bytes, strips: Sequence[HeaderStrip]) -> tuple[list[bytes], int] | None:
    """The header fields to keep and where the rest starts; None when none is removed."""
    if not strips:
        return None
    fields, rest = _split(raw)
    kept = [f for f in fields if not ((p := _parse(f)) and any(s.applies(*p) for s in strips))]
    return (kept, rest) if len(kept) < len(fields) else None


def strip_headers(raw: bytes, strips: Sequence[HeaderStrip]) -> bytes:
    """``raw`` without the header fields that one of ``strips`` applies to."""
    kept = _kept(raw, strips)
    return raw if kept is None else _join(b"", *kept, raw)


def assemble(prefix: bytes, raw: bytes, strips: Sequence[HeaderStrip] = ()) -> bytes:
    """``prefix`` followed by ``raw`` without the fields ``strips`` apply to, in one copy."""
    kept = _kept(raw, strips)
    return prefix + raw if kept is None else _join(prefix, *kept, raw)


def _join(prefix: bytes, fields: list[bytes], rest: int, raw: bytes) -> bytes:
    with memoryview(raw) as view:
        return b"".join([prefix, *fields, view[rest:]])
