"""invoice_guard: tag invoice-themed mail from senders we do not know.

Hooks: ``on_data``. Rule ids: ``invoice_guard.suspicious`` (tag).

Config keys:

- ``keywords`` (default ``[invoice, payment, overdue, remittance]``): words looked
  for in the Subject, case-insensitively; none may be empty.
- ``threshold`` (default 2, at least 1): how many keywords make a message suspicious.
- ``score`` (default 5.0): score added to a suspicious message.
- ``known_senders`` (default ``[]``): sender domains that are never tagged.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from mailgate import Envelope, Message, PluginConfig, Rule, Verdict, address_domain, hookimpl


class InvoiceGuardConfig(PluginConfig):
    """The policy keys of ``invoice_guard``."""

    keywords: list[str] = ["invoice", "payment", "overdue", "remittance"]
    threshold: int = Field(default=2, ge=1)
    score: float = 5.0
    known_senders: list[str] = []

    @field_validator("keywords")
    @classmethod
    def _no_empty_keyword(cls, keywords: list[str]) -> list[str]:
        # A ValueError here is reported as FILE:LINE:COL: plugins.NAME.keywords: ...
        if any(not word.strip() for word in keywords):
            raise ValueError("a keyword may not be empty (it would match every Subject)")
        return [word.lower() for word in keywords]


class InvoiceGuard:
    """Tag mail whose Subject has ``threshold`` or more invoice keywords."""

    Config = InvoiceGuardConfig
    RULES = (
        Rule(
            "invoice_guard.suspicious",
            "tag",
            "threshold or more invoice keywords in the Subject, from an unknown sender",
            score=5.0,
        ),
    )

    def __init__(self, config: InvoiceGuardConfig) -> None:
        self.config = config
        self.known = {d.lower().rstrip(".") for d in config.known_senders}

    @hookimpl
    def on_data(self, envelope: Envelope, message: Message) -> Verdict | None:
        """Count keywords in the Subject; tag when there are enough."""
        sender_domain = address_domain(envelope.sender)
        if sender_domain in self.known:
            return None
        subject = " ".join(message.get_all("Subject")).lower()
        hits = sum(1 for word in self.config.keywords if word in subject)
        if hits < self.config.threshold:
            return None
        return Verdict.tag(
            "invoice_guard.suspicious",
            f"{hits} invoice keywords in Subject from unknown sender {sender_domain}",
            score=self.config.score,
            headers={"X-Invoice-Guard": f"hits={hits}"},
        )
