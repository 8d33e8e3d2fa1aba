"""Policy loading: every error names FILE:LINE:COL and the key path; bad policies are refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mailgate.policy import parse_policy
from mailgate.registry import build_plugins
from mailgate.units import Rate, parse_duration, parse_rate, parse_size
from mailgate.yamlsource import SourceError, load


def errors_of(text: str) -> list[str]:
    with pytest.raises(SourceError) as err:
        doc = load(text, "p.yaml")
        build_plugins(parse_policy(doc), doc)
    return err.value.messages


def mailgate(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailgate", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_unknown_key_is_an_error_with_its_position():
    assert errors_of("hostname: mx.test\nlimits:\n  recipents: 5\n") == [
        "p.yaml:3:3: limits.recipents: unknown key"
    ]


def test_wrong_type_is_an_error_not_a_coercion():
    [message] = errors_of("limits:\n  recipients: '25'\n")
    assert message.startswith("p.yaml:2:3: limits.recipients: ")
    assert "integer" in message


def test_duplicate_key_is_an_error():
    [message] = errors_of("hostname: a\ndomains: [x.test]\nhostname: b\n")
    assert message == "p.yaml:3:1: duplicate key 'hostname' (first defined at line 1)"


def test_bad_units_are_errors():
    messages = errors_of("limits:\n  message_size: 25 parsecs\n  idle_timeout: 5 fortnights\n")
    assert messages == [
        "p.yaml:2:3: limits.message_size: unknown size unit 'parsecs'"
        " (use B, KB, MB, GB, KiB, MiB, GiB)",
        "p.yaml:3:3: limits.idle_timeout: unknown duration unit 'fortnights'"
        " (use ms, s, m, h, d or w)",
    ]


def test_several_errors_are_all_reported():
    messages = errors_of(
        "listen:\n  - address: 'localhost:99999'\nupstream: ftp://x\ntrusted_networks: [nonsense]\n"
    )
    assert len(messages) == 3
    assert messages[0].startswith("p.yaml:2:5: listen.0: ")
    assert "bad port" in messages[0]
    assert messages[1].startswith("p.yaml:3:1: upstream: expected smtp://HOST:PORT or maildir:PATH")
    assert messages[2].startswith("p.yaml:4:20: trusted_networks.0: expected a network")


def test_yaml_syntax_error_has_a_position():
    [message] = errors_of("hostname: [unclosed\n")
    assert message.startswith("p.yaml:2:1: ")


def test_plugin_errors_are_positioned_inside_the_plugin_section():
    messages = errors_of(
        "plugins:\n"
        "  block:\n"
        "    module: tests.sample_plugins:BlockSender\n"
        "    sendr: x@y.test\n"
        "  ghost: {}\n"
        "  broken:\n"
        "    module: no.such.module:Thing\n"
        "  slow:\n"
        "    module: tests.sample_plugins:Slow\n"
        "    timeout: soon\n"
    )
    assert messages[0] == "p.yaml:2:3: plugins.block.sender: required key is missing"
    assert messages[1] == "p.yaml:4:5: plugins.block.sendr: unknown key"
    assert messages[2].startswith("p.yaml:5:3: plugins.ghost: unknown plugin 'ghost'")
    assert messages[3].startswith("p.yaml:7:5: plugins.broken.module: cannot load")
    assert messages[4].startswith("p.yaml:10:5: plugins.slow.timeout: expected a duration")


def test_secrets_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MG_HOST", "mx.secret.test")
    doc = load("hostname: {env: MG_HOST}\n", "p.yaml")
    assert parse_policy(doc).hostname == "mx.secret.test"
    monkeypatch.delenv("MG_HOST")
    with pytest.raises(SourceError) as err:
        load("hostname: {env: MG_HOST}\n", "p.yaml")
    assert err.value.messages == ["p.yaml:1:1: hostname: environment variable MG_HOST is not set"]


def test_units():
    assert parse_duration("250ms") == 0.25
    assert parse_duration("5m") == 300
    assert parse_duration(30) == 30
    assert parse_size("25MB") == 25_000_000
    assert parse_size("10MiB") == 10 * 1024 * 1024
    assert parse_rate("100/1h") == Rate(100, 3600)
    assert parse_rate("5/m") == Rate(5, 60)
    for bad in ("100", "x/1h", "0/1h", "5/never"):
        with pytest.raises(ValueError):
            parse_rate(bad)


def test_check_command_prints_plugin_order_for_a_good_policy(tmp_path):
    policy = tmp_path / "good.yaml"
    policy.write_text(
        "domains: [example.com]\n"
        "plugins:\n"
        "  block: {module: 'tests.sample_plugins:BlockSender', sender: x@y.test}\n"
        "  rec: {module: 'tests.sample_plugins:Recorder'}\n"
    )
    result = mailgate("check", "-c", str(policy), cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    assert f"{policy}: ok" in result.stdout
    assert "on_mail: block, rec" in result.stdout
    assert "on_rcpt: rec, relay_access" in result.stdout


def test_check_and_run_refuse_a_bad_policy_with_exit_status_2(tmp_path):
    policy = tmp_path / "bad.yaml"
    policy.write_text("limits:\n  recipients: many\n")
    for command in ("check", "run"):
        result = mailgate(command, "-c", str(policy))
        assert result.returncode == 2
        assert result.stderr.strip().startswith(f"{policy}:2:3: limits.recipients: ")


def test_default_policy_is_valid():
    root = Path(__file__).parent.parent
    result = mailgate("check", "-c", str(root / "policies" / "default.yaml"))
    assert result.returncode == 0, result.stderr


def test_yaml_on_off_yes_no_are_strings_not_booleans():
    doc = load(
        "plugins:\n  rec:\n    module: tests.sample_plugins:Recorder\n    mode: off\n"
        "    rule_modes: {a.b: off, c.d: monitor}\n",
        "p.yaml",
    )
    assert doc.data["plugins"]["rec"]["mode"] == "off"
    assert doc.data["plugins"]["rec"]["rule_modes"] == {"a.b": "off", "c.d": "monitor"}
    assert build_plugins(parse_policy(doc), doc).call_order("on_mail") == []
    assert load("a: yes\nb: true\nc: False\n", "p.yaml").data == {"a": "yes", "b": True, "c": False}
