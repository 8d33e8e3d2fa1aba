"""rspamd, spamassassin and clamav: real daemons on loopback, SMTP through the gateway.

The daemons are private instances (``tests/scanners.py``) started once per test
session. Failures a real daemon will not produce on demand (a server that never
answers, one that closes mid-reply, one that answers garbage) come from
:class:`~tests.scanners.FakeScanner`, a loopback socket server.
"""

from __future__ import annotations

import asyncio
import base64
import json
import tracemalloc
import warnings
from collections.abc import Sequence
from typing import Any

import pytest

from mailgate.plugins.scanning import Server
from tests.ops_support import mailgate
from tests.scanners import EICAR, EICAR_SIGNATURE, GTUBE
from tests.support import MESSAGE

GTUBE_MESSAGE = MESSAGE.replace(b"Hello Bob.", b"Hello Bob.\r\n" + GTUBE.encode())
EICAR_MESSAGE = (
    b"From: Alice <alice@example.net>\r\nTo: Bob <bob@example.com>\r\nSubject: invoice\r\n"
    b"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\nMessage-ID: <2@example.net>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"
    b"--XX\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
    b"--XX\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
    b'Content-Disposition: attachment; filename="eicar.com"\r\n\r\n'
    + base64.encodebytes(EICAR.encode()).replace(b"\n", b"\r\n")
    + b"--XX--\r\n"
)
DEAD = "127.0.0.1:9"  # discard: nothing listens there on these machines


def scanner_policy(name: str, **config: Any) -> dict[str, Any]:
    config.setdefault("timeout", "5s")
    return {"plugins": {name: config}}


def send(
    gw: Any, message: bytes = MESSAGE, rcpts: Sequence[str] = ("bob@example.com",)
) -> tuple[int, bytes]:
    with gw.client() as client:
        assert client.mail("alice@example.net")[0] == 250
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        return client.data(message)


def headers_of(data: bytes) -> dict[str, str]:
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    out: dict[str, str] = {}
    for line in head.replace("\r\n\t", " ").replace("\r\n ", " ").split("\r\n"):
        name, _, value = line.partition(":")
        out.setdefault(name, value.strip())
    return out


def http_json(answer: dict[str, Any]) -> bytes:
    body = json.dumps(answer).encode()
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    )


# ------------------------------------------------------------------ shared parts


def test_scanner_server_addresses_parse_or_say_what_is_wrong():
    assert Server.parse("127.0.0.1:11333") == Server("127.0.0.1", 11333)
    assert str(Server.parse("[::1]:3310")) == "[::1]:3310"
    assert Server.parse("unix:/run/clamd.ctl").path == "/run/clamd.ctl"
    for bad in ("localhost", "unix:relative", "host:0", "[zz]:1"):
        with pytest.raises(ValueError):
            Server.parse(bad)


def test_folded_scanner_headers_stay_within_the_line_limit():
    from mailgate.plugins.scanning import folded

    value = folded("tests=" + ", ".join(f"RULE_{n}" for n in range(400)) + "\r\nBcc: x@y")
    lines = value.split("\r\n\t")
    assert len(lines) > 10 and max(len(line) for line in lines) <= 76
    assert "\r\nB" not in value and value.startswith("tests=RULE_0,")


def test_rspamd_spamassassin_clamav_bad_config_is_an_error_naming_the_key(make_gateway):
    from mailgate.yamlsource import SourceError

    with pytest.raises(SourceError, match=r"plugins\.rspamd.*unknown outcome bogus"):
        make_gateway(**scanner_policy("rspamd", servers=["127.0.0.1:1"], actions={"bogus": "tag"}))
    with pytest.raises(SourceError, match=r"plugins\.clamav\.servers"):
        make_gateway(**scanner_policy("clamav", servers=["nowhere"]))
    with pytest.raises(SourceError, match=r"plugins\.spamassassin\.on_error"):
        make_gateway(**scanner_policy("spamassassin", servers=[DEAD], on_error="ignore"))
    # no session has an authenticated user (no SMTP AUTH, no inbound XCLIENT): no such key
    with pytest.raises(SourceError, match=r"plugins\.rspamd\.exempt_authenticated"):
        make_gateway(**scanner_policy("rspamd", servers=[DEAD], exempt_authenticated=False))


# ------------------------------------------------------------------ rspamd


def test_rspamd_gtube_is_refused_with_its_smtp_message_and_never_reaches_upstream(
    make_gateway, rspamd, upstream, decisions
):
    gw = make_gateway(**scanner_policy("rspamd", servers=[rspamd.address]))
    assert send(gw, GTUBE_MESSAGE) == (550, b"5.7.1 Gtube pattern")
    assert upstream.messages == []
    line = decisions()[-1]
    assert "verdicts=rspamd.reject:reject" in line
    assert 'rspamd="reject 15/15 GTUBE' in line


def test_rspamd_request_carries_the_message_without_copying_it(rspamd):
    """The body goes out in slices of a view on the message: no second copy in memory.

    Given plain ``bytes``, aiohttp joins body and header block into one new
    buffer on this Python (before 3.12.9): the contrast below shows that copy.
    """
    import aiohttp
    from aiohttp import http_writer

    from mailgate.plugins._rspamdbody import MessageBody

    line = b"x" * 76 + b"\r\n"
    raw = MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n\r\n" + line * (8 * 1024**2 // len(line))

    async def scan(body: object) -> tuple[str, int]:
        async with aiohttp.ClientSession() as http:
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                url = f"http://{rspamd.address}/checkv2"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ResourceWarning)  # aiohttp's, for big bytes
                    async with http.post(url, data=body) as response:
                        answer = json.loads(await response.read())
                return answer["action"], tracemalloc.get_traced_memory()[1] - base
            finally:
                tracemalloc.stop()

    action, peak = asyncio.run(scan(MessageBody(raw)))
    assert action == "no action"
    assert peak < len(raw) // 8, f"{peak} bytes held while sending {len(raw)}"
    if getattr(http_writer, "SKIP_WRITELINES", False):  # aiohttp joins body and headers here
        _, copied = asyncio.run(scan(raw))
        assert copied >= len(raw)


def test_rspamd_clean_message_arrives_with_summary_headers_for_several_recipients(
    make_gateway, rspamd, upstream, decisions
):
    gw = make_gateway(**scanner_policy("rspamd", servers=[rspamd.address]))
    rcpts = ("bob@example.com", "carol@example.com")
    assert send(gw, rcpts=rcpts)[0] == 250
    received = upstream.messages[-1]
    assert received.recipients == list(rcpts)
    headers = headers_of(received.data)
    assert headers["X-Spam-Action"] == "no action"
    assert headers["X-Spam-Score"].endswith("/ 15.00")
    assert "X-Spam" not in headers
    assert received.data.endswith(MESSAGE)  # the message itself is untouched
    assert "verdicts=rspamd.clean:tag" in decisions()[-1]


@pytest.mark.parametrize(
    ("settings_id", "expected"),
    [
        ("mg_greylist", (451, b"4.7.1 Greylisted, try again later")),
        ("mg_add_header", (250, None)),
        ("mg_rewrite_subject", (250, None)),
        ("mg_reject", (550, b"5.7.1 Spam message rejected")),
    ],
)
def test_rspamd_each_action_maps_to_its_verdict(
    make_gateway, rspamd, upstream, settings_id, expected
):
    gw = make_gateway(**scanner_policy("rspamd", servers=[rspamd.address], settings_id=settings_id))
    code, text = send(gw)
    assert code == expected[0]
    if expected[1] is not None:
        assert text == expected[1]
        assert upstream.messages == []
        return
    headers = headers_of(upstream.messages[-1].data)
    assert headers["X-Spam"] == "Yes"
    if settings_id == "mg_rewrite_subject":
        assert headers["Subject"] == "*** SPAM *** hello"
        assert upstream.messages[-1].data.count(b"\r\nSubject:") == 1
    else:
        assert headers["X-Spam-Action"] == "add header"


def test_rspamd_over_a_unix_socket_refuses_gtube_and_tags_a_clean_message(
    make_gateway, rspamd, upstream, decisions
):
    gw = make_gateway(**scanner_policy("rspamd", servers=[f"unix:{rspamd.socket}"]))
    assert send(gw, GTUBE_MESSAGE) == (550, b"5.7.1 Gtube pattern")
    assert upstream.messages == []
    assert "verdicts=rspamd.reject:reject" in decisions()[-1]
    assert send(gw)[0] == 250  # the kept-alive unix connection is reused
    headers = headers_of(upstream.messages[-1].data)
    assert headers["X-Spam-Action"] == "no action"
    assert headers["X-Spam-Score"].endswith("/ 15.00")
    assert "verdicts=rspamd.clean:tag" in decisions()[-1]


def test_rspamd_soft_reject_tempfails_with_rspamd_message(make_gateway, rspamd, upstream):
    gw = make_gateway(**scanner_policy("rspamd", servers=[rspamd.address]))
    message = MESSAGE.replace(b"Subject: hello", b"Subject: hello\r\nX-Test-Soft-Reject: 1")
    assert send(gw, message) == (451, b"4.7.1 Test soft reject, try later")
    assert upstream.messages == []


def test_rspamd_actions_remap_reject_to_tag_and_add_score(
    make_gateway, rspamd, upstream, decisions
):
    gw = make_gateway(
        **scanner_policy(
            "rspamd", servers=[rspamd.address], actions={"reject": "tag"}, add_score=True
        ),
        scoring={"reject": 100},
    )
    assert send(gw, GTUBE_MESSAGE)[0] == 250
    headers = headers_of(upstream.messages[-1].data)
    assert headers["X-Spam"] == "Yes" and headers["X-Spam-Symbols"].startswith("GTUBE")
    assert "score=15 " in decisions()[-1]


def test_rspamd_monitor_mode_logs_the_reject_and_delivers(
    make_gateway, rspamd, upstream, decisions
):
    gw = make_gateway(**scanner_policy("rspamd", servers=[rspamd.address], mode="monitor"))
    assert send(gw, GTUBE_MESSAGE)[0] == 250
    assert len(upstream.messages) == 1
    assert "X-Spam-Action" not in headers_of(upstream.messages[-1].data)
    assert "rspamd.reject:reject(monitor)" in decisions()[-1]


def test_rspamd_message_over_max_size_is_not_scanned(make_gateway, rspamd, upstream, decisions):
    gw = make_gateway(**scanner_policy("rspamd", servers=[rspamd.address], max_size=100))
    assert send(gw, GTUBE_MESSAGE)[0] == 250
    assert "rspamd.too_big:tag" in decisions()[-1]


def test_rspamd_sends_envelope_facts_one_rcpt_header_per_recipient(
    make_gateway, fake_scanner, upstream
):
    fake = fake_scanner(http_json({"action": "no action", "score": 1.5, "required_score": 15,
                                   "symbols": {"R_X": {"score": 1.5}}}))  # fmt: skip
    gw = make_gateway(**scanner_policy("rspamd", servers=[fake.address], settings_id="inbound"))
    assert send(gw, rcpts=("bob@example.com", "carol@example.com"))[0] == 250
    request = fake.requests[0]
    head = request.split(b"\r\n\r\n")[0].decode().lower()
    assert head.startswith("post /checkv2 http/1.1")
    for expected in ("ip: 127.0.0.1", "helo: client.example.net", "from: <alice@example.net>",
                     "rcpt: <bob@example.com>", "rcpt: <carol@example.com>",
                     "settings-id: inbound", "mta-name: mailgate.test", "queue-id: "):  # fmt: skip
        assert expected in head
    assert "\r\nhostname:" not in head and "\r\nuser:" not in head  # none known: not sent
    assert request.endswith(MESSAGE)
    assert headers_of(upstream.messages[-1].data)["X-Spam-Symbols"] == "R_X"


def test_rspamd_long_symbol_lists_and_milter_headers_are_folded_and_sanitised(
    make_gateway, fake_scanner, upstream
):
    symbols = {f"SYMBOL_NUMBER_{n}": {"score": 0.1} for n in range(300)}
    answer = {"action": "add header", "score": 30, "required_score": 15, "symbols": symbols,
              "milter": {"add_headers": {"X-Spamd-Result": {"value": "default: " + "A " * 900,
                                                            "order": 0},
                                         "X-Evil": "x\r\nBcc: victim@example.org"},
                         "remove_headers": {"X-Old": 0}}}  # fmt: skip
    fake = fake_scanner(http_json(answer))
    gw = make_gateway(**scanner_policy("rspamd", servers=[fake.address]))
    message = MESSAGE.replace(b"Subject: hello", b"Subject: hello\r\nX-Old: forged")
    assert send(gw, message)[0] == 250
    data = upstream.messages[-1].data
    head = data.split(b"\r\n\r\n")[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 998
    assert b"\r\nBcc:" not in head and b"X-Old" not in head
    assert headers_of(data)["X-Spam-Symbols"].count("SYMBOL_NUMBER_") == 300


@pytest.mark.parametrize(
    "reply",
    [
        b'HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{"action": "rej',  # closed mid-reply
        http_json({"action": "discard", "score": 1}),  # an action we do not know
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnope",  # not JSON
        b"",  # closed without a word
    ],
    ids=["truncated", "unknown-action", "not-json", "closed"],
)
def test_rspamd_bad_answer_is_rspamd_error_and_tempfails(
    make_gateway, fake_scanner, upstream, decisions, reply
):
    fake = fake_scanner(reply)
    gw = make_gateway(**scanner_policy("rspamd", servers=[fake.address]))
    assert send(gw) == (451, b"4.7.1 Content scanner unavailable, try again later")
    assert upstream.messages == []
    assert "verdicts=rspamd.error:tempfail" in decisions()[-1]


def test_rspamd_not_running_tempfails_or_accepts_as_configured(make_gateway, upstream, decisions):
    gw = make_gateway(**scanner_policy("rspamd", servers=[DEAD]))
    assert send(gw)[0] == 451
    assert "verdicts=rspamd.unavailable:tempfail" in decisions()[-1]
    gw = make_gateway(**scanner_policy("rspamd", servers=[DEAD], on_error="accept"))
    assert send(gw)[0] == 250
    assert "verdicts=rspamd.unavailable:tag" in decisions()[-1]
    assert len(upstream.messages) == 1


def test_rspamd_server_that_never_answers_times_out_then_the_next_one_scans(
    make_gateway, fake_scanner, rspamd, upstream, decisions
):
    silent = fake_scanner(mode="silent")
    gw = make_gateway(
        **scanner_policy("rspamd", servers=[silent.address, rspamd.address], timeout="3s")
    )
    assert send(gw, GTUBE_MESSAGE)[0] == 550  # the second server's verdict
    gw = make_gateway(**scanner_policy("rspamd", servers=[silent.address], timeout="1s"))
    code, text = send(gw)
    assert code == 451 and b"4.7.1" in text
    assert "verdicts=rspamd.unavailable:tempfail" in decisions()[-1]


def test_rspamd_trusted_client_is_exempt(make_gateway, rspamd, upstream, decisions):
    gw = make_gateway(
        **scanner_policy("rspamd", servers=[rspamd.address]), trusted_networks=["127.0.0.0/8"]
    )
    assert send(gw, GTUBE_MESSAGE)[0] == 250
    assert "rspamd.exempt:tag" in decisions()[-1]


# ------------------------------------------------------------------ spamassassin


def test_spamassassin_gtube_over_reject_score_is_refused(make_gateway, spamd, upstream, decisions):
    gw = make_gateway(**scanner_policy("spamassassin", servers=[spamd.address]))
    assert send(gw, GTUBE_MESSAGE) == (550, b"5.7.1 Spam message rejected")
    assert upstream.messages == []
    line = decisions()[-1]
    assert "verdicts=spamassassin.reject:reject" in line
    assert 'spamassassin="True 1000' in line and "GTUBE" in line


def test_spamassassin_spam_below_reject_score_is_tagged_with_status_and_report(
    make_gateway, spamd, upstream
):
    gw = make_gateway(
        **scanner_policy(
            "spamassassin", servers=[spamd.address], reject_score=None, report_header=True
        )
    )
    assert send(gw, GTUBE_MESSAGE)[0] == 250
    headers = headers_of(upstream.messages[-1].data)
    assert headers["X-Spam-Flag"] == "YES"
    assert headers["X-Spam-Status"].startswith("Yes, score=1000")
    assert "GTUBE" in headers["X-Spam-Status"] and "GTUBE" in headers["X-Spam-Report"]


def test_spamassassin_clean_message_passes_with_headers_forged_ones_removed(
    make_gateway, spamd, upstream
):
    gw = make_gateway(**scanner_policy("spamassassin", servers=[spamd.address]))
    forged = MESSAGE.replace(b"Subject: hello", b"Subject: hello\r\nX-Spam-Flag: NO")
    assert send(gw, forged)[0] == 250
    data = upstream.messages[-1].data
    assert data.count(b"X-Spam-Flag:") == 1
    headers = headers_of(data)
    assert headers["X-Spam-Status"].startswith("No, score=")
    assert data.endswith(MESSAGE.split(b"\r\n\r\n", 1)[1])


def test_spamassassin_over_a_unix_socket_refuses_gtube_and_tags_a_clean_message(
    make_gateway, spamd, upstream, decisions
):
    gw = make_gateway(**scanner_policy("spamassassin", servers=[f"unix:{spamd.socket}"]))
    assert send(gw, GTUBE_MESSAGE) == (550, b"5.7.1 Spam message rejected")
    assert upstream.messages == []
    assert 'spamassassin="True 1000' in decisions()[-1]
    assert send(gw)[0] == 250
    headers = headers_of(upstream.messages[-1].data)
    assert headers["X-Spam-Flag"] == "NO"
    assert headers["X-Spam-Status"].startswith("No, score=")
    assert "verdicts=spamassassin.clean:tag" in decisions()[-1]


def test_spamassassin_closed_mid_reply_or_down_is_an_error_not_a_traceback(
    make_gateway, fake_scanner, upstream, decisions
):
    cut = fake_scanner(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 20\r\nSpam: Tru")
    gw = make_gateway(**scanner_policy("spamassassin", servers=[cut.address]))
    assert send(gw)[0] == 451
    assert "verdicts=spamassassin.error:tempfail" in decisions()[-1]
    gw = make_gateway(**scanner_policy("spamassassin", servers=[DEAD], on_error="accept"))
    assert send(gw)[0] == 250
    assert "verdicts=spamassassin.unavailable:tag" in decisions()[-1]


# ------------------------------------------------------------------ clamav


def test_clamav_eicar_is_refused_naming_the_signature(make_gateway, clamd, upstream, decisions):
    gw = make_gateway(**scanner_policy("clamav", servers=[clamd.address]))
    code, text = send(gw, EICAR_MESSAGE)
    assert (code, text) == (554, f"5.7.1 Virus found: {EICAR_SIGNATURE}.UNOFFICIAL".encode())
    assert upstream.messages == []
    assert f'clamav="{EICAR_SIGNATURE}.UNOFFICIAL FOUND' in decisions()[-1]


def test_clamav_clean_message_over_a_unix_socket_gets_x_virus_scanned(
    make_gateway, clamd, upstream
):
    gw = make_gateway(**scanner_policy("clamav", servers=[f"unix:{clamd.socket}"]))
    assert send(gw)[0] == 250
    assert headers_of(upstream.messages[-1].data)["X-Virus-Scanned"] == "clamav (mailgate)"


def test_clamav_found_as_tag_delivers_with_the_signature_and_score(
    make_gateway, clamd, upstream, decisions
):
    gw = make_gateway(
        **scanner_policy("clamav", servers=[clamd.address], actions={"found": "tag"}, score=3)
    )
    assert send(gw, EICAR_MESSAGE)[0] == 250
    assert headers_of(upstream.messages[-1].data)["X-Virus-Found"].startswith(EICAR_SIGNATURE)
    assert "clamav.found:tag" in decisions()[-1] and "score=3 " in decisions()[-1]


def test_clamav_found_as_quarantine_holds_eicar_in_the_spool(
    make_gateway, clamd, upstream, decisions, tmp_path
):
    policy = scanner_policy("clamav", servers=[clamd.address], actions={"found": "quarantine"})
    gw = make_gateway(**policy, queue={"directory": str(tmp_path / "spool")})
    code, text = send(gw, EICAR_MESSAGE)
    assert code == 250 and b"held as" in text
    assert upstream.messages == []
    [envelope] = (tmp_path / "spool" / "queue").glob("*.env")
    assert "clamav.found" in envelope.read_text()
    assert "clamav.found:quarantine" in decisions()[-1]


def test_clamav_error_answer_and_dead_first_server_fail_over(
    make_gateway, clamd, fake_scanner, upstream, decisions
):
    erring = fake_scanner(b"stream: Can't allocate memory ERROR\0", request_end=b"\0\0\0\0")
    gw = make_gateway(**scanner_policy("clamav", servers=[erring.address]))
    assert send(gw)[0] == 451
    assert "verdicts=clamav.error:tempfail" in decisions()[-1]
    gw = make_gateway(**scanner_policy("clamav", servers=[DEAD, clamd.address]))
    assert send(gw, EICAR_MESSAGE)[0] == 554


def test_clamav_failed_server_is_asked_last_for_retry_after_then_first_again(
    make_gateway, clamd, fake_scanner, upstream, decisions
):
    broken = fake_scanner(b"garbage\0", request_end=b"\0\0\0\0")
    policy = scanner_policy("clamav", servers=[broken.address, clamd.address])
    gw = make_gateway(**policy)
    assert send(gw)[0] == 250  # broken answered garbage; clamd scanned it
    assert send(gw)[0] == 250
    assert broken.connections == 1  # asked after clamd for retry_after (10s)
    policy["plugins"]["clamav"]["retry_after"] = "0s"
    gw = make_gateway(**policy)
    assert send(gw)[0] == 250 and send(gw)[0] == 250
    assert broken.connections == 3  # asked first every time


def test_clamav_recipients_listed_as_exempt_are_not_scanned(
    make_gateway, clamd, upstream, decisions
):
    gw = make_gateway(
        **scanner_policy("clamav", servers=[clamd.address], exempt_recipients=["example.com"])
    )
    assert send(gw, EICAR_MESSAGE)[0] == 250
    assert "clamav.exempt:tag" in decisions()[-1]


# ------------------------------------------------------------------ mailgate test


def test_mailgate_test_shows_the_rspamd_and_clamav_answers_in_its_trace(tmp_path, rspamd, clamd):
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        json.dumps({
            "hostname": "mailgate.test",
            "domains": ["example.com"],
            "plugins": {
                "rspamd": {"servers": [rspamd.address], "timeout": "5s"},
                "clamav": {"servers": [clamd.address], "timeout": "5s"},
            },
        })
    )  # fmt: skip
    eml = tmp_path / "gtube.eml"
    eml.write_bytes(GTUBE_MESSAGE)
    result = mailgate("test", "-c", str(policy), str(eml), "--client-ip", "127.0.0.1")
    assert result.returncode == 5, result.stdout + result.stderr
    assert "rspamd  rspamd.reject  reject" in result.stdout
    assert "rspamd: reject 15/15 GTUBE" in result.stdout
    assert "rspamd=" in result.stdout  # the decision line's entry
    eml.write_bytes(MESSAGE)
    result = mailgate("test", "-c", str(policy), str(eml), "--client-ip", "127.0.0.1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "clamav  clamav.clean  tag" in result.stdout
    assert "X-Virus-Scanned: clamav (mailgate)" in result.stdout


# ------------------------------------------------------------------ policy test cases


def test_content_example_cases_run_rspamd_spamassassin_clamav_on_declared_answers():
    result = mailgate("test", "--cases", "policies/examples/content.cases.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "11 cases in 1 files: 11 passed, 0 failed" in result.stdout


def test_cases_with_an_unknown_rspamd_answer_key_are_refused_with_its_position(tmp_path):
    cases = tmp_path / "p.cases.yaml"
    cases.write_text(
        "cases:\n  - name: x\n    from: a@example.net\n    to: b@example.com\n"
        "    scanners:\n      rspamd: {acton: reject}\n    expect: {outcome: reject}\n"
    )
    policy = tmp_path / "p.yaml"
    policy.write_text("hostname: t\ndomains: [example.com]\nplugins: {rspamd: {servers: [DEAD]}}\n"
                      .replace("DEAD", DEAD))  # fmt: skip
    result = mailgate("test", "--cases", str(cases))
    assert result.returncode == 2
    assert f"{cases}:5:" in result.stderr and "rspamd: unknown key acton" in result.stderr


# ------------------------------------------------------------------ all three


def test_rspamd_spamassassin_clamav_together_a_clean_message_carries_all_their_headers(
    make_gateway, rspamd, spamd, clamd, upstream, decisions
):
    gw = make_gateway(
        plugins={
            "clamav": {"servers": [clamd.address], "timeout": "5s"},
            "rspamd": {"servers": [rspamd.address], "timeout": "5s"},
            "spamassassin": {"servers": [spamd.address], "timeout": "5s"},
        }
    )
    assert send(gw)[0] == 250
    data = upstream.messages[-1].data
    headers = headers_of(data)
    head = data.split(b"\r\n\r\n")[0]
    names = ("X-Spam-Action", "X-Spam-Score", "X-Spam-Flag", "X-Spam-Status", "X-Virus-Scanned")
    for name in names:
        assert head.count(f"\r\n{name}:".encode()) == 1, name
    assert headers["X-Spam-Flag"] == "NO"
    assert data.endswith(MESSAGE)
    line = decisions()[-1]
    assert "clamav.clean:tag,rspamd.clean:tag,spamassassin.clean:tag" in line
    assert 'rspamd="no action' in line and 'spamassassin="False' in line
    assert 'clamav="OK' in line
    assert send(gw, EICAR_MESSAGE)[0] == 554  # clamd, first, refuses it
    assert len(upstream.messages) == 1


def test_cases_declare_a_clamav_that_never_answers_and_a_spamassassin_answer(tmp_path):
    (tmp_path / "p.yaml").write_text(
        "hostname: t\ndomains: [example.com]\nplugins:\n"
        f"  clamav: {{servers: ['{DEAD}'], timeout: 1s}}\n"
        f"  spamassassin: {{servers: ['{DEAD}'], reject_score: 8}}\n"
    )
    cases = tmp_path / "p.cases.yaml"
    cases.write_text(
        "defaults: {from: a@example.net, to: b@example.com}\n"
        "scanners: {clamav: {found: null}}\n"
        "cases:\n"
        "  - name: clamd hangs\n    scanners: {clamav: timeout}\n"
        "    expect: {outcome: tempfail, rules: [clamav.unavailable], reply: '451 4.7.1'}\n"
        "  - name: spamd says 9\n"
        "    scanners: {spamassassin: {spam: true, score: 9, rules: [X_A, X_B]}}\n"
        "    expect: {outcome: reject, rules: [clamav.clean, spamassassin.reject]}\n"
    )
    result = mailgate("test", "--cases", str(cases), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    traces = [c["trace"] for c in json.loads(result.stdout)["files"][0]["cases"]]
    reasons = [v["reason"] for step in traces[1]["steps"] for v in step["verdicts"]]
    assert any(r.startswith("spamd: True 9/5 X_A,X_B") for r in reasons)
