"""from_addresses reads a plain From without the email package, with the email package's answer."""

from __future__ import annotations

import email.utils
import random

from mailgate.context import Message
from mailgate.helpers import _PLAIN_MAILBOX, from_addresses

_ATEXT = "abcXYZ0189!#$%&'*+-/=?^_`{|}~"
_NOISE = ['"', "(", ")", ",", ";", ":", "<", ">", "@", ".", " ", "\t", "[", "]", "\\", "é", "\r\n "]


def _value(rng: random.Random) -> str:
    def dot_atom() -> str:
        atoms = ("".join(rng.choice(_ATEXT) for _ in range(rng.randint(1, 4))) for _ in "ab")
        return ".".join(list(atoms)[: rng.randint(1, 2)])

    address = f"{dot_atom()}@{dot_atom()}"
    if rng.random() < 0.4:
        value = address
    else:
        words = ("".join(rng.choice("abAB09") for _ in range(rng.randint(1, 5))) for _ in "abc")
        name = " ".join(list(words)[: rng.randint(0, 3)])
        value = f"{name}{' ' * rng.randint(0, 2)}<{address}>"
    if rng.random() < 0.3:  # something getaddresses reads its own way
        at = rng.randrange(len(value) + 1)
        value = value[:at] + rng.choice(_NOISE) + value[at:]
    return value


def test_a_plain_mailbox_is_read_as_getaddresses_reads_it() -> None:
    rng = random.Random(17)
    plain = 0
    for _ in range(50_000):
        value = _value(rng)
        match = _PLAIN_MAILBOX.fullmatch(value)
        if match:
            plain += 1
            expected = [a for _n, a in email.utils.getaddresses([value]) if a]
            assert [match[1] or match[2]] == expected, value
    assert plain > 20_000


def test_from_addresses_gives_getaddresses_answer_for_every_from() -> None:
    rng = random.Random(18)
    for _ in range(3_000):
        froms = [_value(rng) for _ in range(rng.randint(0, 3))]
        raw = (
            "".join(f"From: {v}\r\n" for v in froms).encode("utf-8") + b"Subject: x\r\n\r\nbody\r\n"
        )
        message = Message(raw)
        expected = [
            a for _n, a in email.utils.getaddresses(message.get_all("From")) if a
        ]  # what from_addresses gave before its plain path
        assert from_addresses(message) == expected, froms
