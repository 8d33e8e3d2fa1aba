"""mailgate: a pluggable mail-filtering SMTP gateway.

This folder (``gateway/``) installs as the import package ``mailgate``; the
built-in plugins (``plugins/``) install as ``mailgate.plugins``. Nothing named
``gateway`` or ``plugins`` is importable once installed.

The public API for plugin authors: ``hookimpl`` to mark hook methods,
``Verdict`` to return decisions, ``PluginConfig`` to declare a config model,
and the types hooks receive.
"""

from mailgate.context import Envelope, Message, Session
from mailgate.hookspecs import hookimpl
from mailgate.registry import PluginConfig
from mailgate.rewrite import HeaderStrip
from mailgate.runtime import StartupContext
from mailgate.verdict import Action, Reply, Verdict

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
