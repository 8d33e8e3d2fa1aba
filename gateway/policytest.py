"""``mailgate test``: dry-run one message, or run a policy's test cases like a test runner.

One message::

    mailgate test -c policy.yaml message.eml --client-ip 203.0.113.9 \\
        --helo mx.example.net --from alice@example.net --to bob@example.com [--json]

prints the stage-by-stage trace (``mailgate.testreport``) and exits 0 (accept),
4 (tempfail) or 5 (reject); 2 for a bad policy or cases file, 1 for other
errors. Without ``--from``/``--to`` the envelope comes from the From, To and Cc
headers; without a message file a small valid message is made up.

Test cases::

    mailgate test --cases policies/default.cases.yaml [more.cases.yaml ...] [-c POLICY]

A cases file (YAML, checked like a policy, errors as ``FILE:LINE:COL``)::

    defaults:                       # optional: merged under every case
      client_ip: 192.0.2.10
      from: alice@example.net
    dns:                            # optional: records for every case (mailgate.testzone)
      example.net: {TXT: "v=spf1 ip4:192.0.2.0/24 -all"}
    scanners:                       # optional: what scanners answer (mailgate.testscanners)
      rspamd: {action: no action, score: 1.2}
    cases:
      - name: mail for a local user is delivered
        to: bob@example.com         # one address or a list
        message: |                  # or message_file: msg.eml (beside the cases file)
          From: alice@example.net
          ...
        dns: {}                     # merged over the file's records
        scanners: {}                # content scanners' answers (mailgate.testscanners)
        expect:
          outcome: accept           # accept | tempfail | reject
          rules: [spf.pass]         # rule ids that must give a verdict (any mode)
          not_rules: [spf.fail]     # ... that must not
          reply: "250 2.0.0"        # start of the reply that decided the outcome
          headers: [Received-SPF]   # header names the relayed message must gain
          score: 2                  # the transaction's total score
        repeat: 1                   # send it N times (rate limits); expect judges the last

Each case gets a fresh runtime (new plugin instances, empty in-memory state)
and DNS only from its records: cases never touch real DNS or Redis. Without
``-c``, ``NAME.cases.yaml`` is run against ``NAME.yaml`` beside it. Exit
status: 0 when every case passed, 1 when one failed, 2 for a bad file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import email.utils
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, field_validator

from mailgate import dryrun
from mailgate.dryrun import DEFAULT_CLIENT_IP, Request, Trace, as_sent, dry_runtime
from mailgate.policy import StrictModel, validation_messages
from mailgate.testreport import trace_json, trace_lines
from mailgate.testscanners import check_answers, start_servers
from mailgate.testzone import Zone, ZoneServer
from mailgate.yamlsource import SourceError, load_file

EXIT_FAILED = 1
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2

Outcome = Literal["accept", "tempfail", "reject"]


def _valid_zone(value: dict[str, Any]) -> dict[str, Any]:
    Zone(value)  # raises ValueError naming the bad record
    return value


def _valid_answers(value: dict[str, Any]) -> dict[str, Any]:
    check_answers(value)  # raises ValueError naming the bad answer
    return value


ScannersField = Annotated[dict[str, Any], AfterValidator(_valid_answers)]
ZoneField = Annotated[
    dict[str, dict[str, str | list[str]] | Literal["servfail", "timeout"]],
    AfterValidator(_valid_zone),
]


def _listify(value: object) -> object:
    return [value] if isinstance(value, str) else value


class Expect(StrictModel):
    """What a case must produce."""

    outcome: Outcome
    rules: list[str] = Field(default_factory=list)
    not_rules: list[str] = Field(default_factory=list)
    reply: str | None = None
    headers: list[str] = Field(default_factory=list)
    score: float | int | None = None


class CaseInput(StrictModel):
    """Who connects and what they send; every key may also sit under ``defaults:``."""

    client_ip: str = DEFAULT_CLIENT_IP
    helo: str = ""
    sender: str | None = Field(default=None, alias="from")
    to: Annotated[list[str] | None, BeforeValidator(_listify)] = None
    message: str | None = None
    message_file: str | None = None
    dns: ZoneField = Field(default_factory=dict)
    scanners: ScannersField = Field(default_factory=dict)
    """What content scanners answer (``mailgate.testscanners``)."""

    @field_validator("client_ip")
    @classmethod
    def _ip(cls, value: str) -> str:
        ipaddress.ip_address(value)  # raises ValueError with a clear message
        return value


class Case(CaseInput):
    """One test case."""

    name: str
    expect: Expect
    repeat: int = Field(default=1, ge=1, le=1000)
    """Send the transaction this many times (a connection each); ``expect`` judges the last."""


class CasesFile(StrictModel):
    """The top level of a cases file."""

    defaults: dict[str, Any] = Field(default_factory=dict)
    dns: ZoneField = Field(default_factory=dict)
    scanners: ScannersField = Field(default_factory=dict)
    cases: list[dict[str, Any]] = Field(min_length=1)


@dataclass(frozen=True, slots=True)
class LoadedCase:
    """A validated case, ready to run."""

    case: Case
    request: Request
    zone: Zone
    scanners: dict[str, Any]


def made_up_message(sender: str, recipients: list[str]) -> bytes:
    """A small, valid message for cases and runs that do not give one."""
    now = email.utils.format_datetime(datetime.datetime.now(datetime.UTC))
    lines = [
        f"From: <{sender}>" if sender else "From: <mailer-daemon@invalid>",
        f"To: {', '.join(f'<{r}>' for r in recipients)}",
        "Subject: mailgate test message",
        f"Date: {now}",
        f"Message-ID: {email.utils.make_msgid(domain='mailgate.test')}",
        "",
        "This is a test message made up by mailgate test.",
        "",
    ]
    return "\r\n".join(lines).encode("utf-8")


def build_request(
    message: bytes | None,
    sender: str | None,
    recipients: list[str] | None,
    client_ip: str,
    helo: str,
) -> Request:
    """A request with the envelope completed from the message headers; ValueError if it cannot."""
    if message is not None:
        message = as_sent(message)
        header_sender, header_rcpts = dryrun.envelope_from_headers(message)
        sender = header_sender if sender is None else sender
        recipients = recipients or header_rcpts
    if sender is None:
        raise ValueError("no sender: give --from (from:) or a message with a From header")
    if not recipients:
        raise ValueError("no recipients: give --to (to:) or a message with To or Cc headers")
    if message is None:
        message = made_up_message(sender, recipients)
    return Request(message, sender, tuple(recipients), client_ip, helo)


def load_cases(path: str) -> list[LoadedCase]:
    """Read and validate a cases file; SourceError lists every problem with its position."""
    doc = load_file(path)
    try:
        top = CasesFile.model_validate(doc.data)
    except ValidationError as exc:
        raise SourceError(validation_messages(doc, exc)) from None
    try:
        CaseInput.model_validate(top.defaults)
    except ValidationError as exc:
        raise SourceError(validation_messages(doc, exc, ("defaults",))) from None
    errors: list[str] = []
    loaded: list[LoadedCase] = []
    base = os.path.dirname(os.path.abspath(path))
    for index, raw in enumerate(top.cases):
        where = ("cases", index)
        try:
            case = Case.model_validate({**top.defaults, **raw})
        except ValidationError as exc:
            errors.extend(validation_messages(doc, exc, where))
            continue
        try:
            message = _message_bytes(case, base)
            request = build_request(message, case.sender, case.to, case.client_ip, case.helo)
        except (OSError, ValueError) as exc:
            errors.append(doc.error(where, str(exc)))
            continue
        zone = Zone({**top.dns, **top.defaults.get("dns", {}), **case.dns})
        scanners = {**top.scanners, **top.defaults.get("scanners", {}), **case.scanners}
        loaded.append(LoadedCase(case, request, zone, scanners))
    if errors:
        raise SourceError(errors)
    return loaded


def _message_bytes(case: Case, base: str) -> bytes | None:
    if case.message is not None and case.message_file is not None:
        raise ValueError("give message or message_file, not both")
    if case.message_file is not None:
        with open(os.path.join(base, case.message_file), "rb") as fh:
            return fh.read()
    return case.message.encode("utf-8") if case.message is not None else None


def check(case: Case, trace: Trace) -> list[str]:
    """Why ``trace`` does not meet the case's expectations (empty: it does)."""
    expect, failures = case.expect, []
    seen = trace.rules
    if trace.outcome != expect.outcome:
        failures.append(f"outcome: expected {expect.outcome}, got {trace.outcome} ({trace.reply})")
    missing = [rule for rule in expect.rules if rule not in seen]
    if missing:
        failures.append(f"rules: expected {', '.join(missing)}; got {', '.join(seen) or '-'}")
    unwanted = [rule for rule in expect.not_rules if rule in seen]
    if unwanted:
        failures.append(f"not_rules: got {', '.join(unwanted)}")
    if expect.reply is not None and not trace.reply.startswith(expect.reply):
        failures.append(f"reply: expected {expect.reply!r}..., got {trace.reply!r}")
    added = {name.lower() for name, _ in trace.added_headers}
    absent = [h for h in expect.headers if h.lower() not in added]
    if absent:
        failures.append(f"headers: {', '.join(absent)} not added")
    if expect.score is not None and (trace.score or 0.0) != float(expect.score):
        failures.append(f"score: expected {expect.score:g}, got {trace.score or 0:g}")
    return failures


def policy_for(cases_path: str, explicit: str | None) -> str:
    """The policy for a cases file: ``-c``, else ``NAME.yaml`` beside ``NAME.cases.yaml``."""
    if explicit:
        return explicit
    if cases_path.endswith(".cases.yaml"):
        sibling = cases_path.removesuffix(".cases.yaml") + ".yaml"
        if os.path.exists(sibling):
            return sibling
    raise SourceError([f"{cases_path}: no policy beside it (NAME.yaml); give -c POLICY"])


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Keep the gateway's own log lines off the terminal during runs (the trace has them)."""
    logger = logging.getLogger("mailgate")
    saved = logger.propagate, logger.level
    if verbose:
        logger.setLevel(logging.DEBUG)
    else:
        logger.propagate = False
    try:
        yield
    finally:
        logger.propagate, logger.level = saved


@dataclass(slots=True)
class CaseResult:
    """One case run: its name, what was wrong, and the trace."""

    name: str
    failures: list[str]
    trace: Trace

    @property
    def passed(self) -> bool:
        """True when every expectation held."""
        return not self.failures


async def run_cases(path: str, policy_path: str) -> list[CaseResult]:
    """Run every case of one cases file against ``policy_path``."""
    doc = load_file(policy_path)
    dry_runtime(doc)  # a bad policy fails here, once, before any case
    cases = load_cases(path)
    results = []
    zones = await ZoneServer.start(Zone({}))
    try:
        for item in cases:
            zones.zone = item.zone
            scanners = await start_servers(item.scanners)
            try:
                servers = {s.kind: s.address for s in scanners}
                runtime = dry_runtime(doc, nameservers=[zones.address], servers=servers)
                await runtime.start()
                try:
                    for _ in range(item.case.repeat):
                        trace = await dryrun.run(runtime, item.request)
                finally:
                    await runtime.stop()
            finally:
                for scanner in scanners:
                    await scanner.close()
            results.append(CaseResult(item.case.name, check(item.case, trace), trace))
    finally:
        await zones.close()
    return results


def _print_cases(path: str, policy_path: str, results: list[CaseResult]) -> None:
    print(f"{path} (policy {policy_path})")
    for result in results:
        print(f"  {'ok  ' if result.passed else 'FAIL'}  {result.name}")
        if not result.passed:
            for failure in result.failures:
                print(f"        {failure}")
            print("        trace:")
            for line in trace_lines(result.trace):
                print(f"          {line}".rstrip())


async def _cases_command(args: argparse.Namespace) -> int:
    files: list[dict[str, Any]] = []
    every: list[CaseResult] = []
    for path in args.cases:
        try:
            policy_path = policy_for(path, args.config)
            results = await run_cases(path, policy_path)
        except SourceError as exc:
            for message in exc.messages:
                print(message, file=sys.stderr)
            return EXIT_BAD_INPUT
        every += results
        if args.json:
            cases = [
                {"name": r.name, "passed": r.passed, "failures": r.failures}
                | {"trace": trace_json(r.trace)}
                for r in results
            ]
            files.append({"file": path, "policy": policy_path, "cases": cases})
        else:
            _print_cases(path, policy_path, results)
    failed = sum(not r.passed for r in every)
    passed = len(every) - failed
    if args.json:
        print(json.dumps({"passed": passed, "failed": failed, "files": files}, indent=2))
    else:
        print(f"{len(every)} cases in {len(args.cases)} files: {passed} passed, {failed} failed")
    return EXIT_FAILED if failed else 0


def _single_request(args: argparse.Namespace) -> Request:
    """The request from the command line; OSError or ValueError if it cannot be made."""
    message = None
    if args.message == "-":
        message = sys.stdin.buffer.read()
    elif args.message:
        with open(args.message, "rb") as fh:
            message = fh.read()
    ipaddress.ip_address(args.client_ip)
    return build_request(message, args.sender, args.to, args.client_ip, args.helo or "")


async def _single_command(args: argparse.Namespace, request: Request) -> int:
    policy_path = args.config or "policies/default.yaml"
    try:
        runtime = dry_runtime(load_file(policy_path))
    except SourceError as exc:
        for message in exc.messages:
            print(message, file=sys.stderr)
        return EXIT_BAD_INPUT
    await runtime.start()
    try:
        trace = await dryrun.run(runtime, request)
    finally:
        await runtime.stop()
    if args.json:
        print(json.dumps({"policy": policy_path} | trace_json(trace), indent=2))
    else:
        scoring = runtime.policy.scoring
        print(f"mailgate test: {policy_path} (dry run: nothing is relayed)")
        for line in trace_lines(trace, (scoring.tag, scoring.reject)):
            print(line)
    return trace.exit_status


def main(args: argparse.Namespace) -> int:
    """Run ``mailgate test`` with parsed arguments; return the exit status."""
    with _quiet(args.verbose):
        if args.cases:
            return asyncio.run(_cases_command(args))
        try:
            request = _single_request(args)
        except (OSError, ValueError) as exc:
            print(f"mailgate test: {exc}", file=sys.stderr)
            return EXIT_ERROR
        return asyncio.run(_single_command(args, request))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``mailgate test`` options."""
    parser.add_argument("-c", "--config", help="policy file (default: policies/default.yaml)")
    parser.add_argument("message", nargs="?", help="message file (.eml), - for standard input")
    parser.add_argument("--client-ip", default=DEFAULT_CLIENT_IP, help="the client's address")
    parser.add_argument("--helo", help="the EHLO name (default: the address literal)")
    parser.add_argument("--from", dest="sender", help="envelope sender (default: From header)")
    parser.add_argument(
        "--to", action="append", help="envelope recipient, repeatable (default: To and Cc)"
    )
    parser.add_argument("--cases", nargs="+", metavar="CASES", help="run test cases files")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the gateway's log")
