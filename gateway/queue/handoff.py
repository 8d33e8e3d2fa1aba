"""Queue mode's session side: lockstep with the upstream while it answers, the spool otherwise.

``QueueTransaction`` is what the session drives in ``delivery: queue``. While
the upstream (the route's first server) answers within
``queue.handoff_timeout``, MAIL, each RCPT and the message are handed over in
lockstep, as in in-line mode, and the client hears the upstream's replies:

============================  ===================================================
the upstream ...              the client gets
============================  ===================================================
accepts (2xx)                 its reply (the message is upstream, nothing spooled)
refuses for good (5xx)        its reply at that stage: MAIL, that RCPT, or DATA;
                              nothing is spooled, so there is never a DSN for it
answers 4xx, is down, or      ``250`` once the message is fsynced in the spool;
slower than the budget        the queue delivers it later with retries
============================  ===================================================

A recipient the upstream refused with a 5xx is remembered for
``queue.refusal_cache`` (as Postfix's verify(8) does): while the upstream is
down, that recipient is refused at RCPT with the same reply instead of being
spooled. A recipient never seen before is spooled during an outage; if the
upstream refuses it later, a DSN goes out only under the rules of
:func:`sender_verified` (see ``docs/delivery.md``).

Routes (``routes``) get the same lockstep: a transaction locks onto the route
of its first recipient (the route's servers, as ``upstream`` for the default
route). With no ``routes``, MAIL goes upstream when the client sends it; with
``routes``, when the first RCPT names the route (the client already has its
250 for MAIL, so a 5xx to MAIL refuses that RCPT with the server's reply). A
recipient of another route, while the lockstep is live, gets
:data:`OTHER_ROUTE` (``452 4.5.3``): RFC 5321 §4.5.3.1.10 has the client send
it in a later transaction, which locks onto its route in turn. Once a
transaction spools (the route's server down, 4xx, or slow), it takes every
route's recipients into the spool, as before.

While every server of the route is marked down (``down_for``, after a failed
connection) the lockstep is skipped and the message is spooled at once.
``handoff_timeout: 0`` turns the lockstep off (spool first, as before 0.x).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING

from mailgate.observer import ObservedTransaction, Observer
from mailgate.relay import SmtpTransaction, SmtpUpstream, UpstreamTransaction
from mailgate.verdict import Reply
from mailgate.xclient import ClientIdentity

if TYPE_CHECKING:
    from mailgate.context import Envelope, Session
    from mailgate.queue.delivery import QueueUpstream

log = logging.getLogger("mailgate.queue")

SPOOL_FAILED = Reply(451, "Could not write the message to the queue, try again later", "4.3.0")
HANDOFF_SLOW = Reply(451, "Upstream slower than the handoff budget", "4.4.2")
_MAIL_OK = Reply(250, "Ok", "2.1.0")
_RCPT_OK = Reply(250, "Ok", "2.1.5")
OTHER_ROUTE = Reply(452, "Too many recipients for this transaction", "4.5.3")
"""A recipient of another route than the lockstep's: the client sends it later.

Like every ``452 4.5.3`` to RCPT it is not counted as an error up to
``limits.recipient_overshoot`` (``mailgate.smtpserver``)."""
_CACHE_SIZE = 10_000


def sender_verified(session: Session, envelope: Envelope) -> bool:
    """True if a DSN to this sender is not backscatter.

    That is: the client is in ``trusted_networks`` (our own users), or SPF
    passed for the MAIL FROM domain, or a DKIM signature of the sender's
    domain (or a parent of it) verified.
    """
    if session.trusted:
        return True
    domain = envelope.sender_domain
    if not domain:
        return False
    spf = envelope.results.get("spf")
    spf_domain = str(getattr(spf, "domain", "")).lower().rstrip(".")
    spf_mailfrom = getattr(spf, "identity", "") == "mailfrom"
    if getattr(spf, "result", "") == "pass" and spf_mailfrom and spf_domain == domain:
        return True
    for sig in envelope.results.get("dkim") or ():
        d = str(getattr(sig, "domain", "")).lower().rstrip(".")
        if getattr(sig, "result", "") == "pass" and d and (domain == d or domain.endswith("." + d)):
            return True
    return False


class RefusalCache:
    """Recipients the upstream refused permanently, remembered for ``ttl`` seconds."""

    def __init__(self, ttl: float, size: int = _CACHE_SIZE) -> None:
        self.ttl = ttl
        self.size = size
        self._entries: OrderedDict[str, tuple[Reply, float]] = OrderedDict()

    def remember(self, recipient: str, reply: Reply) -> None:
        """Record a permanent refusal of ``recipient``."""
        if self.ttl <= 0:
            return
        key = recipient.lower()
        self._entries.pop(key, None)
        self._entries[key] = (reply, time.monotonic() + self.ttl)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def forget(self, recipient: str) -> None:
        """The upstream accepted ``recipient``: drop any refusal."""
        self._entries.pop(recipient.lower(), None)

    def get(self, recipient: str) -> Reply | None:
        """The remembered refusal of ``recipient``, if still fresh."""
        found = self._entries.get(recipient.lower())
        if found is None:
            return None
        if found[1] <= time.monotonic():
            del self._entries[recipient.lower()]
            return None
        return found[0]


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


def _dead(txn: UpstreamTransaction) -> bool:
    """True when the relay has dropped the transaction's connection (error or timeout)."""
    if isinstance(txn, ObservedTransaction):
        txn = txn.inner
    return isinstance(txn, SmtpTransaction) and txn.conn is None


class QueueTransaction:
    """One client transaction in queue mode: lockstep while possible, else the spool."""

    def __init__(self, queue: QueueUpstream, identity: ClientIdentity | None) -> None:
        self.queue = queue
        self.identity = identity
        self.sender = ""
        self.options: list[str] = []
        self.route: str | None = None
        """The route key the lockstep is locked onto (``""``: ``upstream``), once chosen."""
        self.live: UpstreamTransaction | None = None
        """The lockstep transaction with the route's server, while it lasts."""
        self.refused: Reply | None = None
        """The route's server refused MAIL for good: the reply to its recipients."""
        self.spooling = False
        """No lockstep for this transaction: every route's recipients go to the spool."""
        self.live_rcpts: list[str] = []
        """Recipients the upstream accepted in lockstep."""
        self.spool_rcpts: list[str] = []
        """Recipients accepted for the spool (outage, 4xx)."""
        self.session: Session | None = None
        self.envelope: Envelope | None = None
        self.observer: Observer | None = None

    def bind(self, session: Session, envelope: Envelope, observer: Observer | None = None) -> None:
        """Know the session and envelope (for the DSN rule and the spooled verdicts).

        ``observer`` hears the replies of the lockstep upstream only: the 250s that
        this transaction gives itself (the message spooled) are not the upstream's.
        The envelope's ``kept`` becomes ``queued`` when the message is spooled.
        """
        self.session, self.envelope, self.observer = session, envelope, observer

    async def _step(self, txn: UpstreamTransaction, step: Awaitable[Reply]) -> Reply:
        try:
            async with asyncio.timeout(self.queue.config.handoff_timeout):
                return await step
        except TimeoutError:
            txn.abort()
            return HANDOFF_SLOW

    async def mail(self, sender: str, options: list[str]) -> Reply:
        """MAIL: in lockstep now if there is one route only, else at the first RCPT."""
        self.sender, self.options = sender, list(options)
        if self.queue.config.handoff_timeout <= 0:
            self.spooling = True
            return _MAIL_OK
        if self.queue.policy.routes:
            return _MAIL_OK  # the route is known at the first RCPT
        reply = await self._lock("")
        return _MAIL_OK if reply is None else reply

    async def _lock(self, key: str) -> Reply | None:
        """Send MAIL to route ``key``'s server: its reply, or None when spooling instead.

        A 5xx is kept for the route's recipients; 4xx, down or slow mean the spool.
        """
        await self._drop_live()
        self.route, self.refused = key, None
        upstream = self.queue.route(key)
        if isinstance(upstream, SmtpUpstream) and not any(upstream.health().values()):
            # Every server is marked down (for ``down_for``): spool at once rather than make
            # each client wait out the budget; the queue's retries find it up again.
            self.spooling = True
            return None
        txn: UpstreamTransaction = upstream.begin(self.identity)
        if self.observer is not None:
            txn = ObservedTransaction(txn, self.observer)
        reply = await self._step(txn, txn.mail(self.sender, self.options))
        if reply.positive:
            self.live = txn
            return reply
        if reply.code >= 500:
            self.refused = reply
            return reply
        log.info("handoff: MAIL got %s; spooling this transaction (route %r)", reply, key)
        self.spooling = True
        return None

    async def _drop_live(self) -> None:
        """RSET the lockstep transaction (within the budget) and let it go."""
        live, self.live = self.live, None
        if live is None:
            return
        try:
            async with asyncio.timeout(self.queue.config.handoff_timeout):
                await live.reset()
        except TimeoutError:
            live.abort()

    async def rcpt(self, recipient: str) -> Reply:
        """RCPT in lockstep; a recipient refused for good is remembered and never spooled."""
        refusals = self.queue.refusals
        key = route_key(self.queue.policy.routes, recipient)
        if not self.spooling and key != self.route and not (self.live_rcpts or self.spool_rcpts):
            # The first recipient (or the first since the others were refused) picks the route.
            await self._lock(key)
        if self.spooling:
            if (cached := refusals.get(recipient)) is not None:
                return cached
            self.spool_rcpts.append(recipient)
            return _RCPT_OK
        if key != self.route:
            # RFC 5321 §4.5.3.1.10: the client sends it in another transaction, with lockstep.
            return refusals.get(recipient) or OTHER_ROUTE
        live = self.live
        if live is None:
            assert self.refused is not None
            return self.refused  # the route's server refused MAIL for good
        reply = await self._step(live, live.rcpt(recipient))
        if reply.positive:
            refusals.forget(recipient)
            self.live_rcpts.append(recipient)
            return reply
        if reply.code >= 500:
            refusals.remember(recipient, reply)
            return reply
        if _dead(live):
            log.info("handoff: RCPT got %s; spooling this transaction", reply)
            self.live, self.spooling = None, True
            self.spool_rcpts[:0] = self.live_rcpts
            self.live_rcpts = []
        self.spool_rcpts.append(recipient)
        return _RCPT_OK

    async def data(self, message: bytes) -> Reply:
        """Hand the message over in lockstep; spool what the upstream could not take now."""
        live, self.live = self.live, None
        if live is not None and self.live_rcpts:
            reply = await self._step(live, live.data(message))
            if reply.code >= 500:
                return reply
            if reply.positive:
                if not self.spool_rcpts:
                    return reply
                return await self._spool(self.spool_rcpts, message, handed=True)
            log.info("handoff: DATA got %s; spooling the message", reply)
            return await self._spool(self.live_rcpts + self.spool_rcpts, message)
        if live is not None:
            await live.reset()
        return await self._spool(self.spool_rcpts, message)

    async def _spool(self, recipients: list[str], message: bytes, handed: bool = False) -> Reply:
        session, env = self.session, self.envelope
        try:
            queue_id = await self.queue.enqueue(
                self.sender,
                recipients,
                message,
                options=self.options,
                identity=self.identity,
                verified=bool(session and env and sender_verified(session, env)),
                verdicts=[r.label() for r in env.card.verdicts] if env else [],
            )
        except OSError as exc:
            log.error("spool write failed: %s", exc)
            return SPOOL_FAILED
        if handed:
            return Reply(250, f"Ok: delivered, the rest queued as {queue_id}", "2.0.0")
        if env is not None:
            env.kept = "queued"
        return Reply(250, f"Ok: queued as {queue_id}", "2.0.0")

    async def reset(self) -> None:
        """Forget the envelope; RSET the lockstep transaction."""
        live, self.live = self.live, None
        self._forget()
        if live is not None:
            await live.reset()

    def abort(self) -> None:
        """Forget the envelope; drop the lockstep connection."""
        live, self.live = self.live, None
        self._forget()
        if live is not None:
            live.abort()

    def _forget(self) -> None:
        self.live_rcpts, self.spool_rcpts = [], []
        self.route, self.refused = None, None
        self.spooling = self.queue.config.handoff_timeout <= 0
