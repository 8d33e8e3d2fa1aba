"""The decision log: one ``key=value`` line per transaction, saying what happened and why.

Example::

    txn=3f9a1c.1 client=192.0.2.7 helo=mx.example.net from=<a@example.net>
    rcpts=<b@example.com> rejected_rcpts=<c@example.com>:550
    verdicts=headers.missing_date:tag,spf.fail:reject(monitor) score=1 outcome=delivered
    stage=data reply="250 2.0.0 Ok: queued as 4B1" upstream="250 2.0.0 Ok: queued as 4B1"
    size=5120 ms=12

Message bodies and header values never appear here. With ``log: {format: json}``
the same fields become keys of the JSON line (``rcpts`` and ``verdicts`` as
lists, ``score`` as a number); see ``mailgate.logformat``.
"""

from __future__ import annotations

import logging
import time

from mailgate.context import Envelope, Session, VerdictRecord
from mailgate.logfields import format_fields
from mailgate.verdict import Reply

log = logging.getLogger("mailgate.decision")


def _verdicts(records: list[VerdictRecord]) -> list[str]:
    return [r.label() for r in records]


def emit_fields(fields: list[tuple[str, object]]) -> None:
    """Log one decision line; the fields ride along (``record.fields``) for the JSON format."""
    decision = {k: v if isinstance(v, (int, float, list)) else str(v) for k, v in fields}
    log.info("%s", format_fields(fields), extra={"fields": decision})


def outcome_of(stage: str, reply: Reply | None, kept: str = "") -> str:
    """delivered (2xx at DATA), accepted (2xx earlier), rejected, tempfailed or aborted.

    A 2xx for a message our own spool ``kept`` is that instead: ``queued`` (queue
    mode, the upstream did not take it now) or ``held`` (quarantine).
    """
    if reply is None:
        return "aborted"
    if reply.positive:
        if kept:
            return kept
        return "delivered" if stage == "data" else "accepted"
    return "tempfailed" if reply.transient else "rejected"


def log_transaction(
    session: Session,
    envelope: Envelope,
    *,
    stage: str,
    reply: Reply | None,
    upstream: Reply | None,
    rejected: list[tuple[str, Reply]],
    size: int | None,
) -> None:
    """Write the one decision line for a finished (or abandoned) transaction.

    ``outcome`` is delivered (2xx at DATA), rejected (5xx), tempfailed (4xx) or
    aborted (no final reply: reset, disconnect); ``stage`` says where it ended.
    """
    if not log.isEnabledFor(logging.INFO):
        return  # a level above info: the line would be built only to be dropped
    fields: list[tuple[str, object]] = [
        ("txn", envelope.id),
        ("client", str(session.client_ip)),
        ("helo", session.helo or "-"),
        ("from", f"<{envelope.sender}>"),
        ("rcpts", [f"<{r}>" for r in envelope.recipients]),
    ]
    if rejected:
        fields.append(("rejected_rcpts", [f"<{r}>:{rep.code}" for r, rep in rejected]))
    fields += [
        ("verdicts", _verdicts(envelope.card.verdicts)),
        ("score", float(envelope.card.score)),
        *envelope.log_fields.items(),
        ("outcome", outcome_of(stage, reply, envelope.kept)),
        ("stage", stage),
        ("reply", str(reply) if reply else "-"),
        ("upstream", str(upstream) if upstream else "-"),
    ]
    if size is not None:
        fields.append(("size", size))
    fields.append(("ms", round((time.monotonic() - envelope.started) * 1000)))
    emit_fields(fields)


def log_connection(session: Session, *, outcome: str, reply: Reply | None = None) -> None:
    """Write the decision line for a connection refused before any transaction."""
    if not log.isEnabledFor(logging.INFO):
        return
    fields: list[tuple[str, object]] = [
        ("session", session.id),
        ("client", str(session.client_ip)),
        ("helo", session.helo or "-"),
        ("verdicts", _verdicts(session.card.verdicts)),
        ("outcome", outcome),
        ("reply", str(reply) if reply else "-"),
    ]
    emit_fields(fields)
