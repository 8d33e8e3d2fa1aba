"""Delivery status notifications (RFC 3464) for mail the queue could not deliver.

A DSN goes to the envelope sender, from the null sender (so it can never
bounce back), as ``multipart/report; report-type=delivery-status`` with three
parts: a short text for people, the ``message/delivery-status`` fields per
failed recipient (Final-Recipient, Action: failed, Status, Diagnostic-Code),
and the original message's header section (``text/rfc822-headers``), never
its body.
"""

from __future__ import annotations

import email.utils
import re
import secrets
from dataclasses import dataclass

from mailgate.verdict import Reply

_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


@dataclass(frozen=True, slots=True)
class Failure:
    """One recipient that will not be delivered, and why."""

    recipient: str
    reply: Reply
    expired: bool = False


def _status(failure: Failure) -> str:
    text = f"{failure.reply.status} {failure.reply.text}".strip()
    if match := _STATUS.match(text):
        status = match.group(0)
    else:
        status = f"{str(failure.reply.code)[0]}.0.0"
    # An expired message failed for good, whatever the last (temporary) reason was.
    return "4.4.7" if failure.expired and status.startswith("4.") else status


def _oneline(text: str) -> str:
    return " ".join(text.split())


def _header_section(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]


def build_dsn(
    *,
    hostname: str,
    queue_id: str,
    sender: str,
    arrival: float,
    failures: list[Failure],
    message: bytes,
) -> bytes:
    """The DSN message (CRLF line endings) telling ``sender`` about ``failures``."""
    boundary = f"{queue_id}.{secrets.token_hex(8)}/{hostname}"
    now = email.utils.formatdate(localtime=True)
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {now}",
        f"Message-ID: <{queue_id}.{secrets.token_hex(4)}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "",
        f"This is the mail system at host {hostname}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "",
    ]
    for failure in failures:
        why = "delivery time expired" if failure.expired else "refused"
        lines.append(f"<{failure.recipient}>: {why}: {_oneline(str(failure.reply))}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {hostname}",
        f"X-Mailgate-Queue-ID: {queue_id}",
        f"Arrival-Date: {email.utils.formatdate(arrival, localtime=True)}",
    ]
    for failure in failures:
        lines += [
            "",
            f"Final-Recipient: rfc822; {failure.recipient}",
            "Action: failed",
            f"Status: {_status(failure)}",
            f"Diagnostic-Code: smtp; {_oneline(str(failure.reply))}",
            f"Last-Attempt-Date: {now}",
        ]
    lines += [
        "",
        f"--{boundary}",
        "Content-Description: Undelivered Message Headers",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    head = "\r\n".join(lines).encode("utf-8", "surrogateescape") + b"\r\n"
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head + _header_section(message) + tail
