"""Plugins that break (or keep) the hook contract, for the load-time checks in test_plugin_api."""

from __future__ import annotations

import re
from collections.abc import Iterator

from mailgate import Envelope, Message, PluginConfig, Rule, Verdict, hookimpl


class HookWrapper:
    """An old-style pluggy hookwrapper: refused."""

    @hookimpl(hookwrapper=True)
    def on_data(self, message: Message) -> Iterator[None]:
        yield


class NewWrapper:
    """A new-style pluggy wrapper: refused."""

    @hookimpl(wrapper=True)
    def on_rcpt(self, recipient: str) -> Iterator[None]:
        return (yield)


class UnknownHook:
    """A misspelt hook name: refused."""

    @hookimpl
    def on_dat(self, message: Message) -> None:
        """Never called."""


class UnknownArgument:
    """An argument on_rcpt does not offer: refused."""

    @hookimpl
    def on_rcpt(self, rcpt: str) -> None:
        """Never called."""


class PatternConfig(PluginConfig):
    """A regular expression, compiled in ``__init__``."""

    pattern: str = "x"


class BadPatternInInit:
    """Compiles its pattern in ``__init__``: a bad one is a policy error, not a traceback."""

    Config = PatternConfig

    def __init__(self, config: PatternConfig) -> None:
        self.pattern = re.compile(config.pattern)


class TwoFindings:
    """Returns two verdicts at once: a tag and a reject, each with its declared rule id."""

    RULES = (
        Rule("two.tag", "tag", "always tags", 1.0),
        Rule("two.reject", "reject", "always rejects"),
    )

    @hookimpl
    def on_data(self, envelope: Envelope) -> list[Verdict]:
        """Tag, then reject."""
        return [
            Verdict.tag("two.tag", "tagged", score=1.0),
            Verdict.reject("two.reject", "rejected", code=550, status="5.7.1", text="No"),
        ]


class StrayConfiguredRule:
    """Lists a concrete rule id that no declared placeholder stands for: a load error."""

    RULES = (Rule("odd.<name>", "tag", "one per configured name"), Rule("odd.plain", "tag", "x"))

    def configured_rules(self) -> list[Rule]:
        """``odd.first`` is fine; ``other.first`` is no instance of ``odd.<name>``."""
        return [Rule("odd.first", "tag", "one"), Rule("other.first", "tag", "x")]
