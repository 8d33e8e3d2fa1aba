"""The ``mailgate`` command: ``run`` the gateway, ``check`` a policy, ``test`` it, ``reload`` it.

``mailgate rules -c POLICY`` lists every rule id of the policy's plugins (their
``RULES`` declarations) with its default action, score, mode and description;
a placeholder id (``ratelimit.<name>``) is followed by the concrete ids the
config gives it, with their configured action, where the plugin lists them
(``configured_rules()``).

``mailgate queue list | show | hold | release | delete | flush`` manages the
spool (queued and quarantined mail); without ``-c`` it reads ``$MAILGATE_CONFIG``.

``mailgate --version`` prints the installed version; ``mailgate`` alone, the help.

Exit status: 0 on success, 2 for a bad policy (every problem printed as
``FILE:LINE:COL: path: message`` on standard error), 1 for other failures.
``mailgate test`` has its own (``mailgate.policytest``): 0 accept, 4 tempfail,
5 reject for one message; 0 all passed, 1 some failed for test cases.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from mailgate import policytest
from mailgate.listener import ListenError
from mailgate.logformat import configure_logging
from mailgate.pidfile import PidFileError, read_pid, remove_pid, write_pid
from mailgate.policy import Logging
from mailgate.registry import STAGES
from mailgate.runtime import Runtime
from mailgate.server import Gateway
from mailgate.version import version
from mailgate.yamlsource import SourceError

DEFAULT_POLICY = "policies/default.yaml"
EXIT_BAD_POLICY = 2
EXIT_CANNOT_LISTEN = 1
"""``run``: a listen (or metrics) address could not be opened, e.g. already in use."""


def _load(path: str) -> Runtime | None:
    try:
        return Runtime.load(path)
    except SourceError as exc:
        for message in exc.messages:
            print(message, file=sys.stderr)
        return None


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        found = False
    else:
        found = True
    # Outside the except block, so that an error in main() is not chained to the ImportError.
    if found:
        uvloop.run(main)
    else:
        asyncio.run(main)


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a policy and print the plugin order per hook."""
    runtime = _load(args.config)
    if runtime is None:
        return EXIT_BAD_POLICY
    print(f"{args.config}: ok")
    for hook in STAGES:
        order = runtime.plugin_set.call_order(hook)
        print(f"  {hook}: {', '.join(order) if order else '-'}")
    return 0


def rule_table(runtime: Runtime) -> list[tuple[str, str, str, str, str, str]]:
    """One row per declared rule of the loaded plugins: rule, plugin, action, score, mode, text.

    A placeholder's row is followed by one per concrete id its plugin lists.
    """
    rows: list[tuple[str, str, str, str, str, str]] = []
    for name, loaded in runtime.plugin_set.plugins.items():
        if loaded.rules is None:
            rows.append(("-", name, "-", "-", loaded.settings.mode, "(declares no RULES)"))
            continue
        for rule in loaded.rules_in_use:
            modes: set[str] = {loaded.settings.mode_of(rule.id)}
            if "<" in rule.id:  # a placeholder: every mode its instances are in
                modes |= {m for r, m in loaded.settings.rule_modes.items() if rule.matches(r)}
            mode = "/".join(sorted(modes))
            score = f"{rule.score:g}" if rule.score else "-"
            rows.append((rule.id, name, rule.action, score, mode, rule.description))
    return rows


def cmd_rules(args: argparse.Namespace) -> int:
    """List every rule id of the policy's plugins, in plugin order."""
    runtime = _load(args.config)
    if runtime is None:
        return EXIT_BAD_POLICY
    rows = [("RULE", "PLUGIN", "ACTION", "SCORE", "MODE", "DESCRIPTION"), *rule_table(runtime)]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[5]]))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Start the gateway and serve until SIGTERM or SIGINT."""
    runtime = _load(args.config)
    if runtime is None:
        return EXIT_BAD_POLICY
    try:
        configure_logging(runtime.policy.log)
    except OSError as exc:
        print(f"mailgate: log: {exc}", file=sys.stderr)
        return 1
    pid_file = args.pid_file or runtime.policy.pid_file
    if pid_file:
        try:
            write_pid(pid_file)
        except PidFileError as exc:
            print(f"mailgate: {exc}", file=sys.stderr)
            return 1
        atexit.register(remove_pid, pid_file)  # removes it only if it still holds our pid

    async def main(runtime: Runtime) -> None:
        gateway = Gateway(runtime)
        await gateway.start()

        def ready() -> None:
            for host, port in gateway.addresses:
                logging.getLogger("mailgate").info(
                    "mailgate ready on %s:%s",
                    host,
                    port,
                    extra={"fields": {"host": host, "port": port}},
                )

        await gateway.serve(ready)

    if runtime.policy.workers > 1:
        from mailgate.workers import probe_listen, supervise

        problem = probe_listen([listener.host_port for listener in runtime.policy.listen])
        if problem is not None:
            print(f"mailgate: {problem}", file=sys.stderr)
            return EXIT_CANNOT_LISTEN

        def worker() -> int:
            fresh = _load(args.config)  # each worker, and each restart, reads the file again
            if fresh is None:
                return EXIT_BAD_POLICY
            return _serve(main(fresh))

        return supervise(runtime.policy.workers, worker, runtime.policy.state.url)
    return _serve(main(runtime))


def _serve(main: Coroutine[Any, Any, None]) -> int:
    """Run the gateway until it stops; a socket it cannot open is one line and exit 1."""
    try:
        _run_loop(main)
    except ListenError as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return EXIT_CANNOT_LISTEN
    return 0


def cmd_queue(args: argparse.Namespace) -> int:
    """``queue list | show | hold | release | delete | flush`` (``mailgate.queue.admin``)."""
    from mailgate.queue import admin

    config = args.config or os.environ.get("MAILGATE_CONFIG") or DEFAULT_POLICY
    runtime = _load(config)
    if runtime is None:
        return EXIT_BAD_POLICY
    return admin.run(runtime.policy, args)


_QUEUE_HELP = """\
Manage the spool: queued mail (delivery: queue) and quarantined (held) mail.
The policy is -c FILE, else $MAILGATE_CONFIG, else policies/default.yaml
(relative to the current folder); its queue.directory is the spool."""


def _queue_parser(sub: Any) -> None:
    q = sub.add_parser(
        "queue",
        help="list, show, hold, release, delete or flush spooled mail",
        description=_QUEUE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config_help = "policy file (YAML); default: $MAILGATE_CONFIG, else " + DEFAULT_POLICY
    q.add_argument("-c", "--config", help=config_help)
    actions = q.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("list", help="list queued, held and damaged messages")
    ls.add_argument("--held", action="store_true", help="held (quarantined) messages only")
    show = actions.add_parser("show", help="envelope, verdicts and headers of one message")
    show.add_argument("--raw", action="store_true", help="write the whole message as stored")
    show.add_argument("id", help="the queue id")
    for name, text in (
        ("hold", "quarantine a queued message"),
        ("release", "let a held message go: delivered now, as it is"),
        ("delete", "delete a message (queued, held or damaged), no DSN"),
    ):
        actions.add_parser(name, help=text).add_argument("id", help="the queue id")
    actions.add_parser("flush", help="retry every queued message now")
    for p in actions.choices.values():
        p.add_argument("-c", "--config", default=argparse.SUPPRESS, help=config_help)
    q.set_defaults(func=cmd_queue)


def cmd_test(args: argparse.Namespace) -> int:
    """Dry-run a message or run test cases (``mailgate.policytest``)."""
    return policytest.main(args)


def cmd_reload(args: argparse.Namespace) -> int:
    """Validate the policy (with ``-c``), then SIGHUP the gateway named by the pid file."""
    pid_file = args.pid_file
    if args.config:
        runtime = _load(args.config)
        if runtime is None:
            print("mailgate reload: not reloading: fix the policy first", file=sys.stderr)
            return EXIT_BAD_POLICY
        pid_file = pid_file or runtime.policy.pid_file
    if not pid_file:
        print("mailgate reload: give --pid-file, or -c POLICY with pid_file: set", file=sys.stderr)
        return 1
    try:
        pid = read_pid(pid_file)
        os.kill(pid, signal.SIGHUP)
    except PidFileError as exc:
        print(f"mailgate reload: {exc}", file=sys.stderr)
        return 1
    except ProcessLookupError:
        print(f"mailgate reload: {pid_file}: no process {pid} (stale pid file?)", file=sys.stderr)
        return 1
    except PermissionError:
        print(f"mailgate reload: not allowed to signal process {pid}", file=sys.stderr)
        return 1
    print(f"sent SIGHUP to mailgate (pid {pid}); the gateway logs the result")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    summary = __doc__.splitlines()[0].replace("``", "")
    parser = argparse.ArgumentParser(prog="mailgate", description=summary)
    parser.add_argument("--version", action="version", version=f"mailgate {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in (
        ("run", cmd_run, "run the gateway"),
        ("check", cmd_check, "validate a policy and show the plugin order"),
        ("rules", cmd_rules, "list the rule ids of the policy's plugins"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("-c", "--config", default=DEFAULT_POLICY, help="policy file (YAML)")
        p.set_defaults(func=func)
    _queue_parser(sub)
    sub.choices["run"].add_argument("--pid-file", help="write the pid here (over pid_file:)")
    t = sub.add_parser("test", help="dry-run a message through the policy, or run test cases")
    policytest.add_arguments(t)
    t.set_defaults(func=cmd_test)
    r = sub.add_parser("reload", help="validate the policy, then make the gateway reload it")
    r.add_argument("-c", "--config", help="policy to validate first (and read pid_file from)")
    r.add_argument("--pid-file", help="the running gateway's pid file")
    r.set_defaults(func=cmd_reload)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mailgate`` console script."""
    configure_logging(Logging())  # text at info until a policy says otherwise
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):
        parser.print_help()  # no command: say what there is, not a usage error
        return 0
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # `mailgate queue list | head -1`: the reader has gone; say nothing more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return result


if __name__ == "__main__":
    sys.exit(main())
