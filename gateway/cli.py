"""The ``mailgate`` command: ``run`` the gateway, ``check`` a policy.

Exit status: 0 on success, 2 for a bad policy (every problem printed as
``FILE:LINE:COL: path: message`` on standard error), 1 for other failures.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Coroutine
from typing import Any

from gateway.registry import STAGES
from gateway.runtime import Runtime
from gateway.server import Gateway
from gateway.yamlsource import SourceError

DEFAULT_POLICY = "policies/default.yaml"
EXIT_BAD_POLICY = 2


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
        asyncio.run(main)
    else:
        uvloop.run(main)


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


def cmd_run(args: argparse.Namespace) -> int:
    """Start the gateway and serve until SIGTERM or SIGINT."""
    runtime = _load(args.config)
    if runtime is None:
        return EXIT_BAD_POLICY
    logging.getLogger().setLevel(runtime.policy.log.level.upper())

    async def main() -> None:
        gateway = Gateway(runtime)
        await gateway.start()
        for host, port in gateway.addresses:
            logging.getLogger("mailgate").info("mailgate ready on %s:%s", host, port)
        await gateway.serve()

    _run_loop(main())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="mailgate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in (
        ("run", cmd_run, "run the gateway"),
        ("check", cmd_check, "validate a policy and show the plugin order"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("-c", "--config", default=DEFAULT_POLICY, help="policy file (YAML)")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mailgate`` console script."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # aiosmtpd logs every command line at INFO; our decision log says what matters.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
