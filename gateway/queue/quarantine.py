"""Quarantine: a ``quarantine`` verdict holds the message in the spool, held, with its reasons.

Any plugin may return ``Verdict.quarantine(rule, reason)`` (at any stage of
the transaction), and ``scoring.quarantine: N`` holds a message whose score
reaches N (below ``scoring.reject``). At end of DATA, if nothing refused the
message, the session stores it held (:meth:`QueueUpstream.hold`) instead of
relaying it, and the client gets ``250 2.0.0 Ok: held as ID`` once the files
are fsynced. ``mailgate queue list --held | show | release | delete`` manage
held mail; after ``quarantine.lifetime`` it is deleted with a log line, never
a DSN. In in-line mode the spool holds quarantined mail only.
"""

from __future__ import annotations

from mailgate.context import Envelope, Session
from mailgate.verdict import Action

QUARANTINE = Action.QUARANTINE.value


def held_by(session: Session, envelope: Envelope) -> tuple[str, list[str]] | None:
    """``(reason, rule ids)`` if an enforced quarantine verdict holds this transaction."""
    found = [
        r
        for r in (*session.card.verdicts, *envelope.card.verdicts)
        if r.enforced and r.action == QUARANTINE
    ]
    if not found:
        return None
    rules = list(dict.fromkeys(r.rule for r in found))
    reason = "; ".join(dict.fromkeys(r.reason for r in found))
    return reason, rules
