"""mailgate: a pluggable mail-filtering SMTP gateway.

This folder (``gateway/``) installs as the import package ``mailgate``; the
built-in plugins (``plugins/``) install as ``mailgate.plugins``. Nothing named
``gateway`` or ``plugins`` is importable once installed.

The public API for plugin authors: ``hookimpl`` to mark hook methods,
``Verdict`` to return decisions, ``PluginConfig`` to declare a config model,
and the types hooks receive.
"""

from mailgate.context import Envelope, IPAddress, Message, Session
from mailgate.dns import DnsTempError, Resolver
from mailgate.hookspecs import hookimpl
from mailgate.policy import Network, NetworkField
from mailgate.registry import Mode, PluginConfig
from mailgate.rewrite import HeaderStrip, header_fields
from mailgate.runtime import StartupContext
from mailgate.state import StateBackend, StateError, hashed
from mailgate.units import Duration, Rate, RateField, Size
from mailgate.verdict import Action, Reply, Verdict

__all__ = [
    "Action",
    "DnsTempError",
    "Duration",
    "Envelope",
    "HeaderStrip",
    "IPAddress",
    "Message",
    "Mode",
    "Network",
    "NetworkField",
    "PluginConfig",
    "Rate",
    "RateField",
    "Reply",
    "Resolver",
    "Session",
    "Size",
    "StartupContext",
    "StateBackend",
    "StateError",
    "Verdict",
    "hashed",
    "header_fields",
    "hookimpl",
]
