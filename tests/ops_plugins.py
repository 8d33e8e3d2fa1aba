"""Plugins for the operator-tool tests (metrics, reload, dry run, logs), loaded by dotted path."""

from __future__ import annotations

import asyncio
from typing import Literal

from mailgate import Envelope, PluginConfig, StartupContext, Verdict, hookimpl
from mailgate.dns import DnsTempError, Resolver


class RuleConfig(PluginConfig):
    """Config of :class:`Rule`."""

    hook: Literal["on_connect", "on_helo", "on_mail", "on_rcpt", "on_data"] = "on_mail"
    rule: str = "probe.rule"
    action: Literal["tag", "reject", "tempfail", "raise", "sleep"] = "tag"
    score: float = 0.0
    headers: dict[str, str] = {}
    only_recipient: str | None = None
    """At on_rcpt: judge only this recipient."""
    delay: float = 0.0
    """Seconds to wait before judging (a slow plugin)."""
    secret: str = ""
    """Never used; the tests check that its value never reaches a log."""


class Rule:
    """One configurable rule at one hook: tag, reject, tempfail, raise or hang."""

    Config = RuleConfig

    def __init__(self, config: RuleConfig) -> None:
        self.config = config

    async def _judge(self, recipient: str | None = None) -> Verdict | None:
        c = self.config
        if c.only_recipient is not None and recipient != c.only_recipient:
            return None
        if c.delay:
            await asyncio.sleep(c.delay)
        if c.action == "raise":
            raise RuntimeError("probe failure")
        if c.action == "sleep":
            await asyncio.sleep(30)
        if c.action == "reject":
            return Verdict.reject(c.rule, "probe says no")
        if c.action == "tempfail":
            return Verdict.tempfail(c.rule, "probe says later", code=450)
        return Verdict.tag(c.rule, "probe tags", score=c.score, headers=c.headers)

    @hookimpl
    async def on_connect(self) -> Verdict | None:
        return await self._judge() if self.config.hook == "on_connect" else None

    @hookimpl
    async def on_helo(self) -> Verdict | None:
        return await self._judge() if self.config.hook == "on_helo" else None

    @hookimpl
    async def on_mail(self) -> Verdict | None:
        return await self._judge() if self.config.hook == "on_mail" else None

    @hookimpl
    async def on_rcpt(self, recipient: str) -> Verdict | None:
        return await self._judge(recipient) if self.config.hook == "on_rcpt" else None

    @hookimpl
    async def on_data(self) -> Verdict | None:
        return await self._judge() if self.config.hook == "on_data" else None


class TxtProbe:
    """Tags with the TXT record of ``probe.<sender domain>`` (through the shared resolver)."""

    def __init__(self) -> None:
        self.dns: Resolver | None = None

    @hookimpl
    def on_startup(self, context: StartupContext) -> None:
        self.dns = context.dns

    @hookimpl
    async def on_mail(self, envelope: Envelope) -> Verdict | None:
        assert self.dns is not None
        try:
            records = await self.dns.txt(f"probe.{envelope.sender_domain}")
        except DnsTempError:
            return Verdict.tempfail("probe.temperror", "DNS failed")
        if records is None:
            return Verdict.tag("probe.none", "no TXT record")
        value = records[0].decode()
        return Verdict.tag("probe.txt", f"TXT says {value}", headers={"X-Probe": value})
