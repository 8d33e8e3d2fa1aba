"""Mail loops: a message that has passed too many MTAs is refused (``limits.hops``).

A gateway whose upstream (or a route, or the upstream's own routing) leads
back to it would pass a message round for ever, adding a ``Received:`` line
each time. As RFC 5321 §6.3 describes (and Postfix's ``hopcount_limit``
does), the session counts the ``Received:`` fields in the header section
before any plugin runs, and a message with ``limits.hops`` or more (default
100, the RFC's "normally at least 100") gets ``554 5.4.6 Too many hops``: a
permanent refusal, so the client bounces it instead of retrying it.
"""

from __future__ import annotations

import re

from mailgate.context import VerdictRecord
from mailgate.verdict import Reply

HOPS_RULE = "limits.hops"
"""The rule id of a refusal for a mail loop, in the decision line."""

_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)


def hop_count(raw: bytes) -> int:
    """How many ``Received:`` fields the header section of ``raw`` has."""
    if raw.startswith(b"\r\n"):
        return 0  # no header section at all
    end = raw.find(b"\r\n\r\n")
    stop = len(raw) if end < 0 else end + 2
    # The pattern is tried only where a line starts with "received" in any case
    # (bytes.lower folds ASCII only, as re.IGNORECASE does for bytes): a search
    # over the whole section for the pattern anchored at every line cost 3.4 us.
    section = raw[:stop].lower()
    count, start = 0, 0 if section.startswith(b"received") else section.find(b"\nreceived")
    while start >= 0:
        begin = start + 1 if section[start] == 10 else start  # past the LF
        if _RECEIVED.match(raw, begin, stop):
            count += 1
        start = section.find(b"\nreceived", begin + 8)
    return count


def too_many_hops(raw: bytes, limit: int) -> tuple[Reply, VerdictRecord] | None:
    """The refusal for a message with ``limit`` or more hops, or None."""
    hops = hop_count(raw)
    if hops < limit:
        return None
    reason = f"{hops} Received: fields, limit {limit}"
    record = VerdictRecord("core", "on_data", HOPS_RULE, "reject", reason, True)
    return Reply(554, f"Too many hops ({hops}): a mail loop?", "5.4.6"), record
