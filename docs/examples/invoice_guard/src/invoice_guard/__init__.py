"""invoice_guard: tag invoice-themed mail from senders we do not know.

Hooks: ``on_data``. Rule ids: ``invoice_guard.suspicious`` (tag).

Config keys:

- ``keywords`` (default ``[invoice, payment, overdue, remittance]``): words looked
  for in the Subject, case-insensitively.
- ``threshold`` (default 2): how many keywords make a message suspicious.
- ``score`` (default 5.0): score added to a suspicious message.
- ``known_senders`` (default ``[]``): sender domains that are never tagged.
"""

from __future__ import annotations

from mailgate import Envelope, Message, PluginConfig, Verdict, hookimpl


class InvoiceGuardConfig(PluginConfig):
    """The policy keys of ``invoice_guard``."""

    keywords: list[str] = ["invoice", "payment", "overdue", "remittance"]
    threshold: int = 2
    score: float = 5.0
    known_senders: list[str] = []


class InvoiceGuard:
    """Tag mail whose Subject has ``threshold`` or more invoice keywords."""

    Config = InvoiceGuardConfig

    def __init__(self, config: InvoiceGuardConfig) -> None:
        self.config = config
        self.keywords = [k.lower() for k in config.keywords]
        self.known = {d.lower() for d in config.known_senders}

    @hookimpl
    def on_data(self, envelope: Envelope, message: Message) -> Verdict | None:
        """Count keywords in the Subject; tag when there are enough."""
        if envelope.sender_domain in self.known:
            return None
        subject = " ".join(message.get_all("Subject")).lower()
        hits = sum(1 for word in self.keywords if word in subject)
        if hits < self.config.threshold:
            return None
        return Verdict.tag(
            "invoice_guard.suspicious",
            f"{hits} invoice keywords in Subject from unknown sender {envelope.sender_domain}",
            score=self.config.score,
            headers={"X-Invoice-Guard": f"hits={hits}"},
        )
