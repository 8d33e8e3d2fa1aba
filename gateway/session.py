"""One client connection: SMTP commands -> stage hooks -> verdict -> relay.

``SmtpSession`` holds the state of a single connection (the listener builds one
per accepted socket, beside its ``mailgate.smtpserver.SmtpServer``). The
server calls one method per command that passed its syntax and state checks
(:meth:`SmtpSession.helo`, :meth:`~SmtpSession.mail`, ...); each runs the stage's
hooks through the runtime's stage runner; when the stage lets the command
through, the command is forwarded upstream in lockstep and the upstream's
reply is the client's reply. Every transaction ends in exactly one decision
log line, however it ends (delivered, refused, reset, disconnected).
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import re
import secrets
import time
from dataclasses import dataclass, field

from mailgate.context import Envelope, Message, Scorecard, Session, VerdictRecord
from mailgate.decisionlog import log_connection, log_transaction
from mailgate.hops import too_many_hops
from mailgate.lineendings import screen
from mailgate.observer import ObservedTransaction
from mailgate.proxyproto import peer_ip
from mailgate.queue.handoff import QueueTransaction, sender_verified
from mailgate.queue.quarantine import held_by
from mailgate.relay import UpstreamTransaction
from mailgate.rewrite import assemble
from mailgate.runtime import Runtime
from mailgate.verdict import Reply
from mailgate.xclient import ClientIdentity

log = logging.getLogger("mailgate.session")

TOO_MANY_RECIPIENTS = Reply(452, "Too many recipients", "4.5.3")
INTERNAL_ERROR = Reply(451, "Internal error, try again later", "4.3.0")
SPAM_REJECT = Reply(550, "Message refused as spam", "5.7.1")
HELD_DRY_RUN = Reply(250, "Ok: would be held in quarantine (dry run)", "2.0.0")

# MAIL parameters we pass on. Not SIZE: the client's figure leaves out the headers we add.
_FORWARDED_MAIL_OPTIONS = ("BODY=8BITMIME", "BODY=7BIT", "SMTPUTF8")
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")


@dataclass(slots=True)
class _Transaction:
    envelope: Envelope
    upstream: UpstreamTransaction | None = None
    rejected: list[tuple[str, Reply]] = field(default_factory=list)


_date: list[tuple[int, str]] = [(-1, "")]
"""The last second whose Received date was written, and that date."""


def _received_date() -> str:
    """``email.utils.formatdate(localtime=True)``, formatted once per second."""
    now = time.time()
    second = int(now)
    if now - second >= 0.999999:  # fromtimestamp may round this up to the next second
        return email.utils.formatdate(now, localtime=True)
    cached, text = _date[0]
    if cached != second:
        text = email.utils.formatdate(second, localtime=True)
        _date[0] = (second, text)
    return text


def _address_literal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return f"[IPv6:{ip}]" if ip.version == 6 else f"[{ip}]"


def _oneline(text: str) -> str:
    """``text`` with any CR or LF turned into a space, so it cannot start a new header line."""
    return text.replace("\r", " ").replace("\n", " ")


def _header_line(name: str, value: str) -> bytes:
    """One header field whose value cannot inject another.

    A fold (CRLF then a space or tab, then text) is kept, so long values such
    as DKIM-Signature stay within the line limit; any other CR or LF becomes a space.
    """
    first, *rest = value.split("\r\n")
    folded = _oneline(first)
    for part in rest:
        fold = part[:1] in (" ", "\t") and part.strip()
        folded += ("\r\n" if fold else " ") + _oneline(part)
    return f"{name}: {folded}\r\n".encode("utf-8", "surrogateescape")


class SmtpSession:
    """One connection's state, and what each SMTP command does to it."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.session: Session | None = None
        self.txn: _Transaction | None = None

    # ---------------------------------------------------------------- connect

    async def connect(self, peer: tuple[str, int], tls: bool = False) -> Reply | None:
        """Start the session for ``peer``; return a reply to refuse the connection.

        ``peer`` is the real client (from a PROXY header when the listener has one);
        ``tls`` is true on an implicit-TLS listener.
        """
        ip = peer_ip(peer)
        self.session = session = Session(
            id=secrets.token_hex(5),
            client_ip=ip,
            client_port=peer[1],
            local_hostname=self.rt.policy.hostname,
            trusted=self.rt.policy.is_trusted(ip),
            tls=tls,
        )
        self.rt.session_opened(self)
        outcome = await self.rt.runner.run_stage(
            "on_connect", session.card, session.id, session=session
        )
        if outcome.reply is not None:
            log_connection(session, outcome="refused", reply=outcome.reply)
        return outcome.reply

    async def disconnected(self) -> None:
        """The connection is gone: abandon any transaction, tell the plugins."""
        self._finish("disconnect", None, abort_upstream=True)
        if self.session is not None:
            try:
                await self.rt.runner.run_event("on_disconnect", session=self.session)
            finally:
                self.rt.session_closed(self)

    def tls_started(self) -> None:
        """The TLS handshake after STARTTLS succeeded: the client must greet again."""
        self._finish("reset", None, abort_upstream=True)  # RFC 3207: back to the start
        if self.session is not None:
            self.session.tls = True
            self.session.helo = None

    # ---------------------------------------------------------------- greeting

    async def helo(self, hostname: str, esmtp: bool) -> Reply | None:
        """HELO or EHLO: run on_helo; return a reply to refuse the greeting."""
        assert self.session is not None
        await self.rset()
        self.session.helo = hostname
        self.session.esmtp = esmtp
        outcome = await self.rt.runner.run_stage(
            "on_helo", self.session.card, self.session.id, session=self.session, hostname=hostname
        )
        if outcome.reply is not None:
            log_connection(self.session, outcome="helo refused", reply=outcome.reply)
        return outcome.reply

    # ---------------------------------------------------------------- transaction

    async def mail(self, sender: str, options: list[str]) -> Reply:
        """MAIL FROM: run on_mail, then open the upstream transaction and relay its reply.

        ``sender`` is ``""`` for the null reverse-path; ``options`` are the
        upper-cased ESMTP parameters.
        """
        assert self.session is not None
        await self.rset()
        self.session.transactions += 1
        inherited = Scorecard(self.session.card.score, list(self.session.card.headers))
        env = Envelope(
            id=f"{self.session.id}.{self.session.transactions}",
            sender=sender,
            mail_options=list(options),
            smtputf8="SMTPUTF8" in options,
            card=inherited,
        )
        self.txn = txn = _Transaction(env)
        outcome = await self.rt.runner.run_stage(
            "on_mail", env.card, env.id, session=self.session, envelope=env, sender=sender
        )
        if outcome.reply is not None:
            self._finish("mail", outcome.reply)
            return outcome.reply
        inner = self.rt.upstream.begin(ClientIdentity.of(self.session))
        if isinstance(inner, QueueTransaction):
            # Queue mode: for the DSN rule and `queue show`; it reports its lockstep
            # upstream's replies to the observers, never its own (spooled) 250s.
            inner.bind(self.session, env, self.rt.observers)
            txn.upstream = inner
        else:
            txn.upstream = ObservedTransaction(inner, self.rt.observers)
        forwarded = [o for o in options if o in _FORWARDED_MAIL_OPTIONS]
        reply = await txn.upstream.mail(sender, forwarded)
        if not reply.positive:
            txn.upstream = None  # the relay has already released the connection
            self._finish("mail", reply, upstream=reply)
        return reply

    async def rcpt(self, recipient: str) -> Reply:
        """RCPT TO: run on_rcpt, then forward it and relay the upstream's reply."""
        assert self.session is not None and self.txn is not None
        txn, env, upstream = self.txn, self.txn.envelope, self.txn.upstream
        assert upstream is not None
        if len(env.recipients) >= self.rt.policy.limits.recipients:
            txn.rejected.append((recipient, TOO_MANY_RECIPIENTS))
            return TOO_MANY_RECIPIENTS
        outcome = await self.rt.runner.run_stage(
            "on_rcpt", env.card, env.id, session=self.session, envelope=env, recipient=recipient
        )
        reply = outcome.reply or await upstream.rcpt(recipient)
        if reply.positive:
            env.recipients.append(recipient)
        else:
            txn.rejected.append((recipient, reply))
        return reply

    async def data(self, raw: bytes) -> Reply:
        """End of DATA: run on_data and scoring, then relay (or quarantine) and return the reply.

        ``raw`` is the message as received, dot-unstuffed. Pass the only reference:
        the bytes are let go once the relayed copy (our headers, then the message)
        is made, so a message is held once while the upstream takes it.
        """
        assert self.session is not None and self.txn is not None
        txn, env, upstream = self.txn, self.txn.envelope, self.txn.upstream
        assert upstream is not None
        # Bare CR/LF and NUL are settled before any plugin sees the bytes (mailgate.lineendings).
        screened = screen(raw, self.rt.policy.protocol.line_endings_for(self.session.client_ip))
        env.card.verdicts.extend(screened.records)
        if screened.reply is not None:
            await self.refuse_data(screened.reply, len(raw))
            return screened.reply
        raw = screened.data
        del screened
        size = len(raw)
        if (loop := too_many_hops(raw, self.rt.policy.limits.hops)) is not None:
            await self.refuse_data(loop[0], size, record=loop[1])
            return loop[0]
        message = Message(raw)
        try:
            outcome = await self.rt.runner.run_stage(
                "on_data", env.card, env.id, session=self.session, envelope=env, message=message
            )
            reply = outcome.reply or self._apply_scoring(env)
            if reply is not None:
                await self.refuse_data(reply, size)
                return reply
            relayed = assemble(self._added_headers(env), raw, env.card.strip)
            del raw, message  # the relayed copy is all that is held from here
            if (hold := held_by(self.session, env)) is not None:
                reply = await self._hold(env, relayed, hold)
                await self.refuse_data(reply, size)  # RSETs the upstream
                return reply
            upstream_reply = await upstream.data(relayed)
        except BaseException:
            self._finish("data", None, abort_upstream=True, size=size)
            raise
        txn.upstream = None
        self._finish("data", upstream_reply, upstream=upstream_reply, size=size)
        if upstream_reply.positive:
            await self.rt.runner.run_event(
                "on_delivered", session=self.session, envelope=env, reply=upstream_reply
            )
        return upstream_reply

    async def refuse_data(
        self, reply: Reply, size: int | None = None, record: VerdictRecord | None = None
    ) -> None:
        """The message is refused with ``reply``: log the transaction, RSET the upstream.

        ``record`` is the core's verdict when a limit refused it (``limits.memory``).
        """
        upstream = self.txn.upstream if self.txn is not None else None
        if record is not None and self.txn is not None:
            self.txn.envelope.card.verdicts.append(record)
        self._finish("data", reply, size=size)
        if upstream is not None:
            await upstream.reset()

    async def rset(self) -> None:
        """Close out an open transaction (RSET, new MAIL, HELO, QUIT) and RSET upstream."""
        txn = self.txn
        if txn is None:
            return
        upstream = txn.upstream
        self._finish("reset", None)
        if upstream is not None:
            await upstream.reset()

    async def internal_error(self, error: Exception) -> Reply:
        """An unexpected error in our code: log it, drop the upstream, answer 451 (not 500)."""
        txn_id = self.txn.envelope.id if self.txn else (self.session.id if self.session else "-")
        log.error("internal error: txn=%s", txn_id, exc_info=error)
        self._finish("error", INTERNAL_ERROR, abort_upstream=True)
        return INTERNAL_ERROR

    # ---------------------------------------------------------------- helpers

    async def _hold(self, env: Envelope, message: bytes, hold: tuple[str, list[str]]) -> Reply:
        """Quarantine the message in the spool (``mailgate.queue.quarantine``)."""
        assert self.session is not None
        if self.rt.queue is None:  # a dry run (``mailgate test``): say so, keep nothing
            return HELD_DRY_RUN
        reply = await self.rt.queue.hold(
            env.sender,
            list(env.recipients),
            message,
            reason=hold[0],
            rules=hold[1],
            options=[o for o in env.mail_options if o in _FORWARDED_MAIL_OPTIONS],
            identity=ClientIdentity.of(self.session),
            verified=sender_verified(self.session, env),
            verdicts=[r.label() for r in env.card.verdicts],
        )
        if reply.positive:
            env.kept = "held"
        return reply

    def _apply_scoring(self, env: Envelope) -> Reply | None:
        """Compare the total score with the policy's thresholds; record what they decided."""
        scoring = self.rt.policy.scoring
        score = env.card.score
        if scoring.reject is not None and score >= scoring.reject:
            reason = f"score {score:g} >= reject threshold {scoring.reject:g}"
            env.card.verdicts.append(
                VerdictRecord("scoring", "on_data", "score.reject", "reject", reason, True, score)
            )
            return SPAM_REJECT
        if scoring.quarantine is not None and score >= scoring.quarantine:
            reason = f"score {score:g} >= quarantine threshold {scoring.quarantine:g}"
            env.card.verdicts.append(
                VerdictRecord(
                    "scoring", "on_data", "score.quarantine", "quarantine", reason, True, score
                )
            )
        if scoring.tag is not None and score >= scoring.tag:
            reason = f"score {score:g} >= tag threshold {scoring.tag:g}"
            env.card.verdicts.append(
                VerdictRecord("scoring", "on_data", "score.tag", "tag", reason, True, score)
            )
            env.card.headers.append((scoring.flag_header, "YES"))
        if score:
            env.card.headers.append((scoring.score_header, f"{score:g}"))
        return None

    def _added_headers(self, env: Envelope) -> bytes:
        """Received first (top), then the plugins' headers in the order they were added."""
        assert self.session is not None
        s = self.session
        proto = ("UTF8SMTP" if env.smtputf8 else "ESMTP" if s.esmtp else "SMTP") + (
            "S" if s.tls else ""
        )
        rcpt = f"\r\n\tfor <{_oneline(env.recipients[0])}>" if len(env.recipients) == 1 else ""
        received = (
            f"from {_oneline(s.helo or '')} ({_address_literal(s.client_ip)})\r\n"
            f"\tby {s.local_hostname} (mailgate) with {proto} id {env.id}{rcpt};\r\n"
            f"\t{_received_date()}"
        )
        lines = [f"Received: {received}\r\n".encode("utf-8", "surrogateescape")]
        for name, value in env.card.headers:
            if _HEADER_NAME.match(name):
                lines.append(_header_line(name, value))
            else:
                log.warning("dropped header with invalid name %r: txn=%s", name, env.id)
        return b"".join(lines)

    def _finish(
        self,
        stage: str,
        reply: Reply | None,
        *,
        abort_upstream: bool = False,
        upstream: Reply | None = None,
        size: int | None = None,
    ) -> None:
        """Log the transaction's decision line once and forget it.

        ``stage`` is where the transaction ended: mail, data, reset, disconnect, error.
        """
        txn, self.txn = self.txn, None
        if txn is None or self.session is None:
            return
        if abort_upstream and txn.upstream is not None:
            txn.upstream.abort()
        log_transaction(
            self.session,
            txn.envelope,
            stage=stage,
            reply=reply,
            upstream=upstream,
            rejected=txn.rejected,
            size=size,
        )
        self.rt.observers.transaction_done(self.session, txn.envelope, stage, reply)
