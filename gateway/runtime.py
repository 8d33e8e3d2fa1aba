"""A loaded policy and everything built from it: plugins, stage runner, upstream.

Sessions take a reference to the :class:`Runtime` current when they connect
and keep it to the end, so swapping in a new runtime (a reload) never changes
the rules under a transaction in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mailgate import state as state_store
from mailgate.dns import Resolver
from mailgate.maildir import MaildirUpstream
from mailgate.observer import Observers
from mailgate.policy import Policy
from mailgate.policy import Upstream as UpstreamConfig
from mailgate.queue import QueueUpstream
from mailgate.registry import LoadedPlugin, PluginSet, PluginSettings, load_policy
from mailgate.relay import SmtpUpstream, Upstream
from mailgate.stages import StageRunner
from mailgate.state.memory import MemoryState
from mailgate.yamlsource import Document, load_file

if TYPE_CHECKING:
    from mailgate.session import SmtpSession


@dataclass(frozen=True, slots=True)
class StartupContext:
    """Shared services handed to every plugin's ``on_startup``."""

    policy: Policy
    hostname: str
    dns: Resolver
    state: state_store.StateBackend = field(default_factory=MemoryState)
    """The rate-limit and greylist store (``mailgate.state``), one per process and config."""
    plugins: Mapping[str, LoadedPlugin] = field(default_factory=dict)

    def settings_of(self, plugin: object) -> PluginSettings:
        """The common settings (``mode``, ``rule_modes``, ``timeout``) of ``plugin``."""
        for loaded in self.plugins.values():
            if loaded.plugin is plugin:
                return loaded.settings
        return PluginSettings()


class Runtime:
    """One policy, validated and built; start it before use, stop it after."""

    def __init__(
        self,
        policy: Policy,
        plugin_set: PluginSet,
        filename: str,
        upstream: Upstream | None = None,
    ) -> None:
        self.policy = policy
        self.filename = filename
        self.plugin_set = plugin_set
        self.observers = Observers()
        """Subscribe here to watch this runtime's data path (metrics, ``mailgate test``)."""
        self.runner = StageRunner(plugin_set, self.observers)
        self.dns = Resolver(policy.dns)
        self.upstream: Upstream = upstream or make_upstream(policy, self.dns)
        self.queue: QueueUpstream | None = None
        """The spool: queue mode's upstream, or (in-line mode) the home of held mail;
        None with a stand-in ``upstream`` (``mailgate test``: nothing is held for real)."""
        if isinstance(self.upstream, QueueUpstream):
            self.queue = self.upstream
        elif upstream is None:
            self.queue = QueueUpstream(
                policy,
                lambda config: upstream_for(config, policy.hostname, self.dns),
                held_only=True,
            )
        self.state: state_store.StateBackend | None = None
        self.sessions: set[SmtpSession] = set()
        """The open connections that use this runtime."""
        self._no_sessions = asyncio.Event()
        self._no_sessions.set()

    def session_opened(self, handler: SmtpSession) -> None:
        """A connection started using this runtime (``handler.session`` is set)."""
        assert handler.session is not None
        self.sessions.add(handler)
        self._no_sessions.clear()
        self.observers.session_opened(handler.session)

    def session_closed(self, handler: SmtpSession) -> None:
        """A connection that used this runtime is gone."""
        assert handler.session is not None
        self.sessions.discard(handler)
        if not self.sessions:
            self._no_sessions.set()
        self.observers.session_closed(handler.session)

    def transactions_in_flight(self) -> int:
        """How many of this runtime's sessions are inside a transaction (MAIL to its end)."""
        return sum(1 for handler in self.sessions if handler.txn is not None)

    async def wait_no_sessions(self) -> None:
        """Return once every connection using this runtime has closed."""
        await self._no_sessions.wait()

    @classmethod
    def from_document(cls, doc: Document) -> Runtime:
        """Validate a loaded document; raises ``SourceError`` with every problem found."""
        policy, plugin_set = load_policy(doc)  # every error, core and plugins, in one pass
        return cls(policy, plugin_set, doc.filename)

    @classmethod
    def load(cls, path: str) -> Runtime:
        """Read, validate and build the policy at ``path``."""
        return cls.from_document(load_file(path))

    async def start(self) -> None:
        """Run every plugin's ``on_startup``."""
        self.state = state_store.acquire(self.policy.state)
        context = StartupContext(
            self.policy, self.policy.hostname, self.dns, self.state, self.plugin_set.plugins
        )
        await self.runner.run_event("on_startup", context=context)
        if self.queue is not None:
            await self.queue.start()  # resumes the spool (in-line mode: only if it exists)

    async def stop(self) -> None:
        """Run every plugin's ``on_shutdown`` and close idle upstream connections."""
        await self.runner.run_event("on_shutdown")
        await self.upstream.close()
        if self.queue is not None and self.queue is not self.upstream:
            await self.queue.close()
        if self.state is not None:
            self.state = None
            await state_store.release(self.policy.state)


def make_upstream(policy: Policy, dns: Resolver | None = None) -> Upstream:
    """The upstream the policy names: the queue (``delivery: queue``), a server or a Maildir."""
    if policy.delivery == "queue":
        return QueueUpstream(policy, lambda config: upstream_for(config, policy.hostname, dns))
    return upstream_for(policy.upstream, policy.hostname, dns)


def upstream_for(config: UpstreamConfig, hostname: str, dns: Resolver | None) -> Upstream:
    """An ``smtp://`` connection pool or a ``maildir:`` folder."""
    if config.kind == "maildir":
        return MaildirUpstream(config.maildir_path)
    return SmtpUpstream(config, hostname, dns)
