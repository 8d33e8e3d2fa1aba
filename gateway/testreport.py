"""How ``mailgate test`` shows a dry run: a stage-by-stage text trace, or JSON.

Text, one block per SMTP command, with the verdicts of the stage it ran::

    EHLO [203.0.113.9]                  250-mailgate.example.com
      time  helo 0.041ms
    MAIL FROM:<alice@example.net>       250 2.1.0 Sender ok (dry run)
      time  ratelimit 0.052ms, spf 3.214ms
      spf  spf.softfail  tag  score +2  adds Received-SPF: softfail ...
        sender domain example.net does not designate 203.0.113.9 (softfail)
    RCPT TO:<bob@example.com>           250 2.1.5 Recipient ok (dry run)
      time  ratelimit 0.043ms, relay_access 0.006ms

(``time``: how long each plugin's hook took for that command, in the order
they ran; a hook other than the command's own is named, as in ``dkim/on_delivered``.)

then the score, the headers the relayed message would gain or lose, the
decision line as the gateway would log it, and ``result: ACCEPT (exit 0)``.
JSON holds the same data: see :func:`trace_json`.
"""

from __future__ import annotations

from typing import Any

from mailgate.context import VerdictRecord
from mailgate.dryrun import Step, Trace
from mailgate.logfields import format_fields

COMMAND_WIDTH = 36


def _verdict_lines(record: VerdictRecord) -> list[str]:
    mode = "" if record.enforced else " (monitor: would have)"
    parts = [record.plugin, record.rule, record.action + mode]
    if record.score:
        parts.append(f"score {record.score:+g}")
    if record.headers:
        parts.append("adds " + "; ".join(f"{n}: {v}" for n, v in record.headers))
    return ["  " + "  ".join(parts), f"    {record.reason}"]


def _timing_line(step: Step) -> list[str]:
    if not step.plugins:
        return []
    own = step.hooks[0] if step.hooks else None
    parts = [
        f"{plugin}{'' if hook == own else '/' + hook} {ms:.3f}ms"
        for plugin, hook, ms in step.plugins
    ]
    return ["  time  " + ", ".join(parts)]


def trace_lines(
    trace: Trace, scoring: tuple[float | None, float | None] | None = None
) -> list[str]:
    """The text trace, one string per line (no trailing newlines)."""
    lines = [
        f"client {trace.client_ip}  helo {trace.helo}  from <{trace.sender}>  "
        f"to {', '.join(f'<{r}>' for r in trace.recipients)}",
        "",
    ]
    for step in trace.steps:
        reply = step.reply[0] if step.reply else "(no reply: connection closed)"
        if len(step.reply) > 1:
            reply += " ..."
        lines.append(f"{step.command:<{COMMAND_WIDTH}} {reply}")
        lines += _timing_line(step)
        for record in step.verdicts:
            lines += _verdict_lines(record)
    lines.append("")
    if trace.score is not None:
        line = f"score {trace.score:g}"
        if scoring:
            tag, reject = (f"{t:g}" if t is not None else "-" for t in scoring)
            line += f" (tag at {tag}, reject at {reject})"
        lines.append(line)
    if trace.added_headers:
        lines.append("the relayed message would gain:")
        lines += [f"  {name}: {value}" for name, value in trace.added_headers]
    if trace.removed_headers:
        lines.append("the relayed message would lose:")
        lines += [f"  {name}: {value}" for name, value in trace.removed_headers]
    if trace.decision:
        lines.append("decision line:")
        lines.append("  " + format_fields(trace.decision.items()))
    for problem in trace.log:
        lines.append(f"logged {problem}")
    rcpts = [step.code for step in trace.steps if step.command.startswith("RCPT")]
    partial = ""
    if trace.outcome == "accept" and any(code >= 400 for code in rcpts):
        taken = sum(code < 400 for code in rcpts)
        partial = f" for {taken} of {len(rcpts)} recipients"
    lines.append(
        f"result: {trace.outcome.upper()}{partial} (exit {trace.exit_status}): {trace.reply}"
    )
    return lines


def _verdict_json(record: VerdictRecord) -> dict[str, Any]:
    return {
        "plugin": record.plugin,
        "stage": record.stage,
        "rule": record.rule,
        "action": record.action,
        "mode": "enforce" if record.enforced else "monitor",
        "reason": record.reason,
        "score": record.score,
        "headers": [list(h) for h in record.headers],
    }


def trace_json(trace: Trace) -> dict[str, Any]:
    """The trace as plain JSON data."""
    return {
        "client_ip": trace.client_ip,
        "helo": trace.helo,
        "from": trace.sender,
        "to": trace.recipients,
        "outcome": trace.outcome,
        "exit_status": trace.exit_status,
        "reply": trace.reply,
        "steps": [
            {
                "command": step.command,
                "reply": step.reply,
                "hooks": step.hooks,
                "ms": round(step.ms, 3),
                "plugins": [
                    {"plugin": plugin, "hook": hook, "ms": round(ms, 3)}
                    for plugin, hook, ms in step.plugins
                ],
                "verdicts": [_verdict_json(v) for v in step.verdicts],
            }
            for step in trace.steps
        ],
        "rules": trace.rules,
        "score": trace.score,
        "added_headers": [list(h) for h in trace.added_headers],
        "removed_headers": [list(h) for h in trace.removed_headers],
        "decision": trace.decision,
        "log": trace.log,
    }
