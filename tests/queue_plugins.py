"""Plugins for the quarantine tests, loaded by dotted path."""

from __future__ import annotations

from typing import Literal

from mailgate import Envelope, Message, PluginConfig, Verdict, hookimpl


class HoldConfig(PluginConfig):
    """Config of :class:`Hold`."""

    hook: Literal["on_mail", "on_data"] = "on_data"
    rule: str = "test.hold"
    marker: str = "quarantine-me"
    """Held when the sender (on_mail) or the message (on_data) contains this."""
    score: float = 0.0


class Hold:
    """Quarantines mail that carries a marker; with ``marker: ""`` it only adds ``score``."""

    Config = HoldConfig

    def __init__(self, config: HoldConfig) -> None:
        self.config = config

    def _judge(self, text: str) -> Verdict | None:
        c = self.config
        if not c.marker:
            return Verdict.tag(c.rule, "scored", score=c.score) if c.score else None
        if c.marker in text:
            return Verdict.quarantine(c.rule, f"carries {c.marker!r}", score=c.score)
        return None

    @hookimpl
    def on_mail(self, sender: str) -> Verdict | None:
        return self._judge(sender) if self.config.hook == "on_mail" else None

    @hookimpl
    def on_data(self, envelope: Envelope, message: Message) -> Verdict | None:
        if self.config.hook != "on_data":
            return None
        return self._judge(message.raw.decode("utf-8", "replace"))
