"""Per-rule actions for the built-in checkers (``headers``, ``helo``).

Not a plugin. A checker finds *faults*, each named by a rule id; the policy
decides, rule by rule, what a fault does::

    rules:
      headers.date_skew: monitor                 # shorthand for {action: monitor}
      headers.missing_message_id: {action: tag, score: 2}

- ``reject``: refuse with the rule's reply, which names the fault
  (``550 5.6.0 Duplicate From header``);
- ``tag``: add the rule's ``score`` to the message's score and carry on;
- ``quarantine``: hold the message in the spool (``Verdict.quarantine``; the
  client gets ``250``, see ``mailgate.queue.quarantine``); a later reject still
  refuses it. A fault found at HELO holds every message of the connection;
- ``monitor``: the same as the plugin's ``rule_modes: {RULE: monitor}``;
- ``off``: the same as ``rule_modes: {RULE: off}``.

Monitor and off are not applied here: :attr:`RuleBook.default_rule_modes`
hands them to the core, whose stage runner applies every plugin's modes
alike (the decision line shows ``rule:action(monitor)``). One hook call
returns one verdict per fault: tags and monitored faults first, then the
enforced rejects (the first one ends the stage, so its text is the reply).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from mailgate import Mode, PluginConfig, PluginSettings, Rule, Verdict

Action = Literal["reject", "tag", "quarantine", "monitor", "off"]


class RuleSetting(PluginConfig):
    """What one rule does: ``action`` and, for ``tag``, the ``score`` it adds."""

    action: Action
    score: float | None = Field(default=None, ge=0)
    """The score a tag adds; the rule's default when not given."""


def _shorthand(value: object) -> object:
    return {"action": value} if isinstance(value, str) else value


RuleField = Annotated[RuleSetting, BeforeValidator(_shorthand)]


@dataclass(frozen=True, slots=True)
class Fault:
    """One thing a checker found wrong, in words fit for an SMTP reply."""

    rule: str
    text: str
    repair: tuple[tuple[str, str], ...] = ()
    """Headers that fix the fault; when given, the fault is repaired instead of rejected."""


class RuleBook:
    """A checker's rules with the policy's overrides applied.

    :param rules: the concrete rules (placeholders filled in), with their defaults.
    :param replies: rule id -> (code, enhanced status) of its reject; 550 5.6.0 otherwise.
    """

    def __init__(
        self,
        plugin: str,
        rules: Iterable[Rule],
        overrides: Mapping[str, RuleSetting],
        replies: Mapping[str, tuple[int, str]] | None = None,
    ) -> None:
        self.plugin = plugin
        self.rules = {rule.id: rule for rule in rules}
        unknown = sorted(set(overrides) - set(self.rules))
        if unknown:
            known = ", ".join(sorted(self.rules))
            raise ValueError(f"unknown rule id {', '.join(unknown)} (known: {known})")
        self.overrides = dict(overrides)
        self.replies = dict(replies or {})
        self.settings = PluginSettings()
        """The plugin's common settings, set at ``on_startup`` (orders monitored faults first)."""

    @property
    def default_rule_modes(self) -> dict[str, Mode]:
        """``monitor``/``off`` set under ``rules:``, for the core to apply."""
        return {
            rule_id: setting.action
            for rule_id, setting in self.overrides.items()
            if setting.action in ("monitor", "off")
        }

    def setting(self, rule_id: str) -> tuple[Literal["reject", "tag", "quarantine", "off"], float]:
        """The action and tag score of ``rule_id`` (a monitored rule keeps its action)."""
        rule = self.rules[rule_id]
        override = self.overrides.get(rule_id)
        score = override.score if override and override.score is not None else rule.score
        action = override.action if override else rule.action
        if action == "off":
            return "off", 0.0
        if action == "monitor" or action not in ("reject", "tag", "quarantine"):
            action = "reject" if rule.action == "reject" else "tag"
        return action, score

    def verdict(self, fault: Fault) -> Verdict | None:
        """The verdict of one fault, or None when its rule is off."""
        action, score = self.setting(fault.rule)
        if action == "off":
            return None
        if fault.repair:
            repair_score = score if action == "tag" else 0.0
            return Verdict.tag(
                fault.rule, fault.text, score=repair_score, headers=dict(fault.repair)
            )
        if action == "tag":
            return Verdict.tag(fault.rule, fault.text, score=score)
        if action == "quarantine":
            return Verdict.quarantine(fault.rule, fault.text)
        code, status = self.replies.get(fault.rule, (550, "5.6.0"))
        return Verdict.reject(fault.rule, fault.text, code=code, status=status)

    def decide(self, faults: Iterable[Fault]) -> list[Verdict]:
        """One verdict per fault: tags and monitored faults first, then enforced rejects."""
        verdicts = [v for v in map(self.verdict, faults) if v is not None]

        def ends_stage(verdict: Verdict) -> bool:
            return verdict.reply() is not None and self.settings.mode_of(verdict.rule) == "enforce"

        return sorted(verdicts, key=ends_stage)  # stable: fault order within each group
