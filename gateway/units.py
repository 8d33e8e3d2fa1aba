"""Units that read like an operator writes them: ``30s``, ``25MB``, ``100/1h``.

Each parser takes the YAML value (a number or a string) and raises ``ValueError``
with a message that says what was expected; the policy loader adds file and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer

_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
}
_NUMBER_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_duration(value: object) -> float:
    """Seconds from ``250ms``, ``30s``, ``5m``, ``1h``, ``2d``, ``1w`` or a bare number."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 30s or 5m, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _NUMBER_UNIT.match(value)):
        unit = m.group(2).lower() or "s"
        if unit not in _DURATION_UNITS:
            raise ValueError(f"unknown duration unit {m.group(2)!r} (use ms, s, m, h, d or w)")
        seconds = float(m.group(1)) * _DURATION_UNITS[unit]
    else:
        raise ValueError(f"expected a duration like 30s or 5m, got {value!r}")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from ``25MB`` (10^6), ``10MiB`` (2^20), ``512KB`` or a bare number of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 25MB, got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _NUMBER_UNIT.match(value)):
        unit = m.group(2).lower()
        if unit not in _SIZE_UNITS:
            raise ValueError(f"unknown size unit {m.group(2)!r} (use B, KB, MB, GB, KiB, MiB, GiB)")
        number = float(m.group(1)) * _SIZE_UNITS[unit]
        if number > 2**62:  # also infinity, from a number too long for a float
            raise ValueError("size is too large")
        size = int(number)
    else:
        raise ValueError(f"expected a size like 25MB, got {value!r}")
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` events per ``period`` seconds."""

    count: int
    period: float

    def __str__(self) -> str:
        return f"{self.count}/{self.period:g}s"


def parse_rate(value: object) -> Rate:
    """A :class:`Rate` from ``100/1h``, ``10/30s`` or ``5/m`` (a bare unit means one of it)."""
    if isinstance(value, Rate):
        return value
    if not isinstance(value, str) or "/" not in value:
        raise ValueError(f"expected a rate like 100/1h, got {value!r}")
    count_text, _, period_text = value.partition("/")
    period_text = period_text.strip()
    if period_text.isalpha():
        period_text = "1" + period_text
    try:
        count = int(count_text.strip())
    except ValueError:
        raise ValueError(f"expected a whole number before '/' in {value!r}") from None
    period = parse_duration(period_text)
    if count < 1 or period <= 0:
        raise ValueError(f"a rate needs a positive count and period, got {value!r}")
    return Rate(count, period)


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""A policy field in seconds, written as ``30s``, ``5m``, ``1h``."""

Size = Annotated[int, BeforeValidator(parse_size)]
"""A policy field in bytes, written as ``25MB``."""

RateField = Annotated[Rate, BeforeValidator(parse_rate), PlainSerializer(str)]
"""A policy field written as ``100/1h``."""
