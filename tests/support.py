"""The test suite's harness is the one mailgate ships for plugin authors: mailgate.testing.

Plus what several queue-mode tests look at: the spool's envelopes, and the
Message-IDs an upstream received.
"""

from __future__ import annotations

import json
import re
import smtplib
from pathlib import Path
from typing import Any

from mailgate.testing import (
    MESSAGE,
    Harness,
    LoopThread,
    Received,
    RecordingUpstream,
    RunningGateway,
    UpstreamBehaviour,
    gateway_harness,
    write_policy,
)

__all__ = [
    "MESSAGE",
    "Harness",
    "LoopThread",
    "Received",
    "RecordingUpstream",
    "RunningGateway",
    "UpstreamBehaviour",
    "envelopes",
    "gateway_harness",
    "message_ids",
    "queue_policy_file",
    "queued_ids",
    "transaction",
    "write_policy",
]


def queue_policy_file(path: Path, upstream: RecordingUpstream, **queue: Any) -> Path:
    """Write a queue-mode policy for ``mailgate run`` to ``path``; its spool is ``spool`` beside it.

    ``queue`` adds to (or overrides) ``directory`` and ``retry_min: 1s``.
    """
    queue = {"directory": str(path.parent / "spool"), "retry_min": "1s", **queue}
    policy = {"upstream": upstream.url, "domains": ["example.com"], "delivery": "queue"}
    return write_policy(path, {**policy, "queue": queue})


def queued_ids(spool: Path) -> list[str]:
    """The ids with an envelope in the spool."""
    folder = spool / "queue"
    return sorted(p.stem for p in folder.glob("*.env")) if folder.exists() else []


def envelopes(spool: Path) -> list[dict[str, Any]]:
    """The envelopes in the spool (one delivered between the listing and the read is left out)."""
    folder = spool / "queue"
    if not folder.exists():
        return []
    found = []
    for path in sorted(folder.glob("*.env")):
        try:
            found.append(json.loads(path.read_text()))
        except FileNotFoundError:
            continue
    return found


def message_ids(upstream: RecordingUpstream) -> list[str]:
    """The Message-ID of each message ``upstream`` received, in order."""
    found = [re.search(rb"Message-ID: (<[^>]+>)", m.data) for m in upstream.messages]
    return [m.group(1).decode() for m in found if m]


def transaction(gw: RunningGateway, rcpts: list[str]) -> list[tuple[int, bytes]]:
    """MAIL, each RCPT and (if any was accepted) DATA, on one connection; the reply to each."""
    with gw.client() as client:
        replies = [client.mail("alice@example.net")]
        if replies[0][0] != 250:
            return replies
        replies += [client.rcpt(rcpt) for rcpt in rcpts]
        if any(code == 250 for code, _ in replies[1:]):
            try:
                replies.append(client.data(MESSAGE))
            except smtplib.SMTPDataError as exc:
                replies.append((exc.smtp_code, exc.smtp_error))
    return replies
