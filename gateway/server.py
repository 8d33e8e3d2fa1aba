"""The gateway process: load the policy, start plugins and listeners, serve until told to stop.

``Gateway.current`` is the runtime new connections get; sessions keep the
runtime they started with, so replacing ``current`` is an atomic policy swap.

Signals (installed by :meth:`Gateway.serve`):

- SIGHUP: :meth:`Gateway.reload` reads the policy file again. A valid policy
  is started and swapped in; the old one is stopped once its last session has
  closed. An invalid one is logged (``FILE:LINE:COL``) and the old one stays.
- SIGTERM, SIGINT: stop accepting (``/health`` answers 503), let transactions
  in flight finish for up to ``shutdown_timeout``, then stop. A second signal
  stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from mailgate.admission import tune_allocator
from mailgate.listener import ListenError, os_reason, start_listeners
from mailgate.logformat import configure_logging
from mailgate.metrics import Metrics, MetricsServer
from mailgate.reload import changed_keys, load_off_loop, restart_only
from mailgate.runtime import Runtime

log = logging.getLogger("mailgate")


class Gateway:
    """A running mailgate: its current runtime and its listening servers."""

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime
        self.servers: list[asyncio.Server] = []
        self.draining = False
        self.metrics = Metrics()
        self.metrics_server = MetricsServer(self.metrics, lambda: not self.draining)
        self.metrics.track_state(lambda: self.current.state)
        self._watch(runtime)
        self._stopping = asyncio.Event()
        self._hurry = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._retiring: dict[Runtime, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[bool]] = set()

    def _watch(self, runtime: Runtime) -> None:
        """Count the runtime's traffic in :attr:`metrics` when its policy serves them."""
        if runtime.policy.metrics:
            runtime.observers.add(self.metrics)
            self.metrics.expect(runtime.plugin_set)

    async def start(self) -> None:
        """Start the plugins, then open the listeners and the metrics endpoint.

        Raises :class:`~mailgate.listener.ListenError` (naming the address) if a
        socket cannot be opened, such as an address already in use.
        """
        tune_allocator()  # message buffers mapped on their own, given back when freed
        await self.current.start()
        try:
            self.servers = await start_listeners(lambda: self.current)
            if address := self.current.policy.metrics:
                try:
                    await self.metrics_server.start(address, spread=self.current.policy.workers)
                except OSError as exc:
                    for server in self.servers:
                        server.close()
                    why = os_reason(exc)
                    raise ListenError(f"cannot serve metrics on {address}: {why}") from None
        except ListenError:
            await self.current.stop()  # the plugins and the queue were started: stop them
            raise
        self.metrics.policy_loaded_now()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) of every listening socket, ports resolved."""
        return [sock.getsockname()[:2] for s in self.servers for sock in s.sockets]

    def request_stop(self) -> None:
        """Ask :meth:`serve` to return; asked a second time, stop without waiting."""
        if self._stopping.is_set():
            self._hurry.set()
        self._stopping.set()

    def request_reload(self) -> None:
        """Start :meth:`reload` in the background (SIGHUP)."""
        task = asyncio.get_running_loop().create_task(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def serve(self, ready: Callable[[], None] | None = None) -> None:
        """Serve until SIGTERM/SIGINT (or :meth:`request_stop`), reloading on SIGHUP.

        ``ready`` is called once the signal handlers are in place: a signal sent
        after it is handled, never the default action (which ends the process).
        """
        loop = asyncio.get_running_loop()
        handlers = {
            signal.SIGTERM: self.request_stop,
            signal.SIGINT: self.request_stop,
            signal.SIGHUP: self.request_reload,
        }
        for sig, handler in handlers.items():
            loop.add_signal_handler(sig, handler)
        if ready is not None:
            ready()
        try:
            await self._stopping.wait()
        finally:
            try:
                await self.stop(grace=self.current.policy.shutdown_timeout)
            finally:
                for sig in handlers:
                    loop.remove_signal_handler(sig)

    async def reload(self) -> bool:
        """Load the policy file again and swap it in if it is valid; return whether it was."""
        async with self._reload_lock:
            old = self.current
            if self.draining:
                log.warning("reload ignored: the gateway is stopping")
                return False
            try:
                new = await load_off_loop(old.filename)  # serving goes on meanwhile
            except Exception as exc:
                messages = getattr(exc, "messages", None) or [f"{old.filename}: {exc!r}"]
                for message in messages:
                    log.error("reload failed, the running policy stays: error=%s", message)
                self.metrics.reloads.labels("failed").inc()
                return False
            self._watch(new)
            try:
                await new.start()
            except Exception:
                log.exception("reload failed, the new policy did not start; the running one stays")
                self.metrics.reloads.labels("failed").inc()
                with contextlib.suppress(Exception):
                    await new.stop()
                return False
            self.current = new
            self.metrics.reloads.labels("ok").inc()
            self.metrics.policy_loaded_now()
            try:
                configure_logging(new.policy.log, install=False)
            except OSError as exc:
                log.error("log: cannot open the new target, logging stays as it was: error=%s", exc)
            changed = changed_keys(old.policy, new.policy)
            log.info(
                "policy reloaded: file=%s changed=%s",
                new.filename,
                ",".join(changed) or "nothing",
            )
            if later := restart_only(changed):
                log.warning("kept until the next restart: keys=%s", ",".join(later))
            if new.policy.metrics != self.metrics_server.address:
                await self._move_metrics(new.policy.metrics)
            self._retiring[old] = asyncio.get_running_loop().create_task(self._retire(old))
            return True

    async def _move_metrics(self, address: str | None) -> None:
        await self.metrics_server.stop()
        if address:
            try:
                await self.metrics_server.start(address, spread=self.current.policy.workers)
            except OSError as exc:
                log.error("metrics: cannot listen: address=%s error=%s", address, exc)

    async def _retire(self, old: Runtime) -> None:
        """Stop a replaced runtime once its last session has closed (or the gateway stops)."""
        try:
            await old.wait_no_sessions()
        finally:
            del self._retiring[old]
            await old.stop()
            log.info("previous policy stopped")

    async def _drain(self, grace: float) -> None:
        """Wait until no transaction is in flight, for at most ``grace`` seconds."""
        runtimes = [self.current, *self._retiring]
        deadline = asyncio.get_running_loop().time() + grace

        def in_flight() -> int:
            return sum(runtime.transactions_in_flight() for runtime in runtimes)

        if busy := in_flight():
            log.info("stopping: waiting up to %gs for %d transaction(s)", grace, busy)
        while in_flight() and not self._hurry.is_set():
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.05)):
                    await self._hurry.wait()
        if busy := in_flight():
            log.warning("stopping with %d transaction(s) unfinished", busy)

    async def stop(self, grace: float = 0.0) -> None:
        """Stop accepting, let transactions finish for up to ``grace`` seconds, then stop."""
        if self.draining:
            return  # stopped (or stopping) already
        self.draining = True
        self.metrics.draining.set(1)
        for server in self.servers:
            server.close()
        if grace > 0:
            await self._drain(grace)
        for server in self.servers:
            await server.wait_closed()
        self.servers = []
        retiring = list(self._retiring.values())
        for task in retiring:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        await self.current.stop()
        await self.metrics_server.stop()
        log.info("stopped")
