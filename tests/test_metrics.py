"""Prometheus metrics and /health, scraped over HTTP from a real gateway."""

from __future__ import annotations

import asyncio
import json
import re
import smtplib
import urllib.request
from pathlib import Path

import pytest

from mailgate.metrics import Metrics
from tests.ops_support import http_get, sample, scrape, wait_until
from tests.support import MESSAGE

RULE = "tests.ops_plugins:Rule"


def metrics_port(gw) -> int:
    bound = gw.gateway.metrics_server.bound
    assert bound is not None, "the metrics endpoint is not listening"
    return bound[1]


def test_connections_transactions_verdicts_and_upstream_are_counted(make_gateway, upstream):
    gw = make_gateway(
        metrics="127.0.0.1:0",
        scoring={"tag": 1, "reject": 50},
        plugins={
            "watch": {"module": RULE, "mode": "monitor", "rule": "probe.watch", "score": 3},
            "stamp": {"module": RULE, "hook": "on_data", "rule": "probe.stamp", "score": 1},
            "greet": {"module": RULE, "hook": "on_helo", "rule": "probe.greet"},
        },
    )
    port = metrics_port(gw)
    with gw.client() as client:
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
        client.sendmail("alice@example.net", ["carol@example.com"], MESSAGE)
    with gw.client() as client:
        client.mail("alice@example.net")
        assert client.rcpt("victim@elsewhere.org")[0] == 554
    assert wait_until(lambda: sample(scrape(port), "mailgate_connections_current") == 0)
    s = scrape(port)
    assert sample(s, "mailgate_connections_total") == 2
    assert sample(s, "mailgate_transactions_total", outcome="delivered", stage="data") == 2
    assert sample(s, "mailgate_transactions_total", outcome="aborted", stage="reset") == 1
    relay = {"plugin": "relay_access", "rule": "relay.denied", "action": "reject"}
    assert sample(s, "mailgate_verdicts_total", **relay, mode="enforce") == 1
    # Monitor mode: counted as "would have", and the score never reached the message.
    watch = {"plugin": "watch", "rule": "probe.watch", "action": "tag"}
    assert sample(s, "mailgate_verdicts_total", **watch, mode="monitor") == 3
    assert sample(s, "mailgate_verdicts_total", **watch, mode="enforce") == 0
    stamp = {"plugin": "stamp", "rule": "probe.stamp", "action": "tag"}
    assert sample(s, "mailgate_verdicts_total", **stamp, mode="enforce") == 2
    assert [m.data.count(b"X-Spam-Score: 1\r\n") for m in upstream.messages] == [1, 1]
    # The core's own verdicts count too (here: the score threshold) ...
    score_tag = {"plugin": "scoring", "rule": "score.tag", "action": "tag", "mode": "enforce"}
    assert sample(s, "mailgate_verdicts_total", **score_tag) == 2
    # ... and those of the connection's stages, once per EHLO.
    greet = {"plugin": "greet", "rule": "probe.greet", "action": "tag", "mode": "enforce"}
    assert sample(s, "mailgate_verdicts_total", **greet) == 2
    assert sample(s, "mailgate_upstream_replies_total", command="mail", **{"class": "2xx"}) == 3
    assert sample(s, "mailgate_upstream_replies_total", command="data", **{"class": "2xx"}) == 2
    assert sample(s, "mailgate_upstream_duration_seconds_count", command="data") == 2
    assert sample(s, "mailgate_stage_duration_seconds_count", stage="mail") == 3
    assert sample(s, "mailgate_stage_duration_seconds_count", stage="connect") == 2
    assert sample(s, "mailgate_stage_duration_seconds_count", stage="data") == 2
    assert sample(s, "mailgate_policy_loaded_timestamp_seconds") > 0


def test_per_plugin_latency_says_which_plugin_is_slow(make_gateway):
    gw = make_gateway(
        metrics="127.0.0.1:0",
        plugins={
            "slow": {"module": RULE, "hook": "on_mail", "delay": 0.08},
            "quick": {"module": RULE, "hook": "on_mail"},
        },
    )
    with gw.client() as client:
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    s = scrape(metrics_port(gw))
    name = "mailgate_plugin_duration_seconds"
    slow, quick = {"plugin": "slow", "hook": "on_mail"}, {"plugin": "quick", "hook": "on_mail"}
    assert sample(s, f"{name}_count", **slow) == 2
    assert sample(s, f"{name}_bucket", **slow, le="0.05") == 0
    assert sample(s, f"{name}_bucket", **slow, le="+Inf") == 2
    assert sample(s, f"{name}_sum", **slow) >= 0.16
    assert sample(s, f"{name}_count", **quick) == 2
    assert sample(s, f"{name}_bucket", **quick, le="0.05") == 2
    # Every hook a plugin implements is timed, the core's own plugins too.
    assert sample(s, f"{name}_count", plugin="slow", hook="on_data") == 2
    assert sample(s, f"{name}_count", plugin="relay_access", hook="on_rcpt") == 2
    # The sum over every plugin of a stage is (about) the stage's own time.
    mail_stage = sample(s, "mailgate_stage_duration_seconds_sum", stage="mail")
    on_mail = sum(
        value
        for (sample_name, labels), value in s.items()
        if sample_name == f"{name}_sum" and ("hook", "on_mail") in labels
    )
    assert on_mail <= mail_stage < on_mail + 0.05


def test_known_label_values_start_at_zero(make_gateway):
    gw = make_gateway(
        metrics="127.0.0.1:0",
        plugins={"stamp": {"module": RULE, "hook": "on_data"}},
    )
    s = scrape(metrics_port(gw))  # before any traffic
    for stage in ("connect", "helo", "mail", "rcpt", "data"):
        assert ("mailgate_stage_duration_seconds_count", frozenset({("stage", stage)})) in s
    delivered = frozenset({("outcome", "delivered"), ("stage", "data")})
    assert s[("mailgate_transactions_total", delivered)] == 0
    for hook in ("on_connect", "on_mail", "on_data"):
        labels = frozenset({("plugin", "stamp"), ("hook", hook)})
        assert s[("mailgate_plugin_duration_seconds_count", labels)] == 0
        assert s[("mailgate_plugin_errors_total", labels | {("kind", "timeout")})] == 0
    upstream_5xx = frozenset({("command", "data"), ("class", "5xx")})
    assert s[("mailgate_upstream_replies_total", upstream_5xx)] == 0
    assert s[("mailgate_policy_reloads_total", frozenset({("result", "failed")}))] == 0
    assert s[("mailgate_state_up", frozenset())] == 1


def test_declared_rules_start_at_zero_with_their_concrete_ids(make_gateway):
    gw = make_gateway(
        metrics="127.0.0.1:0",
        plugins={
            "spf": {"rule_modes": {"spf.softfail": "monitor", "spf.neutral": "off"}},
            "headers": {"require": ["From", "Date", "Message-ID"], "singletons": ["Subject"]},
            "ratelimit": {
                "rules": [
                    {"key": "client_ip", "rate": "100/1h", "name": "per_client"},
                    {"key": "sender", "rate": "5/1m", "name": "bulk", "action": "reject"},
                ]
            },
        },
    )
    status, text = http_get(metrics_port(gw), "/metrics")  # before any mail
    assert status == 200
    line = 'mailgate_verdicts_total{action="tag",mode="enforce",plugin="spf",rule="spf.fail"} 0.0'
    assert line in text.splitlines()
    s = scrape(metrics_port(gw))
    verdicts = "mailgate_verdicts_total"

    def has(**labels: str) -> bool:
        return s.get((verdicts, frozenset(labels.items()))) == 0

    assert has(plugin="spf", rule="spf.softfail", action="tag", mode="monitor")
    assert has(plugin="headers", rule="headers.missing_date", action="reject", mode="enforce")
    assert has(plugin="headers", rule="headers.missing_message_id", action="tag", mode="enforce")
    assert has(plugin="headers", rule="headers.duplicate_subject", action="reject", mode="enforce")
    assert has(plugin="ratelimit", rule="ratelimit.per_client", action="tempfail", mode="enforce")
    assert has(plugin="ratelimit", rule="ratelimit.bulk", action="reject", mode="enforce")
    assert has(plugin="relay_access", rule="relay.denied", action="reject", mode="enforce")
    hits = "mailgate_ratelimit_hits_total"
    assert s[(hits, frozenset({("rule", "ratelimit.bulk"), ("mode", "enforce")}))] == 0
    rules = {dict(labels)["rule"] for name, labels in s if name == verdicts}
    assert "spf.neutral" not in rules  # off: never counted
    assert not [rule for rule in rules if "<" in rule]  # placeholders only as concrete ids
    assert "headers.duplicate_from" not in rules  # only the configured singletons


def test_upstream_refusals_are_counted_by_class(make_gateway, upstream):
    gw = make_gateway(metrics="127.0.0.1:0")
    upstream.behaviour.rcpt_replies["nobody@example.com"] = "550 5.1.1 No such user"
    upstream.behaviour.data_reply = "451 4.3.0 Try later"
    with gw.client() as client:
        client.mail("alice@example.net")
        client.rcpt("bob@example.com")
        client.rcpt("nobody@example.com")
        assert client.data(MESSAGE)[0] == 451
    s = scrape(metrics_port(gw))
    assert sample(s, "mailgate_upstream_replies_total", command="rcpt", **{"class": "2xx"}) == 1
    assert sample(s, "mailgate_upstream_replies_total", command="rcpt", **{"class": "5xx"}) == 1
    assert sample(s, "mailgate_upstream_replies_total", command="data", **{"class": "4xx"}) == 1
    assert sample(s, "mailgate_transactions_total", outcome="tempfailed", stage="data") == 1


def test_plugin_errors_and_timeouts_are_counted(make_gateway):
    gw = make_gateway(
        metrics="127.0.0.1:0",
        plugins={"boom": {"module": RULE, "hook": "on_mail", "action": "raise"}},
    )
    with gw.client() as client:
        assert client.mail("alice@example.net")[0] == 451
    gw2 = make_gateway(
        metrics="127.0.0.1:0",
        plugins={
            "slow": {"module": RULE, "hook": "on_data", "action": "sleep", "timeout": "200ms"}
        },
    )
    with gw2.client() as client:
        client.mail("alice@example.net")
        client.rcpt("bob@example.com")
        assert client.data(MESSAGE)[0] == 451
    s1, s2 = scrape(metrics_port(gw)), scrape(metrics_port(gw2))
    errors = "mailgate_plugin_errors_total"
    assert sample(s1, errors, plugin="boom", hook="on_mail", kind="error") == 1
    assert sample(s2, errors, plugin="slow", hook="on_data", kind="timeout") == 1
    # Each gateway has its own registry: nothing leaks from one to the other.
    assert sample(s2, errors, plugin="boom", hook="on_mail", kind="error") == 0


def test_rate_limit_rules_are_counted_by_their_prefix(make_gateway):
    gw = make_gateway(
        metrics="127.0.0.1:0",
        plugins={
            "limiter": {
                "module": RULE,
                "hook": "on_rcpt",
                "action": "tempfail",
                "rule": "ratelimit.recipient",
                "only_recipient": "busy@example.com",
            },
            "shadow": {"module": RULE, "mode": "monitor", "rule": "ratelimit.client_ip"},
        },
    )
    with gw.client() as client:
        client.mail("alice@example.net")
        assert client.rcpt("busy@example.com")[0] == 450
        assert client.rcpt("bob@example.com")[0] == 250
    s = scrape(metrics_port(gw))
    hits = "mailgate_ratelimit_hits_total"
    assert sample(s, hits, rule="ratelimit.recipient", mode="enforce") == 1
    assert sample(s, hits, rule="ratelimit.client_ip", mode="monitor") == 1
    assert sample(s, hits, rule="relay.denied", mode="enforce") == 0


def test_health_answers_503_while_transactions_drain(make_gateway, loop_thread, upstream):
    gw = make_gateway(metrics="127.0.0.1:0")
    port = metrics_port(gw)
    assert http_get(port, "/health") == (200, "ok\n")
    client = gw.client()
    client.mail("alice@example.net")
    client.rcpt("bob@example.com")
    stopping = asyncio.run_coroutine_threadsafe(gw.gateway.stop(grace=60), loop_thread.loop)
    assert wait_until(lambda: http_get(port, "/health")[0] == 503)
    assert sample(scrape(port), "mailgate_draining") == 1
    with pytest.raises(OSError):
        smtplib.SMTP("127.0.0.1", gw.port, timeout=5)  # no longer accepting
    # The transaction in flight still completes, then the gateway stops.
    assert client.data(MESSAGE)[0] == 250
    client.close()
    stopping.result(30)
    assert len(upstream.messages) == 1
    with pytest.raises(OSError):
        http_get(port, "/health", timeout=2)


def test_http_errors_and_openmetrics(make_gateway):
    gw = make_gateway(metrics="127.0.0.1:0")
    port = metrics_port(gw)
    assert http_get(port, "/nope")[0] == 404
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    err.value.close()
    assert err.value.code == 405
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        assert resp.read().decode().rstrip().endswith("# EOF")


def test_the_grafana_dashboard_uses_only_metrics_that_exist():
    dashboard = json.loads(
        (Path(__file__).parent.parent / "docs" / "grafana" / "mailgate.json").read_text()
    )
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert exprs
    known = set()
    for family in Metrics().registry.collect():
        suffixes = {
            "counter": ["_total"],
            "gauge": [""],
            "histogram": ["_bucket", "_count", "_sum"],
        }
        known |= {family.name + suffix for suffix in suffixes[family.type]}
    used = {name for expr in exprs for name in re.findall(r"\bmailgate_\w+", expr)}
    assert used <= known, used - known
    assert {
        "mailgate_verdicts_total",
        "mailgate_upstream_duration_seconds_bucket",
        "mailgate_plugin_duration_seconds_bucket",
        "mailgate_state_up",
    } <= used
    # Imported, it asks for the data source; every panel and query uses that one.
    [source] = dashboard["__inputs"]
    assert source["name"] == "DS_PROMETHEUS" and source["pluginId"] == "prometheus"
    queries = json.dumps([dashboard["panels"], dashboard["templating"]])
    uids = re.findall(r'"uid": "([^"]*)"', queries)
    assert uids and set(uids) == {"${DS_PROMETHEUS}"}
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_reloads_are_counted_and_counters_carry_on(make_gateway, loop_thread):
    gw = make_gateway(metrics="127.0.0.1:0")
    port = metrics_port(gw)
    with gw.client() as client:
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    good = gw.policy_path.read_text()
    gw.policy_path.write_text(good.replace("domains:", "domians:"))
    assert loop_thread.run(gw.gateway.reload()) is False
    gw.policy_path.write_text(good)
    assert loop_thread.run(gw.gateway.reload()) is True
    with gw.client() as client:
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    s = scrape(port)
    assert sample(s, "mailgate_policy_reloads_total", result="failed") == 1
    assert sample(s, "mailgate_policy_reloads_total", result="ok") == 1
    # One transaction on the old runtime, one on the new: one set of counters.
    assert sample(s, "mailgate_transactions_total", outcome="delivered", stage="data") == 2
    # A reload may move the endpoint.
    gw.policy_path.write_text(good.replace("metrics: 127.0.0.1:0", "metrics: 127.0.0.2:0"))
    assert loop_thread.run(gw.gateway.reload()) is True
    assert gw.gateway.metrics_server.bound[0] == "127.0.0.2"
    assert sample(scrape(metrics_port(gw), "127.0.0.2"), "mailgate_connections_total") == 2


@pytest.mark.redis
def test_state_up_follows_the_redis_backend(make_gateway, redis_server):
    gw = make_gateway(
        metrics="127.0.0.1:0",
        state={"url": redis_server.url, "timeout": "1s"},
        plugins={"ratelimit": {"rules": [{"key": "client_ip", "rate": "1000/1h"}]}},
    )
    port = metrics_port(gw)

    def mail() -> int:
        with gw.client() as client:
            return client.mail("alice@example.net")[0]

    assert mail() == 250
    assert sample(scrape(port), "mailgate_state_up") == 1
    redis_server.stop()
    assert mail() == 451  # on_error: tempfail
    assert sample(scrape(port), "mailgate_state_up") == 0
    redis_server.start()
    assert mail() == 250
    assert sample(scrape(port), "mailgate_state_up") == 1
