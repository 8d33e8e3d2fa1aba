"""The policy file's core keys, as typed models with defaults.

Every model forbids unknown keys and validates strictly (``"25"`` is not 25,
``on`` is not a string). Plugin sections under ``plugins:`` are validated by
each plugin's own config model in ``gateway.registry``. The README and
``docs/policy.md`` describe every key.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from gateway.units import Duration, Size
from gateway.yamlsource import Document, SourceError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _to_network(value: object) -> Network:
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a network like 10.0.0.0/8, got {value!r}")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"expected a network like 10.0.0.0/8 or ::1, got {value!r}") from None


NetworkField = Annotated[Network, BeforeValidator(_to_network)]


class StrictModel(BaseModel):
    """Base for every policy model: unknown keys are errors, types are not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def split_host_port(address: str, default_port: int) -> tuple[str, int]:
    """``"[::1]:25"`` -> ``("::1", 25)``; ``"host"`` -> ``("host", default_port)``."""
    parts = urlsplit(f"//{address}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in {address!r}") from None
    host = parts.hostname
    if not host:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host, port if port is not None else default_port


class Listener(StrictModel):
    """One listening socket."""

    address: str = "127.0.0.1:2525"

    @property
    def host_port(self) -> tuple[str, int]:
        """The address split into host and port."""
        return split_host_port(self.address, 25)

    @model_validator(mode="after")
    def _check_address(self) -> Listener:
        self.host_port  # noqa: B018 - raises ValueError on a bad address
        return self


def _upstream_shorthand(value: object) -> object:
    return {"url": value} if isinstance(value, str) else value


class Upstream(StrictModel):
    """Where accepted mail goes: ``smtp://host:port`` (in-line relay) or ``maildir:PATH``."""

    url: str = "maildir:./mail"
    starttls: Literal["off", "opportunistic", "required"] = "off"
    verify_certificate: bool = True
    ca_file: str | None = None
    timeout: Duration = 60.0
    """The longest wait for any one upstream reply; past it the client gets a 4xx."""
    connect_timeout: Duration = 10.0
    pool_size: int = Field(default=8, ge=0)
    """Idle connections kept for reuse."""
    max_connections: int = Field(default=200, ge=1)
    """Upstream connections open at once, idle or busy; past it MAIL waits, then gets a 4xx."""
    idle_timeout: Duration = 30.0

    @property
    def kind(self) -> Literal["smtp", "maildir"]:
        """``smtp`` or ``maildir``."""
        return "maildir" if self.url.startswith("maildir:") else "smtp"

    @property
    def maildir_path(self) -> str:
        """The Maildir folder of a ``maildir:`` upstream."""
        return self.url.removeprefix("maildir:")

    @property
    def host_port(self) -> tuple[str, int]:
        """Host and port of an ``smtp://`` upstream."""
        return split_host_port(self.url.removeprefix("smtp://"), 25)

    @model_validator(mode="after")
    def _check_url(self) -> Upstream:
        if self.kind == "maildir":
            if not self.maildir_path:
                raise ValueError("maildir: needs a folder, as in maildir:./mail")
        elif self.url.startswith("smtp://"):
            self.host_port  # noqa: B018 - raises ValueError on a bad address
        else:
            raise ValueError(f"expected smtp://HOST:PORT or maildir:PATH, got {self.url!r}")
        return self


class Limits(StrictModel):
    """Limits on what one client may send."""

    message_size: Size = 25_000_000
    recipients: int = Field(default=100, ge=1)
    idle_timeout: Duration = 300.0
    """How long the gateway waits for the client's next command."""


class Scoring(StrictModel):
    """Score thresholds applied at end of DATA, after every on_data hook."""

    tag: float | None = 5.0
    reject: float | None = 15.0
    flag_header: str = "X-Spam-Flag"
    score_header: str = "X-Spam-Score"


class Logging(StrictModel):
    """Where and how the decision log is written."""

    level: Literal["debug", "info", "warning", "error"] = "info"


class Dns(StrictModel):
    """The process's resolver, shared by every plugin that looks things up."""

    nameservers: list[str] = Field(default_factory=list)
    """``IP`` or ``IP:PORT`` entries; empty means the system's resolv.conf."""
    timeout: Duration = 3.0
    cache_size: int = Field(default=10_000, ge=0)


class Policy(StrictModel):
    """The whole policy file."""

    hostname: str = Field(default_factory=socket.getfqdn)
    listen: list[Listener] = Field(default_factory=lambda: [Listener()], min_length=1)
    upstream: Annotated[Upstream, BeforeValidator(_upstream_shorthand)] = Field(
        default_factory=Upstream
    )
    domains: list[str] = Field(default_factory=list)
    """Recipient domains mail is accepted for (subdomains are not included)."""
    trusted_networks: list[NetworkField] = Field(default_factory=list)
    """Clients that may relay to any domain."""
    limits: Limits = Field(default_factory=Limits)
    scoring: Scoring = Field(default_factory=Scoring)
    log: Logging = Field(default_factory=Logging)
    dns: Dns = Field(default_factory=Dns)
    plugins: dict[str, dict[str, Any] | None] = Field(default_factory=dict)
    """Plugin name -> its settings, in the order the plugins run."""

    @model_validator(mode="after")
    def _normalise(self) -> Policy:
        object.__setattr__(self, "domains", [d.lower().rstrip(".") for d in self.domains])
        return self

    def is_trusted(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """True when ``ip`` lies in one of ``trusted_networks``."""
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.trusted_networks)


def validation_messages(
    doc: Document, exc: ValidationError, prefix: tuple[str, ...] = ()
) -> list[str]:
    """Turn pydantic's errors into ``FILE:LINE:COL: path: message`` lines."""
    out = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "missing":
            message = "required key is missing"
        out.append(doc.error((*prefix, *loc), message))
    return out


def parse_policy(doc: Document) -> Policy:
    """Validate a loaded document's core keys; raise :class:`SourceError` with positions."""
    try:
        return Policy.model_validate(doc.data)
    except ValidationError as exc:
        raise SourceError(validation_messages(doc, exc)) from None
