"""A loaded policy and everything built from it: plugins, stage runner, upstream.

Sessions take a reference to the :class:`Runtime` current when they connect
and keep it to the end, so swapping in a new runtime (a reload) never changes
the rules under a transaction in flight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.dns import Resolver
from gateway.maildir import MaildirUpstream
from gateway.policy import Policy, parse_policy
from gateway.registry import PluginSet, build_plugins
from gateway.relay import SmtpUpstream, Upstream
from gateway.stages import StageRunner
from gateway.yamlsource import Document, load_file


@dataclass(frozen=True, slots=True)
class StartupContext:
    """Shared services handed to every plugin's ``on_startup``."""

    policy: Policy
    hostname: str
    dns: Resolver
    state: Any = None


class Runtime:
    """One policy, validated and built; start it before use, stop it after."""

    def __init__(self, policy: Policy, plugin_set: PluginSet, filename: str) -> None:
        self.policy = policy
        self.filename = filename
        self.plugin_set = plugin_set
        self.runner = StageRunner(plugin_set)
        self.dns = Resolver(policy.dns)
        self.upstream: Upstream = make_upstream(policy)

    @classmethod
    def from_document(cls, doc: Document) -> Runtime:
        """Validate a loaded document; raises ``SourceError`` with every problem found."""
        policy = parse_policy(doc)
        return cls(policy, build_plugins(policy, doc), doc.filename)

    @classmethod
    def load(cls, path: str) -> Runtime:
        """Read, validate and build the policy at ``path``."""
        return cls.from_document(load_file(path))

    async def start(self) -> None:
        """Run every plugin's ``on_startup``."""
        context = StartupContext(self.policy, self.policy.hostname, self.dns)
        await self.runner.run_event("on_startup", context=context)

    async def stop(self) -> None:
        """Run every plugin's ``on_shutdown`` and close idle upstream connections."""
        await self.runner.run_event("on_shutdown")
        await self.upstream.close()


def make_upstream(policy: Policy) -> Upstream:
    """The upstream the policy names."""
    if policy.upstream.kind == "maildir":
        return MaildirUpstream(policy.upstream.maildir_path)
    return SmtpUpstream(policy.upstream, policy.hostname)
