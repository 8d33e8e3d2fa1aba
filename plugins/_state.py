"""Helpers shared by the plugins that keep state in ``mailgate.state`` (ratelimit, greylist).

Not a plugin. It holds what those plugins must do alike: the replies for each
stage, client networks as keys, and the ``on_error`` policy for a state backend
that cannot answer (``tempfail``: 4xx with ``4.3.0``; ``allow``: let the request
through, tagged ``<plugin>.unavailable`` in the decision log, warning at most
every ``WARN_INTERVAL`` seconds so a Redis outage does not flood the log).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from typing import Literal

from mailgate import IPAddress, StateError, Verdict, unmapped
from mailgate.plugins._throttle import WarningThrottle

OnError = Literal["tempfail", "allow"]
Stage = Literal["connect", "helo", "mail", "rcpt", "data"]
WARN_INTERVAL = 10.0

log = logging.getLogger("mailgate.plugins")


@functools.lru_cache(maxsize=4096)  # ipaddress parses text slowly; clients come back
def client_network(ip: IPAddress, ipv4_prefix: int, ipv6_prefix: int) -> str:
    """``ip`` widened to its /prefix network, as text (``192.0.2.0/24``, ``2001:db8::/64``)."""
    ip = unmapped(ip)
    prefix = ipv4_prefix if ip.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def refusal(
    action: Literal["tempfail", "reject"], stage: Stage, rule: str, reason: str, text: str
) -> Verdict:
    """A 4xx or 5xx with ``4.7.1``/``5.7.1``, using the code that fits the stage.

    At connect: 421 (tempfail, then the gateway closes) or 554; at DATA: 451
    or 550; elsewhere 450 or 550.
    """
    if action == "reject":
        return Verdict.reject(
            rule, reason, code=554 if stage == "connect" else 550, status="5.7.1", text=text
        )
    code = {"connect": 421, "data": 451}.get(stage, 450)
    return Verdict.tempfail(rule, reason, code=code, status="4.7.1", text=text)


class StateErrors:
    """Applies a plugin's ``on_error`` policy to a :class:`StateError`."""

    def __init__(self, plugin: str, on_error: OnError) -> None:
        self.plugin = plugin
        self.on_error = on_error
        self._warnings = WarningThrottle(WARN_INTERVAL)

    def verdict(self, exc: StateError, stage: Stage, txn: str = "-") -> Verdict:
        """The verdict for a failed check: tempfail (4.3.0) or an ``allow`` tag.

        ``txn`` (the transaction or session id) goes on the warning.
        """
        rule = f"{self.plugin}.unavailable"
        reason = f"state backend failed: {exc}"
        if (suppressed := self._warnings.due()) is not None:
            log.warning(
                "state backend failed: txn=%s plugin=%s error=%s on_error=%s suppressed=%d",
                txn,
                self.plugin,
                exc,
                self.on_error,
                suppressed,
            )
        if self.on_error == "allow":
            return Verdict.tag(rule, f"{reason}; allowed (on_error: allow)")
        code = 421 if stage == "connect" else 451
        return Verdict.tempfail(
            rule, reason, code=code, status="4.3.0", text="Temporary local problem, try again later"
        )
