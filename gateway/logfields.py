"""Fields of a log line: one quoting rule for text, the same fields as keys for JSON.

mailgate writes its log lines as ``event: key=value key=value``. A field is
either written in the call's format string (``log.info("queued id=%s size=%d",
qid, size)``: every ``key=%x`` placeholder is a field, its key from the code,
its value the argument) or handed over whole (``extra={"fields": {...}}``, as
the decision line does). :func:`structure` finds them once per format string
(cached) and renders the text with one quoting rule for every value
(:func:`quote`): a value that is empty or holds a space, ``"``, ``=`` or ``\\``
is written in double quotes with ``\\``, ``"``, CR and LF escaped; ``%r`` is
rendered as ``%s`` so no Python quoting reaches the log. The JSON formatter
(``mailgate.logformat``) puts the same fields in as keys, with the argument's
own value (numbers stay numbers).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

_BARE = re.compile(r"^[^\s\"=\\]*$")
# A %-directive: mapping key, flags, width, precision, length, conversion.
_DIRECTIVE = re.compile(
    r"%(?:\((?P<name>[^)]*)\))?[-#0 +]*(?P<width>\*|\d+)?(?:\.(?P<prec>\*|\d+))?[hlL]?"
    r"(?P<conv>[diouxXeEfFgGcrsa%])"
)
_KEY = re.compile(r"(?:^|[\s(\[,;])(?P<key>[A-Za-z_][\w.-]*)=$")


def _text(value: object) -> str:
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) or "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def quote(value: object) -> str:
    """``value`` as it appears after ``key=`` in a text line, quoted only where needed."""
    text = value if type(value) is str else _text(value)  # most values are plain str
    if text and _BARE.match(text):
        return text
    escaped = (
        text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "\\r").replace("\n", "\\n")
    )
    return f'"{escaped}"'


def format_fields(fields: Iterable[tuple[str, object]]) -> str:
    """``key=value`` pairs separated by spaces, values quoted where needed."""
    return " ".join([f"{key}={quote(value)}" for key, value in fields])


def json_value(value: object) -> object:
    """A field's value as JSON holds it: numbers, booleans, lists and null as such."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    return str(value)


# Per format string: its pieces, and for each directive its key (None: not a field).
_Parsed = tuple[list[tuple[str, str | None, str]], bool] | None
_cache: dict[str, _Parsed] = {}
CACHE_SIZE = 2048


def _parse(fmt: str) -> _Parsed:
    """Split ``fmt`` into (literal before, key or None, directive); None if unusable."""
    parsed = _cache.get(fmt)
    if parsed is not None or fmt in _cache:
        return parsed
    pieces: list[tuple[str, str | None, str]] = []
    pos = 0
    named = False
    for match in _DIRECTIVE.finditer(fmt):
        if match["width"] == "*" or match["prec"] == "*":
            pieces = []
            break
        literal = fmt[pos : match.start()]
        pos = match.end()
        if match["conv"] == "%":
            pieces.append((literal + "%", None, ""))
            continue
        named = named or match["name"] is not None
        key = _KEY.search(literal)
        pieces.append((literal, key["key"] if key else None, match.group()))
    result: _Parsed = None
    if pieces and any(key for _, key, _ in pieces):
        pieces.append((fmt[pos:], None, ""))
        result = (pieces, named)
    if len(_cache) >= CACHE_SIZE:
        _cache.clear()
    _cache[fmt] = result
    return result


def structure(record: logging.LogRecord) -> tuple[str, dict[str, object]]:
    """The record's message, values of ``key=`` placeholders quoted, and its fields."""
    fields: dict[str, object] = {}
    given = getattr(record, "fields", None)
    if isinstance(given, Mapping):
        fields.update(given)
    fmt, args = record.msg, record.args
    parsed = _parse(fmt) if isinstance(fmt, str) and args else None
    if parsed is None:
        return record.getMessage(), fields
    pieces, named = parsed
    out: list[str] = []
    index = 0
    try:
        for literal, key, directive in pieces:
            out.append(literal)
            if not directive:
                continue
            if named:
                if not isinstance(args, Mapping):
                    raise TypeError("format wants a mapping")
                name = _DIRECTIVE.match(directive)["name"]  # type: ignore[index]
                value: Any = args[name]
                spec = directive.replace(f"({name})", "", 1)
            else:
                if not isinstance(args, tuple):
                    raise TypeError("format wants a tuple")
                value = args[index]
                index += 1
                spec = directive
            if key is None:
                out.append(spec % (value,))
                continue
            if spec[-1] in "ra":
                spec = spec[:-1] + "s"
            number = isinstance(value, int | float)
            out.append(quote((spec % (value,)).strip() if number else value))
            fields.setdefault(key, value)
    except (LookupError, TypeError, ValueError):
        return record.getMessage(), fields  # a call that does not fit its format: as logging does
    if not named and isinstance(args, tuple) and index != len(args):
        return record.getMessage(), fields
    return "".join(out), fields
