"""Plugins used by the tests, loaded by dotted path as a site would load its own."""

from __future__ import annotations

import asyncio

from mailgate import Envelope, Message, PluginConfig, Session, Verdict, hookimpl


class BlockSenderConfig(PluginConfig):
    """Config of :class:`BlockSender`."""

    sender: str
    code: int = 550


class BlockSender:
    """A sync plugin: refuse one sender at MAIL."""

    Config = BlockSenderConfig

    def __init__(self, config: BlockSenderConfig) -> None:
        self.config = config

    @hookimpl
    def on_mail(self, sender: str) -> Verdict | None:
        if sender == self.config.sender:
            return Verdict.reject("block.sender", f"sender {sender} is blocked", status="5.7.1")
        return None


class SubjectScoreConfig(PluginConfig):
    """Config of :class:`SubjectScore`."""

    word: str
    score: float = 10.0


class SubjectScore:
    """An async plugin: tag messages whose Subject contains a word."""

    Config = SubjectScoreConfig

    def __init__(self, config: SubjectScoreConfig) -> None:
        self.config = config

    @hookimpl
    async def on_data(self, envelope: Envelope, message: Message) -> Verdict | None:
        await asyncio.sleep(0)
        subject = " ".join(message.get_all("Subject"))
        if self.config.word in subject:
            return Verdict.tag(
                "subject.word",
                f"subject contains {self.config.word!r}",
                score=self.config.score,
                headers={"X-Subject-Word": self.config.word},
            )
        return None


class Raising:
    """A plugin whose DATA hook always raises."""

    @hookimpl
    def on_data(self) -> Verdict | None:
        raise RuntimeError("secret internal detail")


class Slow:
    """A plugin whose RCPT hook takes 5 seconds."""

    @hookimpl
    async def on_rcpt(self) -> Verdict | None:
        await asyncio.sleep(5)
        return None


class AllowListConfig(PluginConfig):
    """Config of :class:`AllowList`."""

    recipients: list[str]


class AllowList:
    """Accept listed recipients at RCPT, pre-empting relay control."""

    Config = AllowListConfig

    def __init__(self, config: AllowListConfig) -> None:
        self.recipients = set(config.recipients)

    @hookimpl
    def on_rcpt(self, recipient: str) -> Verdict | None:
        if recipient in self.recipients:
            return Verdict.accept("allow.rcpt", "listed recipient")
        return None


class Recorder:
    """Records every hook it sees, in order, to show the call sequence."""

    calls: list[str] = []

    @hookimpl
    def on_connect(self, session: Session) -> None:
        Recorder.calls.append(f"connect:{session.client_ip}")

    @hookimpl
    def on_helo(self, hostname: str) -> None:
        Recorder.calls.append(f"helo:{hostname}")

    @hookimpl
    def on_mail(self, sender: str) -> None:
        Recorder.calls.append(f"mail:{sender}")

    @hookimpl
    def on_rcpt(self, recipient: str) -> None:
        Recorder.calls.append(f"rcpt:{recipient}")

    @hookimpl
    def on_data(self, message: Message) -> None:
        Recorder.calls.append(f"data:{len(message)}")

    @hookimpl
    def on_delivered(self, envelope: Envelope) -> None:
        Recorder.calls.append(f"delivered:{envelope.id}")

    @hookimpl
    def on_disconnect(self) -> None:
        Recorder.calls.append("disconnect")


class RefuseConnect:
    """Refuse every connection with 554 before the banner."""

    @hookimpl
    def on_connect(self) -> Verdict:
        return Verdict.reject(
            "test.noconnect", "no connections", code=554, status="5.7.1", text="Go away"
        )
