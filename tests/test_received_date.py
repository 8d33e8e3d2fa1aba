"""The Received header's date, formatted once per second, is formatdate's to the character."""

from __future__ import annotations

import email.utils
import random
from unittest import mock

from mailgate.session import _received_date


def test_received_date_is_formatdates_at_every_instant() -> None:
    rng = random.Random(17)
    fractions = [0.0, 1e-7, 0.5, 0.9999994, 0.9999996, 0.9999999]
    instants = [rng.randint(0, 2**31) + rng.choice(fractions) for _ in range(5000)]
    instants += [rng.uniform(0, 2e9) for _ in range(5000)]
    instants += [1_800_000_000 + i / 7 for i in range(100)]  # the same second again and again
    for now in instants:
        with mock.patch("time.time", return_value=now):
            assert _received_date() == email.utils.formatdate(now, localtime=True), now
