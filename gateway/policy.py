"""The policy file's core keys, as typed models with defaults.

Every model forbids unknown keys and validates strictly (``"25"`` is not 25,
``on`` is not a string). Plugin sections under ``plugins:`` are validated by
each plugin's own config model in ``mailgate.registry``. The README and
``docs/policy.md`` describe every key.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from mailgate.units import Duration, Size
from mailgate.yamlsource import Document, SourceError

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

    # allow_inf_nan: a NaN threshold compares false with every score (never rejects).
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


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


def _host_port(address: str) -> str:
    """Check that ``address`` is ``HOST:PORT`` with the port given."""
    if split_host_port(address, -1)[1] < 0:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return address


class Certificate(StrictModel):
    """A PEM certificate chain and its private key, loaded when the policy is checked."""

    cert: str
    key: str

    @model_validator(mode="after")
    def _load(self) -> Certificate:
        from mailgate.tls import server_context  # tls imports nothing from here

        server_context(self.cert, self.key)  # raises ValueError naming the bad file
        return self


class Listener(StrictModel):
    """One listening socket."""

    address: str = "127.0.0.1:2525"
    starttls: Certificate | None = None
    """Offer STARTTLS with this certificate (with ``tls: implicit``, TLS from the first byte)."""
    tls: Literal["starttls", "implicit"] = "starttls"
    require_starttls: bool = False
    """Refuse MAIL (530 5.7.0) until the client has said STARTTLS."""
    proxy_protocol: bool = False
    """Expect a PROXY v1/v2 header on every connection, from ``trusted_proxies`` only."""
    trusted_proxies: list[NetworkField] = Field(default_factory=list)
    proxy_timeout: Duration = 10.0

    @property
    def host_port(self) -> tuple[str, int]:
        """The address split into host and port."""
        return split_host_port(self.address, 25)

    @model_validator(mode="after")
    def _check_address(self) -> Listener:
        self.host_port  # noqa: B018 - raises ValueError on a bad address
        if self.starttls is None and (self.tls == "implicit" or self.require_starttls):
            raise ValueError("tls: implicit and require_starttls need starttls: {cert, key}")
        if self.tls == "implicit" and self.require_starttls:
            raise ValueError("require_starttls makes no sense with tls: implicit")
        if self.proxy_protocol and not self.trusted_proxies:
            raise ValueError("proxy_protocol needs trusted_proxies (the load balancers)")
        return self

    def is_trusted_proxy(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """True when ``ip`` lies in one of ``trusted_proxies``."""
        return _in_networks(ip, self.trusted_proxies)


def _upstream_shorthand(value: object) -> object:
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return {"url": value[0], "failover": value[1:]}
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
    failover: list[str] = Field(default_factory=list)
    """More ``smtp://`` servers, tried in order when the ones before them are down."""
    down_for: Duration = 30.0
    """How long a server that failed to connect is skipped (while another one is up)."""
    client_identity: Literal["off", "xforward", "xclient"] = "off"
    """Tell the upstream who the real client is: XCLIENT (falling back to XFORWARD) or XFORWARD."""

    @property
    def servers(self) -> list[tuple[str, int]]:
        """Host and port of every ``smtp://`` server, in failover order."""
        return [
            split_host_port(url.removeprefix("smtp://"), 25) for url in [self.url, *self.failover]
        ]

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
        if self.failover and (
            self.kind == "maildir" or not all(u.startswith("smtp://") for u in self.failover)
        ):
            raise ValueError("failover lists further smtp://HOST:PORT servers after an smtp:// url")
        if self.kind == "smtp":
            self.servers  # noqa: B018 - raises ValueError on a bad address
        return self


UpstreamField = Annotated[Upstream, BeforeValidator(_upstream_shorthand)]


class Queue(StrictModel):
    """The spool of queue mode (``delivery: queue``) and its delivery workers."""

    directory: str = "./spool"
    concurrency: int = Field(default=4, ge=1)
    """Messages delivered at once."""
    retry_min: Duration = 300.0
    """The wait after the first failed attempt; it doubles after each further one."""
    retry_max: Duration = 3600.0
    lifetime: Duration = 5 * 86400.0
    """After this long undelivered, the sender gets a DSN and the message is dropped."""
    scan_interval: Duration = 60.0
    """How often the spool folder is re-read (other processes, ``mailgate queue flush``)."""
    handoff_timeout: Duration = Field(default=5.0, le=300)
    """The budget of each lockstep step (MAIL, RCPT, the message) with the upstream; past
    it, or on 4xx or a dead upstream, the message is spooled. ``0``: always spool first."""
    refusal_cache: Duration = 600.0
    """How long a recipient the upstream refused for good (5xx) is refused at RCPT, even
    while the upstream is down (as Postfix's verify(8)); ``0``: not remembered."""
    dsn_fallback: str | None = None
    """Where DSNs go when the sender was not verified (SPF pass, DKIM pass for its domain,
    or a trusted client); unset: such DSNs are not sent (a log line says so)."""


class Quarantine(StrictModel):
    """Held mail (a ``quarantine`` verdict): kept in the spool until released or deleted."""

    lifetime: Duration = 30 * 86400.0
    """After this long a held message is deleted, with a log line and no DSN."""


class Limits(StrictModel):
    """Limits on what one client may send."""

    message_size: Size = 25_000_000
    recipients: int = Field(default=100, ge=1)
    recipient_overshoot: int = Field(default=1000, ge=0)
    """RCPTs past ``recipients`` answered 452 before each further one counts as an error."""
    idle_timeout: Duration = Field(default=300.0, gt=0)
    """How long the gateway waits for one whole command line (or, in DATA, for more data)."""
    data_timeout: Duration = Field(default=600.0, gt=0)
    """The longest the DATA phase may take, from the 354 reply to the final dot."""
    session_timeout: Duration = Field(default=3600.0, gt=0)
    """The longest a connection may last; checked whenever the gateway waits for the client."""
    connections: int = Field(default=1000, ge=1)
    """Client connections open at once (per process); more get 421 4.7.0 at connect."""
    connections_per_ip: int = Field(default=50, ge=1)
    """Connections open at once from one address (trusted networks exempt)."""
    errors: int = Field(default=20, ge=1)
    """4xx/5xx replies a session may get before 421 4.7.0 and disconnect (reset on delivery)."""
    junk_commands: int = Field(default=100, ge=0)
    """NOOP/RSET/VRFY allowed between deliveries; each one past it counts as an error."""
    line_length: Size = Field(default=65536, ge=1001, le=16 * 1024 * 1024)
    """Longest accepted line, CRLF included; a longer DATA line gets 500 5.5.2 for the message."""
    memory: Size = Field(default=512_000_000, ge=1_000_000)
    """Bytes of message data the process may hold (split between ``workers``); past it 452 4.3.1."""
    data_per_ip: int = Field(default=5, ge=1)
    """DATA phases at once from one address (trusted networks exempt); one more gets 451 4.7.1."""
    hops: int = Field(default=100, ge=1, le=1000)
    """A message with this many ``Received:`` fields or more is a loop: 554 5.4.6 at end of DATA."""


class Protocol(StrictModel):
    """SMTP protocol hardening: line endings in DATA and clients that talk too early."""

    line_endings: Literal["reject", "normalize"] = "reject"
    """A bare CR or LF in DATA: ``reject`` (550 5.6.0) or ``normalize`` to CRLF."""
    line_endings_exclusions: list[NetworkField] = Field(default_factory=list)
    """Clients whose bare CR/LF are normalised even when ``line_endings`` is ``reject``."""
    early_talker: Literal["reject", "monitor", "off"] = "reject"
    """A client that sends before the greeting: refuse it (554 5.5.1), only log it, or ignore."""
    greet_delay: Duration = Field(default=0.0, le=60)
    """Wait this long after connect (sending a ``220-`` first line) before the greeting."""

    def line_endings_for(
        self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> Literal["reject", "normalize"]:
        """The line-ending mode for a client at ``ip``."""
        if self.line_endings == "normalize" or _in_networks(ip, self.line_endings_exclusions):
            return "normalize"
        return "reject"


class Scoring(StrictModel):
    """Score thresholds applied at end of DATA, after every on_data hook."""

    tag: float | None = 5.0
    reject: float | None = 15.0
    quarantine: float | None = None
    """A score at or above this (and below ``reject``) holds the message in the spool."""
    flag_header: str = "X-Spam-Flag"
    score_header: str = "X-Spam-Score"


SyslogFacility = Literal[
    "mail", "daemon", "user", "local0", "local1", "local2", "local3", "local4", "local5",
    "local6", "local7",
]  # fmt: skip


class Logging(StrictModel):
    """Where and how the log is written (``mailgate.logformat``)."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"
    """``text``: ``key=value`` lines; ``json``: one JSON object per line."""
    target: Literal["stderr", "syslog", "file"] = "stderr"
    """Standard error, syslog, or the file ``file`` (reopened after logrotate moves it)."""
    file: str | None = None
    """With ``target: file``: the log file's path."""
    syslog_address: str = "/dev/log"
    """With ``target: syslog``: a Unix socket path, or ``HOST:PORT`` (UDP, port 514 if left out)."""
    syslog_facility: SyslogFacility = "mail"

    @model_validator(mode="after")
    def _check_target(self) -> Logging:
        if self.target == "file" and not self.file:
            raise ValueError("target: file needs file: PATH")
        if self.file and self.target != "file":
            raise ValueError("file: is used only with target: file")
        if not self.syslog_address.startswith("/"):
            split_host_port(self.syslog_address, 514)  # raises ValueError on a bad address
        return self


class Dns(StrictModel):
    """The process's resolver, shared by every plugin that looks things up."""

    nameservers: list[str] = Field(default_factory=list)
    """``IP`` or ``IP:PORT`` entries; empty means the system's resolv.conf."""
    timeout: Duration = 3.0
    cache_size: int = Field(default=10_000, ge=0)


def _state_shorthand(value: object) -> object:
    return {"url": value} if isinstance(value, str) else value


class State(StrictModel):
    """Where rate-limit and greylist state lives (``mailgate.state``).

    ``memory`` (per process) or ``redis://[:password@]host:port/db`` (also
    ``rediss://`` and ``unix://``), shared by every process using that database.
    """

    url: str = "memory"
    timeout: Duration = 1.0
    """The longest wait for Redis (connect or reply); past it the check fails (``on_error``)."""
    key_prefix: str = "mailgate:"

    @model_validator(mode="after")
    def _check_url(self) -> State:
        scheme = urlsplit(self.url).scheme
        if self.url != "memory" and scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"expected memory or redis://HOST:PORT/DB, got {self.url!r}")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        return self


class Policy(StrictModel):
    """The whole policy file."""

    hostname: str = Field(default_factory=socket.getfqdn)
    listen: list[Listener] = Field(default_factory=lambda: [Listener()], min_length=1)
    upstream: UpstreamField = Field(default_factory=Upstream)
    delivery: Literal["inline", "queue"] = "inline"
    """``inline``: relay in lockstep; ``queue``: lockstep while the upstream answers,
    else spool (fsynced) before 250 and deliver later."""
    routes: dict[str, UpstreamField] = Field(default_factory=dict)
    """Queue mode: recipient domain (``.example.com`` = its subdomains, ``*`` = any) -> upstream."""
    queue: Queue = Field(default_factory=Queue)
    quarantine: Quarantine = Field(default_factory=Quarantine)
    domains: list[str] = Field(default_factory=list)
    """Recipient domains mail is accepted for (subdomains are not included)."""
    trusted_networks: list[NetworkField] = Field(default_factory=list)
    """Clients that may relay to any domain."""
    limits: Limits = Field(default_factory=Limits)
    protocol: Protocol = Field(default_factory=Protocol)
    scoring: Scoring = Field(default_factory=Scoring)
    log: Logging = Field(default_factory=Logging)
    metrics: Annotated[str, AfterValidator(_host_port)] | None = None
    """``HOST:PORT`` serving Prometheus ``/metrics`` and ``/health``; unset: no endpoint."""
    pid_file: str | None = None
    """Written by ``mailgate run``; ``mailgate reload`` signals the pid in it."""
    shutdown_timeout: Duration = 30.0
    """On SIGTERM: how long transactions in flight may take to finish."""
    dns: Dns = Field(default_factory=Dns)
    state: Annotated[State, BeforeValidator(_state_shorthand)] = Field(default_factory=State)
    """Rate-limit and greylist state: ``memory`` or ``redis://host:port/db``."""
    workers: int = Field(default=1, ge=1, le=256)
    """Processes serving the same ports (SO_REUSEPORT); ports must then be fixed, not 0."""
    plugins: dict[str, dict[str, Any] | None] = Field(default_factory=dict)
    """Plugin name -> its settings, in the order the plugins run."""

    @model_validator(mode="after")
    def _check_workers(self) -> Policy:
        if self.workers > 1 and any(entry.host_port[1] == 0 for entry in self.listen):
            raise ValueError("workers > 1 needs fixed listen ports (port 0 picks one per process)")
        return self

    @model_validator(mode="after")
    def _normalise(self) -> Policy:
        object.__setattr__(self, "domains", [d.lower().rstrip(".") for d in self.domains])
        if self.routes and self.delivery != "queue":
            raise ValueError("routes need delivery: queue")
        routes = {k.lower().rstrip("."): v for k, v in self.routes.items()}
        object.__setattr__(self, "routes", routes)
        return self

    def is_trusted(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """True when ``ip`` lies in one of ``trusted_networks``."""
        return _in_networks(ip, self.trusted_networks)


def _in_networks(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: list[Network]) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in net for net in nets)


def validation_messages(
    doc: Document, exc: ValidationError, prefix: tuple[str | int, ...] = ()
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
        policy = Policy.model_validate(doc.data)
    except ValidationError as exc:
        raise SourceError(validation_messages(doc, exc)) from None
    if loops := [doc.error(path, message) for path, message in relay_loops(policy, doc)]:
        raise SourceError(loops)
    return policy


def relay_loops(policy: Policy, doc: Document) -> list[tuple[tuple[str, ...], str]]:
    """The upstreams and routes that name one of the gateway's own listeners (a mail loop)."""
    route_keys = {str(key).lower().rstrip("."): str(key) for key in doc.data.get("routes") or {}}
    targets: list[tuple[tuple[str, ...], Upstream]] = [(("upstream",), policy.upstream)]
    targets += [(("routes", route_keys.get(d, d)), up) for d, up in policy.routes.items()]
    found: list[tuple[tuple[str, ...], str]] = []
    for path, upstream in targets:
        if upstream.kind != "smtp":
            continue
        for host, port in upstream.servers:
            for listener in policy.listen:
                if _same_socket((host, port), listener.host_port):
                    message = (
                        f"smtp://{host}:{port} is this gateway's own listener"
                        f" {listener.address}: mail would loop"
                    )
                    found.append((path, message))
    return found


def _same_socket(target: tuple[str, int], listener: tuple[str, int]) -> bool:
    """Whether connecting to ``target`` reaches a socket listening on ``listener``."""
    (host, port), (listening_host, listening_port) = target, listener
    if port != listening_port or port == 0:
        return False
    if host.lower() == listening_host.lower():
        return True
    if listening_host in ("0.0.0.0", "::"):  # every local address, loopback included
        return host.lower() == "localhost" or _is_loopback(host)
    return host.lower() == "localhost" and listening_host in ("127.0.0.1", "::1")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
