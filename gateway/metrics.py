"""Prometheus metrics and a health endpoint for load balancers.

With ``metrics: 127.0.0.1:9125`` in the policy the gateway serves, over HTTP:

- ``/metrics``: the metrics below, in the Prometheus text format (or
  OpenMetrics when the scraper asks for it);
- ``/health``: ``200 ok`` while the gateway accepts connections, ``503
  draining`` from SIGTERM on, so a load balancer stops sending clients before
  the listeners close.

With ``workers: N`` every worker process has its own metrics and serves them
on the first free port from PORT to PORT+N-1: scrape all N.

Every process has its own :class:`Metrics` and ``CollectorRegistry`` (never
prometheus-client's global one); it is subscribed to the data path of every
runtime whose policy sets ``metrics:``, so counters carry on across reloads.
Without ``metrics:`` nothing is counted (about 20 us per transaction saved).

==============================================  =========================================
metric                                          labels
==============================================  =========================================
``mailgate_connections_current``                (gauge) open client connections
``mailgate_connections_total``                  connections accepted
``mailgate_transactions_total``                 ``outcome`` (delivered, rejected,
                                                tempfailed, aborted, accepted; queued,
                                                held: 250 from our spool), ``stage``
``mailgate_verdicts_total``                     ``plugin``, ``rule``, ``action``, ``mode``
                                                (``enforce``, or ``monitor``: would have)
``mailgate_ratelimit_hits_total``               ``rule``, ``mode``: verdicts whose rule id
                                                starts with ``ratelimit.``
``mailgate_plugin_errors_total``                ``plugin``, ``hook``, ``kind`` (error,
                                                timeout, bad_result)
``mailgate_upstream_replies_total``             ``command`` (mail, rcpt, data), ``class``
                                                (2xx, 4xx, 5xx): what the upstream said
                                                (never queue mode's own 250s)
``mailgate_stage_duration_seconds``             (histogram) ``stage``: one hook, every plugin
``mailgate_plugin_duration_seconds``            (histogram) ``plugin``, ``hook``: one plugin's
                                                hook call (failures and timeouts included)
``mailgate_upstream_duration_seconds``          (histogram) ``command``: one upstream reply
``mailgate_policy_reloads_total``               ``result`` (ok, failed)
``mailgate_policy_loaded_timestamp_seconds``    (gauge) when the running policy was loaded
``mailgate_draining``                           (gauge) 1 from SIGTERM until exit
``mailgate_build_info``                         (gauge, always 1) ``version``
``mailgate_data_bytes_in_flight``               (gauge) bytes of message data the process
                                                holds (``limits.memory``)
``mailgate_memory_refusals_total``              DATA refused for the memory budget
                                                (``452 4.3.1``, before 354 or after the dot)
``mailgate_state_up``                           (gauge) 1 while the state store (Redis)
                                                answers, 0 after a check failed
``mailgate_queue_messages``                     (gauge) ``state`` (queued, held, corrupt):
                                                the spool at its last scan
``mailgate_queue_corrupt_moved_total``          damaged entries moved to ``corrupt/``
``mailgate_queue_write_errors_total``           spool writes that failed (a full disk)
==============================================  =========================================

Which plugin is slow::

    histogram_quantile(0.99, sum by (le, plugin, hook)
        (rate(mailgate_plugin_duration_seconds_bucket[5m])))

Labelled series start at 0 for the label values known in advance (every
plugin and hook of the loaded policy, the stages, outcomes, reload results,
upstream reply classes), so a dashboard shows 0 rather than "No data". So do
the verdict series of every rule the loaded plugins declare (``RULES``), with
its default action and its mode: a placeholder id (``ratelimit.<name>``,
``headers.missing_<name>``) through the concrete ids its plugin lists
(``configured_rules()``), or not at all when it lists none. A verdict whose
action the config changed (spf's per-result actions, a scanner's remapped
outcomes) gets its own series when it first happens.

Verdicts of the connect and HELO stages are counted at once; those of a
transaction (its stages' and the core's own, such as ``score.reject``) when
the transaction ends, from its decision record.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from mailgate.admission import MEMORY_RULE, PROCESS_BUDGET
from mailgate.decisionlog import outcome_of
from mailgate.observer import Observer
from mailgate.policy import split_host_port
from mailgate.queue.spool import STATS
from mailgate.registry import EVENTS, STAGES
from mailgate.version import version

if TYPE_CHECKING:
    from mailgate.context import Envelope, Session, VerdictRecord
    from mailgate.registry import PluginSet
    from mailgate.stages import StageOutcome
    from mailgate.state import StateBackend
    from mailgate.verdict import Reply

log = logging.getLogger("mailgate.metrics")

# Seconds: from a cached in-memory check to a slow DNS-bound one or a slow upstream.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# One plugin call: an in-memory check takes tens of microseconds.
PLUGIN_BUCKETS = (0.0001, 0.00025, 0.0005, *BUCKETS)
RATELIMIT_PREFIX = "ratelimit."
SESSION_STAGES = ("on_connect", "on_helo")
"""Stages whose verdicts belong to the connection, not to a transaction."""
FAILURE_KINDS = ("error", "timeout", "bad_result")
KNOWN_TRANSACTIONS = (
    ("delivered", "data"),
    ("rejected", "mail"),
    ("rejected", "data"),
    ("tempfailed", "mail"),
    ("tempfailed", "data"),
    ("aborted", "reset"),
    ("aborted", "disconnect"),
    ("queued", "data"),
    ("held", "data"),
)
"""(outcome, stage) pairs every gateway sees; others appear when they first happen."""


class _Children:
    """A metric's label children, cached: ``labels()`` costs three times what ``inc()`` does."""

    def __init__(self, metric: Counter | Histogram) -> None:
        self.metric = metric
        self.cache: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self.cache.get(values)
        if child is None:
            child = self.cache[values] = self.metric.labels(*values)
        return child


class _QueueCollector:
    """The spool's figures (``mailgate.queue.spool.STATS``), read at scrape time."""

    def collect(self) -> Any:
        gauge = GaugeMetricFamily(
            "mailgate_queue_messages", "Messages in the spool by state", labels=["state"]
        )
        for state in ("queued", "held", "corrupt"):
            gauge.add_metric([state], getattr(STATS, state))
        yield gauge
        yield CounterMetricFamily(
            "mailgate_queue_corrupt_moved",
            "Damaged spool entries moved to corrupt/",
            value=STATS.corrupt_moved,
        )
        yield CounterMetricFamily(
            "mailgate_queue_write_errors", "Spool writes that failed", value=STATS.write_errors
        )


class Metrics(Observer):
    """The process's counters, fed by the data path of every runtime it is subscribed to."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.connections_current = Gauge(
            "mailgate_connections_current", "Open client connections", registry=r
        )
        self.connections = Counter(
            "mailgate_connections", "Client connections accepted", registry=r
        )
        self.transactions = Counter(
            "mailgate_transactions",
            "Transactions by outcome and the stage where they ended",
            ["outcome", "stage"],
            registry=r,
        )
        self.verdicts = Counter(
            "mailgate_verdicts",
            "Verdicts by rule id; mode=monitor counts what would have happened",
            ["plugin", "rule", "action", "mode"],
            registry=r,
        )
        self.ratelimit_hits = Counter(
            "mailgate_ratelimit_hits",
            "Verdicts of rules named ratelimit.*",
            ["rule", "mode"],
            registry=r,
        )
        self.plugin_errors = Counter(
            "mailgate_plugin_errors",
            "Plugin hooks that raised, timed out or returned a non-verdict",
            ["plugin", "hook", "kind"],
            registry=r,
        )
        self.upstream_replies = Counter(
            "mailgate_upstream_replies",
            "Upstream replies (or failures, as the 4xx the client got) by class",
            ["command", "class"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "mailgate_stage_duration_seconds",
            "Time to run one stage hook through every plugin",
            ["stage"],
            buckets=BUCKETS,
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "mailgate_upstream_duration_seconds",
            "Time for the upstream to answer one command",
            ["command"],
            buckets=BUCKETS,
            registry=r,
        )
        self.reloads = Counter(
            "mailgate_policy_reloads", "Policy reloads by result", ["result"], registry=r
        )
        self.policy_loaded = Gauge(
            "mailgate_policy_loaded_timestamp_seconds",
            "When the running policy was loaded (Unix time)",
            registry=r,
        )
        self.draining = Gauge(
            "mailgate_draining", "1 while the gateway is shutting down", registry=r
        )
        self.build_info = Gauge(
            "mailgate_build_info", "Always 1; the running version", ["version"], registry=r
        )
        self.build_info.labels(version()).set(1)
        self.data_in_flight = Gauge(
            "mailgate_data_bytes_in_flight",
            "Bytes of message data held: DATA buffers and messages not yet answered",
            registry=r,
        )
        self.data_in_flight.set_function(lambda: PROCESS_BUDGET.in_flight)
        self.memory_refusals = Counter(
            "mailgate_memory_refusals", "DATA refused for the memory budget (452 4.3.1)", registry=r
        )
        self.plugin_seconds = Histogram(
            "mailgate_plugin_duration_seconds",
            "Time for one plugin to run one hook (failures and timeouts included)",
            ["plugin", "hook"],
            buckets=PLUGIN_BUCKETS,
            registry=r,
        )
        self.state_up = Gauge(
            "mailgate_state_up",
            "1 while the state store answers (always, for state: memory); 0 after a failed check",
            registry=r,
        )
        self._state: Callable[[], StateBackend | None] = lambda: None
        self.state_up.set_function(self._state_is_up)
        r.register(_QueueCollector())
        # The data path's label children, looked up once per label set.
        self._stage = _Children(self.stage_seconds)
        self._verdict = _Children(self.verdicts)
        self._hit = _Children(self.ratelimit_hits)
        self._reply = _Children(self.upstream_replies)
        self._upstream = _Children(self.upstream_seconds)
        self._transaction = _Children(self.transactions)
        self._plugin = _Children(self.plugin_seconds)
        self._zero_known_labels()

    # ------------------------------------------------------------ known label values

    def _zero_known_labels(self) -> None:
        """Create the series whose label values are known before any traffic, at 0."""
        for stage in STAGES:
            self._stage(stage.removeprefix("on_"))
        for outcome, stage in KNOWN_TRANSACTIONS:
            self._transaction(outcome, stage)
        for command in ("mail", "rcpt", "data"):
            self._upstream(command)
            for klass in ("2xx", "4xx", "5xx"):
                self._reply(command, klass)
        for result in ("ok", "failed"):
            self.reloads.labels(result)

    def expect(self, plugin_set: PluginSet) -> None:
        """Create the per-plugin series of a policy's plugins at 0 (on start and each reload)."""
        for hook in (*STAGES, *EVENTS):
            for plugin in plugin_set.call_order(hook):
                self._plugin(plugin, hook)
                for kind in FAILURE_KINDS:
                    self.plugin_errors.labels(plugin, hook, kind)
        self._expect_verdicts(plugin_set)

    def _expect_verdicts(self, plugin_set: PluginSet) -> None:
        """Create a verdict series at 0 per rule the plugins declare, with its default action.

        A placeholder (``ratelimit.<name>``) counts through the concrete ids its
        plugin's ``configured_rules()`` lists; one it lists none for is skipped.
        """
        for name, loaded in plugin_set.plugins.items():
            for rule in loaded.rules_in_use:
                mode = loaded.settings.mode_of(rule.id)
                if "<" in rule.id or mode == "off":
                    continue
                self._verdict(name, rule.id, rule.action, mode)
                if rule.id.startswith(RATELIMIT_PREFIX):
                    self._hit(rule.id, mode)

    def track_state(self, backend: Callable[[], StateBackend | None]) -> None:
        """Report the health of the state backend that ``backend()`` returns at scrape time."""
        self._state = backend

    def _state_is_up(self) -> float:
        store = self._state()
        return 1.0 if store is None or getattr(store, "up", True) else 0.0

    # ------------------------------------------------------------ observer events

    def session_opened(self, session: Session) -> None:
        self.connections.inc()
        self.connections_current.inc()

    def session_closed(self, session: Session) -> None:
        self.connections_current.dec()

    def _count(self, records: list[VerdictRecord]) -> None:
        for record in records:
            mode = "enforce" if record.enforced else "monitor"
            self._verdict(record.plugin, record.rule, record.action, mode).inc()
            if record.rule.startswith(RATELIMIT_PREFIX):
                self._hit(record.rule, mode).inc()
            elif record.rule == MEMORY_RULE:
                self.memory_refusals.inc()

    def stage_done(self, stage: str, outcome: StageOutcome, seconds: float) -> None:
        self._stage(stage.removeprefix("on_")).observe(seconds)
        if stage in SESSION_STAGES:  # later stages are counted with their transaction
            self._count(outcome.records)

    def plugin_done(self, plugin: str, hook: str, seconds: float) -> None:
        self._plugin(plugin, hook).observe(seconds)

    def plugin_failed(self, plugin: str, hook: str, kind: str) -> None:
        self.plugin_errors.labels(plugin, hook, kind).inc()

    def upstream_replied(self, command: str, reply: Reply, seconds: float) -> None:
        self._reply(command, f"{reply.code // 100}xx").inc()
        self._upstream(command).observe(seconds)

    def transaction_done(
        self, session: Session, envelope: Envelope, stage: str, reply: Reply | None
    ) -> None:
        self._transaction(outcome_of(stage, reply, envelope.kept), stage).inc()
        # Every verdict of the transaction: its stages' and the core's (score thresholds,
        # line endings), which no stage hook reports.
        self._count(envelope.card.verdicts)

    # ------------------------------------------------------------ process events

    def policy_loaded_now(self) -> None:
        """Record that a policy was (re)loaded and put in service just now."""
        self.policy_loaded.set(time.time())


class MetricsServer:
    """A small HTTP server on the event loop: ``/metrics`` and ``/health``."""

    REQUEST_TIMEOUT = 10.0
    MAX_REQUEST = 16 * 1024

    def __init__(self, metrics: Metrics, healthy: Callable[[], bool]) -> None:
        self.metrics = metrics
        self.healthy = healthy
        self.address: str | None = None
        """The ``metrics:`` address this server was started for."""
        self._server: asyncio.Server | None = None

    @property
    def bound(self) -> tuple[str, int] | None:
        """The (host, port) actually listened on (the port resolved when 0 was asked)."""
        if self._server is None or not self._server.sockets:
            return None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def start(self, address: str, spread: int = 1) -> None:
        """Listen on ``address`` (``HOST:PORT``); raises OSError if it cannot.

        With ``spread`` > 1 (``workers: N``), a port in use makes it try the
        next one, up to PORT+N-1: each worker process serves its own metrics.
        """
        host, port = split_host_port(address, 9125)
        for offset in range(spread if port else 1):
            try:
                self._server = await asyncio.start_server(
                    self._handle, host, port + offset, limit=self.MAX_REQUEST, reuse_address=True
                )
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or offset == spread - 1:
                    raise
        self.address = address
        log.info("metrics on http://%s:%s/metrics", *(self.bound or (host, port)))

    async def stop(self) -> None:
        """Stop listening."""
        server, self._server = self._server, None
        self.address = None
        if server is not None:
            server.close()
            await server.wait_closed()

    def _respond(self, method: str, path: str, accept: str) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"only GET and HEAD\n"
        if path == "/metrics":
            encoder, content_type = choose_encoder(accept)
            return "200 OK", content_type, encoder(self.metrics.registry)
        if path == "/health":
            if self.healthy():
                return "200 OK", "text/plain", b"ok\n"
            return "503 Service Unavailable", "text/plain", b"draining\n"
        return "404 Not Found", "text/plain", b"try /metrics or /health\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self.REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                status, content_type, body = "400 Bad Request", "text/plain", b"bad request\n"
                method = "GET"
            else:
                method, target = parts[0], parts[1]
                headers = {
                    name.strip().lower(): value.strip()
                    for name, _, value in (line.partition(":") for line in lines[1:] if line)
                }
                path = target.partition("?")[0]
                status, content_type, body = self._respond(method, path, headers.get("accept", ""))
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            )
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # a client that sends no request, too big a request, or goes away
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
