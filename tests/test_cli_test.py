"""``mailgate test`` run as a subprocess: the trace, --json, exit statuses, and test cases."""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path
from typing import Any

import yaml

from tests.ops_support import REPO, mailgate, policy_file
from tests.support import MESSAGE

RULE = "tests.ops_plugins:Rule"
PROBE = "tests.ops_plugins:TxtProbe"


def write(path: Path, data: Any) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def test_an_accepted_message_shows_every_stage_and_exits_0(tmp_path, upstream):
    tags = {
        "stamp": {
            "module": RULE,
            "hook": "on_data",
            "rule": "probe.stamp",
            "score": 2,
            "headers": {"X-Stamp": "yes"},
        },
        "watch": {
            "module": RULE,
            "hook": "on_rcpt",
            "rule": "probe.watch",
            "score": 9,
            "headers": {"X-Watch": "would"},
            "mode": "monitor",
        },
    }
    path = policy_file(tmp_path, upstream=upstream.url, plugins=tags)
    eml = tmp_path / "message.eml"
    eml.write_bytes(MESSAGE.replace(b"\r\n", b"\n"))  # LF endings, as files on disk have
    result = mailgate(
        "test",
        "-c",
        str(path),
        str(eml),
        "--client-ip",
        "203.0.113.9",
        "--helo",
        "mx.example.net",
        "--from",
        "alice@example.net",
        "--to",
        "bob@example.com",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    lines = out.splitlines()
    assert "client 203.0.113.9  helo mx.example.net  from <alice@example.net>" in out
    for command in (
        "connect from 203.0.113.9",
        "EHLO mx.example.net",
        "MAIL FROM:<alice@example.net>",
        "RCPT TO:<bob@example.com>",
        "DATA",
    ):
        assert any(line.startswith(command) for line in lines), command
    assert "  stamp  probe.stamp  tag  score +2  adds X-Stamp: yes" in lines
    assert "  watch  probe.watch  tag (monitor: would have)  score +9  adds X-Watch: would" in lines
    assert "score 2 (tag at 5, reject at 15)" in lines
    gained = out.split("the relayed message would gain:")[1].split("decision line:")[0]
    assert "Received: from mx.example.net ([203.0.113.9]) by mailgate.test" in gained
    assert "X-Stamp: yes" in gained and "X-Spam-Score: 2" in gained
    assert "X-Watch" not in gained  # monitor mode changes nothing
    assert "verdicts=probe.watch:tag(monitor),probe.stamp:tag" in out
    assert lines[-1] == "result: ACCEPT (exit 0): 250 2.0.0 Ok: dry run, not relayed"
    # A dry run: the policy's upstream never hears of it.
    assert upstream.connections == 0 and upstream.messages == []


def test_a_refused_recipient_is_a_reject_with_exit_5_in_json(tmp_path):
    result = mailgate(
        "test",
        "-c",
        str(policy_file(tmp_path)),
        "--json",
        "--from",
        "alice@example.net",
        "--to",
        "victim@elsewhere.org",
    )
    assert result.returncode == 5, result.stderr
    trace = json.loads(result.stdout)
    assert trace["outcome"] == "reject" and trace["exit_status"] == 5
    assert trace["reply"] == "554 5.7.1 <victim@elsewhere.org>: Relay access denied"
    assert trace["rules"] == ["relay.denied"]
    [rcpt] = [s for s in trace["steps"] if s["command"].startswith("RCPT")]
    assert rcpt["hooks"] == ["on_rcpt"]
    assert rcpt["verdicts"][0] | {"reason": ""} == {
        "plugin": "relay_access",
        "stage": "on_rcpt",
        "rule": "relay.denied",
        "action": "reject",
        "mode": "enforce",
        "reason": "",
        "score": 0.0,
        "headers": [],
    }
    assert [s["command"] for s in trace["steps"]][-1].startswith("RCPT")  # no DATA sent
    assert trace["decision"]["rejected_rcpts"] == ["<victim@elsewhere.org>:554"]
    assert trace["client_ip"] == "192.0.2.1"  # the default client


def test_a_tempfail_exits_4_and_the_client_ip_drives_the_policy(tmp_path):
    path = policy_file(
        tmp_path,
        trusted_networks=["203.0.113.0/24"],
        plugins={
            "busy": {
                "module": RULE,
                "hook": "on_mail",
                "action": "tempfail",
                "rule": "probe.busy",
                "mode": "monitor",
            }
        },
    )
    args = ["test", "-c", str(path), "--from", "a@example.net", "--to", "x@elsewhere.org"]
    assert mailgate(*args, "--client-ip", "203.0.113.5").returncode == 0  # trusted: may relay
    assert mailgate(*args, "--client-ip", "198.51.100.5").returncode == 5
    enforced = policy_file(
        tmp_path,
        plugins={
            "busy": {"module": RULE, "hook": "on_mail", "action": "tempfail", "rule": "probe.busy"}
        },
    )
    result = mailgate(
        "test", "-c", str(enforced), "--from", "a@example.net", "--to", "b@example.com"
    )
    assert result.returncode == 4
    assert result.stdout.splitlines()[-1] == "result: TEMPFAIL (exit 4): 450 4.7.1 probe says later"


def test_the_envelope_defaults_to_the_message_headers(tmp_path):
    eml = tmp_path / "m.eml"
    eml.write_bytes(MESSAGE)
    result = mailgate("test", "-c", str(policy_file(tmp_path)), str(eml), "--json")
    trace = json.loads(result.stdout)
    assert (trace["from"], trace["to"]) == ("alice@example.net", ["bob@example.com"])
    assert result.returncode == 0


def test_dns_goes_where_the_policy_says(tmp_path, dns_server):
    dns_server.add("probe.example.net", "TXT", "hello from dns")
    path = policy_file(
        tmp_path,
        dns={"nameservers": [f"127.0.0.1:{dns_server.port}"]},
        plugins={"probe": {"module": PROBE}},
    )
    result = mailgate(
        "test", "-c", str(path), "--json", "--from", "a@example.net", "--to", "b@example.com"
    )
    trace = json.loads(result.stdout)
    assert "probe.txt" in trace["rules"]
    assert ["X-Probe", "hello from dns"] in trace["added_headers"]
    assert ("probe.example.net", "TXT") in dns_server.queries


def test_a_dry_run_never_touches_the_state_store(tmp_path):
    # Nothing listens on port 1: any use of this Redis would fail or hang.
    path = policy_file(tmp_path, state="redis://127.0.0.1:1/0")
    result = mailgate("test", "-c", str(path), "--from", "a@example.net", "--to", "b@example.com")
    assert result.returncode == 0, result.stdout + result.stderr


def test_bad_input_exits_2_or_1_with_a_clear_message(tmp_path):
    bad = write(tmp_path / "bad.yaml", "domains: [example.com]\nplugins:\n  nosuch: {}\n")
    result = mailgate("test", "-c", str(bad), "--from", "a@x.net", "--to", "b@example.com")
    assert result.returncode == 2
    assert f"{bad}:3:3: plugins.nosuch: unknown plugin 'nosuch'" in result.stderr
    result = mailgate("test", "-c", str(policy_file(tmp_path)), str(tmp_path / "missing.eml"))
    assert result.returncode == 1 and "missing.eml" in result.stderr
    result = mailgate("test", "-c", str(policy_file(tmp_path)), "--from", "a@x.net")
    assert result.returncode == 1 and "no recipients" in result.stderr


CASES = {
    "dns": {"probe.example.net": {"TXT": "from the case file"}},
    "defaults": {"from": "alice@example.net", "client_ip": "198.51.100.7"},
    "cases": [
        {
            "name": "local mail is delivered",
            "to": "bob@example.com",
            "expect": {"outcome": "accept", "rules": ["probe.txt"], "headers": ["X-Probe"]},
        },
        {
            "name": "relaying is refused",
            "to": ["victim@elsewhere.org"],
            "expect": {"outcome": "reject", "rules": ["relay.denied"], "reply": "554 5.7.1"},
        },
        {
            "name": "a case brings its own records",
            "to": "bob@example.com",
            "from": "alice@example.org",
            "dns": {"probe.example.org": "servfail"},
            "expect": {"outcome": "tempfail", "rules": ["probe.temperror"]},
        },
        {
            "name": "names without records are NXDOMAIN, never real DNS",
            "to": "bob@example.com",
            "from": "someone@example.com",
            "expect": {"outcome": "accept", "rules": ["probe.none"]},
        },
    ],
}


def test_cases_pass_with_hermetic_dns_and_the_sibling_policy(tmp_path):
    policy_file(tmp_path, plugins={"probe": {"module": PROBE}})
    cases = write(tmp_path / "policy.cases.yaml", CASES)
    result = mailgate("test", "--cases", str(cases))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{cases} (policy {tmp_path / 'policy.yaml'})" in result.stdout
    assert "  ok    a case brings its own records" in result.stdout
    assert result.stdout.splitlines()[-1] == "4 cases in 1 files: 4 passed, 0 failed"


def test_a_failing_case_is_reported_with_its_trace_and_exit_1(tmp_path):
    path = policy_file(tmp_path, plugins={"probe": {"module": PROBE}})
    failing = CASES | {
        "cases": [
            CASES["cases"][0],
            {
                "name": "wrong on purpose",
                "to": "victim@elsewhere.org",
                "expect": {
                    "outcome": "accept",
                    "rules": ["spf.pass"],
                    "not_rules": ["relay.denied"],
                    "score": 3,
                },
            },
        ]
    }
    cases = write(tmp_path / "other.cases.yaml", failing)
    result = mailgate("test", "-c", str(path), "--cases", str(cases))
    assert result.returncode == 1
    out = result.stdout
    assert "  ok    local mail is delivered" in out
    assert "  FAIL  wrong on purpose" in out
    assert "outcome: expected accept, got reject (554 5.7.1 <victim@elsewhere.org>: " in out
    assert "rules: expected spf.pass; got probe.txt, relay.denied" in out
    assert "not_rules: got relay.denied" in out
    assert "score: expected 3, got 0" in out
    assert "RCPT TO:<victim@elsewhere.org>" in out  # the trace of the failing case
    assert out.splitlines()[-1] == "2 cases in 1 files: 1 passed, 1 failed"
    report = json.loads(mailgate("test", "-c", str(path), "--cases", str(cases), "--json").stdout)
    assert (report["passed"], report["failed"]) == (1, 1)
    [failed] = [c for c in report["files"][0]["cases"] if not c["passed"]]
    assert failed["trace"]["outcome"] == "reject"


def test_a_bad_cases_file_names_the_position(tmp_path):
    policy_file(tmp_path)
    cases = write(
        tmp_path / "policy.cases.yaml",
        "cases:\n  - name: x\n    to: a@example.com\n    from: b@example.net\n"
        "    expect: {outcome: maybe}\n",
    )
    result = mailgate("test", "--cases", str(cases))
    assert result.returncode == 2
    assert f"{cases}:5:14: cases.0.expect.outcome: Input should be" in result.stderr
    orphan = write(tmp_path / "orphan.cases.yaml", CASES)
    result = mailgate("test", "--cases", str(orphan))
    assert result.returncode == 2 and "give -c POLICY" in result.stderr


def test_the_shipped_policy_cases_pass():
    """What CI runs: every policies/**/*.cases.yaml against the policy beside it."""
    files = sorted(glob.glob(str(REPO / "policies" / "**" / "*.cases.yaml"), recursive=True))
    assert any(f.endswith("policies/default.cases.yaml") for f in files)
    result = mailgate("test", "--cases", *files, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_trace_times_each_plugin_and_names_the_slow_one(tmp_path):
    path = policy_file(
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
