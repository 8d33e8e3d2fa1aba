"""relay_access: the default relay decision (no open relay).

Hook: ``on_rcpt``, ``trylast``, so any site plugin runs before it and can
pre-empt it with an accept (say, for authenticated users).

A recipient is accepted when its domain is one of the policy's ``domains``
(exact match, case-insensitive) or the client is in ``trusted_networks``;
otherwise the client gets ``554 5.7.1 Relay access denied``.

Rule ids:

===================  ======================================================
``relay.denied``     recipient domain not ours, client not trusted (reject)
===================  ======================================================

Config: none of its own; it reads ``domains`` and ``trusted_networks`` from
the top of the policy. It is always loaded and cannot be turned off.
"""

from __future__ import annotations

from mailgate.context import Session
from mailgate.hookspecs import hookimpl
from mailgate.policy import Policy
from mailgate.verdict import Verdict


class RelayAccess:
    """Refuse recipients outside ``domains`` unless the client is trusted."""

    name = "relay_access"

    def __init__(self, policy: Policy) -> None:
        self.domains = frozenset(policy.domains)

    @hookimpl(trylast=True)
    def on_rcpt(self, session: Session, recipient: str) -> Verdict | None:
        """Accept our domains and trusted clients; refuse the rest."""
        if session.trusted:
            return None
        domain = recipient.rpartition("@")[2].lower().rstrip(".")
        if domain in self.domains:
            return None
        return Verdict.reject(
            "relay.denied",
            f"recipient domain {domain or '(none)'} is not ours and client is not trusted",
            code=554,
            status="5.7.1",
            text=f"<{recipient}>: Relay access denied",
        )
