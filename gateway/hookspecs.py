"""The plugin contract: every hook mailgate calls, in the order a connection meets them.

A hook implementation is a method marked ``@hookimpl`` on a plugin class. It may
be ``def`` or ``async def``; the core awaits what is awaitable, under the
plugin's ``timeout`` from the policy. It may take any subset of the arguments
named here (pluggy matches them by name).

The contract is checked when a policy is loaded (``mailgate check``, ``run``):
a hook name that is not below, an argument a hook does not offer, or a
``wrapper``/``hookwrapper`` implementation is refused with the position of
the plugin's section. The core calls every implementation itself (see
below), so pluggy's wrappers would never wrap anything.

Stage hooks (``on_connect`` to ``on_data``) return ``None`` (no opinion), a
:class:`~mailgate.verdict.Verdict`, or a list of verdicts (a checker that found
several things; they are taken in order). The core calls plugins in policy
order; the first enforced accept, reject or tempfail ends the stage, tags add
up. Every verdict's rule id should be one the plugin declares in ``RULES``
(:class:`mailgate.Rule`); the policy's ``rule_modes`` name them. A plugin that
raises or times out gets the client a ``451 4.3.0``; in ``monitor`` mode its
verdicts and errors are logged and change nothing. Event hooks
(``on_disconnect``, ``on_delivered``, ``on_startup``, ``on_shutdown``) return
nothing; an error there is logged and does not affect mail.

pluggy's ``firstresult`` is never used: with ``async def`` implementations a
coroutine is "not None" and would win unrun, so the stage runner in
``mailgate.stages`` does the calling.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from mailgate.context import Envelope, Message, Session
    from mailgate.runtime import StartupContext
    from mailgate.verdict import Reply, Verdict

    StageResult = Verdict | list[Verdict] | Awaitable[Verdict | list[Verdict] | None] | None
    """What a stage hook returns: no opinion, a verdict, or several (maybe awaited)."""

hookspec = pluggy.HookspecMarker("mailgate")
hookimpl = pluggy.HookimplMarker("mailgate")

# --------------------------------------------------------------------------
# Lifecycle
# --------------------------------------------------------------------------


@hookspec
def on_startup(context: StartupContext) -> Awaitable[None] | None:
    """Prepare the plugin once the policy is loaded, before the first connection.

    Runs when the gateway starts and again for the new plugin instances after a
    reload. Open connections to external services here, not in ``__init__``,
    so that ``mailgate check`` stays side-effect free.

    :param context: a :class:`~mailgate.StartupContext`, the shared services:
        ``hostname``, ``dns`` (the process's :class:`~mailgate.Resolver`),
        ``state`` (the rate-limit/greylist store, a :class:`~mailgate.StateBackend`),
        the ``policy``, and ``settings_of(plugin)`` (its ``mode``, ``timeout``
        and ``rule_modes``).
    """


@hookspec
def on_shutdown() -> Awaitable[None] | None:
    """Release what ``on_startup`` opened. Runs at exit and for the old plugins after a reload."""


# --------------------------------------------------------------------------
# SMTP stages
# --------------------------------------------------------------------------


@hookspec
def on_connect(session: Session) -> StageResult:
    """Judge a new connection, after accept and before the banner.

    :param session: the connection; ``client_ip``, ``client_port`` and
        ``trusted`` are set, ``helo`` is not yet.
    :return: a reject or tempfail refuses the connection (the client gets the
        reply instead of the banner and is disconnected); a tag applies to every
        transaction of the connection.
    """


@hookspec
def on_helo(session: Session, hostname: str) -> StageResult:
    """Judge the HELO or EHLO greeting.

    :param session: the connection; ``session.esmtp`` says whether it was EHLO.
    :param hostname: the name the client gave, as sent.
    :return: a reject or tempfail refuses the greeting (the client may try again).
    """


@hookspec
def on_mail(session: Session, envelope: Envelope, sender: str) -> StageResult:
    """Judge MAIL FROM, before it is forwarded upstream.

    :param session: the connection.
    :param envelope: the new transaction; ``envelope.sender`` is set.
    :param sender: the reverse-path without angle brackets; ``""`` is the null sender.
    :return: a reject or tempfail refuses the sender and nothing goes upstream.
    """


@hookspec
def on_rcpt(session: Session, envelope: Envelope, recipient: str) -> StageResult:
    """Judge one RCPT TO, before it is forwarded upstream.

    The built-in relay control runs last (``trylast``): it refuses recipients
    outside ``domains`` from clients outside ``trusted_networks``. Returning an
    accept from a plugin pre-empts it, so use accept here with care.

    :param session: the connection.
    :param envelope: the transaction; ``recipients`` holds those accepted so far.
    :param recipient: the forward-path without angle brackets.
    :return: a reject or tempfail refuses this recipient only.
    """


@hookspec
def on_data(session: Session, envelope: Envelope, message: Message) -> StageResult:
    """Judge the message at end of DATA, before it is sent upstream.

    :param session: the connection.
    :param envelope: the transaction with every accepted recipient.
    :param message: the message as received: ``message.raw`` (CRLF line
        endings, bare CR/LF already refused or normalised); what is relayed is
        ``raw`` with ``Received:`` and added headers on top, less any header
        fields a verdict strips. ``message.headers`` (the ``(name, value)``
        pairs, parsed once per message for every plugin), ``message.get_all(name)``
        and ``message.parsed`` read its header fields.
    :return: a reject or tempfail refuses the message for every recipient; tags
        add score and headers, and may name header fields to remove from the
        relayed message (``Verdict.tag(..., strip=[HeaderStrip(name, match)])``,
        ``from mailgate import HeaderStrip``; tags from ``on_mail`` and
        ``on_rcpt`` may too).
        After this stage the total score is compared with the policy's
        ``scoring`` thresholds.
    """


# --------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------


@hookspec
def on_delivered(session: Session, envelope: Envelope, reply: Reply) -> Awaitable[None] | None:
    """Learn that a message was accepted upstream.

    :param session: the connection.
    :param envelope: the transaction, with every verdict recorded.
    :param reply: the upstream's reply that the client was given.
    """


@hookspec
def on_disconnect(session: Session) -> Awaitable[None] | None:
    """Learn that a connection closed, however it ended.

    :param session: the connection, with its counters final.
    """
