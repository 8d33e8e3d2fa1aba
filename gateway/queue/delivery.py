"""Queue mode: spool before 250, then deliver by route with retries, backoff and DSNs.

``QueueUpstream`` is the upstream the session talks to when ``delivery:
queue``: MAIL and RCPT are recorded, and at end of DATA the message is
written and fsynced to the spool before the client hears ``250 2.0.0 Ok:
queued as ID``. The session's lockstep code is unchanged.

Delivery runs in the same process: a dispatcher hands due messages to at most
``queue.concurrency`` delivery tasks. For each message the remaining
recipients are grouped by route (``routes``: exact domain, then ``.parent``
entries for subdomains, then ``*``, then ``upstream``) and each route gets one
upstream transaction (MAIL, one RCPT per recipient, DATA) over its own
connection pool, so connections are reused and a message for many users of
one host is sent once. Per recipient:

- 2xx: delivered, forgotten;
- 5xx: refused; the sender gets a DSN (unless the sender is null);
- 4xx, a timeout or a broken connection: retried after ``retry_min``,
  doubling each time up to ``retry_max``; past ``lifetime`` (5 days by default)
  the sender gets a DSN saying so.

The spool is re-read at start (a restart resumes it), every
``queue.scan_interval``, and at once after ``mailgate queue flush``. A message
delivered upstream just before a crash, before its envelope was updated, is
delivered again after the restart: duplicates are possible, loss is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from mailgate.policy import Policy
from mailgate.policy import Upstream as UpstreamConfig
from mailgate.queue.dsn import Failure, build_dsn
from mailgate.queue.spool import Entry, Spool, new_id
from mailgate.relay import Upstream
from mailgate.verdict import Reply
from mailgate.xclient import ClientIdentity

log = logging.getLogger("mailgate.queue")

SPOOL_FAILED = Reply(451, "Could not write the message to the queue, try again later", "4.3.0")
INTERNAL = Reply(451, "Internal error during delivery", "4.3.0")
_RESCAN_POLL = 1.0  # how often the flush marker is looked for


def route_key(routes: Mapping[str, object], recipient: str) -> str:
    """The ``routes`` key for ``recipient``: domain, ``.parent``, ``*``; ``""`` = ``upstream``."""
    domain = recipient.rpartition("@")[2].lower().rstrip(".")
    if domain in routes:
        return domain
    labels = domain.split(".")
    for i in range(1, len(labels)):
        parent = "." + ".".join(labels[i:])
        if parent in routes:
            return parent
    return "*" if "*" in routes else ""


def backoff(attempts: int, retry_min: float, retry_max: float) -> float:
    """Seconds to wait after ``attempts`` failures: ``retry_min`` doubling up to ``retry_max``."""
    # The exponent is capped: 2.0 ** 1024 overflows a float, and a short retry_max with the
    # default lifetime reaches that many attempts.
    return float(min(retry_min * 2.0 ** min(attempts - 1, 64), retry_max))


class QueueUpstream:
    """The session's upstream in queue mode, and the delivery machinery behind it."""

    def __init__(self, policy: Policy, make_upstream: Callable[[UpstreamConfig], Upstream]) -> None:
        self.policy = policy
        self.config = policy.queue
        self.spool = Spool(self.config.directory)
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
    ) -> str:
        """Spool a message durably and schedule it now; return its queue id."""
        entry = Entry(
            id=new_id(),
            sender=sender,
            recipients=list(recipients),
            options=list(options or []),
            client=identity.to_json() if identity else None,
            size=len(message),
        )
        # Shielded: once the write started, a client that hangs up cannot stop it half-way.
        await asyncio.shield(asyncio.to_thread(self.spool.store, entry, message))
        self.schedule(entry.id, 0.0)
        log.info(
            "queued id=%s from=%s rcpts=%d size=%d",
            entry.id,
            f"<{sender}>",
            len(recipients),
            entry.size,
        )
        return entry.id

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Prepare the spool, schedule what it holds, start the dispatcher and scanner."""
        await asyncio.to_thread(self.spool.prepare)
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
        except Exception:
            log.exception("delivery failed, retrying later: id=%s", queue_id)
            self._inflight.discard(queue_id)
            self.schedule(queue_id, time.time() + self.config.retry_min)
        finally:
            self._inflight.discard(queue_id)
            self._slots.release()

    async def _scan(self) -> None:
        ids = await asyncio.to_thread(self.spool.ids)
        for queue_id in ids:
            if queue_id in self._due or queue_id in self._inflight:
                continue
            try:
                entry = await asyncio.to_thread(self.spool.load, queue_id)
            except (OSError, ValueError, TypeError) as exc:
                log.error("cannot read the envelope, skipped: id=%s error=%s", queue_id, exc)
                continue
            if entry is not None:
                self.schedule(queue_id, entry.next_attempt)

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

    def _route(self, key: str) -> Upstream:
        if key not in self._routes:
            config = self.policy.routes[key] if key else self.policy.upstream
            self._routes[key] = self._make_upstream(config)
        return self._routes[key]

    async def _deliver(self, queue_id: str) -> None:
        with self.spool.lock(queue_id) as locked:
            if not locked:
                return  # another process is on it; our next scan sees what it left
            entry = await asyncio.to_thread(self.spool.load, queue_id)
            if entry is None:
                return
            if entry.next_attempt > time.time() + 1:
                self._inflight.discard(queue_id)
                self.schedule(queue_id, entry.next_attempt)  # rescheduled elsewhere
                return
            message = await asyncio.to_thread(self.spool.message, queue_id)
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
            replies = await self._send(self._route(key), entry, identity, rcpts, message)
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
            return
        entry.recipients = deferred
        entry.attempts += 1
        entry.next_attempt = now + backoff(
            entry.attempts, self.config.retry_min, self.config.retry_max
        )
        await asyncio.to_thread(self.spool.save, entry)
        self._inflight.discard(entry.id)
        self.schedule(entry.id, entry.next_attempt)

    async def _bounce(self, entry: Entry, message: bytes, failures: list[Failure]) -> None:
        dsn = build_dsn(
            hostname=self.policy.hostname,
            queue_id=entry.id,
            sender=entry.sender,
            arrival=entry.created,
            failures=failures,
            message=message,
        )
        options = [] if dsn.isascii() else ["BODY=8BITMIME"]
        if not entry.sender.isascii():
            options.append("SMTPUTF8")
        dsn_id = await self.enqueue("", [entry.sender], dsn, options=options)
        log.info("dsn id=%s for=%s to=%s", dsn_id, entry.id, f"<{entry.sender}>")


class QueueTransaction:
    """Collects the envelope; at ``data`` the message goes to the spool."""

    def __init__(self, queue: QueueUpstream, identity: ClientIdentity | None) -> None:
        self.queue = queue
        self.identity = identity
        self.sender = ""
        self.options: list[str] = []
        self.recipients: list[str] = []

    async def mail(self, sender: str, options: list[str]) -> Reply:
        """Record the sender."""
        self.sender, self.options = sender, list(options)
        return Reply(250, "Ok", "2.1.0")

    async def rcpt(self, recipient: str) -> Reply:
        """Record a recipient."""
        self.recipients.append(recipient)
        return Reply(250, "Ok", "2.1.5")

    async def data(self, message: bytes) -> Reply:
        """Spool the message; 250 only once it is fsynced."""
        try:
            queue_id = await self.queue.enqueue(
                self.sender,
                self.recipients,
                message,
                options=self.options,
                identity=self.identity,
            )
        except OSError as exc:
            log.error("spool write failed: error=%s", exc)
            return SPOOL_FAILED
        return Reply(250, f"Ok: queued as {queue_id}", "2.0.0")

    async def reset(self) -> None:
        """Forget the envelope."""
        self.recipients.clear()

    def abort(self) -> None:
        """Forget the envelope."""
        self.recipients.clear()
