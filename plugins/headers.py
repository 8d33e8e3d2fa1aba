"""headers: header sanity, judged on the raw bytes that will be relayed (RFC 5322, RFC 6532).

Hook: ``on_data``. It reads ``message.raw`` from the first byte to the empty
line that ends the header section (no further than ``max_header_size``), so
its cost is bounded whatever the message size. The core has already refused
or normalised bare CR/LF and NUL (``mailgate.lineendings``), so lines are CRLF.

A header section may end at the end of the message without an empty line
(a message without a body is valid). A line in the header section that is not
a field (no colon) and not a continuation is refused as ``headers.no_separator``:
parsers disagree on whether it starts the body or breaks a header, and that
disagreement is what header smuggling feeds on. Obsolete syntax that RFC 5322
§4 says receivers must accept (white space before the colon) is accepted.

Rule ids (action defaults; each overridable under ``rules:``, see
``mailgate.plugins.actions``). Rejects answer ``550 5.6.0 <fault>``:

=============================  ========  ===============================================
``headers.missing_<name>``     reject    a ``require`` header is absent (From, Date);
                               tag       ... any other required header (score 1)
``headers.duplicate_<name>``   reject    a ``singletons`` header appears more than once
``headers.bad_name``           reject    field name empty or not printable ASCII
``headers.bad_folding``        reject    continuation with no field before it, or a
                                         line of white space only
``headers.no_separator``       reject    a line that is neither field nor continuation
``headers.line_too_long``      reject    a header line over ``max_line_length`` octets
``headers.too_big``            reject    header section over ``max_header_size``
                                         (``552 5.3.4``)
``headers.8bit``               reject    8-bit bytes without SMTPUTF8 (RFC 6532)
``headers.bad_utf8``           reject    with SMTPUTF8, bytes that are not UTF-8
``headers.bad_from``           reject    From is not a mailbox list
``headers.from_needs_sender``  reject    several From mailboxes and no Sender
``headers.bad_date``           tag       Date does not parse (score 1)
``headers.date_skew``          tag       Date more than ``max_future`` ahead or
                                         ``max_past`` behind (score 1)
=============================  ========  ===============================================

``<name>`` is the header name in lower case with ``-`` as ``_``
(``headers.missing_message_id``).

Config (defaults):

- ``require: [From, Date]``: headers that must be present.
- ``singletons: [Date, From, Sender, Reply-To, To, Cc, Bcc, Message-ID,
  In-Reply-To, References, Subject]``: headers allowed at most once
  (RFC 5322 §3.6), matched case-insensitively.
- ``repair: []``: ``Message-ID`` and/or ``Date``: when missing, add one
  instead of rejecting (like Postfix's ``always_add_missing_headers``).
- ``max_line_length: 998`` octets without CRLF (RFC 5322 §2.1.1).
- ``max_header_size: 100KB``.
- ``max_future: 1d``, ``max_past: 30d``: how far off Date may be.
- ``rules: {}``: per rule id, ``reject``, ``tag`` (with ``score``), ``quarantine``,
  ``monitor`` or ``off``.

Results: ``envelope.results["headers"]`` is a :class:`HeaderReport` (every
fault found, and the From addresses when From parsed).
"""

from __future__ import annotations

import email.errors
import email.policy
import email.utils
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import Field, field_validator, model_validator

from mailgate import (
    Duration,
    Envelope,
    Message,
    Mode,
    PluginConfig,
    Rule,
    Size,
    StartupContext,
    Verdict,
    hookimpl,
)
from mailgate.plugins.actions import Fault, RuleBook, RuleField

SINGLETONS = [
    "Date", "From", "Sender", "Reply-To", "To", "Cc", "Bcc",
    "Message-ID", "In-Reply-To", "References", "Subject",
]  # fmt: skip
REPAIRABLE = {"message-id": "Message-ID", "date": "Date"}
MAX_FROM_LENGTH = 4000  # longer From values are not handed to the email parser
_FIELD_NAME = re.compile(rb"[!-9;-~]+")
_PLAIN_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:(.*)", re.DOTALL)
# One mailbox in its plainest forms: a@b.c, Name <a@b.c>, "Name, Q." <a@b.c>.
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]"
_ADDR_SPEC = rf"({_ATEXT}+(?:\.{_ATEXT}+)*@{_ATEXT}+(?:\.{_ATEXT}+)*)"
_WORD = rf'(?:{_ATEXT}+|"[ !#-\[\]-~]*")'
_SIMPLE_MAILBOX = re.compile(rf"{_ADDR_SPEC}|(?:{_WORD}(?:[ \t]+{_WORD})*[ \t]*)?<{_ADDR_SPEC}>")
_NAME = re.compile(r"[!-9;-~]+")
MISSING = Rule(
    "headers.missing_<name>",
    "reject",
    "a require header is absent (From, Date reject; any other header tags, score 1)",
    score=1.0,
)
DUPLICATE = Rule(
    "headers.duplicate_<name>", "reject", "a singletons header appears more than once", score=1.0
)
_RULES = (
    Rule("headers.bad_name", "reject", "field name empty or not printable ASCII", 1.0),
    Rule("headers.bad_folding", "reject", "continuation with no field before it, or blank", 1.0),
    Rule("headers.no_separator", "reject", "a line that is neither field nor continuation", 1.0),
    Rule("headers.line_too_long", "reject", "a header line over max_line_length octets", 1.0),
    Rule("headers.too_big", "reject", "header section over max_header_size (552 5.3.4)", 1.0),
    Rule("headers.8bit", "reject", "8-bit bytes without SMTPUTF8 (RFC 6532)", 1.0),
    Rule("headers.bad_utf8", "reject", "with SMTPUTF8, bytes that are not UTF-8", 1.0),
    Rule("headers.bad_from", "reject", "From is not a mailbox list", 1.0),
    Rule("headers.from_needs_sender", "reject", "several From mailboxes and no Sender", 1.0),
    Rule("headers.bad_date", "tag", "Date does not parse", 1.0),
    Rule("headers.date_skew", "tag", "Date more than max_future ahead or max_past behind", 1.0),
)
REPLIES = {"headers.too_big": (552, "5.3.4")}


def slug(name: str) -> str:
    """A header name as it appears in a rule id: ``Message-ID`` -> ``message_id``."""
    return name.lower().replace("-", "_")


class HeadersConfig(PluginConfig):
    """The ``headers`` plugin's settings."""

    require: list[str] = Field(default_factory=lambda: ["From", "Date"])
    singletons: list[str] = Field(default_factory=lambda: list(SINGLETONS))
    repair: list[str] = Field(default_factory=list)
    max_line_length: int = Field(default=998, ge=78)
    max_header_size: Size = Field(default=100_000, ge=1000)
    max_future: Duration = 86400.0
    max_past: Duration = 30 * 86400.0
    rules: dict[str, RuleField] = Field(default_factory=dict)

    @field_validator("require", "singletons")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not _NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a header field name")
        return names

    @field_validator("repair")
    @classmethod
    def _repairable(cls, names: list[str]) -> list[str]:
        for name in names:
            if name.lower() not in REPAIRABLE:
                raise ValueError(f"only Message-ID and Date can be repaired, not {name!r}")
        return [REPAIRABLE[name.lower()] for name in names]

    @model_validator(mode="after")
    def _known_rules(self) -> HeadersConfig:
        rulebook(self)  # raises ValueError naming an unknown rule id
        return self


def _wanted(config: HeadersConfig) -> list[str]:
    """Headers that must be present or are added when missing, each once."""
    names = {name.lower(): name for name in config.require}
    names.update({name.lower(): name for name in config.repair})
    return list(names.values())


def rulebook(config: HeadersConfig) -> RuleBook:
    """The plugin's rules, with the ones named after configured headers, and overrides."""
    rules = list(_RULES)
    for name in _wanted(config):
        must = name.lower() in ("from", "date")  # RFC 5322 §3.6: the only required fields
        rule_id = f"headers.missing_{slug(name)}"
        rules.append(Rule(rule_id, "reject" if must else "tag", MISSING.description, 1.0))
    rules += [
        Rule(f"headers.duplicate_{slug(name)}", "reject", DUPLICATE.description, 1.0)
        for name in config.singletons
    ]
    return RuleBook("headers", rules, config.rules, REPLIES)


@dataclass(frozen=True, slots=True)
class HeaderReport:
    """What the headers plugin found, for other plugins: ``envelope.results["headers"]``."""

    faults: tuple[Fault, ...]
    from_addresses: tuple[str, ...]
    """The From mailboxes (``user@domain``) when From parsed, else empty."""


@dataclass(slots=True)
class _Field:
    name: str
    value: bytes


def _split_plain(raw: bytes, config: HeadersConfig) -> tuple[list[_Field], bytes] | None:
    """:func:`_split_section` of a section it finds no fault in (the usual one); else None.

    The section ends at the first blank line, lies within ``max_header_size``,
    and each line is a field with a sound name or a continuation of one, none
    longer than ``max_line_length``: then the fields and the section are the
    same as the line-by-line reading's, without its per-line bookkeeping.
    """
    end = raw.find(b"\r\n\r\n")
    if end < 0 or end + 2 > config.max_header_size:
        return None
    lines = raw[:end].split(b"\r\n")
    if max(map(len, lines)) > config.max_line_length:
        return None
    fields: list[_Field] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not fields or not line.strip(b" \t"):
                return None
            fields[-1].value += b" " + line.lstrip(b" \t")
            continue
        # The name before the first colon (blanks before the colon aside) and the value.
        field = _PLAIN_FIELD.fullmatch(line)
        if field is None:
            return None
        fields.append(_Field(field[1].decode("ascii"), field[2].strip(b" \t")))
    return fields, raw[: end + 4]


def _split_section(raw: bytes, config: HeadersConfig) -> tuple[list[_Field], bytes, list[Fault]]:
    """Parse the header section into fields; return them, the section's bytes and faults."""
    if (plain := _split_plain(raw, config)) is not None:
        return plain[0], plain[1], []
    return _split_lines(raw, config)


def _split_lines(raw: bytes, config: HeadersConfig) -> tuple[list[_Field], bytes, list[Fault]]:
    """:func:`_split_section` line by line, every fault found."""
    fields: list[_Field] = []
    faults: list[Fault] = []
    pos = number = 0
    limit = config.max_header_size
    while pos < len(raw):
        end = raw.find(b"\r\n", pos)
        nxt = len(raw) if end < 0 else end + 2
        line = raw[pos : len(raw) if end < 0 else end]
        number += 1
        if not line:
            return fields, raw[:nxt], faults
        if nxt > limit:
            faults.append(Fault("headers.too_big", f"Header section larger than {limit} octets"))
            return fields, raw[:limit], faults
        if len(line) > config.max_line_length and not any(
            f.rule == "headers.line_too_long" for f in faults
        ):
            text = f"Header line {number} longer than {config.max_line_length} octets"
            faults.append(Fault("headers.line_too_long", text))
        if line[:1] in (b" ", b"\t"):
            if not fields or not line.strip(b" \t"):
                faults.append(Fault("headers.bad_folding", f"Bad header folding at line {number}"))
            else:
                fields[-1].value += b" " + line.lstrip(b" \t")
        elif (colon := line.find(b":")) < 0:
            text = f"Line {number} of the header section is not a header field"
            faults.append(Fault("headers.no_separator", text))
            return fields, raw[:pos], faults
        elif not _FIELD_NAME.fullmatch(name := line[:colon].rstrip(b" \t")):
            faults.append(Fault("headers.bad_name", f"Bad header field name at line {number}"))
        else:
            fields.append(_Field(name.decode("ascii"), line[colon + 1 :].strip(b" \t")))
        pos = nxt
    return fields, raw, faults


def _mailboxes(value: str) -> tuple[str, ...] | None:
    """The addresses of a mailbox list, or None if it is not one."""
    simple = _SIMPLE_MAILBOX.fullmatch(value)
    if simple:  # the common case, without the cost of the full parser
        return (simple.group(1) or simple.group(2),)
    return parse_mailboxes(value)


def parse_mailboxes(value: str) -> tuple[str, ...] | None:
    """:func:`_mailboxes` by the ``email`` package's full RFC 5322 parser."""
    if len(value) > MAX_FROM_LENGTH:
        return None
    try:
        header = email.policy.default.header_factory("From", value)
        addresses = header.addresses
        defects = header.defects
    except Exception:  # the parser raises odd errors (IndexError) on odd input
        return None
    bad = (email.errors.InvalidHeaderDefect, email.errors.NonPrintableDefect)
    if not addresses or any(isinstance(d, bad) for d in defects):
        return None
    if any(not (a.username and a.domain) for a in addresses):
        return None
    return tuple(a.addr_spec for a in addresses)


def _check_date(value: str, config: HeadersConfig, now: datetime) -> Fault | None:
    try:
        date = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return Fault("headers.bad_date", "Date header does not parse")
    if date.tzinfo is None:
        date = date.replace(tzinfo=UTC)
    ahead = (date - now).total_seconds()
    if ahead > config.max_future:
        return Fault("headers.date_skew", f"Date header is {ahead / 86400:.0f} days ahead")
    if -ahead > config.max_past:
        return Fault("headers.date_skew", f"Date header is {-ahead / 86400:.0f} days old")
    return None


def check_headers(
    raw: bytes, config: HeadersConfig, *, smtputf8: bool, now: datetime, hostname: str = "localhost"
) -> HeaderReport:
    """Every header fault in the message ``raw`` (CRLF line endings), in a stable order.

    Pure: the same arguments give the same report (``now`` fixes the clock; a
    repaired Message-ID is random, so compare faults by rule id and text).
    """
    fields, section, faults = _split_section(raw, config)
    if not section.isascii():
        if not smtputf8:
            faults.append(Fault("headers.8bit", "8-bit bytes in header section without SMTPUTF8"))
        else:
            try:
                section.decode("utf-8")
            except UnicodeDecodeError:
                faults.append(Fault("headers.bad_utf8", "Invalid UTF-8 in header section"))
    present: dict[str, list[_Field]] = {}
    for field in fields:
        present.setdefault(field.name.lower(), []).append(field)
    for name in config.singletons:
        if len(present.get(name.lower(), [])) > 1:
            faults.append(Fault(f"headers.duplicate_{slug(name)}", f"Duplicate {name} header"))
    for name in _wanted(config):
        if name.lower() in present:
            continue
        repair: tuple[tuple[str, str], ...] = ()
        if name in config.repair:
            value = (
                email.utils.format_datetime(now)
                if name == "Date"
                else f"<{uuid.uuid4().hex}@{hostname}>"
            )
            repair = ((name, value),)
        faults.append(Fault(f"headers.missing_{slug(name)}", f"Missing {name} header", repair))
    from_addresses: tuple[str, ...] = ()
    if froms := present.get("from"):
        mailboxes = _mailboxes(froms[0].value.decode("utf-8", "surrogateescape"))
        if mailboxes is None:
            faults.append(Fault("headers.bad_from", "From header is not a valid mailbox list"))
        else:
            from_addresses = mailboxes
            if len(mailboxes) > 1 and "sender" not in present:
                text = "From header with several mailboxes needs a Sender header"
                faults.append(Fault("headers.from_needs_sender", text))
    if dates := present.get("date"):
        fault = _check_date(dates[0].value.decode("ascii", "replace"), config, now)
        if fault is not None:
            faults.append(fault)
    return HeaderReport(tuple(faults), from_addresses)


class Headers:
    """Refuse or tag messages whose header section is broken or suspicious."""

    name = "headers"
    Config = HeadersConfig
    RULES = (*_RULES, MISSING, DUPLICATE)

    def __init__(self, config: HeadersConfig) -> None:
        self.config = config
        self.book = rulebook(config)
        self.hostname = "localhost"

    @property
    def default_rule_modes(self) -> dict[str, Mode]:
        """``monitor``/``off`` given under ``rules:`` (the policy's ``rule_modes`` win)."""
        return self.book.default_rule_modes

    def configured_rules(self) -> list[Rule]:
        """The ``missing_``/``duplicate_`` ids of the configured headers, as configured."""
        rules = []
        for rule in self.book.rules.values():
            if not (MISSING.matches(rule.id) or DUPLICATE.matches(rule.id)):
                continue
            action, score = self.book.setting(rule.id)
            if action != "off":
                rules.append(Rule(rule.id, action, rule.description, score))
        return rules

    @hookimpl
    def on_startup(self, context: StartupContext) -> None:
        """Learn our hostname (for repaired Message-IDs) and the plugin's rule modes."""
        self.hostname = context.hostname
        self.book.settings = context.settings_of(self)

    @hookimpl
    def on_data(self, envelope: Envelope, message: Message) -> list[Verdict]:
        """Check the header section; publish the report; return one verdict per fault."""
        report = check_headers(
            message.raw,
            self.config,
            smtputf8=envelope.smtputf8,
            now=datetime.now(UTC),
            hostname=self.hostname,
        )
        envelope.results["headers"] = report
        return self.book.decide(report.faults)
