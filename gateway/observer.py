"""Observers: what metrics, tracing and other watchers learn from the data path.

The core reports a few events, each from the one place where it happens:

- a session opens or closes (``Runtime.session_opened``/``session_closed``);
- a stage hook finishes, with its verdicts and how long it took (``StageRunner.run_stage``);
- one plugin's hook call returns, with how long it took (``StageRunner._call``: the
  per-plugin latency of ``/metrics`` and ``mailgate test``);
- a plugin fails: raises, times out or returns something that is not a verdict;
- the upstream answers MAIL, RCPT or DATA (:class:`ObservedTransaction`);
- a transaction ends, however it ends (``SmtpSession._finish``).

An :class:`Observer` implements the methods it cares about; the base class
ignores everything. Each runtime has one :class:`Observers` fan-out that the
gateway (metrics) or ``mailgate test`` (the trace) subscribe to. An observer
that raises is logged and never affects mail.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mailgate.context import Envelope, Session
    from mailgate.relay import UpstreamTransaction
    from mailgate.stages import StageOutcome
    from mailgate.verdict import Reply

log = logging.getLogger("mailgate.observer")


class Observer:
    """Receives data-path events; every method here does nothing."""

    def session_opened(self, session: Session) -> None:
        """A client connected and its session started (before ``on_connect``)."""

    def session_closed(self, session: Session) -> None:
        """A session's connection is gone and ``on_disconnect`` has run."""

    def stage_done(self, stage: str, outcome: StageOutcome, seconds: float) -> None:
        """The ``stage`` hook (``on_connect`` ... ``on_data``) ran every plugin it needed to."""

    def plugin_done(self, plugin: str, hook: str, seconds: float) -> None:
        """One call of ``plugin``'s ``hook`` returned (or raised, or timed out) after ``seconds``.

        Called for every hook call of every message: keep it cheap.
        """

    def plugin_failed(self, plugin: str, hook: str, kind: str) -> None:
        """A plugin's hook failed; ``kind`` is ``error``, ``timeout`` or ``bad_result``."""

    def upstream_replied(self, command: str, reply: Reply, seconds: float) -> None:
        """The upstream answered ``command`` (``mail``, ``rcpt`` or ``data``), or failed to."""

    def transaction_done(
        self, session: Session, envelope: Envelope, stage: str, reply: Reply | None
    ) -> None:
        """A transaction ended at ``stage`` with ``reply`` (None: reset or disconnect)."""


class Observers(Observer):
    """Passes every event on to the observers subscribed, in order."""

    def __init__(self) -> None:
        self._subscribers: list[Observer] = []
        self._timers: list[Observer] = []
        """The subscribers that implement ``plugin_done`` (the hot event)."""

    def add(self, observer: Observer) -> None:
        """Subscribe ``observer`` (once)."""
        if observer not in self._subscribers:
            self._subscribers.append(observer)
            self._update()

    def remove(self, observer: Observer) -> None:
        """Unsubscribe ``observer`` if it was subscribed."""
        if observer in self._subscribers:
            self._subscribers.remove(observer)
            self._update()

    def _update(self) -> None:
        self._timers = [
            o for o in self._subscribers if type(o).plugin_done is not Observer.plugin_done
        ]

    def _each(self, event: str, *args: Any) -> None:
        for observer in self._subscribers:
            try:
                getattr(observer, event)(*args)
            except Exception:
                log.exception("observer %s failed on %s", type(observer).__name__, event)

    def session_opened(self, session: Session) -> None:
        self._each("session_opened", session)

    def session_closed(self, session: Session) -> None:
        self._each("session_closed", session)

    def stage_done(self, stage: str, outcome: StageOutcome, seconds: float) -> None:
        self._each("stage_done", stage, outcome, seconds)

    def plugin_done(self, plugin: str, hook: str, seconds: float) -> None:
        for observer in self._timers:  # no getattr, no argument tuple: once per hook call
            try:
                observer.plugin_done(plugin, hook, seconds)
            except Exception:
                log.exception("observer %s failed on plugin_done", type(observer).__name__)

    def plugin_failed(self, plugin: str, hook: str, kind: str) -> None:
        self._each("plugin_failed", plugin, hook, kind)

    def upstream_replied(self, command: str, reply: Reply, seconds: float) -> None:
        self._each("upstream_replied", command, reply, seconds)

    def transaction_done(
        self, session: Session, envelope: Envelope, stage: str, reply: Reply | None
    ) -> None:
        self._each("transaction_done", session, envelope, stage, reply)


class ObservedTransaction:
    """An upstream transaction that reports each reply and how long it took."""

    def __init__(self, inner: UpstreamTransaction, observer: Observer) -> None:
        self.inner = inner
        self.observer = observer

    def _report(self, command: str, started: float, reply: Reply) -> Reply:
        self.observer.upstream_replied(command, reply, time.perf_counter() - started)
        return reply

    async def mail(self, sender: str, options: list[str]) -> Reply:
        """Send MAIL FROM upstream."""
        started = time.perf_counter()
        return self._report("mail", started, await self.inner.mail(sender, options))

    async def rcpt(self, recipient: str) -> Reply:
        """Send one RCPT TO upstream."""
        started = time.perf_counter()
        return self._report("rcpt", started, await self.inner.rcpt(recipient))

    async def data(self, message: bytes) -> Reply:
        """Send the message upstream."""
        started = time.perf_counter()
        return self._report("data", started, await self.inner.data(message))

    async def reset(self) -> None:
        """Abandon the transaction cleanly."""
        await self.inner.reset()

    def abort(self) -> None:
        """Abandon the transaction at once."""
        self.inner.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
