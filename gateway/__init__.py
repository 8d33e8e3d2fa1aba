"""mailgate: a pluggable mail-filtering SMTP gateway.

Layout: this folder (``gateway/``) installs as the import package ``mailgate``;
the built-in plugins (``plugins/``) install as ``mailgate.plugins``. Nothing
named ``gateway`` or ``plugins`` is importable once installed.

The public API for plugin authors is what this module exports (``__all__``),
plus two documented modules for the auth plugins: ``mailgate.authresults``
(the typed SPF/DKIM/DMARC/ARC results plugins publish for each other) and
``mailgate.dnsadapters`` (the shared resolver bound to dkimpy and pyspf).
The built-in plugins import nothing else from the core; an import-linter
contract (``lint-imports``, configured in ``pyproject.toml``) keeps it so.
Everything else in ``mailgate`` is internal and may change.
"""

from mailgate.context import Envelope, IPAddress, Message, Session
from mailgate.dns import DnsTempError, Resolver
from mailgate.helpers import (
    address_domain,
    from_addresses,
    from_domain,
    in_networks,
    is_exempt,
    unmapped,
)
from mailgate.hookspecs import hookimpl
from mailgate.policy import Network, NetworkField
from mailgate.registry import Mode, PluginConfig, PluginSettings
from mailgate.rewrite import HeaderStrip, header_fields
from mailgate.rules import Rule, RuleAction
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
    "PluginSettings",
    "Rate",
    "RateField",
    "Reply",
    "Resolver",
    "Rule",
    "RuleAction",
    "Session",
    "Size",
    "StartupContext",
    "StateBackend",
    "StateError",
    "Verdict",
    "address_domain",
    "from_addresses",
    "from_domain",
    "hashed",
    "header_fields",
    "hookimpl",
    "in_networks",
    "is_exempt",
    "unmapped",
]
