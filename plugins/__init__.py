"""mailgate's built-in filter plugins, one module each.

``BUILTIN_PLUGINS`` lists them in their default order. A policy enables a
plugin by naming it under ``plugins:``; the policy's order is the run order.
``relay_access`` and ``auth_results`` are not listed: the core always loads
them, last.
"""

from __future__ import annotations

from typing import Any

from mailgate.plugins.arc import Arc
from mailgate.plugins.clamav import Clamav
from mailgate.plugins.dkim import Dkim
from mailgate.plugins.dmarc import Dmarc
from mailgate.plugins.dnsbl import Dnsbl
from mailgate.plugins.greylist import Greylist
from mailgate.plugins.headers import Headers
from mailgate.plugins.helo import Helo
from mailgate.plugins.ratelimit import RateLimit
from mailgate.plugins.rspamd import Rspamd
from mailgate.plugins.spamassassin import SpamAssassin
from mailgate.plugins.spf import Spf

BUILTIN_PLUGINS: tuple[type[Any], ...] = (
    Dnsbl,
    Helo,
    RateLimit,
    Greylist,
    Spf,
    Headers,
    Dkim,
    Arc,
    Dmarc,
    Rspamd,
    SpamAssassin,
    Clamav,
)

__all__ = ["BUILTIN_PLUGINS"]
