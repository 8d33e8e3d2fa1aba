"""mailgate: a pluggable mail-filtering SMTP gateway.

The public API for plugin authors: ``hookimpl`` to mark hook methods,
``Verdict`` to return decisions, ``PluginConfig`` to declare a config model,
and the types hooks receive.
"""

from gateway.context import Envelope, Message, Session
from gateway.hookspecs import hookimpl
from gateway.registry import PluginConfig
from gateway.rewrite import HeaderStrip
from gateway.runtime import StartupContext
from gateway.verdict import Action, Reply, Verdict

__all__ = [
    "Action",
    "Envelope",
    "HeaderStrip",
    "Message",
    "PluginConfig",
    "Reply",
    "Session",
    "StartupContext",
    "Verdict",
    "hookimpl",
]
