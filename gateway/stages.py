"""The stage runner: call one hook's implementations in order and reduce them to a decision.

pluggy registers and orders the plugins; this module calls them, because
pluggy's own calling cannot await coroutines. For each implementation, in
policy order (``tryfirst``/``trylast`` respected):

- call it with the arguments it asks for, await the result if awaitable, under
  the plugin's ``timeout``;
- ``None``: go on. A verdict, or a list of verdicts taken in order: a tag adds
  its score and headers and goes on (so does a quarantine, held at end of
  DATA by the session); an accept, reject or tempfail stops, and
  the stage's reply is the verdict's (none for accept);
- each verdict's mode is its plugin's ``PluginSettings.mode_of(rule)`` (the
  rule's ``rule_modes`` entry, else the plugin's ``mode``). This is the one
  implementation of monitor mode for every plugin: a ``monitor`` verdict is
  recorded as "would have" (``rule:action(monitor)`` on the decision line, and
  in the verdict metrics) and changes nothing; an ``off`` verdict is dropped;
- an exception or a timeout stops the stage with ``451 4.3.0`` (in monitor
  mode it is only logged), so no mail passes a filter that did not run;
- so does a result that is not None or a sound Verdict (:func:`bad_result`:
  another type, a code that contradicts the action, a NaN or infinite
  score): it is logged once with the plugin's name and recorded as
  ``PLUGIN.bad_result`` on the decision line.

Each stage's outcome and duration, each plugin call's duration and each
plugin failure are reported to the runtime's observers (``mailgate.observer``:
metrics, ``mailgate test``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass, field
from typing import Any

from mailgate.context import Scorecard, VerdictRecord
from mailgate.observer import Observer
from mailgate.registry import EVENTS, STAGES, PluginSet, PluginSettings
from mailgate.verdict import Action, Reply, Verdict, VerdictError, contradiction

log = logging.getLogger("mailgate.plugins")

PLUGIN_FAILURE = Reply(451, "Temporary filter failure, try again later", "4.3.0")
_PLAIN = frozenset({Verdict, list, tuple})
"""Result types that are never awaitable: returned as they are, without the ABC checks."""


def bad_result(result: object) -> str | None:
    """Why one verdict of a hook's result cannot be applied, or None when it is a sound Verdict.

    The one check every hook result passes before the runner applies it: the
    type (a :class:`Verdict`, nothing else), then the verdict's parts
    (:func:`mailgate.verdict.contradiction`: code against action, a finite score).
    """
    if not isinstance(result, Verdict):
        return f"returned {type(result).__name__}, not a Verdict or None"
    problem = contradiction(result)
    return None if problem is None else f"contradictory verdict {result.rule!r}: {problem}"


class _Resumed:
    """Await the rest of a coroutine whose first step already ran and yielded ``first``.

    ``yield from`` semantics for a coroutine that has started: the task sees
    ``first`` (the future it waits on), and every later send or throw (a
    cancellation, the timeout's) goes into the coroutine.
    """

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self._coro = coro
        self._first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, pending = self._coro, self._first
        while True:
            try:
                sent = yield pending
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # thrown in by the task (a cancellation): pass it on
                try:
                    pending = coro.throw(exc)
                except StopIteration as done:
                    return done.value
                continue
            try:
                pending = coro.send(sent)
            except StopIteration as done:
                return done.value


@dataclass(frozen=True, slots=True)
class _Impl:
    plugin: str
    function: Callable[..., Any]
    argnames: tuple[str, ...]
    settings: PluginSettings


@dataclass(slots=True)
class StageOutcome:
    """What one stage decided."""

    reply: Reply | None = None
    """The reply that ends the stage (reject, tempfail, plugin failure); None to go on."""
    records: list[VerdictRecord] = field(default_factory=list)


class StageRunner:
    """Runs stage and event hooks for one loaded policy."""

    def __init__(self, plugin_set: PluginSet, observer: Observer | None = None) -> None:
        self.plugin_set = plugin_set
        self.observer = observer or Observer()
        self._impls: dict[str, list[_Impl]] = {}
        for hook in (*STAGES, *EVENTS):
            impls = reversed(getattr(plugin_set.manager.hook, hook).get_hookimpls())
            self._impls[hook] = [
                _Impl(
                    i.plugin_name,
                    i.function,
                    tuple(i.argnames),
                    plugin_set.plugins[i.plugin_name].settings,
                )
                for i in impls
            ]

    async def _call(self, impl: _Impl, hook: str, kwargs: dict[str, Any]) -> Any:
        started = time.perf_counter()
        try:
            result = impl.function(*[kwargs[name] for name in impl.argnames])
            if result is None or type(result) in _PLAIN:
                return result  # a plain hook's answer (most are): no awaitable checks
            if isinstance(result, Coroutine):
                # Run the first step here: a hook that returns without suspending (most
                # do) needs no timer. One that suspends goes on under the deadline that
                # started with the call, as if the timer had been armed before it.
                deadline = asyncio.get_running_loop().time() + impl.settings.timeout
                try:
                    first = result.send(None)
                except StopIteration as done:
                    return done.value
                async with asyncio.timeout_at(deadline):
                    return await _Resumed(result, first)
            if inspect.isawaitable(result):
                async with asyncio.timeout(impl.settings.timeout):
                    result = await result
            return result
        finally:  # timed however it ends: a plugin that times out is the slowest of all
            self.observer.plugin_done(impl.plugin, hook, time.perf_counter() - started)

    async def run_stage(
        self, stage: str, card: Scorecard, txn_id: str, **kwargs: Any
    ) -> StageOutcome:
        """Run the ``stage`` hook; record verdicts and add tags to ``card``."""
        started = time.perf_counter()
        if self._impls[stage]:
            outcome = await self._run_stage(stage, card, txn_id, kwargs)
        else:
            outcome = StageOutcome()  # no plugin implements it: no coroutine to run
        self.observer.stage_done(stage, outcome, time.perf_counter() - started)
        return outcome

    async def _run_stage(
        self, stage: str, card: Scorecard, txn_id: str, kwargs: dict[str, Any]
    ) -> StageOutcome:
        outcome = StageOutcome()
        for impl in self._impls[stage]:
            try:
                result = await self._call(impl, stage, kwargs)
            except VerdictError as exc:
                # The plugin tried to build a contradictory verdict: a bad result, not a crash.
                what = f"contradictory verdict: {exc}"
                self._failed(impl, stage, txn_id, card, outcome, "bad_result", what)
            except TimeoutError:
                what = f"timed out after {impl.settings.timeout:g}s"
                self._failed(impl, stage, txn_id, card, outcome, "timeout", what, exc_info=False)
            except Exception as exc:
                what = f"raised {type(exc).__name__}"
                self._failed(impl, stage, txn_id, card, outcome, "error", what, exc_info=True)
            else:
                if result is None:
                    continue
                verdicts = result if isinstance(result, list | tuple) else (result,)
                problem = next(filter(None, map(bad_result, verdicts)), None)
                if problem is None:
                    for verdict in verdicts:
                        if self._apply(impl, stage, verdict, card, outcome, txn_id):
                            return outcome
                    continue
                self._failed(impl, stage, txn_id, card, outcome, "bad_result", problem)
            # The call failed: in monitor mode that was only logged and recorded.
            if impl.settings.mode != "monitor":
                outcome.reply = PLUGIN_FAILURE
                return outcome
        return outcome

    def _apply(
        self,
        impl: _Impl,
        stage: str,
        result: Verdict,
        card: Scorecard,
        outcome: StageOutcome,
        txn_id: str,
    ) -> bool:
        """Record one verdict under its mode (enforce, monitor, off); True if it ends the stage."""
        rule_mode = impl.settings.mode_of(result.rule)
        if rule_mode == "off":
            return False
        enforced = rule_mode == "enforce"
        record = VerdictRecord(
            impl.plugin,
            stage,
            result.rule,
            result.action.value,
            result.reason,
            enforced,
            result.score,
            result.headers,
        )
        card.verdicts.append(record)
        outcome.records.append(record)
        log.debug(
            "verdict: txn=%s plugin=%s hook=%s rule=%s action=%s enforced=%s reason=%s",
            txn_id,
            impl.plugin,
            stage,
            result.rule,
            result.action.value,
            enforced,
            result.reason,
        )
        if not enforced:
            return False
        if result.action in (Action.TAG, Action.QUARANTINE):
            card.score += result.score
            card.headers.extend(result.headers)
            card.strip.extend(result.strip)
            return False
        outcome.reply = result.reply()
        return True

    def _failed(
        self,
        impl: _Impl,
        stage: str,
        txn_id: str,
        card: Scorecard,
        outcome: StageOutcome,
        kind: str,
        what: str,
        *,
        exc_info: bool | None = None,
    ) -> None:
        """Log, count and record a failed call: ``PLUGIN.error`` or ``PLUGIN.bad_result``.

        ``kind`` is the observer's: ``error``, ``timeout`` or ``bad_result``.
        """
        monitor = impl.settings.mode == "monitor"
        bad = kind == "bad_result"
        log.error(
            "plugin error: txn=%s plugin=%s hook=%s %s%s",
            txn_id,
            impl.plugin,
            stage,
            f"bad result: {what}" if bad else what,
            " (monitor: ignored)" if monitor else "",
            exc_info=exc_info,
        )
        self.observer.plugin_failed(impl.plugin, stage, kind)
        rule = f"{impl.plugin}.{'bad_result' if bad else 'error'}"
        record = VerdictRecord(impl.plugin, stage, rule, "tempfail", what, not monitor)
        card.verdicts.append(record)
        outcome.records.append(record)

    async def run_event(self, event: str, **kwargs: Any) -> None:
        """Run an event hook; errors are logged and never reach the client."""
        for impl in self._impls[event]:
            try:
                await self._call(impl, event, kwargs)
            except Exception as exc:
                log.exception("plugin error: plugin=%s hook=%s", impl.plugin, event)
                kind = "timeout" if isinstance(exc, TimeoutError) else "error"
                self.observer.plugin_failed(impl.plugin, event, kind)
