"""helo: HELO/EHLO sanity: syntax, a fully qualified name or an address literal, not us.

Hook: ``on_helo``. The name is judged as the client sent it (RFC 5321 §4.1.1.1:
a domain, or an address literal such as ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``).
Underscores are accepted in names, as many Windows hosts use them. Clients in
``trusted_networks`` are not checked unless ``check_trusted`` is set. A tag
applies to every transaction of the connection; a reject refuses the greeting
(the client may greet again).

Rule ids (action defaults; each overridable under ``rules:``, see ``mailgate.plugins.actions``):

=====================  ======  ================================================  ============
``helo.bad_syntax``    reject  neither a domain nor an address literal           ``501 5.5.2``
``helo.bare_ip``       tag 1   an IP address without the brackets of a literal   ``504 5.5.2``
``helo.not_fqdn``      tag 1   one label only (``localhost``, ``PC01``) or a     ``504 5.5.2``
                               numeric top-level label
``helo.our_name``      reject  our hostname or one of ``own_names``              ``550 5.7.1``
``helo.our_address``   reject  an address of ours that is not the client's own   ``550 5.7.1``
=====================  ======  ================================================  ============

(The last column is the reply when the rule rejects.)

Config (defaults):

- ``own_names``: the policy's ``hostname`` and ``domains``; names a client may
  not claim (compared case-insensitively, trailing dot ignored).
- ``own_addresses: []``: addresses a client may not claim, besides the one it
  connected to.
- ``check_trusted: false``: also check clients in ``trusted_networks``.
- ``rules: {}``: per rule id, ``reject``, ``tag`` (with ``score``), ``quarantine``,
  ``monitor`` or ``off``.

Results: none (the verdicts are in the decision log).
"""

from __future__ import annotations

import ipaddress
import re

from pydantic import Field, field_validator

from mailgate import (
    IPAddress,
    Mode,
    PluginConfig,
    Rule,
    Session,
    StartupContext,
    Verdict,
    hookimpl,
)
from mailgate.plugins.actions import Fault, RuleBook, RuleField

RULES = (
    Rule("helo.bad_syntax", "reject", "neither a domain nor an address literal", 1.0),
    Rule("helo.bare_ip", "tag", "an IP address without the brackets of a literal", 1.0),
    Rule("helo.not_fqdn", "tag", "one label only, or a numeric top-level label", 1.0),
    Rule("helo.our_name", "reject", "our hostname or one of own_names", 1.0),
    Rule("helo.our_address", "reject", "an address of ours that is not the client's own", 1.0),
)
REPLIES = {
    "helo.bad_syntax": (501, "5.5.2"),
    "helo.bare_ip": (504, "5.5.2"),
    "helo.not_fqdn": (504, "5.5.2"),
    "helo.our_name": (550, "5.7.1"),
    "helo.our_address": (550, "5.7.1"),
}
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


class HeloConfig(PluginConfig):
    """The ``helo`` plugin's settings."""

    own_names: list[str] | None = None
    own_addresses: list[str] = Field(default_factory=list)
    check_trusted: bool = False
    rules: dict[str, RuleField] = Field(default_factory=dict)

    @field_validator("own_addresses")
    @classmethod
    def _addresses(cls, values: list[str]) -> list[str]:
        for value in values:
            ipaddress.ip_address(value)  # ValueError names the bad one
        return values


def _literal(hostname: str) -> IPAddress | None:
    """The address in ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``; ValueError if malformed."""
    inner = hostname[1:-1]
    if inner[:5].lower() == "ipv6:":
        return ipaddress.IPv6Address(inner[5:])
    return ipaddress.IPv4Address(inner)


def check_helo(
    hostname: str, *, client_ip: IPAddress, own_names: set[str], own_addresses: set[IPAddress]
) -> list[Fault]:
    """The faults of a HELO/EHLO ``hostname`` (at most two: a form fault, an "ours" fault)."""
    address: IPAddress | None = None
    faults: list[Fault] = []
    if hostname.startswith("[") and hostname.endswith("]"):
        try:
            address = _literal(hostname)
        except ValueError:
            return [Fault("helo.bad_syntax", "Invalid HELO/EHLO address literal")]
    else:
        try:
            if ":" not in hostname and not hostname.replace(".", "").isdigit():
                raise ValueError  # not an address: ip_address needs a colon or digits and dots
            address = ipaddress.ip_address(hostname)
        except ValueError:
            name = hostname[:-1] if hostname.endswith(".") else hostname
            labels = name.split(".")
            if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
                return [Fault("helo.bad_syntax", "Invalid HELO/EHLO hostname")]
            if len(labels) < 2 or labels[-1].isdigit():
                faults.append(Fault("helo.not_fqdn", "HELO/EHLO hostname is not fully qualified"))
            if name.lower() in own_names:
                faults.append(Fault("helo.our_name", "HELO/EHLO claims to be this server"))
            return faults
        faults.append(Fault("helo.bare_ip", "HELO/EHLO address must be a [bracketed] literal"))
    if address in own_addresses and address != client_ip:
        faults.append(Fault("helo.our_address", "HELO/EHLO claims an address of this server"))
    return faults


class Helo:
    """Refuse or tag clients whose HELO/EHLO name is malformed, unqualified or ours."""

    name = "helo"
    Config = HeloConfig
    RULES = RULES

    def __init__(self, config: HeloConfig) -> None:
        self.config = config
        self.book = RuleBook("helo", RULES, config.rules, REPLIES)
        self.own_names = {n.lower().rstrip(".") for n in config.own_names or []}
        self.own_addresses = {ipaddress.ip_address(a) for a in config.own_addresses}

    @hookimpl
    def on_startup(self, context: StartupContext) -> None:
        """Take our names from the policy (unless configured) and the plugin's ``rule_modes``."""
        if self.config.own_names is None:
            names = [context.hostname, *context.policy.domains]
            self.own_names = {n.lower().rstrip(".") for n in names}
        self.book.settings = context.settings_of(self)

    @property
    def default_rule_modes(self) -> dict[str, Mode]:
        """``monitor``/``off`` given under ``rules:`` (the policy's ``rule_modes`` win)."""
        return self.book.default_rule_modes

    @hookimpl
    def on_helo(self, session: Session, hostname: str) -> list[Verdict] | None:
        """Judge the greeting name."""
        if session.trusted and not self.config.check_trusted:
            return None
        own = self.own_addresses | ({session.local_ip} if session.local_ip else set())
        faults = check_helo(
            hostname, client_ip=session.client_ip, own_names=self.own_names, own_addresses=own
        )
        return self.book.decide(faults)
