"""ratelimit: limit connections, messages or recipients per client, sender or recipient.

Hooks: ``on_connect``, ``on_helo``, ``on_mail``, ``on_rcpt``, ``on_data``;
each rule runs at one of them (its ``stage``).

Each rule counts requests in a GCRA bucket (a token bucket without a timer:
``rate`` refills it, ``burst`` is its size) kept in the policy's ``state:``
backend, so with ``state: redis://...`` every gateway process shares one
count. The key of a bucket is made of the rule's selectors:

====================  ====================================================
``client_ip``         the client's network: /32 for IPv4, /64 for IPv6
                      (``ipv4_prefix``, ``ipv6_prefix``)
``helo``              the HELO/EHLO name, lower-cased
``sender``            the envelope sender, lower-cased (``<>`` when null)
``sender_domain``     its domain (``<>`` for the null sender)
``recipient``         one envelope recipient, lower-cased
``recipient_domain``  its domain
====================  ====================================================

``key: [sender_domain, recipient_domain]`` combines selectors: one bucket
per pair. A rule counts ``connections`` (at ``connect``, or ``helo`` when it
uses the HELO name), ``messages`` (at ``mail`` by default; at ``rcpt`` when
it uses a recipient: one message per recipient; or at ``data``: messages
that reached end of DATA) or ``recipients`` (at ``rcpt``; at ``data`` one
per recipient of the message). A refused request is not counted.

Rules run in policy order; the first rule that is over its limit (and is
enforced) refuses the request, and rules after it do not count it. A rule in
monitor mode (``rule_modes: {ratelimit.NAME: monitor}``) is evaluated, its
hit returned with the others (the core records it as monitored), and the
next rules still run, so a rule on trial never shadows
an enforced one.

Rule ids:

==========================  ================================================
``ratelimit.<name>``        rule ``<name>`` is over its limit (tempfail,
                            or reject with ``action: reject``)
``ratelimit.unavailable``   the state backend failed (tempfail 4.3.0, or a
                            tag with ``on_error: allow``)
==========================  ================================================

Replies: ``450 4.7.1 Rate limit exceeded, try again later`` (421 at
connect, 451 at DATA); with ``action: reject``, ``550 5.7.1 Rate limit
exceeded`` (554 at connect).

Config (defaults in brackets):

- ``rules`` (required): a list of rules, each with ``key`` (a selector or a
  list of them), ``rate`` (``N/period``, like ``100/1h``), ``burst`` [the
  rate's N], ``count`` [messages], ``stage`` [see above], ``action``
  [tempfail], ``name`` [the selectors joined by ``+``], ``ipv4_prefix`` [32],
  ``ipv6_prefix`` [64], ``allow`` [none]: values of the rule's selectors
  that it never counts (networks for ``client_ip``, addresses, domains,
  names);
- ``on_error`` [tempfail]: ``tempfail`` or ``allow`` when the state backend
  cannot answer;
- ``exempt_trusted`` [true]: clients in ``trusted_networks`` are not limited;
- ``exempt_networks`` [none]: more client networks that are not limited.

Results: none published; the decision log names the rule that refused.
"""

from __future__ import annotations

import ipaddress
import itertools
from typing import Literal

from pydantic import Field, model_validator

from mailgate import (
    Envelope,
    Network,
    NetworkField,
    PluginConfig,
    PluginSettings,
    RateField,
    Rule,
    Session,
    StartupContext,
    StateBackend,
    StateError,
    Verdict,
    address_domain,
    hashed,
    hookimpl,
    in_networks,
    is_exempt,
)
from mailgate.plugins._state import OnError, Stage, StateErrors, client_network, refusal

Selector = Literal["client_ip", "helo", "sender", "sender_domain", "recipient", "recipient_domain"]
Counted = Literal["connections", "messages", "recipients"]

STAGE_ORDER: tuple[Stage, ...] = ("connect", "helo", "mail", "rcpt", "data")
# The first stage at which each selector has a value.
SELECTOR_STAGE: dict[str, Stage] = {
    "client_ip": "connect",
    "helo": "helo",
    "sender": "mail",
    "sender_domain": "mail",
    "recipient": "rcpt",
    "recipient_domain": "rcpt",
}
COUNTED_STAGES: dict[str, tuple[Stage, ...]] = {
    "connections": ("connect", "helo"),
    "messages": ("mail", "rcpt", "data"),
    "recipients": ("rcpt", "data"),
}
MAX_KEY_LENGTH = 200


def _domain(address: str) -> str:
    return address_domain(address) if address else "<>"


class Limit(PluginConfig):
    """One limit: what is counted, under which key, how fast."""

    key: Selector | list[Selector]
    rate: RateField
    burst: int | None = Field(default=None, ge=1)
    count: Counted = "messages"
    stage: Stage | None = None
    action: Literal["tempfail", "reject"] = "tempfail"
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.+-]+$")
    ipv4_prefix: int = Field(default=32, ge=0, le=32)
    ipv6_prefix: int = Field(default=64, ge=0, le=128)
    allow: list[str] = Field(default_factory=list)

    @property
    def selectors(self) -> tuple[Selector, ...]:
        """The key's selectors, in the order given."""
        return (self.key,) if isinstance(self.key, str) else tuple(self.key)

    @model_validator(mode="after")
    def _fill_defaults(self) -> Limit:
        if not self.selectors:
            raise ValueError("key needs at least one selector")
        earliest = max(STAGE_ORDER.index(SELECTOR_STAGE[s]) for s in self.selectors)
        allowed = COUNTED_STAGES[self.count]
        stage = self.stage or next(
            (s for s in allowed if STAGE_ORDER.index(s) >= earliest), allowed[-1]
        )
        if stage not in allowed:
            raise ValueError(f"{self.count} are counted at {' or '.join(allowed)}, not {stage}")
        late = [
            s
            for s in self.selectors
            if SELECTOR_STAGE[s] not in STAGE_ORDER[: STAGE_ORDER.index(stage) + 1]
        ]
        if late:
            raise ValueError(f"{', '.join(late)} is not known yet at stage {stage}")
        object.__setattr__(self, "stage", stage)
        object.__setattr__(self, "burst", self.burst or self.rate.count)
        object.__setattr__(self, "name", self.name or "+".join(self.selectors))
        return self


class RateLimitConfig(PluginConfig):
    """The ratelimit plugin's own keys."""

    rules: list[Limit] = Field(min_length=1)
    on_error: OnError = "tempfail"
    exempt_trusted: bool = True
    exempt_networks: list[NetworkField] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> RateLimitConfig:
        names = [rule.name for rule in self.rules]
        duplicates = sorted({n for n in names if names.count(n) > 1 and n})
        if duplicates:
            raise ValueError(f"two rules named {', '.join(duplicates)}: give each a name")
        return self


class _CompiledRule:
    """A rule with its id, its allow list split into networks and names, its GCRA interval."""

    def __init__(self, rule: Limit) -> None:
        assert rule.stage is not None and rule.name is not None and rule.burst is not None
        self.rule = rule
        self.stage: Stage = rule.stage
        self.id = f"ratelimit.{rule.name}"
        self.interval = rule.rate.period / rule.rate.count
        self.burst = rule.burst
        self.allow_networks: list[Network] = []
        self.allow_names: set[str] = set()
        for entry in rule.allow:
            try:
                self.allow_networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.allow_names.add(entry.lower().rstrip("."))

    def values(
        self, session: Session, envelope: Envelope | None, recipient: str | None
    ) -> dict[str, list[str]] | None:
        """Each selector's values for this request; None when one has no value."""
        out: dict[str, list[str]] = {}
        for selector in self.rule.selectors:
            if selector == "client_ip":
                vals = [
                    client_network(session.client_ip, self.rule.ipv4_prefix, self.rule.ipv6_prefix)
                ]
            elif selector == "helo":
                vals = [session.helo.lower()] if session.helo else []
            elif envelope is None:
                vals = []
            elif selector == "sender":
                vals = [envelope.sender.lower() or "<>"]
            elif selector == "sender_domain":
                vals = [_domain(envelope.sender)]
            else:
                rcpts = [recipient] if recipient is not None else envelope.recipients
                if selector == "recipient":
                    vals = sorted({r.lower() for r in rcpts})
                else:
                    vals = sorted({_domain(r) for r in rcpts})
            if not vals:
                return None
            out[selector] = vals
        return out

    def allowed(self, session: Session, values: dict[str, list[str]]) -> bool:
        """True when some selector value is on the rule's allow list."""
        if in_networks(session.client_ip, self.allow_networks):
            return True
        return any(v in self.allow_names for vals in values.values() for v in vals)

    def cost(self, envelope: Envelope | None, values: dict[str, list[str]]) -> int:
        """Recipients counted at DATA under a key without recipients: one per recipient."""
        per_recipient = {"recipient", "recipient_domain"} & set(values)
        if self.rule.count == "recipients" and self.stage == "data" and not per_recipient:
            return max(1, len(envelope.recipients)) if envelope else 1
        return 1

    def keys(self, values: dict[str, list[str]]) -> list[str]:
        """One bucket key per combination of the selectors' values."""
        keys = []
        for combo in itertools.product(*values.values()):
            joined = "|".join(combo)
            if len(joined) > MAX_KEY_LENGTH:
                joined = "h:" + hashed(joined)
            keys.append(f"{self.rule.name}:{joined}")
        return keys


class RateLimit:
    """Count requests per key in the shared state; refuse those over a rule's limit."""

    name = "ratelimit"
    Config = RateLimitConfig
    RULES = (
        Rule(
            "ratelimit.<name>",
            "tempfail",
            "limit <name> is over its rate (reject with action: reject)",
        ),
        Rule(
            "ratelimit.unavailable",
            "tempfail",
            "the state backend failed (4.3.0; a tag with on_error: allow)",
        ),
    )

    def __init__(self, config: RateLimitConfig) -> None:
        self.config = config
        self.rules = [_CompiledRule(rule) for rule in config.rules]
        self.state: StateBackend | None = None
        self.settings = PluginSettings()
        self.errors = StateErrors(self.name, config.on_error)

    def configured_rules(self) -> list[Rule]:
        """One ``ratelimit.NAME`` per configured limit, with its action."""
        return [
            Rule(rule.id, rule.rule.action, f"limit {rule.rule.name} is over its rate")
            for rule in self.rules
        ]

    @hookimpl
    def on_startup(self, context: StartupContext) -> None:
        """Take the shared state backend and this plugin's rule modes."""
        self.state = context.state
        self.settings = context.settings_of(self)

    def _exempt(self, session: Session) -> bool:
        return is_exempt(session, self.config.exempt_networks, trusted=self.config.exempt_trusted)

    async def _check(
        self,
        stage: Stage,
        session: Session,
        envelope: Envelope | None = None,
        recipient: str | None = None,
    ) -> list[Verdict] | None:
        rules = [r for r in self.rules if r.stage == stage]
        if not rules or self._exempt(session):
            return None
        assert self.state is not None, "on_startup has not run"
        verdicts: list[Verdict] = []
        for rule in rules:
            mode = self.settings.mode_of(rule.id)
            if mode == "off":
                continue
            values = rule.values(session, envelope, recipient)
            if values is None or rule.allowed(session, values):
                continue
            cost = rule.cost(envelope, values)
            for key in rule.keys(values):
                try:
                    decision = await self.state.rate(key, rule.interval, rule.burst, cost)
                except StateError as exc:
                    txn = envelope.id if envelope is not None else session.id
                    return [*verdicts, self.errors.verdict(exc, stage, txn)]
                if decision.allowed:
                    continue
                verdict = refusal(
                    rule.rule.action,
                    stage,
                    rule.id,
                    f"{rule.rule.count} over {rule.rule.rate} (burst {rule.burst}) for "
                    f"{key.partition(':')[2]}; next allowed in {decision.retry_after:.0f}s",
                    "Rate limit exceeded"
                    + (", try again later" if rule.rule.action == "tempfail" else ""),
                )
                verdicts.append(verdict)
                if mode == "enforce":
                    return verdicts  # later rules do not count a refused request
                break  # monitored: the core records it; the next rules still count
        return verdicts or None

    @hookimpl
    async def on_connect(self, session: Session) -> list[Verdict] | None:
        """Rules counting connections at connect."""
        return await self._check("connect", session)

    @hookimpl
    async def on_helo(self, session: Session) -> list[Verdict] | None:
        """Rules that count at HELO/EHLO."""
        return await self._check("helo", session)

    @hookimpl
    async def on_mail(self, session: Session, envelope: Envelope) -> list[Verdict] | None:
        """Rules that count at MAIL FROM."""
        return await self._check("mail", session, envelope)

    @hookimpl
    async def on_rcpt(
        self, session: Session, envelope: Envelope, recipient: str
    ) -> list[Verdict] | None:
        """Rules that count at each RCPT TO."""
        return await self._check("rcpt", session, envelope, recipient)

    @hookimpl
    async def on_data(self, session: Session, envelope: Envelope) -> list[Verdict] | None:
        """Rules that count at end of DATA."""
        return await self._check("data", session, envelope)
