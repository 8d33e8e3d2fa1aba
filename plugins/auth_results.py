"""auth_results: the Authentication-Results header (RFC 8601), and no forged ones.

Hooks: ``on_startup`` (learns the hostname), ``on_data``, ``trylast`` (after
every other plugin, so after ``dmarc``). Like ``relay_access``, the core always
loads it, last, when the policy does not name it; naming it under ``plugins:``
places it and configures it. It is always enforced: ``mode: monitor`` or
``off`` is refused (a forged header must never reach the mailbox).

Config: ``authserv_id`` [the policy's ``hostname``]: the name our header
carries and the one whose forgeries are removed.

- Every incoming ``Authentication-Results`` header whose authserv-id is our
  ``hostname`` is removed from the relayed message: only we may speak for
  us, and a downstream MTA or mail client that trusts our results must never
  see a forged one (RFC 8601 §5). This happens whether or not any auth plugin
  is enabled. Headers of other authserv-ids are kept.
- If ``spf``, ``dkim``, ``arc`` or ``dmarc`` published results
  (``envelope.results``), one ``Authentication-Results: <hostname>; ...``
  header lists them: spf, every dkim signature (``dkim=none`` for an unsigned
  message), dmarc and arc. Results are listed even when their plugin runs in
  ``monitor`` mode: they are observations, not verdicts.

Rule ids (tags, no score):

========================  ===================================================
``auth_results.added``    the header was added
``auth_results.forged``   headers claiming our authserv-id were removed (the
                          reason says how many); the header is added as well
                          when there are results
========================  ===================================================
"""

from __future__ import annotations

from mailgate import (
    Envelope,
    HeaderStrip,
    Message,
    PluginConfig,
    Rule,
    StartupContext,
    Verdict,
    header_fields,
    hookimpl,
)
from mailgate.authresults import authserv_id, header_value

HEADER = "Authentication-Results"
_HEADER_LOWER = HEADER.lower().encode("ascii")


def _may_hold(raw: bytes, name: bytes) -> bool:
    """False when no header field of ``raw`` can be named ``name`` (lower-case ASCII).

    A field's name lies in the header section, before the first blank line;
    ``header_fields`` reads names as ASCII, so a field named ``name`` in any
    case has these bytes there in some case.
    """
    end = raw.find(b"\r\n\r\n")
    return name in (raw if end < 0 else raw[:end]).lower()


class AuthResultsConfig(PluginConfig):
    """The ``plugins.auth_results`` section."""

    authserv_id: str | None = None
    """Our authserv-id (RFC 8601 §2.5); the policy's ``hostname`` when not given."""


class AuthResults:
    """Add our Authentication-Results header; remove forged ones."""

    name = "auth_results"
    Config = AuthResultsConfig
    RULES = (
        Rule("auth_results.added", "tag", "our Authentication-Results header was added"),
        Rule("auth_results.forged", "tag", "headers claiming our authserv-id were removed"),
    )

    def __init__(self, config: AuthResultsConfig) -> None:
        self.config = config
        self.authserv_id = (config.authserv_id or "localhost").lower().rstrip(".")
        self.strip = HeaderStrip(HEADER, self.claims_us)

    @hookimpl
    def on_startup(self, context: StartupContext) -> None:
        """Take our hostname as the authserv-id, unless configured."""
        if self.config.authserv_id is None:
            self.authserv_id = context.hostname.lower().rstrip(".")

    def claims_us(self, value: str) -> bool:
        """True when an Authentication-Results value claims our authserv-id."""
        return authserv_id(value).rstrip(".") == self.authserv_id

    @hookimpl(trylast=True)
    def on_data(self, envelope: Envelope, message: Message) -> Verdict | None:
        """Build the header from the published results; strip forgeries."""
        forged = 0
        if _may_hold(message.raw, _HEADER_LOWER):  # most messages: no field to look at
            forged = sum(
                1 for name, value in header_fields(message.raw) if self.strip.applies(name, value)
            )
        value = header_value(self.authserv_id, envelope.results)
        headers = {HEADER: value} if value else {}
        if forged:
            reason = f"removed {forged} {HEADER} header(s) claiming {self.authserv_id}"
            return Verdict.tag("auth_results.forged", reason, headers=headers, strip=[self.strip])
        if value:
            return Verdict.tag("auth_results.added", "added", headers=headers)
        return None
