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

Config: ``timeout`` only (the keys every plugin has); it reads ``domains``
and ``trusted_networks`` from the top of the policy. It is always loaded,
last, when the policy does not name it; naming it under ``plugins:`` places
it (it still runs ``trylast``). It is always enforced: ``mode: monitor`` or
``off``, or a ``rule_modes`` entry, is refused by ``mailgate check`` (an open
relay is never a trial).
"""

from __future__ import annotations

from mailgate import Rule, Session, StartupContext, Verdict, address_domain, hookimpl


class RelayAccess:
    """Refuse recipients outside ``domains`` unless the client is trusted."""

    name = "relay_access"
    RULES = (Rule("relay.denied", "reject", "recipient domain not ours and client not trusted"),)

    def __init__(self) -> None:
        self.domains: frozenset[str] = frozenset()

    @hookimpl
    def on_startup(self, context: StartupContext) -> None:
        """Take our recipient domains from the policy."""
        self.domains = frozenset(context.policy.domains)

    @hookimpl(trylast=True)
    def on_rcpt(self, session: Session, recipient: str) -> Verdict | None:
        """Accept our domains and trusted clients; refuse the rest."""
        if session.trusted:
            return None
        domain = address_domain(recipient)
        if domain in self.domains:
            return None
        return Verdict.reject(
            "relay.denied",
            f"recipient domain {domain or '(none)'} is not ours and client is not trusted",
            code=554,
            status="5.7.1",
            text=f"<{recipient}>: Relay access denied",
        )
