"""greylist: ask unknown (client network, sender, recipient) triplets to come back later.

Hook: ``on_rcpt`` (each recipient is its own triplet).

The first time a triplet is seen, the recipient gets a 4xx; a real MTA retries,
and a retry after ``delay`` (and within ``retry_window`` of the first attempt)
passes. A triplet that passed is allowed from then on, for ``lifetime`` after
its latest use. The client is taken as its network (/24 for IPv4, /64 for
IPv6), so senders with pools of outgoing servers pass on their retry from a
neighbouring address. Triplets live in the policy's ``state:`` backend (with
Redis, every gateway shares them), hashed, with TTLs.

Not greylisted: clients in ``trusted_networks`` (``exempt_trusted``) and in
``exempt_networks``; recipients in ``exempt_recipients`` (an address, or a
domain for all its addresses); and, with ``spf_bypass``, senders from the
listed domains whose SPF check passed. That last one reads
``envelope.results["spf"]`` (``result == "pass"``, ``domain``), which the spf
plugin publishes at MAIL FROM only when it decides there (when one of its
results is ``reject`` or ``tempfail``); with a tag-only spf policy there is no
SPF result yet at RCPT and the bypass does not apply.

Rule ids:

========================  ===================================================
``greylist.delayed``      new triplet, or retried before ``delay`` (tempfail)
``greylist.unavailable``  the state backend failed (tempfail 4.3.0, or a tag
                          with ``on_error: allow``)
========================  ===================================================

Reply: ``450 4.7.1 Greylisted, please try again in N seconds``.

Config (defaults in brackets): ``delay`` [5m], ``retry_window`` [2d],
``lifetime`` [35d], ``ipv4_prefix`` [24], ``ipv6_prefix`` [64],
``on_error`` [tempfail] (or ``allow``), ``exempt_trusted`` [true],
``exempt_networks`` [none], ``exempt_recipients`` [none], ``spf_bypass``
[none]: sender domains.

Publishes ``envelope.results["greylist"]``: recipient -> ``new``, ``early``,
``passed``, ``known``, ``exempt`` or ``spf`` (why it went on or did not).
"""

from __future__ import annotations

import math

from pydantic import Field, model_validator

from mailgate import (
    Duration,
    Envelope,
    NetworkField,
    PluginConfig,
    Rule,
    Session,
    StartupContext,
    StateBackend,
    StateError,
    Verdict,
    address_domain,
    hashed,
    hookimpl,
    is_exempt,
)
from mailgate.plugins._state import OnError, StateErrors, client_network, refusal

RESULT = "greylist"


class GreylistConfig(PluginConfig):
    """The ``plugins.greylist`` section."""

    delay: Duration = 300.0
    retry_window: Duration = 2 * 86400.0
    lifetime: Duration = 35 * 86400.0
    ipv4_prefix: int = Field(default=24, ge=0, le=32)
    ipv6_prefix: int = Field(default=64, ge=0, le=128)
    on_error: OnError = "tempfail"
    exempt_trusted: bool = True
    exempt_networks: list[NetworkField] = Field(default_factory=list)
    exempt_recipients: list[str] = Field(default_factory=list)
    spf_bypass: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_times(self) -> GreylistConfig:
        if self.retry_window <= self.delay:
            raise ValueError("retry_window must be longer than delay")
        if self.lifetime <= 0:
            raise ValueError("lifetime must be positive")
        return self


def _lower_names(names: list[str]) -> frozenset[str]:
    return frozenset(n.lower().rstrip(".") for n in names)


class Greylist:
    """Tempfail the first delivery attempt of every unknown triplet."""

    name = "greylist"
    Config = GreylistConfig
    RULES = (
        Rule("greylist.delayed", "tempfail", "new triplet, or retried before delay"),
        Rule("greylist.unavailable", "tempfail", "the state backend failed (on_error)"),
    )

    def __init__(self, config: GreylistConfig) -> None:
        self.config = config
        self.exempt_recipients = _lower_names(config.exempt_recipients)
        self.spf_bypass = _lower_names(config.spf_bypass)
        self.state: StateBackend | None = None
        self.errors = StateErrors(self.name, config.on_error)

    @hookimpl
    def on_startup(self, context: StartupContext) -> None:
        """Take the shared state backend."""
        self.state = context.state

    def _exemption(self, session: Session, envelope: Envelope, recipient: str) -> str | None:
        if is_exempt(session, self.config.exempt_networks, trusted=self.config.exempt_trusted):
            return "exempt"
        rcpt = recipient.lower()
        if rcpt in self.exempt_recipients or address_domain(rcpt) in self.exempt_recipients:
            return "exempt"
        spf = envelope.results.get("spf")
        if (
            self.spf_bypass
            and getattr(spf, "result", None) == "pass"
            and str(getattr(spf, "domain", "")).lower().rstrip(".") in self.spf_bypass
        ):
            return "spf"
        return None

    @hookimpl
    async def on_rcpt(self, session: Session, envelope: Envelope, recipient: str) -> Verdict | None:
        """Check the triplet of this recipient; tempfail it unless it is known or passes now."""
        results: dict[str, str] = envelope.results.setdefault(RESULT, {})
        exemption = self._exemption(session, envelope, recipient)
        if exemption is not None:
            results[recipient] = exemption
            return None
        assert self.state is not None, "on_startup has not run"
        config = self.config
        network = client_network(session.client_ip, config.ipv4_prefix, config.ipv6_prefix)
        key = hashed(network, envelope.sender.lower(), recipient.lower())
        try:
            decision = await self.state.greylist(
                key, config.delay, config.retry_window, config.lifetime
            )
        except StateError as exc:
            return self.errors.verdict(exc, "rcpt", envelope.id)
        results[recipient] = decision.status.value
        if decision.status.allowed:
            return None
        wait = max(1, math.ceil(decision.retry_after))
        return refusal(
            "tempfail",
            "rcpt",
            "greylist.delayed",
            f"{decision.status.value} triplet {network} <{envelope.sender}> <{recipient}>; "
            f"retry in {wait}s",
            f"Greylisted, please try again in {wait} seconds",
        )
