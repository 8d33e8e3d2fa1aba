"""The public plugin API: rule declarations, one monitor mode, the hook contract, one-pass check."""

from __future__ import annotations

import ast
import inspect
import ipaddress
import subprocess
from typing import Any

import pytest

import mailgate
from mailgate import (
    Message,
    PluginSettings,
    Rule,
    Session,
    address_domain,
    from_domain,
    in_networks,
    is_exempt,
    unmapped,
)
from mailgate.registry import BUILTINS, builtin_plugins, load_policy
from mailgate.rules import unknown_rule_message
from mailgate.yamlsource import SourceError, load
from tests.ops_support import REPO, policy_file, sample, scrape, wait_until
from tests.ops_support import mailgate as run_mailgate
from tests.rawsmtp import send_message

CONTRACT = "tests.sample_plugins.contract"
PUBLIC_MODULES = {"mailgate", "mailgate.authresults", "mailgate.dnsadapters"}


def errors_of(text: str) -> list[str]:
    with pytest.raises(SourceError) as caught:
        load_policy(load(text, "p.yaml"))
    return caught.value.messages


# ------------------------------------------------------------------ the public API


def test_every_exported_class_and_function_is_documented():
    for name in mailgate.__all__:
        value = getattr(mailgate, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__doc__ and value.__doc__.strip(), name


def test_builtin_plugins_import_only_the_public_api():
    """The import contract, read from the sources (lint-imports checks the same in CI)."""
    for path in sorted((REPO / "plugins").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("mailgate")
            ):
                module = node.module
                assert module in PUBLIC_MODULES or module.startswith("mailgate.plugins"), (
                    f"{path.name} imports {module}"
                )
                if module == "mailgate":
                    for alias in node.names:
                        assert alias.name in mailgate.__all__, f"{path.name}: {alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("mailgate") or alias.name in PUBLIC_MODULES


def test_lint_imports_keeps_both_contracts():
    result = subprocess.run(
        [str(REPO / ".ci" / "lint-imports")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_address_and_from_domain_helpers():
    assert address_domain("Bob@Example.COM.") == "example.com"
    assert address_domain("postmaster") == ""
    one = Message(b"From: Alice <alice@Example.net>\r\nSubject: x\r\n\r\nbody\r\n")
    assert from_domain(one) == "example.net"
    two_domains = Message(b"From: a@one.example, b@two.example\r\n\r\n")
    assert from_domain(two_domains) is None
    two_headers = Message(b"From: a@one.example\r\nFrom: a@one.example\r\n\r\n")
    assert from_domain(two_headers) is None
    assert from_domain(Message(b"Subject: none\r\n\r\n")) is None


def test_client_address_helpers():
    mapped = ipaddress.ip_address("::ffff:192.0.2.7")
    assert unmapped(mapped) == ipaddress.ip_address("192.0.2.7")
    nets = [ipaddress.ip_network("192.0.2.0/24")]
    assert in_networks(mapped, nets)
    session = Session("s", mapped, 25, "mx.test")
    assert is_exempt(session, nets)
    assert not is_exempt(Session("s", ipaddress.ip_address("203.0.113.1"), 25, "mx"), nets)
    trusted = Session("s", ipaddress.ip_address("203.0.113.1"), 25, "mx", trusted=True)
    assert is_exempt(trusted) and not is_exempt(trusted, trusted=False)


# ------------------------------------------------------------------ rules


def test_every_builtin_declares_its_rules():
    for name, cls in builtin_plugins().items():
        rules = cls.RULES  # type: ignore[attr-defined]
        assert rules and all(isinstance(r, Rule) and r.description for r in rules), name


def test_placeholders_match_the_ids_the_config_names():
    rule = Rule("headers.missing_<name>", "reject", "absent")
    assert rule.matches("headers.missing_message_id")
    assert not rule.matches("headers.missing_") and not rule.matches("headers.bad_date")
    assert unknown_rule_message("spf.fial", [Rule("spf.fail", "tag", "x")]) == (
        "unknown rule id 'spf.fial' (did you mean 'spf.fail'?)"
    )


def test_a_rule_modes_typo_is_refused_with_its_position_and_a_suggestion():
    text = "hostname: mx.test\nplugins:\n  spf:\n    rule_modes: {spf.fial: monitor}\n"
    assert errors_of(text) == [
        "p.yaml:4:18: plugins.spf.rule_modes.spf.fial: "
        "unknown rule id 'spf.fial' (did you mean 'spf.fail'?)"
    ]


def test_an_instance_of_a_placeholder_rule_is_accepted():
    text = "plugins:\n  headers: {rule_modes: {headers.missing_date: monitor}}\n"
    runtime_settings = load_policy(load(text, "p.yaml"))[1].plugins["headers"].settings
    assert runtime_settings.mode_of("headers.missing_date") == "monitor"


def test_mode_of_applies_the_plugin_mode_and_the_rule_modes():
    settings = PluginSettings(mode="monitor", rule_modes={"a.b": "off"})
    assert (settings.mode_of("a.b"), settings.mode_of("a.c")) == ("off", "monitor")
    settings = PluginSettings(rule_modes={"a.b": "monitor"})
    assert (settings.mode_of("a.b"), settings.mode_of("a.c")) == ("monitor", "enforce")


def test_mailgate_rules_lists_every_rule_of_the_loaded_plugins(tmp_path):
    path = policy_file(tmp_path, plugins={"spf": {"rule_modes": {"spf.fail": "monitor"}}})
    result = run_mailgate("rules", "-c", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["RULE", "PLUGIN", "ACTION", "SCORE", "MODE", "DESCRIPTION"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["spf.fail"][:5] == ["spf.fail", "spf", "tag", "2", "monitor"]
    assert rows["spf.pass"][4] == "enforce"
    assert {"relay.denied", "auth_results.added", "auth_results.forged"} <= set(rows)


def test_mailgate_rules_lists_the_concrete_ids_of_placeholders(tmp_path):
    limits = [
        {"key": "client_ip", "rate": "100/1h", "name": "per_client"},
        {"key": "sender", "rate": "5/1m", "name": "bulk", "action": "reject"},
    ]
    path = policy_file(
        tmp_path,
        plugins={
            "headers": {
                "require": ["From", "Message-ID"],
                "rule_modes": {"headers.missing_message_id": "monitor"},
            },
            "ratelimit": {"rules": limits},
        },
    )
    result = run_mailgate("rules", "-c", str(path))
    assert result.returncode == 0, result.stderr
    order = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert order.index("ratelimit.per_client") == order.index("ratelimit.<name>") + 1
    assert rows["ratelimit.per_client"][1:3] == ["ratelimit", "tempfail"]
    assert rows["ratelimit.bulk"][1:3] == ["ratelimit", "reject"]
    assert rows["headers.missing_from"][1:5] == ["headers", "reject", "1", "enforce"]
    assert rows["headers.missing_message_id"][1:5] == ["headers", "tag", "1", "monitor"]
    assert "headers.missing_date" not in rows  # not required by this policy
    assert "headers.duplicate_subject" in rows  # the default singletons
    assert {"headers.missing_<name>", "ratelimit.<name>"} <= set(rows)


def test_configured_rules_must_be_instances_of_declared_placeholders(tmp_path):
    errors = errors_of(
        "plugins:\n  odd:\n    module: tests.sample_plugins.contract:StrayConfiguredRule\n"
    )
    assert len(errors) == 1
    assert errors[0].startswith("p.yaml:2:3: plugins.odd: invalid plugin: configured_rules() gave")
    assert "'other.first'" in errors[0] and "(odd.<name>)" in errors[0]


# ------------------------------------------------------------------ one monitor mode


def test_a_monitored_header_rule_is_on_the_decision_line_of_mailgate_test(tmp_path):
    path = policy_file(
        tmp_path,
        upstream=f"maildir:{tmp_path / 'mail'}",
        plugins={"headers": {"rule_modes": {"headers.missing_date": "monitor"}}},
    )
    eml = tmp_path / "nodate.eml"
    eml.write_bytes(b"From: a@example.net\nTo: b@example.com\nSubject: hi\n\nbody\n")
    result = run_mailgate("test", "-c", str(path), str(eml))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verdicts=headers.missing_date:reject(monitor)" in result.stdout


def test_a_list_of_verdicts_is_recorded_in_order_and_the_reject_ends_the_stage(
    make_gateway, upstream, decisions
):
    gw = make_gateway(plugins={"two": {"module": f"{CONTRACT}:TwoFindings"}})
    assert send_message(gw.port, b"Subject: x\r\n\r\nbody\r\n") == (550, b"5.7.1 No")
    assert "verdicts=two.tag:tag,two.reject:reject" in decisions()[-1]
    assert upstream.messages == []


def test_a_monitored_rule_in_a_list_never_ends_the_stage(make_gateway, upstream, decisions):
    gw = make_gateway(
        plugins={
            "two": {
                "module": f"{CONTRACT}:TwoFindings",
                "rule_modes": {"two.reject": "monitor"},
            }
        }
    )
    assert send_message(gw.port, b"Subject: x\r\n\r\nbody\r\n")[0] == 250
    assert "verdicts=two.tag:tag,two.reject:reject(monitor)" in decisions()[-1]


def test_a_monitored_header_rule_is_counted_in_the_verdict_metrics(make_gateway, upstream):
    gw = make_gateway(
        metrics="127.0.0.1:0",
        plugins={"headers": {"rule_modes": {"headers.missing_date": "monitor"}}},
    )
    bound = gw.gateway.metrics_server.bound
    assert bound is not None
    assert send_message(gw.port, b"From: a@example.net\r\nSubject: x\r\n\r\nbody\r\n")[0] == 250
    labels = {"plugin": "headers", "rule": "headers.missing_date", "action": "reject"}
    assert wait_until(
        lambda: sample(scrape(bound[1]), "mailgate_verdicts_total", **labels, mode="monitor") == 1
    )


# ------------------------------------------------------------------ the hook contract


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        ("HookWrapper", "hook on_data is a hookwrapper: mailgate calls each hook itself"),
        ("NewWrapper", "hook on_rcpt is a wrapper: mailgate calls each hook itself"),
        ("UnknownHook", "on_dat is not a mailgate hook (did you mean on_data?)"),
        ("UnknownArgument", "hook on_rcpt takes rcpt, which mailgate does not offer"),
    ],
)
def test_a_plugin_that_breaks_the_hook_contract_is_refused(cls, message):
    [error] = errors_of(f'plugins:\n  bad: {{module: "{CONTRACT}:{cls}"}}\n')
    assert error.startswith("p.yaml:2:3: plugins.bad: invalid plugin: ")
    assert message in error


def test_check_exits_2_for_a_hookwrapper_plugin(tmp_path):
    path = policy_file(tmp_path, plugins={"bad": {"module": f"{CONTRACT}:HookWrapper"}})
    result = run_mailgate("check", "-c", str(path))
    assert result.returncode == 2
    assert "plugins.bad: invalid plugin: hook on_data is a hookwrapper" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_pattern_compiled_in_init_is_a_policy_error_not_a_traceback(tmp_path):
    plugin = {"module": f"{CONTRACT}:BadPatternInInit", "pattern": "(["}
    path = policy_file(tmp_path, plugins={"guard": plugin})
    result = run_mailgate("check", "-c", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        "plugins.guard: bad regular expression: unterminated character set at position 1"
    )
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ relay_access, auth_results


def test_auth_results_and_relay_access_can_be_named_and_configured():
    text = (
        "hostname: mx.test\nplugins:\n  auth_results: {authserv_id: mx.example.com}\n"
        "  relay_access: {timeout: 2s}\n  helo: {}\n"
    )
    _, plugins = load_policy(load(text, "p.yaml"))
    assert list(plugins.plugins) == ["auth_results", "relay_access", "helo"]
    auth_results: Any = plugins.plugins["auth_results"].plugin
    assert auth_results.authserv_id == "mx.example.com"
    assert plugins.call_order("on_rcpt") == ["relay_access"]


def test_auth_results_and_relay_access_are_loaded_last_when_not_named():
    _, plugins = load_policy(load("plugins:\n  helo: {}\n", "p.yaml"))
    assert list(plugins.plugins) == ["helo", "relay_access", "auth_results"]


def test_relay_access_and_auth_results_are_never_monitored_or_off():
    text = (
        "plugins:\n  relay_access: {mode: monitor}\n"
        "  auth_results: {rule_modes: {auth_results.forged: off}}\n"
    )
    assert errors_of(text) == [
        "p.yaml:2:18: plugins.relay_access.mode: relay_access is always enforced, never "
        "monitor: an open relay is never a trial",
        "p.yaml:3:31: plugins.auth_results.rule_modes.auth_results.forged: auth_results is "
        "always enforced, never off: forged Authentication-Results headers are always removed",
    ]


def test_an_unknown_key_of_auth_results_is_refused():
    [error] = errors_of("plugins:\n  auth_results: {authserv: x}\n")
    assert error == "p.yaml:2:18: plugins.auth_results.authserv: unknown key"


# ------------------------------------------------------------------ one pass


def test_check_reports_core_and_plugin_errors_in_one_pass_in_file_order():
    text = (
        "hostname: mx.test\n"
        "limits: {recipients: lots}\n"
        "plugins:\n"
        "  headers: {requir: [From]}\n"
        "  spf: {rule_modes: {spf.fial: monitor}}\n"
        "upstream: {urll: x}\n"
    )
    errors = errors_of(text)
    assert [e.split(": ")[0] for e in errors] == [
        "p.yaml:2:10",
        "p.yaml:4:13",
        "p.yaml:5:22",
        "p.yaml:6:12",
    ]
    assert errors[0].endswith("limits.recipients: Input should be a valid integer")
    assert errors[1].endswith("plugins.headers.requir: unknown key")
    assert errors[3].endswith("upstream.urll: unknown key")


def test_check_cli_prints_both_layers_at_once(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("limits: {recipients: lots}\nplugins:\n  nosuch: {}\n")
    result = run_mailgate("check", "-c", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and "limits.recipients" in lines[0]
    assert "plugins.nosuch: unknown plugin 'nosuch'" in lines[1]


def test_an_unknown_plugin_name_gets_a_suggestion():
    [error] = errors_of("plugins:\n  grelist: {}\n")
    assert "unknown plugin 'grelist' (did you mean 'greylist'?)" in error


def test_builtins_are_listed_by_name_in_default_order():
    assert list(BUILTINS)[:3] == ["dnsbl", "helo", "ratelimit"]
    assert list(BUILTINS)[-2:] == ["relay_access", "auth_results"]
