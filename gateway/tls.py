"""TLS contexts: the listeners' (STARTTLS, implicit TLS) and the upstream client's.

Server side: TLS 1.2 or newer, the certificate chain and key from the policy,
no client certificates asked for. Client side: with verification, the peer's
certificate must chain to ``ca_file`` (or the system's CAs) and name the host
we connected to; without it, any certificate is taken (encryption without
authentication, as Postfix's ``may`` level).
"""

from __future__ import annotations

import ssl


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context for ``cert`` (PEM chain) and ``key``; ``ValueError`` if unusable."""
    for path in (cert, key):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ValueError(f"cannot use certificate {cert} with key {key}: {exc.reason}") from None
    return context


def client_context(*, verify: bool, ca_file: str | None = None) -> ssl.SSLContext:
    """A client context; with ``verify``, the chain and the host name are checked."""
    context = ssl.create_default_context(cafile=ca_file if verify else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
