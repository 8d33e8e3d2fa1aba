"""Plugins that break the hook contract, for tests/test_bad_input.py.

``BadResult`` returns, at one stage, a result the stage runner must refuse:
another type, a verdict whose code contradicts its action (built past the
constructor's own check, as a buggy or hostile plugin could), a NaN or
infinite score, or a verdict built with the constructor directly (which
raises).
"""

from __future__ import annotations

from typing import Literal

from mailgate import Action, PluginConfig, Verdict, hookimpl

Kind = Literal["wrong_type", "contradiction", "positive_reject", "nan", "inf", "constructor"]


class BadResultConfig(PluginConfig):
    """Config of :class:`BadResult`."""

    kind: Kind
    stage: Literal["on_mail", "on_rcpt", "on_data"] = "on_rcpt"


def _forced(verdict: Verdict, **fields: object) -> Verdict:
    """``verdict`` with ``fields`` changed in place, past ``__post_init__``'s check."""
    for name, value in fields.items():
        object.__setattr__(verdict, name, value)
    return verdict


class BadResult:
    """Returns a bad result from the configured stage; nothing from the others."""

    Config = BadResultConfig

    def __init__(self, config: BadResultConfig) -> None:
        self.config = config

    def _result(self, stage: str) -> object:
        if stage != self.config.stage:
            return None
        kind = self.config.kind
        if kind == "wrong_type":
            return "250 ok"
        if kind == "constructor":
            return Verdict(Action.TEMPFAIL, "bad.verdict", "r", 250, "2.0.0", "Ok: queued")
        if kind == "contradiction":
            return _forced(
                Verdict.tempfail("bad.verdict", "r"), code=250, status="2.0.0", text="Ok: queued"
            )
        if kind == "positive_reject":
            return _forced(Verdict.reject("bad.verdict", "r"), code=250, status="2.1.5")
        score = float("nan") if kind == "nan" else float("-inf")
        return _forced(Verdict.tag("bad.score", "r", score=1.0), score=score)

    @hookimpl
    def on_mail(self) -> object:
        return self._result("on_mail")

    @hookimpl
    def on_rcpt(self) -> object:
        return self._result("on_rcpt")

    @hookimpl
    def on_data(self) -> object:
        return self._result("on_data")
