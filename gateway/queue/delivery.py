"""Queue mode: lockstep handoff, the spool for the rest, delivery by route with retries.

``QueueUpstream`` is the upstream the session talks to when ``delivery:
queue``; its transactions (``mailgate.queue.handoff``) relay in lockstep while
the upstream answers within ``queue.handoff_timeout`` and otherwise write the
message to the spool, fsynced before the client hears ``250 2.0.0 Ok: queued
as ID``. It also holds quarantined mail (:meth:`QueueUpstream.hold`), in
in-line mode too, where the spool serves held mail only.

Delivery runs in the same process: a dispatcher hands due messages to at most
``queue.concurrency`` delivery tasks. For each message the remaining
recipients are grouped by route (``routes``: exact domain, then ``.parent``
entries for subdomains, then ``*``, then ``upstream``) and each route gets one
upstream transaction (MAIL, one RCPT per recipient, DATA) over its own
connection pool, so connections are reused and a message for many users of
one host is sent once. Before each attempt the message's length and SHA-256
are checked against its envelope; a damaged entry goes to ``corrupt/``. Per
recipient:

- 2xx: delivered, forgotten;
- 5xx: refused; a DSN goes to the sender only if it was verified (SPF, DKIM,
  or a trusted client), else to ``queue.dsn_fallback`` if set, else nowhere
  (logged) -- so the queue never sends backscatter;
- 4xx, a timeout or a broken connection: retried after ``retry_min``,
  doubling each time up to ``retry_max``; past ``lifetime`` (5 days by default)
  the sender gets a DSN saying so (same rule).

The spool is re-read at start (a restart resumes it), every
``queue.scan_interval``, and at once after ``mailgate queue flush``. A scan
moves damaged entries to ``corrupt/`` (one ERROR line each), skips held ones
and deletes held ones older than ``quarantine.lifetime`` (a log line, no
DSN). A message delivered upstream just before a crash, before its envelope
was updated, is delivered again after the restart: duplicates are possible,
loss is not. A failed envelope update (a full disk) is logged in one line and
retried after the backoff, the attempt still counted in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

from mailgate.policy import Policy
from mailgate.policy import Upstream as UpstreamConfig
from mailgate.queue.dsn import Failure, build_dsn
from mailgate.queue.handoff import SPOOL_FAILED, QueueTransaction, RefusalCache, route_key
from mailgate.queue.spool import STATS, Damaged, Entry, Spool, new_id
from mailgate.relay import Upstream
from mailgate.verdict import Reply
from mailgate.xclient import ClientIdentity

log = logging.getLogger("mailgate.queue")

__all__ = ["QueueUpstream", "backoff"]

INTERNAL = Reply(451, "Internal error during delivery", "4.3.0")
_RESCAN_POLL = 1.0  # how often the flush marker is looked for


def backoff(attempts: int, retry_min: float, retry_max: float) -> float:
    """Seconds to wait after ``attempts`` failures: ``retry_min`` doubling up to ``retry_max``."""
    # The exponent is capped: 2.0 ** 1024 overflows a float, and a short retry_max with the
    # default lifetime reaches that many attempts.
    return float(min(retry_min * 2.0 ** min(attempts - 1, 64), retry_max))


class QueueUpstream:
    """The session's upstream in queue mode, and the delivery machinery behind it."""

    def __init__(
        self,
        policy: Policy,
        make_upstream: Callable[[UpstreamConfig], Upstream],
        *,
        held_only: bool = False,
    ) -> None:
        self.policy = policy
        self.config = policy.queue
        self.held_only = held_only
        """In-line mode: the spool holds quarantined (and released) mail only."""
        self.spool = Spool(self.config.directory)
        self.refusals = RefusalCache(self.config.refusal_cache)
        self._started = False
        self._start_lock = asyncio.Lock()
        self._reported: set[str] = set()
        """Entries whose damage could not be set aside, already logged once."""
        self._attempts: dict[str, int] = {}
        """Attempts counted in memory when the envelope could not be rewritten."""
        self._make_upstream = make_upstream
        self._routes: dict[str, Upstream] = {}
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._inflight: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(self.config.concurrency)

    # ---------------------------------------------------------------- session side

    def begin(self, identity: ClientIdentity | None = None) -> QueueTransaction:
        """Start a transaction that ends in the spool."""
        return QueueTransaction(self, identity)

    async def enqueue(
        self,
        sender: str,
        recipients: list[str],
        message: bytes,
        *,
        options: list[str] | None = None,
        identity: ClientIdentity | None = None,
        verified: bool = False,
        verdicts: list[str] | None = None,
        hold: tuple[str, list[str]] | None = None,
    ) -> str:
        """Spool a message durably and schedule it now; return its queue id.

        ``hold`` is ``(reason, rule ids)`` to keep it quarantined instead.
        """
        entry = Entry(
            id=new_id(),
            sender=sender,
            recipients=list(recipients),
            options=list(options or []),
            client=identity.to_json() if identity else None,
            verified=verified,
            verdicts=list(verdicts or []),
        )
        if hold is not None:
            entry.held, entry.held_since = True, time.time()
            entry.hold_reason, entry.hold_rules = hold[0], list(hold[1])
        await self.ensure_started()
        try:
            # Shielded: once the write started, a client that hangs up cannot stop it half-way.
            await asyncio.shield(asyncio.to_thread(self.spool.store, entry, message))
        except OSError:
            STATS.write_errors += 1
            raise
        if entry.held:
            STATS.held += 1
            log.info(
                "held id=%s from=<%s> rcpts=%d size=%d rules=%s reason=%r",
                entry.id,
                sender,
                len(recipients),
                entry.size,
                ",".join(entry.hold_rules),
                entry.hold_reason,
            )
            return entry.id
        self.schedule(entry.id, 0.0)
        log.info(
            "queued id=%s from=%s rcpts=%d size=%d",
            entry.id,
            f"<{sender}>",
            len(recipients),
            entry.size,
        )
        return entry.id

    async def hold(
        self,
        sender: str,
        recipients: list[str],
        message: bytes,
        *,
        reason: str,
        rules: list[str],
        options: list[str] | None = None,
        identity: ClientIdentity | None = None,
        verified: bool = False,
        verdicts: list[str] | None = None,
    ) -> Reply:
        """Quarantine a message in the spool; ``250`` once it is fsynced, else ``451``."""
        try:
            queue_id = await self.enqueue(
                sender,
                recipients,
                message,
                options=options,
                identity=identity,
                verified=verified,
                verdicts=verdicts,
                hold=(reason, rules),
            )
        except OSError as exc:
            log.error("spool write failed (quarantine): %s", exc)
            return SPOOL_FAILED
        return Reply(250, f"Ok: held as {queue_id}", "2.0.0")

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Prepare the spool, schedule what it holds, start the dispatcher and scanner.

        With ``held_only`` (in-line mode) nothing happens until the spool folder
        exists: the first quarantined message creates it (:meth:`ensure_started`).
        """
        if self.held_only and not await asyncio.to_thread(os.path.isdir, self.spool.queue_dir):
            return
        await self.ensure_started()

    def _started_now(self) -> bool:
        return self._started

    async def ensure_started(self) -> None:
        """Start the spool's machinery once."""
        if self._started:
            return
        async with self._start_lock:
            if self._started_now():
                return  # another task started it while we waited for the lock
            await asyncio.to_thread(self.spool.prepare)
            self._started = True
            await self._scan()
            for coro in (self._dispatch(), self._scanner()):
                self._spawn(coro)

    async def close(self) -> None:
        """Stop delivering (messages in flight stay in the spool) and close the routes."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for upstream in self._routes.values():
            await upstream.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------------------- scheduling

    def schedule(self, queue_id: str, when: float) -> None:
        """Deliver ``queue_id`` at ``when`` (epoch seconds; 0 = now)."""
        if queue_id in self._inflight:
            return
        self._due[queue_id] = when
        heapq.heappush(self._heap, (when, queue_id))
        self._wake.set()

    async def _next_due(self) -> str:
        while True:
            while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
                heapq.heappop(self._heap)  # superseded by a later schedule()
            now = time.time()
            if self._heap and self._heap[0][0] <= now:
                _, queue_id = heapq.heappop(self._heap)
                del self._due[queue_id]
                return queue_id
            self._wake.clear()
            delay = self._heap[0][0] - now if self._heap else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def _dispatch(self) -> None:
        while True:
            await self._slots.acquire()
            queue_id = await self._next_due()
            self._inflight.add(queue_id)
            self._spawn(self._run(queue_id))

    async def _run(self, queue_id: str) -> None:
        try:
            await self._deliver(queue_id)
        except OSError as exc:
            log.error("delivery of %s failed: %s; retrying later", queue_id, exc)
            self._inflight.discard(queue_id)
            self.schedule(queue_id, time.time() + self.config.retry_min)
        except Exception:
            log.exception("delivery failed, retrying later: id=%s", queue_id)
            self._inflight.discard(queue_id)
            self.schedule(queue_id, time.time() + self.config.retry_min)
        finally:
            self._inflight.discard(queue_id)
            self._slots.release()

    async def _scan(self) -> None:
        try:
            due = await asyncio.to_thread(self._scan_spool)
        except OSError as exc:  # the folder itself is unreadable: say so, try again next scan
            log.error("spool scan failed: %s", exc)
            return
        for queue_id, when in due:
            if queue_id not in self._due and queue_id not in self._inflight:
                self.schedule(queue_id, when)

    def _scan_spool(self) -> list[tuple[str, float]]:
        """What to schedule; expire old held mail, move damage aside (in a thread)."""
        due: list[tuple[str, float]] = []
        queued = held = 0
        now = time.time()
        for queue_id in self.spool.ids():
            if queue_id in self._inflight:
                continue
            try:
                entry = self._scan_one(queue_id, now)
            except OSError as exc:  # cannot even set it aside (read-only, full): say so once
                if queue_id not in self._reported:
                    self._reported.add(queue_id)
                    log.error("spool: cannot handle %s: %s", queue_id, exc)
                continue
            if entry is None:
                continue
            if entry.held:
                held += 1
                continue
            queued += 1
            due.append((queue_id, entry.next_attempt))
        STATS.queued = queued
        STATS.held = held
        STATS.corrupt = len(self.spool.corrupt())
        return due

    def _scan_one(self, queue_id: str, now: float) -> Entry | None:
        """The entry to count, or None once damage was set aside or held mail expired."""
        try:
            entry = self.spool.load(queue_id)
        except Damaged as exc:
            self._set_aside(queue_id, str(exc))
            return None
        if entry is None:
            if self.spool.stale(queue_id):
                self._set_aside(queue_id, "envelope without its message")
            return None
        if entry.held and now - entry.held_since >= self.policy.quarantine.lifetime:
            self._expire_held(entry)
            return None
        return entry

    def _set_aside(self, queue_id: str, why: str) -> None:
        """Move a damaged entry to ``corrupt/`` under its lock (a thread); once per entry."""
        if self.spool.stale(queue_id):
            self.spool.move_corrupt(queue_id, "envelope without its message")
            return
        with self.spool.lock(queue_id) as locked:
            if not locked:
                return  # busy: whoever holds it sees the damage too
            try:
                self.spool.load(queue_id)
            except Damaged:
                self.spool.move_corrupt(queue_id, why)

    def _expire_held(self, entry: Entry) -> None:
        with self.spool.lock(entry.id) as locked:
            if not locked:
                return
            self.spool.remove(entry.id)
        log.warning(
            "quarantine expired id=%s from=<%s> rcpts=%d held_since=%s rules=%s: deleted, no DSN",
            entry.id,
            entry.sender,
            len(entry.recipients),
            time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(entry.held_since)),
            ",".join(entry.hold_rules),
        )

    async def _scanner(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(_RESCAN_POLL)
            if await asyncio.to_thread(self.spool.take_flush):
                log.info("flush requested: retrying every queued message now")
                for queue_id in list(self._due):
                    self.schedule(queue_id, 0.0)
                await self._scan()
                last = time.monotonic()
            elif time.monotonic() - last >= self.config.scan_interval:
                await self._scan()
                last = time.monotonic()

    # ---------------------------------------------------------------- delivery

    def route(self, key: str) -> Upstream:
        """The upstream of route ``key`` (``""``: ``upstream``), one pool per route."""
        if key not in self._routes:
            config = self.policy.routes[key] if key else self.policy.upstream
            self._routes[key] = self._make_upstream(config)
        return self._routes[key]

    async def _deliver(self, queue_id: str) -> None:
        with self.spool.lock(queue_id) as locked:
            if not locked:
                if await asyncio.to_thread(self.spool.stale, queue_id):
                    await asyncio.to_thread(self._set_aside, queue_id, "")
                return  # else another process is on it; our next scan sees what it left
            try:
                entry = await asyncio.to_thread(self.spool.load, queue_id)
                if entry is None or entry.held:
                    return
                if entry.next_attempt > time.time() + 1:
                    self._inflight.discard(queue_id)
                    self.schedule(queue_id, entry.next_attempt)  # rescheduled elsewhere
                    return
                message = await asyncio.to_thread(self.spool.checked_message, entry)
            except Damaged as exc:
                await asyncio.to_thread(self.spool.move_corrupt, queue_id, str(exc))
                return
            entry.attempts = max(entry.attempts, self._attempts.get(queue_id, 0))
            results = await self._attempt(entry, message)
            await self._settle(entry, message, results)

    async def _attempt(self, entry: Entry, message: bytes) -> dict[str, tuple[Reply, str]]:
        """Try every remaining recipient once; recipient -> (reply, route key)."""
        groups: dict[str, list[str]] = {}
        for rcpt in entry.recipients:
            groups.setdefault(route_key(self.policy.routes, rcpt), []).append(rcpt)
        identity = ClientIdentity.from_json(entry.client) if entry.client else None
        results: dict[str, tuple[Reply, str]] = {}
        for key, rcpts in groups.items():
            replies = await self._send(self.route(key), entry, identity, rcpts, message)
            results.update({rcpt: (reply, key or "upstream") for rcpt, reply in replies.items()})
        return results

    async def _send(
        self,
        upstream: Upstream,
        entry: Entry,
        identity: ClientIdentity | None,
        rcpts: list[str],
        message: bytes,
    ) -> dict[str, Reply]:
        """One upstream transaction for ``rcpts``; the reply that decides each one."""
        txn = upstream.begin(identity)
        try:
            reply = await txn.mail(entry.sender, entry.options)
            if not reply.positive:
                return dict.fromkeys(rcpts, reply)
            replies = {rcpt: await txn.rcpt(rcpt) for rcpt in rcpts}
            accepted = [rcpt for rcpt, r in replies.items() if r.positive]
            if not accepted:
                await txn.reset()
                return replies
            final = await txn.data(message)
        except Exception:
            txn.abort()
            log.exception("delivery failed: id=%s", entry.id)
            return dict.fromkeys(rcpts, INTERNAL)
        except BaseException:
            txn.abort()
            raise
        replies.update(dict.fromkeys(accepted, final))
        return replies

    async def _settle(
        self, entry: Entry, message: bytes, results: dict[str, tuple[Reply, str]]
    ) -> None:
        """Record an attempt: forget the delivered, bounce the refused, reschedule the rest."""
        now = time.time()
        expired = now - entry.created >= self.config.lifetime
        failures: list[Failure] = []
        deferred: list[str] = []
        for rcpt, (reply, route) in results.items():
            outcome = "sent" if reply.positive else "deferred" if reply.transient else "bounced"
            if reply.transient and expired:
                outcome = "expired"
            log.info(
                "delivery id=%s to=%s route=%s outcome=%s reply=%s",
                entry.id,
                f"<{rcpt}>",
                route,
                outcome,
                str(reply),
            )
            if outcome == "deferred":
                deferred.append(rcpt)
                entry.last_error = str(reply)
            elif outcome in ("bounced", "expired"):
                failures.append(Failure(rcpt, reply, expired=outcome == "expired"))
        if failures and entry.sender:
            await self._bounce(entry, message, failures)
        if not deferred:
            await asyncio.to_thread(self.spool.remove, entry.id)
            self._attempts.pop(entry.id, None)
            return
        entry.recipients = deferred
        entry.attempts += 1
        entry.next_attempt = now + backoff(
            entry.attempts, self.config.retry_min, self.config.retry_max
        )
        try:
            await asyncio.to_thread(self.spool.save, entry)
            self._attempts.pop(entry.id, None)
        except OSError as exc:
            STATS.write_errors += 1
            self._attempts[entry.id] = entry.attempts
            log.error(
                "spool: cannot update the envelope of %s (%s); attempt %d counted in memory, "
                "next try in %.0fs",
                entry.id,
                exc.strerror or exc,
                entry.attempts,
                entry.next_attempt - now,
            )
        self._inflight.discard(entry.id)
        self.schedule(entry.id, entry.next_attempt)

    async def _bounce(self, entry: Entry, message: bytes, failures: list[Failure]) -> None:
        to = entry.sender if entry.verified else self.config.dsn_fallback
        if not to:
            log.warning(
                "dsn suppressed id=%s sender=<%s> rcpts=%s: sender not verified (SPF/DKIM) "
                "and no queue.dsn_fallback",
                entry.id,
                entry.sender,
                ",".join(f.recipient for f in failures),
            )
            return
        dsn = build_dsn(
            hostname=self.policy.hostname,
            queue_id=entry.id,
            sender=entry.sender,
            arrival=entry.created,
            failures=failures,
            message=message,
        )
        options = [] if dsn.isascii() else ["BODY=8BITMIME"]
        if not to.isascii():
            options.append("SMTPUTF8")
        dsn_id = await self.enqueue("", [to], dsn, options=options, verified=True)
        log.info("dsn id=%s for=%s to=<%s>", dsn_id, entry.id, to)
