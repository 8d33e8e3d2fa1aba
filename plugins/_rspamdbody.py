"""The message as the body of the request to rspamd, sent a slice at a time, never copied.

Private to the ``rspamd`` plugin; imported when the first scan is sent, as
aiohttp is.
"""

from __future__ import annotations

from typing import Any

from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

SLICE = 64 * 1024


class MessageBody(Payload):
    """``raw`` as a request body, written in slices of a view on it.

    Given ``bytes``, aiohttp joins the body to the request's header block in
    one new buffer (on Python before 3.12.9, where it does not trust
    ``writelines``): one more copy of every message in flight to rspamd.
    Slices of a memoryview copy nothing, and each one waits for the socket
    to take the one before.
    """

    _value: bytes

    def __init__(self, raw: bytes, **kwargs: Any) -> None:
        super().__init__(raw, content_type="application/octet-stream", **kwargs)
        self._size = len(raw)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        """The message as text (aiohttp's interface; not used to send it)."""
        return self._value.decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        """Write the whole message, a slice at a time (from the start again on a retry)."""
        view = memoryview(self._value)
        for start in range(0, len(view), SLICE):
            await writer.write(view[start : start + SLICE])
