"""``mailgate test`` shows how long each plugin took, per command, in text and in JSON."""

from __future__ import annotations

import json
import re

from tests.ops_support import mailgate
from tests.test_cli_test import RULE, policy


def test_the_trace_times_each_plugin_and_names_the_slow_one(tmp_path):
    path = policy(
        tmp_path,
        plugins={
            "slow": {"module": RULE, "hook": "on_mail", "delay": 0.08},
            "quick": {"module": RULE, "hook": "on_mail"},
        },
    )
    args = ["test", "-c", str(path), "--from", "alice@example.net", "--to", "bob@example.com"]
    text = mailgate(*args)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    mail = next(i for i, line in enumerate(lines) if line.startswith("MAIL FROM:"))
    timing = lines[mail + 1]
    found = re.fullmatch(r"  time  slow (\d+\.\d{3})ms, quick (\d+\.\d{3})ms", timing)
    assert found, timing
    slow, quick = map(float, found.groups())
    assert slow >= 80 and quick < 50
    rcpt = next(line for line in lines if line.startswith("RCPT TO:"))
    assert "relay_access " in lines[lines.index(rcpt) + 1]

    result = mailgate(*args, "--json")
    trace = json.loads(result.stdout)
    [step] = [s for s in trace["steps"] if s["command"].startswith("MAIL")]
    by_plugin = {p["plugin"]: p for p in step["plugins"]}
    assert by_plugin["slow"]["hook"] == "on_mail" and by_plugin["slow"]["ms"] >= 80
    assert by_plugin["quick"]["ms"] < 50
    # The step's own time covers its plugins'.
    assert step["ms"] >= sum(p["ms"] for p in step["plugins"])
