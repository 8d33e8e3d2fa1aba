"""The headers plugin: each rule on its own (the checker), then over real SMTP (the plugin).

``tests/fixtures/eml/`` holds sample messages: ``ok-*.eml`` must pass, every
other file must give exactly the fault named by its file name. They are
stored with LF line endings and sent with CRLF.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailgate import PluginSettings
from mailgate.plugins.actions import Fault, RuleSetting
from mailgate.plugins.headers import HeadersConfig, check_headers, rulebook
from mailgate.runtime import Runtime
from mailgate.yamlsource import SourceError, load
from tests.rawsmtp import send_message

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
FIXTURES = Path(__file__).parent / "fixtures" / "eml"
GOOD = b"From: Alice <alice@example.net>\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n"


def faults(raw: bytes, smtputf8: bool = False, **config: object) -> list[str]:
    report = check_headers(raw, HeadersConfig.model_validate(config), smtputf8=smtputf8, now=NOW)
    return [f.rule for f in report.faults]


def eml(path: Path) -> bytes:
    return path.read_bytes().replace(b"\n", b"\r\n")


# ------------------------------------------------------------------ the checker


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.eml")), ids=lambda p: p.stem)
def test_fixture_gives_exactly_the_fault_it_is_named_after(path):
    expected = [] if path.stem.startswith("ok-") else [path.stem]
    assert faults(eml(path)) == expected


@pytest.mark.parametrize(
    ("raw", "rule"),
    [
        (b"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\n\r\n", "headers.missing_from"),
        (GOOD + b"Subject: a\r\nsubject: b\r\n\r\n", "headers.duplicate_subject"),
        (GOOD + b"Message-ID: <1@x>\r\nMESSAGE-ID: <2@x>\r\n\r\n", "headers.duplicate_message_id"),
        (b" folded first\r\n" + GOOD + b"\r\n", "headers.bad_folding"),
        (GOOD + b"Subject: x\r\n \t \r\nX-Hidden: y\r\n\r\n", "headers.bad_folding"),
        (GOOD + b": no name\r\n\r\n", "headers.bad_name"),
        (GOOD + b"X\x01Name: a control character\r\n\r\n", "headers.bad_name"),
        (GOOD + b"body text without an empty line\r\n", "headers.no_separator"),
        (GOOD + b"X-Long: " + b"x" * 991 + b"\r\n\r\n", "headers.line_too_long"),
        (GOOD + b"Subject: caf\xc3\xa9\r\n\r\n", "headers.8bit"),
        (b"From: a@b.example\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n\r\n", None),
        (GOOD.replace(b"Alice <alice@example.net>", b"alice"), "headers.bad_from"),
        (GOOD.replace(b"Alice <alice@example.net>", b"joe@"), "headers.bad_from"),
        (
            GOOD.replace(b"Alice <alice@example.net>", b"a@x.example, b@x.example"),
            "headers.from_needs_sender",
        ),
        (GOOD.replace(b"Mon, 30 Nov 2026", b"Tue, 30 Oct 2026"), "headers.date_skew"),
        (GOOD.replace(b"Mon, 30 Nov 2026", b"Thu, 3 Dec 2026"), "headers.date_skew"),
        (
            GOOD.replace(b"Mon, 30 Nov 2026 10:00:00", b"Mon, 99 Nov 2026 10:00:00"),
            "headers.bad_date",
        ),
    ],
)
def test_each_rule(raw, rule):
    assert faults(raw) == ([rule] if rule else [])


def test_line_length_is_counted_without_the_crlf():
    assert faults(GOOD + b"X-Long: " + b"x" * 990 + b"\r\n\r\n") == []
    assert faults(GOOD + b"X-Long: " + b"x" * 991 + b"\r\n\r\n") == ["headers.line_too_long"]


def test_header_section_size_is_limited_and_parsing_stops_there():
    raw = GOOD + b"".join(b"X-Filler-%d: %s\r\n" % (i, b"y" * 80) for i in range(2000))
    assert faults(raw, max_header_size=10_000) == ["headers.too_big"]


def test_eight_bit_headers_need_smtputf8_and_then_valid_utf8():
    raw = GOOD + b"Subject: caf\xc3\xa9\r\n\r\n"
    assert faults(raw, smtputf8=True) == []
    assert faults(GOOD + b"Subject: caf\xe9\r\n\r\n", smtputf8=True) == ["headers.bad_utf8"]


def test_singletons_and_required_headers_are_configurable():
    raw = GOOD + b"Received: a\r\nReceived: b\r\n\r\n"
    assert faults(raw) == []
    assert faults(raw, singletons=["Received"]) == ["headers.duplicate_received"]
    assert faults(GOOD + b"\r\n", require=["From", "Date", "Message-ID"]) == [
        "headers.missing_message_id"
    ]


def test_repair_offers_the_missing_headers():
    config = HeadersConfig(repair=["Message-ID", "date"])
    report = check_headers(b"From: a@b.example\r\n\r\n", config, smtputf8=False, now=NOW)
    by_rule = {f.rule: f.repair for f in report.faults}
    assert by_rule["headers.missing_date"] == (("Date", "Mon, 30 Nov 2026 12:00:00 +0000"),)
    [(name, value)] = by_rule["headers.missing_message_id"]
    assert name == "Message-ID" and value.startswith("<") and value.endswith("@localhost>")


def test_the_report_publishes_the_from_addresses():
    report = check_headers(GOOD + b"\r\n", HeadersConfig(), smtputf8=False, now=NOW)
    assert report.from_addresses == ("alice@example.net",)


def test_default_actions_reject_what_rfc_5322_forbids_and_tag_the_rest():
    book = rulebook(HeadersConfig(require=["From", "Date", "Message-ID"]))
    assert book.setting("headers.duplicate_from") == ("reject", 1.0)
    assert book.setting("headers.missing_date") == ("reject", 1.0)
    assert book.setting("headers.missing_message_id") == ("tag", 1.0)
    assert book.setting("headers.date_skew") == ("tag", 1.0)


def test_one_verdict_per_fault_with_enforced_rejects_last():
    book = rulebook(HeadersConfig())
    found = [
        Fault("headers.bad_date", "Date header does not parse"),
        Fault("headers.duplicate_from", "Duplicate From header"),
        Fault("headers.missing_date", "Missing Date header"),
    ]
    verdicts = book.decide(found)
    assert [v.rule for v in verdicts] == [
        "headers.bad_date",
        "headers.duplicate_from",
        "headers.missing_date",
    ]
    assert str(verdicts[1].reply()) == "550 5.6.0 Duplicate From header"
    # A monitored reject comes before the enforced ones, so the core always records it.
    book.overrides = {"headers.duplicate_from": RuleSetting(action="monitor")}
    book.settings = PluginSettings(rule_modes=book.default_rule_modes)
    assert book.default_rule_modes == {"headers.duplicate_from": "monitor"}
    verdicts = book.decide(found)
    assert [v.rule for v in verdicts][-1] == "headers.missing_date"
    assert verdicts[0].rule == "headers.bad_date" and verdicts[0].score == 1.0
    assert verdicts[1].rule == "headers.duplicate_from" and verdicts[1].reply() is not None
    book.overrides = {"headers.missing_date": RuleSetting(action="off")}
    assert [v.rule for v in book.decide(found)] == ["headers.bad_date", "headers.duplicate_from"]


# ------------------------------------------------------------------ over SMTP


def test_duplicate_from_is_refused_with_a_reply_that_names_it(make_gateway, upstream, decisions):
    gw = make_gateway(plugins={"headers": {}})
    path = FIXTURES / "headers.duplicate_from.eml"
    assert send_message(gw.port, eml(path)) == (550, b"5.6.0 Duplicate From header")
    assert upstream.messages == []
    [line] = decisions()
    assert "verdicts=headers.duplicate_from:reject" in line


def test_a_nul_in_a_header_is_refused_by_the_core_before_the_plugin(
    make_gateway, upstream, decisions
):
    gw = make_gateway(plugins={"headers": {}})
    assert send_message(gw.port, GOOD + b"X-Nul: a\x00b\r\n\r\nbody\r\n") == (
        550,
        b"5.6.0 NUL byte in message content",
    )
    assert upstream.messages == []
    [line] = decisions()
    assert "verdicts=protocol.nul:reject" in line and "headers." not in line


def test_a_good_message_passes_untouched(make_gateway, upstream):
    gw = make_gateway(plugins={"headers": {}})
    body = eml(FIXTURES / "ok-plain.eml")
    assert send_message(gw.port, body)[0] == 250
    assert upstream.messages[0].data.endswith(body)


def test_a_long_header_line_is_refused_though_the_protocol_allows_long_lines(make_gateway):
    gw = make_gateway(plugins={"headers": {}})
    body = GOOD + b"X-Long: " + b"x" * 3000 + b"\r\n\r\nbody\r\n"
    assert send_message(gw.port, body) == (550, b"5.6.0 Header line 3 longer than 998 octets")


def test_repair_adds_message_id_and_date(make_gateway, upstream, decisions):
    gw = make_gateway(plugins={"headers": {"repair": ["Message-ID", "Date"]}})
    assert (
        send_message(gw.port, b"From: alice@example.net\r\nSubject: hi\r\n\r\nbody\r\n")[0] == 250
    )
    [msg] = upstream.messages
    head = msg.data.split(b"\r\n\r\n")[0]
    assert b"\r\nMessage-ID: <" in head and b"@mailgate.test>" in head
    assert b"\r\nDate: " in head
    assert "headers.missing_date:tag" in decisions()[0]


def test_a_tag_adds_its_score(make_gateway, upstream):
    gw = make_gateway(
        plugins={"headers": {"rules": {"headers.duplicate_from": {"action": "tag", "score": 6}}}}
    )
    assert send_message(gw.port, eml(FIXTURES / "headers.duplicate_from.eml"))[0] == 250
    head = upstream.messages[0].data.split(b"\r\n\r\n")[0]
    assert b"X-Spam-Score: 6\r\n" in head and b"X-Spam-Flag: YES\r\n" in head


def test_monitor_under_rules_is_on_the_decision_line(make_gateway, upstream, decisions):
    gw = make_gateway(plugins={"headers": {"rules": {"headers.missing_date": "monitor"}}})
    assert send_message(gw.port, eml(FIXTURES / "headers.missing_date.eml"))[0] == 250
    assert "verdicts=headers.missing_date:reject(monitor)" in decisions()[-1]


def test_rule_modes_monitor_is_on_the_decision_line(make_gateway, upstream, decisions):
    gw = make_gateway(plugins={"headers": {"rule_modes": {"headers.missing_date": "monitor"}}})
    assert send_message(gw.port, eml(FIXTURES / "headers.missing_date.eml"))[0] == 250
    assert "verdicts=headers.missing_date:reject(monitor)" in decisions()[-1]


def test_eight_bit_headers_pass_with_smtputf8(make_gateway, tmp_path):
    gw = make_gateway(upstream=f"maildir:{tmp_path / 'mail'}", plugins={"headers": {}})
    body = GOOD + "Subject: café\r\n\r\nbody\r\n".encode()
    assert send_message(gw.port, body) == (
        550,
        b"5.6.0 8-bit bytes in header section without SMTPUTF8",
    )
    assert send_message(gw.port, body, b"<alice@example.net> SMTPUTF8")[0] == 250


def _load(text: str) -> Runtime:
    return Runtime.from_document(load(text, "p.yaml"))


def test_an_unknown_rule_id_is_a_policy_error():
    with pytest.raises(SourceError) as caught:
        _load("plugins:\n  headers:\n    rules: {headers.dupe_from: off}\n")
    [message] = caught.value.messages
    assert message.startswith("p.yaml:3:13: plugins.headers.rules.headers.dupe_from: ")
    assert "unknown rule id 'headers.dupe_from'" in message


def test_a_placeholder_rule_for_an_unconfigured_header_is_an_error():
    with pytest.raises(SourceError) as caught:
        _load("plugins:\n  headers:\n    rules: {headers.missing_subject: tag}\n")
    [message] = caught.value.messages
    assert message.startswith("p.yaml:2:3: plugins.headers: ")
    assert "unknown rule id headers.missing_subject" in message


def test_unquoted_off_in_yaml_means_off():
    runtime = _load("plugins:\n  headers:\n    rules: {headers.missing_date: off}\n")
    plugin = runtime.plugin_set.plugins["headers"].plugin
    assert plugin.book.setting("headers.missing_date") == ("off", 0.0)


def test_the_plain_section_reading_gives_the_line_by_line_answer() -> None:
    """``_split_plain`` answers only where the line-by-line reading finds no fault, and the same."""
    import random

    from mailgate.plugins.headers import _split_lines, _split_plain

    rng = random.Random(17)
    good = [b"From: a@b.example", b"Subject:x", b"To : c@d", b"X-Long: " + b"x" * 70,
            b" folded", b"\tfolded too", b"Empty:"]  # fmt: skip
    bad = [b"X-\xc3\xa9: v", b"Bad Name: v", b"NoColon", b":empty", b"  ", b"\t", b"",
           b"a\nb: c", b"d\re: f", b"X-Longer: " + b"y" * 300]  # fmt: skip
    ends = [b"\r\n\r\nbody\r\n", b"\r\n\r\n", b"\r\n", b"", b"\r\n\r\n" + b"z" * 900]
    configs = [HeadersConfig(), HeadersConfig(max_line_length=78, max_header_size=1000)]
    answered = 0
    for _ in range(5000):
        count = rng.randint(0, 30)
        lines = [rng.choice(good if rng.random() < 0.93 else bad) for _ in range(count)]
        raw = b"\r\n".join(lines) + rng.choice(ends)
        config = rng.choice(configs)
        fields, section, faults = _split_lines(raw, config)
        plain = _split_plain(raw, config)
        if plain is not None:
            answered += 1
            assert not faults, raw
            assert [(f.name, f.value) for f in plain[0]] == [(f.name, f.value) for f in fields]
            assert plain[1] == section, raw
    assert answered > 1000
