"""Per-rule actions for the built-in checkers (``headers``, ``helo``).

A checker finds *faults*, each named by a rule id; the policy decides, rule by
rule, what a fault does::

    rules:
      headers.date_skew: monitor                 # shorthand for {action: monitor}
      headers.missing_message_id: {action: tag, score: 2}

- ``reject``: refuse with the rule's reply, which names the fault
  (``550 5.6.0 Duplicate From header``);
- ``tag``: add the rule's ``score`` to the message's score and carry on;
- ``monitor``: log the fault, change nothing;
- ``off``: do not report it.

The plugin's ``rule_modes`` (``monitor``/``off`` per rule id) are honoured too.
One hook call returns one verdict: the first rejecting fault, else one tag
carrying every tagging fault's score and headers. Every fault that is not off
is logged on its own line (``mailgate.plugins.<name>``) with its rule id.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from mailgate.registry import Mode, PluginConfig
from mailgate.verdict import Verdict

Action = Literal["reject", "tag", "monitor", "off"]


class RuleSetting(PluginConfig):
    """What one rule does: ``action`` and, for ``tag``, the ``score`` it adds."""

    action: Action
    score: float | None = Field(default=None, ge=0)
    """The score a tag adds; the rule's default when not given."""


def _shorthand(value: object) -> object:
    return {"action": value} if isinstance(value, str) else value


RuleField = Annotated[RuleSetting, BeforeValidator(_shorthand)]


@dataclass(frozen=True, slots=True)
class Rule:
    """A rule id with its defaults: action, tag score, and the reply when it rejects."""

    id: str
    action: Action
    score: float = 1.0
    code: int = 550
    status: str = "5.6.0"


@dataclass(frozen=True, slots=True)
class Fault:
    """One thing a checker found wrong, in words fit for an SMTP reply."""

    rule: str
    text: str
    repair: tuple[tuple[str, str], ...] = ()
    """Headers that fix the fault; when given, the fault is repaired instead of rejected."""


class RuleBook:
    """A checker's rules with the policy's overrides applied."""

    def __init__(self, plugin: str, rules: Iterable[Rule], overrides: Mapping[str, RuleSetting]):
        self.plugin = plugin
        self.rules = {rule.id: rule for rule in rules}
        unknown = sorted(set(overrides) - set(self.rules))
        if unknown:
            known = ", ".join(sorted(self.rules))
            raise ValueError(f"unknown rule id {', '.join(unknown)} (known: {known})")
        self.overrides = dict(overrides)
        self.rule_modes: Mapping[str, Mode] = {}
        self.log = logging.getLogger(f"mailgate.plugins.{plugin}")

    def setting(self, rule_id: str) -> tuple[Action, float]:
        """The action and tag score in force for ``rule_id``."""
        rule = self.rules[rule_id]
        override = self.overrides.get(rule_id)
        action = override.action if override else rule.action
        score = override.score if override and override.score is not None else rule.score
        mode = self.rule_modes.get(rule_id, "enforce")
        if mode == "off" or action == "off":
            return "off", 0.0
        return ("monitor" if mode == "monitor" else action), score

    def decide(self, faults: Iterable[Fault], txn: str) -> Verdict | None:
        """Log every fault and turn them into one verdict (or None)."""
        rejects: list[Fault] = []
        tags: list[tuple[Fault, float]] = []
        for fault in faults:
            action, score = self.setting(fault.rule)
            if action == "off":
                continue
            shown: str = self.rules[fault.rule].action if action == "monitor" else action
            if fault.repair and action != "monitor":
                shown, score = "repair", (score if action == "tag" else 0.0)
                tags.append((fault, score))
            elif action == "reject":
                rejects.append(fault)
            elif action == "tag":
                tags.append((fault, score))
            if action == "monitor":
                shown += "(monitor)"
            self.log.info("txn=%s rule=%s action=%s reason=%s", txn, fault.rule, shown, fault.text)
        if rejects:
            first, rule = rejects[0], self.rules[rejects[0].rule]
            reason = "; ".join(f.text for f in rejects)
            return Verdict.reject(
                first.rule, reason, code=rule.code, status=rule.status, text=first.text
            )
        if tags:
            headers = {name: value for fault, _ in tags for name, value in fault.repair}
            return Verdict.tag(
                tags[0][0].rule,
                "; ".join(f.text for f, _ in tags),
                score=sum(score for _, score in tags),
                headers=headers,
            )
        return None
