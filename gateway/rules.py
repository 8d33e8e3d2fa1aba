"""Rule declarations: the rule ids a plugin puts on its verdicts, with their defaults.

Each plugin lists its rules in a class attribute ``RULES`` (a tuple of
:class:`Rule`), as rspamd declares symbols. From that one declaration
``mailgate check`` refuses an unknown id in ``rule_modes`` (or in a plugin's
``rules:`` map), ``mailgate rules -c POLICY`` lists every rule, and the docs'
rule tables are tested against it.

A rule id whose last part depends on the config is declared with a
placeholder in angle brackets: ``headers.missing_<name>`` stands for
``headers.missing_date``, ``headers.missing_message_id`` and so on.

A configured plugin may say which concrete ids its placeholders stand for
with an optional method ``configured_rules()``, returning :class:`Rule` objects
whose ids are instances of its declared placeholders (with the action and
score its config gives them); :func:`rules_in_use` puts them in place of the
placeholder, for ``mailgate rules`` and the verdict metrics' zero series.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

RuleAction = Literal["accept", "reject", "tempfail", "tag", "quarantine"]

_PLACEHOLDER = re.compile(r"<[a-z_]+>")


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule id a plugin may return, with its default action, score and a description."""

    id: str
    """``plugin.rule``; a ``<placeholder>`` stands for a part the config names."""
    action: RuleAction
    """What the verdict does by default (the plugin's config may change it)."""
    description: str
    """One line: when the rule fires."""
    score: float = 0.0
    """The score a tag adds by default."""

    def matches(self, rule_id: str) -> bool:
        """True when ``rule_id`` is this rule, or an instance of its placeholder."""
        if "<" not in self.id:
            return rule_id == self.id
        parts = _PLACEHOLDER.split(self.id)
        pattern = r"[A-Za-z0-9_.+-]+".join(re.escape(p) for p in parts)
        return re.fullmatch(pattern, rule_id) is not None


def declared_rules(plugin: object) -> tuple[Rule, ...] | None:
    """The ``RULES`` a plugin (class, instance or module) declares; None when it declares none."""
    rules = getattr(plugin, "RULES", None)
    if rules is None:
        return None
    return tuple(rules)


def configured_rules(plugin: object, declared: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """What a configured plugin's ``configured_rules()`` returns (empty without one).

    Raises ValueError for an id with a placeholder left or one that is no
    instance of a declared placeholder.
    """
    method = getattr(plugin, "configured_rules", None)
    if method is None:
        return ()
    found = tuple(method())
    placeholders = [rule for rule in declared if "<" in rule.id]
    for rule in found:
        if not isinstance(rule, Rule):
            raise ValueError(f"configured_rules() gave {rule!r}, not a mailgate.Rule")
        if "<" in rule.id or not any(p.matches(rule.id) for p in placeholders):
            known = ", ".join(p.id for p in placeholders) or "none"
            raise ValueError(
                f"configured_rules() gave {rule.id!r}, which is no instance of a declared "
                f"placeholder ({known})"
            )
    return found


def rules_in_use(declared: tuple[Rule, ...], concrete: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """The declared rules with each placeholder followed by its concrete instances.

    A placeholder no concrete id matches stays as it is (its instances are not
    known before traffic).
    """
    rules: list[Rule] = []
    for rule in declared:
        rules.append(rule)
        if "<" in rule.id:
            rules.extend(c for c in concrete if rule.matches(c.id) and c not in rules)
    return tuple(rules)


def unknown_rule_message(rule_id: str, rules: Iterable[Rule]) -> str:
    """``unknown rule id 'spf.fial' (did you mean 'spf.fail'?)``, or with the known ids."""
    ids = [rule.id for rule in rules]
    close = difflib.get_close_matches(rule_id, ids, n=1, cutoff=0.6)
    if close:
        return f"unknown rule id {rule_id!r} (did you mean {close[0]!r}?)"
    return f"unknown rule id {rule_id!r} (known: {', '.join(ids) or 'none'})"
