"""Dry run: one SMTP transaction through the real data path, relayed nowhere.

``mailgate test`` (and every case of ``mailgate test --cases``) builds the
policy's runtime as ``mailgate run`` does, with every plugin and its
``on_startup``, and then changes two things:

- the upstream is a :class:`DryRunUpstream`, which answers 250 and keeps the
  message it would have relayed instead of sending it anywhere;
- the rate-limit and greylist state is a fresh in-memory store, so a dry run
  never counts against (or reads) the production counters in Redis.

It then opens a listener on ``127.0.0.1:0`` from the same protocol factory as
the real listeners (the SMTP server's parsing and limits, the session, every
stage hook, scoring, the headers the core adds, the decision line) and speaks
SMTP to it from a small lockstep client. The one thing faked is the client
address: the session is handed ``--client-ip`` where the socket would say
127.0.0.1. DNS goes wherever the policy's ``dns:`` says, unless a test case
gives its own records (see ``mailgate.testzone``).

A :class:`Trace` records, per SMTP command, the reply and the verdicts of the
stage it ran (plugin, rule id, action, enforce or monitor, score, headers to
add), then the headers the relayed message would gain or lose, the decision
line, and the outcome: accept, tempfail or reject.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
import email.utils
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mailgate.context import VerdictRecord
from mailgate.listener import protocol_factory
from mailgate.observer import Observer
from mailgate.policy import State
from mailgate.registry import build_plugins, load_policy
from mailgate.runtime import Runtime
from mailgate.stages import StageOutcome
from mailgate.verdict import Reply
from mailgate.yamlsource import Document

DEFAULT_CLIENT_IP = "192.0.2.1"
"""TEST-NET-1 (RFC 5737): a client address that is nobody's."""
REPLY_TIMEOUT = 300.0
"""The longest wait for one reply; plugin and upstream timeouts answer well before it."""

EXIT_STATUS = {"accept": 0, "tempfail": 4, "reject": 5}
"""``mailgate test`` exit status per outcome: the first digit of the SMTP reply class."""


# ---------------------------------------------------------------- the upstream


class DryRunUpstream:
    """Takes every transaction and relays nothing; keeps what it would have sent."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def begin(self, identity: object = None) -> DryRunTransaction:
        """Start a transaction."""
        return DryRunTransaction(self)

    async def close(self) -> None:
        """Nothing to close."""


class DryRunTransaction:
    """Says yes to everything, as a willing upstream would."""

    def __init__(self, upstream: DryRunUpstream) -> None:
        self.upstream = upstream

    async def mail(self, sender: str, options: list[str]) -> Reply:
        """Accept the sender."""
        return Reply(250, "Sender ok (dry run)", "2.1.0")

    async def rcpt(self, recipient: str) -> Reply:
        """Accept the recipient."""
        return Reply(250, "Recipient ok (dry run)", "2.1.5")

    async def data(self, message: bytes) -> Reply:
        """Keep the message instead of relaying it."""
        self.upstream.messages.append(message)
        return Reply(250, "Ok: dry run, not relayed", "2.0.0")

    async def reset(self) -> None:
        """Nothing to reset."""

    def abort(self) -> None:
        """Nothing to abort."""


def dry_runtime(
    doc: Document, nameservers: list[str] | None = None, servers: dict[str, str] | None = None
) -> Runtime:
    """The policy's runtime with a :class:`DryRunUpstream` and in-memory state.

    ``nameservers`` replaces the policy's ``dns.nameservers`` (a test zone);
    ``servers`` replaces the ``servers`` of the plugins it names (declared
    scanner answers, ``mailgate.testscanners``).
    Raises ``SourceError`` for a bad policy, as ``Runtime.from_document`` does.
    """
    policy, plugin_set = load_policy(doc)
    update: dict[str, Any] = {"state": State()}
    if nameservers is not None:
        update["dns"] = policy.dns.model_copy(update={"nameservers": nameservers})
    if servers:
        update["plugins"] = {
            name: {**(section or {}), "servers": [servers[name]]} if name in servers else section
            for name, section in policy.plugins.items()
        }
    policy = policy.model_copy(update=update)
    if servers:
        plugin_set = build_plugins(policy, doc)
    return Runtime(policy, plugin_set, doc.filename, upstream=DryRunUpstream())


# ---------------------------------------------------------------- what to send


@dataclass(frozen=True, slots=True)
class Request:
    """One transaction to try: who connects, the envelope and the message bytes."""

    message: bytes
    sender: str
    recipients: tuple[str, ...]
    client_ip: str = DEFAULT_CLIENT_IP
    helo: str = ""
    """Empty: the client's address literal, ``[192.0.2.1]``."""

    @property
    def greeting(self) -> str:
        """The EHLO argument."""
        if self.helo:
            return self.helo
        return f"[IPv6:{self.client_ip}]" if ":" in self.client_ip else f"[{self.client_ip}]"


def as_sent(message: bytes) -> bytes:
    """The message as a sending MTA puts it on the wire.

    A file with only LF line endings (the usual ``.eml`` on disk) gets CRLF;
    a file that already has a CRLF is sent byte for byte, so a test can keep a
    deliberate bare LF or CR. A missing final line ending is added.
    """
    if b"\r\n" not in message:
        message = message.replace(b"\n", b"\r\n")
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    return message


def _header_fields(message: bytes) -> list[tuple[str, str]]:
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[: end + 4]
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    return [(name, " ".join(str(value).split())) for name, value in parsed.items()]


def envelope_from_headers(message: bytes) -> tuple[str | None, list[str]]:
    """A sender (the From address) and recipients (To and Cc) read from the message."""
    fields = _header_fields(message)

    def addresses(*names: str) -> list[str]:
        values = [v for n, v in fields if n.lower() in names]
        return [addr for _, addr in email.utils.getaddresses(values) if "@" in addr]

    senders = addresses("from")
    return (senders[0] if senders else None), addresses("to", "cc")


# ---------------------------------------------------------------- the trace


@dataclass(slots=True)
class Step:
    """One command, the reply it got, and the verdicts of the stage it ran."""

    command: str
    reply: list[str]
    verdicts: list[VerdictRecord] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)
    ms: float = 0.0
    plugins: list[tuple[str, str, float]] = field(default_factory=list)
    """(plugin, hook, milliseconds) of every plugin hook call the command ran, in order."""

    @property
    def code(self) -> int:
        """The reply code (0 when the connection closed without one)."""
        last = self.reply[-1] if self.reply else ""
        return int(last[:3]) if last[:3].isdigit() else 0


def outcome_of_code(code: int) -> str:
    """accept (2xx, 3xx), tempfail (4xx, or no reply at all) or reject (5xx)."""
    if 200 <= code < 400:
        return "accept"
    return "reject" if 500 <= code < 600 else "tempfail"


@dataclass(slots=True)
class Trace:
    """Everything one dry run found out."""

    client_ip: str
    helo: str
    sender: str
    recipients: list[str]
    steps: list[Step]
    outcome: str = "tempfail"
    reply: str = ""
    """The reply that decided the outcome."""
    score: float | None = None
    added_headers: list[tuple[str, str]] = field(default_factory=list)
    removed_headers: list[tuple[str, str]] = field(default_factory=list)
    decision: dict[str, Any] | None = None
    log: list[str] = field(default_factory=list)
    """Warnings and errors logged during the run (plugin failures, say)."""

    @property
    def rules(self) -> list[str]:
        """Every rule id that gave a verdict, in order."""
        return [v.rule for step in self.steps for v in step.verdicts]

    @property
    def exit_status(self) -> int:
        """0 accept, 4 tempfail, 5 reject."""
        return EXIT_STATUS[self.outcome]


class _Tracer(Observer):
    """Collects stage results until the client takes them with the reply."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, StageOutcome]] = []
        self.timings: list[tuple[str, str, float]] = []
        self.score: float | None = None
        self.verdicts: list[VerdictRecord] = []
        """Every verdict of the transaction, scoring's included."""

    def stage_done(self, stage: str, outcome: StageOutcome, seconds: float) -> None:
        self.pending.append((stage, outcome))

    def plugin_done(self, plugin: str, hook: str, seconds: float) -> None:
        if hook != "on_disconnect":  # runs after the last reply: no step to show it with
            self.timings.append((plugin, hook, seconds * 1000))

    def transaction_done(self, session: Any, envelope: Any, stage: str, reply: Any) -> None:
        self.score = envelope.card.score
        self.verdicts = list(envelope.card.verdicts)

    def take(self) -> tuple[list[str], list[VerdictRecord], list[tuple[str, str, float]]]:
        taken, self.pending = self.pending, []
        timings, self.timings = self.timings, []
        hooks = [hook for hook, _ in taken]
        return hooks, [r for _, outcome in taken for r in outcome.records], timings


class _LogCapture(logging.Handler):
    """Keeps the decision fields and any warning or error logged during a run."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.decision: dict[str, Any] | None = None
        self.problems: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        decision = getattr(record, "fields", None)
        if isinstance(decision, dict) and "txn" in decision:
            self.decision = decision
        elif record.levelno >= logging.WARNING:
            self.problems.append(f"{record.levelname.lower()}: {record.getMessage()}")


# ---------------------------------------------------------------- the client side


class _PeerTransport:
    """The real transport, except that it names the simulated client as the peer."""

    def __init__(self, transport: asyncio.Transport, peer: tuple[str, int]) -> None:
        self._transport = transport
        self._peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._peer
        return self._transport.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _AsClient(asyncio.Protocol):
    """Wraps the gateway's protocol so that it sees ``client_ip`` as the peer."""

    def __init__(self, inner: asyncio.Protocol, client_ip: str) -> None:
        self.inner = inner
        self.client_ip = client_ip

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        port = transport.get_extra_info("peername")[1]
        self.inner.connection_made(_PeerTransport(transport, (self.client_ip, port)))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _Client:
    """A lockstep SMTP client: one command, then its whole (multi-line) reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def exchange(self, data: bytes | None) -> list[str]:
        if data is not None:
            self.writer.write(data)
            await self.writer.drain()
        lines: list[str] = []
        async with asyncio.timeout(REPLY_TIMEOUT):
            while True:
                raw = await self.reader.readline()
                if not raw:
                    return lines  # closed by the gateway
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                lines.append(line)
                if line[3:4] != "-":
                    return lines


def _stuffed(message: bytes) -> bytes:
    return re.sub(rb"(^|\r\n)\.", rb"\1..", message) + b".\r\n"


async def _converse(client: _Client, request: Request, tracer: _Tracer) -> list[Step]:
    steps: list[Step] = []

    async def step(label: str, data: bytes | None) -> Step:
        started = time.perf_counter()
        try:
            reply = await client.exchange(data)
        except (OSError, TimeoutError) as exc:
            reply = [f"(no reply: {exc or type(exc).__name__})"]
        hooks, verdicts, timings = tracer.take()
        ms = (time.perf_counter() - started) * 1000
        done = Step(label, reply, verdicts, hooks, ms, timings)
        steps.append(done)
        return done

    def line(command: str) -> bytes:
        return command.encode("utf-8", "surrogateescape") + b"\r\n"

    if (await step(f"connect from {request.client_ip}", None)).code != 220:
        return steps
    if (await step(f"EHLO {request.greeting}", line(f"EHLO {request.greeting}"))).code != 250:
        return steps
    params = ""
    if not all(a.isascii() for a in (request.sender, *request.recipients)):
        params += " SMTPUTF8"
    if not request.message.isascii():
        params += " BODY=8BITMIME"
    mail = f"MAIL FROM:<{request.sender}>{params}"
    if (await step(mail, line(mail))).code == 250:
        accepted = 0
        for recipient in request.recipients:
            rcpt = f"RCPT TO:<{recipient}>"
            accepted += (await step(rcpt, line(rcpt))).code in (250, 251)
        if accepted and (await step("DATA", line("DATA"))).code == 354:
            size = len(request.message)
            await step(f"(message, {size} bytes) .", _stuffed(request.message))
    with contextlib.suppress(OSError, TimeoutError):
        client.writer.write(b"QUIT\r\n")
        await client.writer.drain()
        await client.exchange(None)
    return steps


def _decide(trace: Trace) -> None:
    """Set the outcome and the reply that decided it.

    The conversation stops at the first refusal, so the last step decides,
    except when every recipient was refused: that is a reject only if every
    refusal was permanent.
    """
    rcpts = [s for s in trace.steps if s.command.startswith("RCPT")]
    if rcpts and not any(s.code in (250, 251) for s in rcpts):
        deciding = rcpts[-1]
        trace.outcome = "reject" if all(500 <= s.code < 600 for s in rcpts) else "tempfail"
    else:
        deciding = trace.steps[-1]
        trace.outcome = outcome_of_code(deciding.code)
    trace.reply = " / ".join(deciding.reply)


def _missing(fields: list[tuple[str, str]], other: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The fields not in ``other``, in order, a repeated field counted each time."""
    left, out = Counter(other), []
    for item in fields:
        if left[item]:
            left[item] -= 1
        else:
            out.append(item)
    return out


def _header_changes(
    sent: bytes, relayed: bytes
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The header fields the relayed message gained and lost."""
    before, after = _header_fields(sent), _header_fields(relayed)
    return _missing(after, before), _missing(before, after)


async def run(runtime: Runtime, request: Request) -> Trace:
    """Try ``request`` against a started ``runtime`` (from :func:`dry_runtime`)."""
    upstream = runtime.upstream
    assert isinstance(upstream, DryRunUpstream), "build the runtime with dry_runtime()"
    upstream.messages.clear()
    tracer, capture = _Tracer(), _LogCapture()
    runtime.observers.add(tracer)
    logger, decisions = logging.getLogger("mailgate"), logging.getLogger("mailgate.decision")
    logger.addHandler(capture)
    decision_level = decisions.level
    if not decisions.isEnabledFor(logging.INFO):
        decisions.setLevel(logging.INFO)
    factory = protocol_factory(lambda: runtime)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _AsClient(factory(), request.client_ip), "127.0.0.1", 0
    )
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            steps = await _converse(_Client(reader, writer), request, tracer)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        # Let the session see the disconnect and run on_disconnect before we report.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await runtime.wait_no_sessions()
    finally:
        server.close()
        await server.wait_closed()
        logger.removeHandler(capture)
        decisions.setLevel(decision_level)
        runtime.observers.remove(tracer)
    trace = Trace(
        request.client_ip,
        request.greeting,
        request.sender,
        list(request.recipients),
        steps,
        score=tracer.score,
        decision=capture.decision,
        log=capture.problems,
    )
    # Verdicts the core recorded outside the stage hooks (the score thresholds) go
    # with the step where the transaction ended.
    seen = {id(v) for step in steps for v in step.verdicts}
    if steps and (extra := [v for v in tracer.verdicts if id(v) not in seen]):
        steps[-1].verdicts += extra
    _decide(trace)
    if upstream.messages:
        trace.added_headers, trace.removed_headers = _header_changes(
            request.message, upstream.messages[-1]
        )
    return trace
