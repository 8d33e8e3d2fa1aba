"""gateway.listener's per-class reflection cache gives aiosmtpd what ``inspect`` would."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import aiosmtpd.smtp
import pytest

from gateway import listener


class _AuthHandler:
    """A handler with hooks and an AUTH mechanism of its own."""

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        return responses

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 Ok"

    async def auth_CRAM_MD5(self, server: Any, args: list[str]) -> Any:
        return None


def _build(handler: Any) -> dict[str, Any]:
    async def make() -> aiosmtpd.smtp.SMTP:
        return aiosmtpd.smtp.SMTP(handler, loop=asyncio.get_running_loop())

    proto = asyncio.run(make())
    return {
        "auth": {k: (v.is_builtin, v.method.__func__) for k, v in proto._auth_methods.items()},
        "hooks": {k: v.__func__ for k, v in proto._handle_hooks.items()},
        "ehlo": proto._ehlo_hook_ver,
        "smtp": {k: v.__func__ for k, v in proto._smtp_methods.items()},
    }


@pytest.mark.parametrize("handler_class", [_AuthHandler, object])
def test_protocol_is_built_as_with_the_real_inspect_module(monkeypatch, handler_class):
    handler = handler_class()
    assert aiosmtpd.smtp.inspect is not inspect  # the stand-in is installed
    fast = _build(handler)
    fast_again = _build(handler)  # answered from the cache this time
    monkeypatch.setattr(aiosmtpd.smtp, "inspect", inspect)
    slow = _build(handler)
    assert fast == slow == fast_again
    assert "LOGIN" in slow["auth"] and "PLAIN" in slow["auth"]
    if handler_class is _AuthHandler:
        assert "CRAM_MD5" in slow["auth"] and slow["ehlo"] == "new"
        assert set(slow["hooks"]) == {"EHLO", "DATA"}


def test_signature_cache_keys_bound_methods_by_their_function():
    a, b = _AuthHandler(), _AuthHandler()
    assert listener._signature(a.handle_EHLO) is listener._signature(b.handle_EHLO)
    assert len(listener._signature(a.handle_EHLO).parameters) == 5
